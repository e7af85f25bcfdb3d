"""The CuPy backend: a package, because its fused driver and kernels live here.

* :mod:`.backend`: the backend object ``BACKEND`` (what ``get_backend("cupy")`` returns);
  importing it needs CuPy and a CUDA GPU, and raises ``BackendUnavailableError`` otherwise.
* :mod:`.fused`: the fused driver (``run_cupy``, ``run_fused``, ``certify``) and the rules
  that select it (``use_fused``, ``unsupported_reason``, ``AUTO_MAX_N``).
* :mod:`.executor`: where the kernels run (``Executor``, ``CupyExecutor``).
* :mod:`.kernels`: the kernels' parameter table, names and dtypes, and the CUDA source
  (``kernels.cu``, read as a package resource).
* :mod:`.options`: the run options (``CupyOptions``, ``options()``, ``current_options()``).

Every module but :mod:`.backend` imports without CuPy or a GPU (the tests run the driver on
NumPy), and so does this package: it imports none of them.
"""
