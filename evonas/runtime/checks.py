"""Argument checks shared by the search, full training and the worker backends.

Where it sits: search/config.py, fulltrain/config.py and runtime/backends.py check the
numbers and names a user typed with these functions before any work starts, so a rule
(what a GPU share may be, what counts as a whole number) is written once and every
flag that follows it says the same thing. Each check raises EvonasError with one line
that names the flag, the value and the fix; `flag` is the name the user typed
("--gpus-per-eval", "--gpus-per-trial"). Imports stay light: the registries of
datasets and architectures (torch) load only when a name is checked.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from evonas.errors import EvonasError


def real(value: Any) -> bool:
    """A finite int or float, and not a bool (True would pass as 1)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


def whole(flag: str, value: Any, *, minimum: int, hint: str = "") -> None:
    """A whole number >= minimum (counts, sizes, seeds)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvonasError(f"{flag} must be a whole number >= {minimum}, got {value!r}{hint}")


def positive(flag: str, value: Any, example: str = "1") -> None:
    """A finite number > 0 (CPUs per task, seconds)."""
    if not (real(value) and value > 0):
        raise EvonasError(f"{flag} must be a number > 0, e.g. {example}, got {value!r}")


def time_limit(flag: str, limit: Any) -> None:
    """None (no limit) or a finite number of seconds > 0."""
    if limit is not None:
        positive(flag, limit, example="1800 (seconds)")


def gpu_share(flag: str, share: Any) -> None:
    """GPUs one task holds: 0, 1/k below one GPU, a whole number above.

    Ray's fractional GPUs are logical only: 0.3 would pack three tasks on a GPU, each
    capping its memory at 30%, and leave a tenth of every GPU unused; 1.5 would hold a
    GPU and a half that no task can use as such.
    """
    if not (real(share) and share >= 0):
        raise EvonasError(f"{flag} must be a number >= 0, got {share!r}")
    if 0 < share < 1 and abs(1 / share - round(1 / share)) > 1e-6:
        raise EvonasError(f"{flag} {share:g} does not split a GPU evenly (1/{share:g} = "
                          f"{1 / share:.2f}): use 1/k, e.g. 0.5, 0.25, 0.2 or 0.125")
    if share > 1 and share != int(share):
        raise EvonasError(f"{flag} {share:g}: above 1 use whole GPUs, e.g. {math.ceil(share)}")


def known(flag: str, value: Any, names: Iterable[str], what: str) -> None:
    """value is one of `names`; the message lists them."""
    names = list(names)
    if value not in names:
        raise EvonasError(f"{flag}: unknown {what} {value!r}; use any of {', '.join(names)}")


def archs(flag: str, values: Iterable[str]) -> None:
    """Every name is an architecture of the model registry (proxy and full-size alike)."""
    from evonas.proxy.models import ARCHS

    for arch in values:
        known(flag, arch, ARCHS, "architecture")


def dataset(flag: str, value: str) -> None:
    from evonas.proxy.data import DATASETS

    known(flag, value, DATASETS, "dataset")


__all__ = ["real", "whole", "positive", "time_limit", "gpu_share", "known", "archs", "dataset"]
