"""``python -m eqsolve.bench``: see :mod:`eqsolve.bench.cli`."""

from .cli import main

raise SystemExit(main())
