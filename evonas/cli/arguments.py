"""Flag value types the subcommands share: comma-separated names and whole numbers."""

from __future__ import annotations

import argparse


def names(text: str) -> tuple[str, ...]:
    """A comma-separated flag value (--archs, --baselines, ...) as a tuple; '' is ()."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def whole_numbers(example: str):
    """An argparse type: a comma-separated list of whole numbers, its error naming
    `example` (e.g. "128,8"). Their range is the config's to check, with the flag's name."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(t) for t in names(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                             f"whole numbers, e.g. {example}") from None
    return parse
