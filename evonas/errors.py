"""Errors a user can fix.

Every check at the boundary (genome files, spaces, budgets, CLI arguments, data folders)
raises EvonasError with one line that names the problem and the fix. The CLI prints it
and exits with status 2 before any work starts or any file is written.
"""


class EvonasError(Exception):
    """A problem with the user's input; str(err) is the one-line message shown."""


class GenomeError(EvonasError):
    """A genome that is malformed or not a valid layer (cycle, arity, unknown op, ...)."""


class SpaceError(EvonasError):
    """A search space that cannot be found or is malformed."""
