"""`python -m evonas` runs the command line, as the `evonas` script does."""

import sys

from evonas.cli import main

sys.exit(main())
