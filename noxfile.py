"""Test, lint and type-check sessions for eqsolve (run ``nox``; list them with ``nox -l``).

* ``tests-<backend>``: the test suite restricted to one array library (EQSOLVE_TEST_BACKENDS),
  in its own virtualenv holding only that library. ``tests-numpy`` installs neither torch
  nor jax: it proves eqsolve works without them. ``tests-cupy`` skips itself, before
  installing anything, on a machine without a usable CUDA GPU.
* ``lint`` (ruff), ``typecheck`` (mypy on src/), ``demo`` (examples/quickstart.py) and
  ``readme`` (runs every Python block of README.md).

Every install goes through ``constraints.txt`` (torch pinned to the local CPU wheel). uv is
the virtualenv backend where it is installed (virtualenv + pip otherwise). uv ignores pip's
configuration, so pip's ``find-links`` folders are read here at run time and handed to uv
as ``UV_FIND_LINKS``: that is where the torch CPU wheel comes from.

All test runs pin every array library to one intra-op thread (see THREAD_ENV).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.needs_version = ">=2024.4"
nox.options.default_venv_backend = "uv|virtualenv"

BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "cupy")
nox.options.sessions = [f"tests-{b}" for b in BACKENDS] + ["lint", "typecheck", "readme"]

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))

#: One intra-op thread everywhere: a small VM stalls badly with more (a 64x256 matmul took
#: ~30 ms with 2 torch threads vs ~0.2 ms with 1 on a 2-core VM).
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}


def _pip_find_links() -> list[str]:
    """The ``find-links`` locations of pip's configuration (files and PIP_FIND_LINKS)."""
    links: list[str] = []
    for cmd in ([sys.executable, "-m", "pip"], [shutil.which("pip3") or "pip3"]):
        try:
            out = subprocess.run(
                [*cmd, "config", "list"], capture_output=True, text=True, timeout=60, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            # e.g.  global.find-links='/some/dir'   or   :env:.find-links='a b'
            m = re.match(r"^\S*\.find-links\s*=\s*(['\"]?)(.*)\1\s*$", line)
            if m:
                links += [v for v in m.group(2).split() if v not in links]
        break
    for v in os.environ.get("PIP_FIND_LINKS", "").split():
        if v not in links:
            links.append(v)
    return links


def _hand_pip_config_to_uv() -> None:
    """Make uv see the same local wheels as pip (an explicit UV_FIND_LINKS wins)."""
    if os.environ.get("UV_FIND_LINKS"):
        return
    links = _pip_find_links()
    if links:
        # uv reads a comma-separated list here (pip: space-separated)
        os.environ["UV_FIND_LINKS"] = ",".join(links)
        os.environ.setdefault("PIP_FIND_LINKS", " ".join(links))


_hand_pip_config_to_uv()


#: pytest-xdist spreads each session's tests over the cores (one thread per worker):
#: JAX's compile-heavy tests take half the time on 2 cores. Pass `-- -n 0` to turn it off.
XDIST = ("-n", "auto", "--maxprocesses", "4")


def _install(session: nox.Session, *args: str) -> None:
    session.install(*CONSTRAINTS, *args)


def _assert_absent(session: nox.Session, *modules: str) -> None:
    code = (
        "import importlib.util, sys\n"
        f"found = [m for m in {modules!r} if importlib.util.find_spec(m) is not None]\n"
        "sys.exit(f'these must not be installed in this session: {found}' if found else 0)\n"
    )
    session.run("python", "-c", code, silent=True)


def _pytest(session: nox.Session, backend: str, *extra: str) -> None:
    """Run the test suite on one backend (extra pytest arguments after `--`)."""
    env = {**THREAD_ENV, "EQSOLVE_TEST_BACKENDS": backend}
    # pytest exits 5 when it collected no test; nox treats any non-zero exit as a failure.
    session.run("pytest", *XDIST, *extra, *session.posargs, env=env)


@nox.session(name="tests-numpy")
def tests_numpy(session: nox.Session) -> None:
    """Tests on NumPy, with neither torch nor jax installed (plus the doctests)."""
    # scipy: the numpy peer rows of the benchmark (tests/test_bench_*.py, which import the
    # repository's bench/ package: pyproject's pytest `pythonpath` puts the root on sys.path)
    _install(session, "-e", ".[test]", "pytest-xdist", "scipy")
    _assert_absent(session, "torch", "jax", "cupy")
    _pytest(session, "numpy")
    if not session.posargs:
        session.run(
            "pytest", "--doctest-modules", "src/eqsolve/api.py", "src/eqsolve/__init__.py",
            env={**THREAD_ENV, "EQSOLVE_TEST_BACKENDS": "numpy"},
        )


@nox.session(name="tests-array_api_strict")
def tests_array_api_strict(session: nox.Session) -> None:
    """Tests on array-api-strict: proves the core uses only the Array API standard."""
    _install(session, "-e", ".[test]", "pytest-xdist")
    _pytest(session, "array_api_strict")


@nox.session(name="tests-torch")
def tests_torch(session: nox.Session) -> None:
    """Tests on PyTorch (the CPU wheel pinned in constraints.txt)."""
    _install(session, "-e", ".[test,torch]", "pytest-xdist", "torchdeq")
    session.run("python", "-c", "import torch; print('torch', torch.__version__)")
    _pytest(session, "torch")


@nox.session(name="tests-jax")
def tests_jax(session: nox.Session) -> None:
    """Tests on JAX (CPU)."""
    _install(session, "-e", ".[test,jax]", "pytest-xdist", "jaxopt", "optimistix")
    _pytest(session, "jax")


def _nvidia_gpu_present() -> bool:
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return False
    try:
        out = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


@nox.session(name="tests-cupy")
def tests_cupy(session: nox.Session) -> None:
    """Tests on CuPy; skipped (before any download) without a usable CUDA GPU."""
    if not _nvidia_gpu_present():
        session.skip("no CUDA GPU on this machine: cupy tests need one (nvidia-smi -L failed)")
    _install(session, "-e", ".[test,cupy]", "pytest-xdist")
    out = session.run(
        "python", "-c", "import cupy; print('cuda-available', cupy.cuda.is_available())",
        silent=True,
    )
    if "cuda-available True" not in str(out):
        session.skip("no CUDA GPU on this machine: cupy tests need one "
                     "(cupy.cuda.is_available() is False)")
    _pytest(session, "cupy")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on the sources, tests, benchmarks, examples and this file."""
    session.install("ruff")
    paths = ("src", "tests", "bench", "examples", "noxfile.py")
    targets = [t for t in paths if (ROOT / t).exists()]
    session.run("ruff", "check", *(session.posargs or targets))


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/ (settings in pyproject.toml), with torch and jax installed so
    the adapters are checked against the frameworks' own type hints."""
    _install(session, "-e", ".[torch,jax]", "mypy")
    session.run("mypy", *(session.posargs or ["src"]))


@nox.session
def bench(session: nox.Session) -> None:
    """The cross-backend benchmark, ``python -m bench`` from this folder (arguments after ``--``).

    The benchmark is the repository's ``bench/`` package, not part of the installed wheel; nox
    runs from the repository's root, where ``-m bench`` finds it.
    """
    _install(session, "-e", ".[torch,jax,bench]")
    session.chdir(ROOT)
    session.run("python", "-m", "bench", *session.posargs, env=THREAD_ENV)


@nox.session
def demo(session: nox.Session) -> None:
    """The README's first command: examples/quickstart.py on NumPy, PyTorch and JAX."""
    _install(session, "-e", ".[torch,jax]")
    session.run("python", "examples/quickstart.py", *session.posargs, env=THREAD_ENV)


@nox.session
def readme(session: nox.Session) -> None:
    """Run every ```python block of README.md, each in a fresh interpreter.

    A block that uses CuPy is skipped without a CUDA GPU (it needs one).
    """
    gpu = _nvidia_gpu_present()
    _install(session, "-e", ".[torch,jax,cupy]" if gpu else ".[torch,jax]", "array-api-strict")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)
    if not blocks:
        session.error("README.md has no ```python blocks")
    ran = 0
    for i, code in enumerate(blocks, 1):
        if "cupy" in code and not gpu:
            session.log(f"README block {i}: uses CuPy, skipped (no CUDA GPU here)")
            continue
        session.log(f"README block {i} of {len(blocks)}")
        session.run("python", "-c", code, env=THREAD_ENV)
        ran += 1
    session.log(f"README: {ran} of {len(blocks)} Python blocks ran")
