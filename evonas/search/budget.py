"""Search budgets and the ledger that spends them.

The CLI turns `--budget` into a Budget with parse_budget before any work starts. The
controller keeps one Ledger per search: each evaluation is charged the device-seconds it
used at every stage it went through, and counted once at the stage where it stopped. The
controller asks `can_start` before it launches an evaluation, stores `to_state()` in the
run folder's state.json after every finished evaluation, and prints `format_summary()`
at the end. A device budget is split between the search and the final full training of
the best layers with `Budget.split`. `check_spendable` refuses, before any work, a device
budget the evaluations or trials could never spend (CPU work under a gpu-h budget, a
gpu-h budget where there is no GPU): such a search would never stop.

Accepted budget texts (case and spaces between number and unit do not matter):

    200gpu-h, 0.5cpu-h   device-hours: hours of one whole device; an evaluation that held
                         a quarter of a GPU for 120 s costs 30 GPU-seconds
    45m, 1.5h, 90s       wall time since the search started, summed over resumes
    500evals             number of evaluations, whichever stage they stopped at
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Literal

from evonas.errors import EvonasError

Kind = Literal["device", "wall", "evals"]
DEVICES = ("gpu", "cpu")
# The share of a device budget the search may spend; the rest trains the finalists fully.
DEFAULT_SEARCH_FRACTION = 0.8

_FORMS = ("use device-hours (200gpu-h, 0.5cpu-h), wall time (45m, 1.5h, 90s) "
          "or an evaluation count (500evals)")
# One number then one unit, anchored, no nested repetition: matching is linear in the length.
_BUDGET_RE = re.compile(
    r"\s*(?P<number>\d+(?:\.\d+)?|\.\d+)\s*"
    r"(?:(?P<device>gpu|cpu)\s*-\s*h|(?P<wall>[hms])|(?P<evals>evals))\s*",
    re.IGNORECASE | re.ASCII,  # ASCII: \d must not accept other scripts' digits
)
_WALL_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_STATE_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """How much a search may spend.

    amount is in the budget's base unit: device-seconds for "device" (GPU-seconds when
    device is "gpu"), seconds for "wall", a count for "evals". str() gives the canonical
    text, which parse_budget reads back: device budgets in device-hours, wall budgets in
    the largest of h, m, s that gives a whole number (so "1.5h" reads back as "90m"),
    eval budgets as "<n>evals".
    """

    kind: Kind
    amount: float
    device: str | None = None

    def __post_init__(self) -> None:
        # Guards the constructor used by from_state and split; users go through parse_budget.
        if self.kind not in ("device", "wall", "evals"):
            raise ValueError(f"budget kind must be device, wall or evals, not {self.kind!r}")
        if not (isinstance(self.amount, (int, float)) and math.isfinite(self.amount)
                and self.amount > 0):
            raise ValueError(f"budget amount must be a positive finite number, not {self.amount!r}")
        if (self.device in DEVICES) != (self.kind == "device"):
            raise ValueError(f"a {self.kind} budget cannot have device {self.device!r}")
        if self.kind == "evals" and not float(self.amount).is_integer():
            raise ValueError(f"an evals budget must be a whole count, not {self.amount!r}")
        object.__setattr__(self, "amount", float(self.amount))

    def __str__(self) -> str:
        if self.kind == "device":
            return f"{_plain(self.amount / 3600.0)}{self.device}-h"
        if self.kind == "evals":
            return f"{int(self.amount)}evals"
        for unit, seconds in _WALL_UNITS.items():
            if (self.amount / seconds).is_integer():
                return f"{int(self.amount / seconds)}{unit}"
        return f"{_plain(self.amount)}s"

    @property
    def unit(self) -> str:
        """The unit a person reads totals in: gpu-h, cpu-h, h:mm:ss or evals."""
        return {"device": f"{self.device}-h", "wall": "h:mm:ss", "evals": "evals"}[self.kind]

    def format_amount(self, amount: float) -> str:
        """An amount in this budget's base unit, written in human units."""
        if self.kind == "device":
            return f"{_significant(amount / 3600.0)} {self.unit}"
        if self.kind == "wall":
            return _hms(amount)
        return f"{int(round(amount))} evals"

    def split(self, search_fraction: float = DEFAULT_SEARCH_FRACTION) -> tuple[Budget, Budget]:
        """(search part, full-training part), the search getting `search_fraction`.

        Device and wall budgets split: both parts are spent one after the other in the same
        unit, the full training of the finalists starting when the search part is spent.
        Evaluation counts do not: training the finalists is not a number of candidate
        evaluations, so no fraction of a count says how long it may take; such a budget
        raises EvonasError asking for device-hours or wall time instead.
        """
        if self.kind == "evals":
            raise EvonasError(
                f"budget {self} counts evaluations and cannot be split between search and "
                f"full training; give device-hours (200gpu-h) or wall time (1.5h) instead")
        if not (isinstance(search_fraction, (int, float)) and 0 < search_fraction < 1):
            raise EvonasError(
                f"search fraction {search_fraction!r} must lie strictly between 0 and 1 "
                f"(e.g. {DEFAULT_SEARCH_FRACTION}: {DEFAULT_SEARCH_FRACTION:.0%} search, "
                f"the rest full training)")
        search = self.amount * search_fraction
        # The training part is the remainder, so the two parts add up to the whole exactly.
        return (Budget(self.kind, search, self.device),
                Budget(self.kind, self.amount - search, self.device))


def parse_budget(text: str) -> Budget:
    """Read a --budget value; EvonasError with one line naming it and the accepted forms."""
    match = _BUDGET_RE.fullmatch(text)
    if match is None:
        raise _invalid(text)
    number = float(match["number"])
    if not math.isfinite(number):
        raise _invalid(text, "too large")
    if number == 0:
        raise _invalid(text, "must be more than 0")
    if match["device"]:
        return Budget("device", number * 3600.0, match["device"].lower())
    if match["wall"]:
        return Budget("wall", number * _WALL_UNITS[match["wall"].lower()])
    if not number.is_integer():
        raise _invalid(text, "an evaluation count must be a whole number")
    return Budget("evals", number)


def check_spendable(budget: Budget, gpu_share: float, *, gpus: float | None,
                    inline: bool = False, flag: str = "--gpus-per-eval",
                    tasks: str = "evaluations", where: str = "this machine") -> None:
    """Refuse a device budget the work could never spend; EvonasError naming the fix.

    A device budget is spent only by charges on its own device (Ledger.charge), and
    tasks are charged on the device they hold: CPU tasks never spend a gpu-h budget,
    GPU tasks never spend a cpu-h one, and such a search would run until killed.
    gpu_share: GPUs one task holds (flag names it); inline: tasks run in this process,
    which holds no GPU (--workers 0); gpus: GPUs where the tasks run (this machine's
    for an embedded Ray, a cluster's once connected: `where` names it), None where not
    known yet (a cluster before connecting). Wall-time and evaluation budgets bind
    whatever the tasks hold.
    """
    if budget.kind != "device":
        return
    if budget.device == "cpu":
        if gpu_share > 0:
            raise EvonasError(f"a cpu-h budget is never spent by {tasks} that hold a GPU "
                              f"({flag} {gpu_share:g}): budget in gpu-h (--budget "
                              f"{_plain(budget.amount / 3600.0)}gpu-h), or drop {flag}")
        return
    hint = "or budget in cpu-h or wall time"
    if gpu_share == 0:
        raise EvonasError(f"a gpu-h budget needs {tasks} that hold a GPU: pass {flag} 0.25 "
                          f"(and a machine or cluster with GPUs), {hint}")
    if inline:
        raise EvonasError(f"a gpu-h budget is never spent with --workers 0 ({tasks} in this "
                          f"process hold no GPU): pass --workers 1 or more, {hint}")
    if gpus is not None and gpus <= 0:
        raise EvonasError(f"a gpu-h budget needs a GPU but {where} has none: run where "
                          f"GPUs are (--ray-address of a cluster with GPUs), {hint}")


def cluster_check(budget: Budget, gpu_share: float, *, flag: str = "--gpus-per-eval",
                  tasks: str = "evaluations") -> Callable[[dict], None]:
    """check_spendable against a Ray cluster's GPUs, known once connected: the `admit`
    hook of runtime.cluster.connect (RayBackend, the full-training stage)."""
    def admit(resources: dict) -> None:
        check_spendable(budget, gpu_share, gpus=resources["gpus_total"], flag=flag,
                        tasks=tasks, where="the Ray cluster")
    return admit


def _invalid(text: str, reason: str = "") -> EvonasError:
    # repr() escapes newlines, so the message stays one line whatever was typed.
    shown = repr(text if len(text) <= 40 else text[:40] + "...")
    detail = f" ({reason})" if reason else ""
    return EvonasError(f"invalid budget {shown}{detail}; {_FORMS}")


@dataclass
class _Stage:
    evaluations: int = 0  # evaluations that stopped at this stage
    device_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DEVICES, 0.0))


class Ledger:
    """What a search has spent of its budget, by stage, surviving resumes.

    charge() adds device-seconds (seconds times the share of the device held) to a stage;
    count_evaluation() counts a finished evaluation once, at the stage where it stopped.
    Only charges on the budget's own device spend a device budget; the others are still
    shown in the summary. Wall time counts only while started: start() and stop() add
    the running time to a stored elapsed total, which is what to_state() keeps, because
    monotonic clock readings mean nothing in another process.
    """

    def __init__(self, budget: Budget, clock: Callable[[], float] = time.monotonic):
        self.budget = budget
        self._clock = clock
        self._stages: dict[str, _Stage] = {}
        self._evaluations = 0
        self._elapsed_stored = 0.0
        self._started_at: float | None = None

    # --- wall time ------------------------------------------------------------------

    def start(self) -> None:
        """Start (or, after from_state, resume) counting wall time; no-op if running."""
        if self._started_at is None:
            self._started_at = self._clock()

    def stop(self) -> None:
        """Stop counting wall time, keeping what has elapsed; no-op if stopped."""
        if self._started_at is not None:
            self._elapsed_stored = self.elapsed
            self._started_at = None

    @property
    def elapsed(self) -> float:
        """Wall seconds counted so far, over all runs of this search."""
        running = 0.0 if self._started_at is None else self._clock() - self._started_at
        return self._elapsed_stored + max(0.0, running)

    # --- charging -------------------------------------------------------------------

    def charge(self, stage: str, seconds: float, share: float = 1.0, *,
               device: str = "cpu") -> None:
        """Charge `stage` for `seconds` of measured time on `share` of one `device`.

        share is the fraction of the device the evaluation held (0.25 of a GPU, or 2 for
        two GPUs). Charge a GPU stage with device="gpu": the default is the CPU, where
        the cheap checks run, and CPU time does not spend a GPU budget.
        """
        if not (isinstance(stage, str) and stage):
            raise ValueError(f"stage must be a non-empty string, not {stage!r}")
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be finite and >= 0, not {seconds!r}")
        if not (math.isfinite(share) and share > 0):
            raise ValueError(f"share must be finite and > 0, not {share!r}")
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
        self._stage(stage).device_seconds[device] += seconds * share

    def count_evaluation(self, stopped_at: str) -> None:
        """Count one finished evaluation, once, at the stage where it stopped."""
        if not (isinstance(stopped_at, str) and stopped_at):
            raise ValueError(f"stopped_at must be a non-empty string, not {stopped_at!r}")
        self._stage(stopped_at).evaluations += 1
        self._evaluations += 1

    def _stage(self, name: str) -> _Stage:
        # First use fixes a stage's row, so the summary lists stages in pipeline order.
        return self._stages.setdefault(name, _Stage())

    @property
    def evaluations(self) -> int:
        return self._evaluations

    def device_seconds(self, device: str) -> float:
        """Device-seconds charged on `device` over all stages."""
        return sum(s.device_seconds[device] for s in self._stages.values())

    # --- the budget -----------------------------------------------------------------

    @property
    def spent(self) -> float:
        """Spent so far in the budget's base unit (device-seconds, seconds or a count)."""
        if self.budget.kind == "device":
            return self.device_seconds(self.budget.device)
        if self.budget.kind == "wall":
            return self.elapsed
        return float(self._evaluations)

    @property
    def remaining(self) -> float:
        """Left in the budget's base unit; 0 once spent, never negative."""
        return max(0.0, self.budget.amount - self.spent)

    @property
    def fraction_spent(self) -> float:
        """spent / budget; above 1 when the last evaluations overran the budget."""
        return self.spent / self.budget.amount

    def exhausted(self) -> bool:
        return self.spent >= self.budget.amount

    def can_start(self, expected_cost: float = 0.0) -> bool:
        """Whether new work may start: budget left, and at least `expected_cost` of it.

        expected_cost is in the budget's base unit (device-seconds, seconds, evaluations).
        Running evaluations are not stopped; they are charged in full when they finish.
        """
        remaining = self.remaining
        return remaining > 0 and expected_cost <= remaining

    # --- reporting ------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Figures per stage and in total; stage figures add up to the totals."""
        totals = {d: self.device_seconds(d) for d in DEVICES}
        stages = {
            name: {
                "evaluations": s.evaluations,
                "device_seconds": dict(s.device_seconds),
                "share": {d: (s.device_seconds[d] / totals[d] if totals[d] else 0.0)
                          for d in DEVICES},
            }
            for name, s in self._stages.items()
        }
        return {
            "budget": str(self.budget),
            "kind": self.budget.kind,
            "device": self.budget.device,
            "amount": self.budget.amount,
            "spent": self.spent,
            "remaining": self.remaining,
            "fraction_spent": self.fraction_spent,
            "evaluations": self._evaluations,
            "elapsed_s": self.elapsed,
            "device_seconds": totals,
            "stages": stages,
        }

    def format_summary(self) -> str:
        """A table per stage (evaluations stopped there, device-hours, share) and totals."""
        s = self.summary()
        devices = [d for d in DEVICES if s["device_seconds"][d] > 0 or d == self.budget.device]
        header = ["stage", "evals"] + [c for d in devices for c in (f"{d}-h", "share")]
        rows = [[name, str(st["evaluations"])]
                + [c for d in devices for c in (_significant(st["device_seconds"][d] / 3600.0),
                                               f"{st['share'][d]:.1%}")]
                for name, st in s["stages"].items()]
        rows.append(["total", str(s["evaluations"])]
                    + [c for d in devices
                       for c in (_significant(s["device_seconds"][d] / 3600.0),
                                 "100.0%" if s["device_seconds"][d] else "0.0%")])
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                           for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
                 for r in [header] + rows]
        b = self.budget
        lines.append(f"budget {b}: spent {b.format_amount(s['spent'])}, "
                     f"left {b.format_amount(s['remaining'])} "
                     f"({s['fraction_spent']:.1%} spent), wall time {_hms(s['elapsed_s'])}")
        return "\n".join(lines)

    # --- resume ---------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """A JSON-safe snapshot; wall time is stored as elapsed seconds."""
        return {
            "version": _STATE_VERSION,
            "budget": {"kind": self.budget.kind, "amount": self.budget.amount,
                       "device": self.budget.device},
            "elapsed_s": self.elapsed,
            "evaluations": self._evaluations,
            "stages": {name: {"evaluations": s.evaluations,
                              "device_seconds": dict(s.device_seconds)}
                       for name, s in self._stages.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any],
                   clock: Callable[[], float] = time.monotonic) -> Ledger:
        """The ledger to_state() saved, stopped: call start() to go on counting wall time."""
        try:
            if state["version"] != _STATE_VERSION:
                raise ValueError(f"version {state['version']!r} is not {_STATE_VERSION}")
            b = state["budget"]
            ledger = cls(Budget(b["kind"], b["amount"], b["device"]), clock)
            ledger._elapsed_stored = _non_negative(state["elapsed_s"])
            for name, st in state["stages"].items():
                stage = ledger._stage(str(name))
                stage.evaluations = _count(st["evaluations"])
                for d in DEVICES:
                    stage.device_seconds[d] = _non_negative(st["device_seconds"][d])
            ledger._evaluations = _count(state["evaluations"])
            if ledger._evaluations != sum(s.evaluations for s in ledger._stages.values()):
                raise ValueError("evaluation counts do not add up")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise EvonasError(f"budget ledger in the run state is malformed ({err!s}); "
                              f"restore state.json or start a new run folder") from None
        return ledger


def _non_negative(x: Any) -> float:
    x = float(x)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{x!r} is not a finite non-negative number")
    return x


def _count(x: Any) -> int:
    if not (isinstance(x, int) and not isinstance(x, bool) and x >= 0):
        raise ValueError(f"{x!r} is not a count")
    return x


def _plain(x: float) -> str:
    """Shortest decimal text of x without an exponent ("0.4", "200", "0.00002")."""
    if x.is_integer():
        return str(int(x))
    return format(Decimal(repr(x)), "f")


def _significant(x: float, digits: int = 3) -> str:
    """x with `digits` significant figures and no exponent: 1.20, 199, 0.000123, 1230."""
    if x == 0:
        return "0"
    places = digits - 1 - math.floor(math.log10(abs(x)))
    rounded = round(x, places)
    # Rounding up can add a digit (9.996 -> 10.0); count places again from the result.
    places = digits - 1 - math.floor(math.log10(abs(rounded)))
    rounded = round(x, places)
    return f"{rounded:.{max(places, 0)}f}"


def _hms(seconds: float) -> str:
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"
