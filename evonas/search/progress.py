"""The live progress line of a search, and its closing summary.

On a terminal the line is redrawn in place; in a log file (CI, a cluster job) a line is
written every `every` seconds, so logs stay readable.

Each finished candidate counts once, under its outcome (state.py): a candidate equal to an earlier
one is a duplicate whether that one survived (its fitness reused) or was rejected (its
verdict reused), and "rejected" lists the stages that rejected a layer on its own.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, every: float = 30.0, clock=time.monotonic):
        # sys.stderr as it is now, not at import: a caller may have replaced it since.
        stream = sys.stderr if stream is None else stream
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self.clock = clock
        self._last = -float("inf")
        self._start = clock()
        self._start_count: int | None = None

    def line(self, *, evaluated: int, outcomes: Counter, best: float | None,
             spent: str, left: str, in_flight: int) -> str:
        """outcomes: finished candidates counted by state.outcome."""
        if self._start_count is None:
            self._start_count = evaluated
        minutes = max(self.clock() - self._start, 1e-9) / 60
        rate = (evaluated - self._start_count) / minutes
        rejected = " ".join(f"{key.split(':', 1)[1]} {n}" for key, n in outcomes.items()
                            if key.startswith("rejected:")) or "none"
        best_text = f"{best:.4f}" if best is not None else "-"
        return (f"evaluated {evaluated} (survivors {outcomes['survivor']}, duplicates "
                f"{outcomes['duplicate']}, failed {outcomes['failed']}; rejected: {rejected}) | "
                f"best {best_text} | spent {spent}, left {left} | {rate:.1f}/min | "
                f"running {in_flight}")

    def show(self, text: str, force: bool = False) -> None:
        now = self.clock()
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
        elif force or now - self._last >= self.every:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last = now

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
