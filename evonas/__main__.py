"""`python -m evonas` runs the command line, as the `evonas` script does."""

import sys

from evonas.cli import main

# Guarded: processes started by spawn (the search's MLflow writer) import this module again.
if __name__ == "__main__":
    sys.exit(main())
