"""The cross-backend benchmark: ``python -m eqsolve.bench`` (see :mod:`eqsolve.bench.cli`).

Modules: ``problems`` (the problems as data, with float64 references), ``case`` (one problem
on one backend), ``peers`` (torchdeq, jaxopt, optimistix, scipy rows), ``instrument``
(f-evaluation counts and residual histories), ``timing``, ``runner`` (one row), ``report``
(ratios, targets, tables, JSON), ``plots`` and ``session`` (one run).
"""
