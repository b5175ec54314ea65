"""The `evonas` command line.

Each module of this package adds its subcommands to the parser (`add_parsers`) and keeps
its heavy imports (torch, sympy, ray, mlflow) inside the handlers, so `evonas --help` and
argument errors answer at once. Every user-fixable problem ends in one line on stderr and
exit status 2, before any work starts and before any file is written. A reader that leaves
early (`evonas top RUN | head -3`) ends the command quietly, as it ends cat or grep.
"""

from __future__ import annotations

import argparse
import os
import select
import sys

from evonas import __version__
from evonas.errors import EvonasError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse's own print the usage block first)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> Parser:
    from evonas.cli import calibrate, dashboards, layers, search, train

    parser = Parser(prog="evonas", description="Evolve normalization-activation layers.")
    parser.add_argument("--version", action="version", version=f"evonas {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    layers.add_parsers(sub)
    search.add_parsers(sub)
    train.add_parsers(sub)
    calibrate.add_parsers(sub)
    dashboards.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args) or 0
        sys.stdout.flush()  # so a reader that left shows up here rather than at exit
        return status
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        return _quiet_stdout()
    except EvonasError as err:
        print(f"evonas {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it, so that a BrokenPipeError from a
    socket (Ray, MLflow) is never mistaken for it and silenced."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout
        return False
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _quiet_stdout() -> int:
    """Point stdout at devnull, because Python flushes it again at exit and would print a
    second BrokenPipeError; exit 1, as Python does on EPIPE (docs: "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1
