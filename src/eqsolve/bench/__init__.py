"""Moved: the benchmark is the repository's top-level ``bench/`` package, outside the wheel.

From the root of a clone: ``python -m bench`` (this shim, kept for one release, forwards
``python -m eqsolve.bench`` there when ``bench`` is importable).
"""

MOVED = (
    "the benchmark moved out of the eqsolve package to the repository's bench/ folder: "
    "from the root of a clone (git clone, then pip install -c constraints.txt "
    '-e ".[torch,jax,bench]"), run python -m bench'
)
