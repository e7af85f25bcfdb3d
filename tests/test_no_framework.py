"""``import eqsolve`` and a NumPy solve work with neither torch nor jax (nor cupy) importable,
and the backend-neutral core never imports a framework."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

import eqsolve

FRAMEWORKS = ("torch", "jax", "jaxlib", "cupy")

_BLOCK_META_PATH = f"""
import sys

class _Blocker:
    # refuses every framework import, as if the packages were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {FRAMEWORKS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test)", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
for _name in list(sys.modules):
    assert _name.split(".")[0] not in {FRAMEWORKS!r}, _name
"""

# (``sys.modules["jax"] = None`` is *not* used to simulate a missing package here: that
# state does not occur with an uninstalled package, and array_api_compat's
# ``_issubclass_fast`` does ``getattr(sys.modules["jax"], "Array")`` on it and crashes inside
# ``array_api_extra.at`` -- an array_api_compat quirk, not an eqsolve one. The meta-path
# blocker below reproduces "not installed" faithfully: the modules never enter sys.modules.)

_BODY = f"""
import numpy as np
import eqsolve

def loaded():
    return sorted(
        n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in {FRAMEWORKS!r}
    )

assert loaded() == [], loaded()

for solver in ("anderson", "broyden", "picard"):
    sol = eqsolve.fixed_point(np.cos, np.zeros((3, 2)), solver=solver, tol=1e-10)
    assert bool(sol.converged.all()), (solver, sol.status)
    assert abs(float(sol.value[0, 0]) - 0.7390851332151607) < 1e-8, sol.value
    assert type(sol.value) is np.ndarray

# a failing solve reports through the warning machinery without any framework
import warnings
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    sol = eqsolve.fixed_point(np.cos, np.zeros((3, 2)), solver="picard", tol=1e-12, max_iter=2)
assert [w.category for w in rec] == [eqsolve.ConvergenceWarning], rec

EXTRAS = (("torch", "eqsolve[torch]"), ("jax", "eqsolve[jax]"), ("cupy", "eqsolve[cupy]"))
for name, extra in EXTRAS:
    try:
        eqsolve.fixed_point(np.cos, np.zeros((3, 2)), backend=name)
    except eqsolve.BackendUnavailableError as exc:
        msg = str(exc)
        assert "pip install" in msg and extra in msg and repr(name) in msg, msg
    else:
        raise AssertionError(f"backend={{name!r}} did not raise BackendUnavailableError")

assert loaded() == [], loaded()
print("EQSOLVE-NO-FRAMEWORK-OK")
"""


def test_numpy_solve_without_frameworks():
    code = textwrap.dedent(_BLOCK_META_PATH) + textwrap.dedent(_BODY)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "EQSOLVE-NO-FRAMEWORK-OK" in proc.stdout


def test_blocker_is_effective():
    """The meta-path blocker really makes ``import torch`` fail (so the test above can fail)."""
    code = textwrap.dedent(_BLOCK_META_PATH) + "import torch\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "blocked by test" in proc.stderr


# --------------------------------------------------------------------------- static check

CORE = pathlib.Path(eqsolve.__file__).parent / "core"
ALLOWED_THIRD_PARTY = {"array_api_compat", "array_api_extra"}
FORBIDDEN = {"numpy", "torch", "jax", "jaxlib", "cupy", "array_api_strict", "scipy", "tensorflow"}


def _imported_modules(tree: ast.AST) -> list[tuple[str, int]]:
    """Absolute module names imported anywhere in ``tree`` (also inside functions), plus
    string arguments of ``importlib.import_module`` / ``__import__`` calls."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Call):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if fname in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    if not arg.value.startswith("."):
                        found.append((arg.value, node.lineno))
                else:
                    found.append(("<dynamic import>", node.lineno))
    return found


def test_core_files_found():
    files = sorted(CORE.glob("*.py"))
    names = {f.name for f in files}
    assert {"loop.py", "anderson.py", "broyden.py", "picard.py", "validation.py"} <= names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_framework(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for module, lineno in _imported_modules(tree):
        top = module.split(".")[0]
        if top in FORBIDDEN or (top not in stdlib and top not in ALLOWED_THIRD_PARTY):
            bad.append(f"{path.name}:{lineno}: imports {module}")
    assert not bad, "\n".join(bad)


def test_static_checker_detects_imports():
    """The checker itself flags framework imports in every form (so the test can fail)."""
    src = textwrap.dedent(
        """
        import numpy as np
        from torch import nn
        import jax.numpy
        def f():
            import cupy
            importlib.import_module("array_api_strict")
        from . import loop
        from .solution import Status
        """
    )
    tops = {m.split(".")[0] for m, _ in _imported_modules(ast.parse(src))}
    assert tops == {"numpy", "torch", "jax", "cupy", "array_api_strict"}
