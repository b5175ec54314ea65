"""One line for a failure: how outcomes, trial records and connection errors name an
exception (progress lines, state.json and MLflow all show it on one line)."""

from __future__ import annotations

# Long enough for a path and a shape, short enough for one line of the progress display.
REASON_CHARS = 300


def reason(err: BaseException) -> str:
    """An exception's type and the first line of its message, capped."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return one_line(text)


def one_line(text: str) -> str:
    """The first line of text, capped at REASON_CHARS."""
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= REASON_CHARS else line[: REASON_CHARS - 3] + "..."


__all__ = ["reason", "one_line", "REASON_CHARS"]
