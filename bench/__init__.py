"""The cross-backend benchmark of eqsolve, run from a clone: ``python -m bench``.

It lives outside the installed package (the wheel holds eqsolve alone); see :mod:`bench.cli`
for the command. Modules, one job each:

* ``cli`` (the command line), ``machine`` (threads, backends, versions), ``session`` (one
  run: plan, measure, report, write);
* the problems: ``problems`` (the registry and their definitions), ``native`` (float64
  parameters onto a backend), ``tanh``, ``digits`` (the trained cell, its data in
  ``data/digits_cell.npz``, and its accuracy), ``conv``; ``case`` (one problem on one
  backend);
* the measurement: ``instrument`` (f-evaluation counts and residual histories), ``timing``,
  ``runner`` (one row), ``peers`` (torchdeq, jaxopt, optimistix and scipy rows);
* the output: ``report`` (ratios, targets, tables, JSON) and ``plots``.

Scripts: ``jax_gradients``, ``torch_gradients`` and ``train_digits_cell`` (``python -m
bench.<name>``).
"""
