"""``python -m eqsolve.bench``: deprecated, forwards to ``python -m bench`` (see __init__)."""

import importlib
import sys
import warnings

from . import MOVED

try:
    cli = importlib.import_module("bench.cli")  # the clone's bench/ package, if on the path
except ImportError as exc:
    if exc.name not in ("bench", "bench.cli"):
        raise
    sys.exit(f"eqsolve.bench: {MOVED}")
warnings.warn(f"python -m eqsolve.bench is deprecated: {MOVED}", DeprecationWarning, 1)
sys.exit(cli.main())
