"""evonas: evolve normalization-activation layers over graphs of primitive tensor ops.

Importing the package is cheap: torch, sympy, ray and mlflow load only in the modules
that use them, so `evonas --help` answers at once.
"""

__version__ = "0.1.0"
