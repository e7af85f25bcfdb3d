"""The shape of the code: layers that import only downward, no import circles, small files.

Layers of ``src/eqsolve`` (lowest first)::

    core       pure Array-API math (never a framework)
    backends   one module or package per array library: namespace, conversion, loop driver
    adapters   framework-native entry points and their shared vocabulary (backward spec,
               failure reports, the array adapter ``solve``)
    entry      ``api``, ``torch``, ``jax``, ``cupy``, the package ``__init__`` (and the
               ``bench`` deprecation shim)

A module may import modules of its own layer or below. Every import counts, also those made
inside functions (a lazy import still ties the modules together) and under
``TYPE_CHECKING``. The benchmark (top-level ``bench/``) is checked for circles too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
LAYERS = {"core": 0, "backends": 1, "adapters": 2}
ENTRY = 3
MAX_LINES = 600


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(base: Path, package: str) -> dict[str, Path]:
    root = base / package.replace(".", "/")
    return {_module_name(p, base): p for p in sorted(root.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The modules of ``known`` that module ``name`` imports (any position in the file)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from . import x` / `from .pkg import mod` import submodules when they exist
            targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `a.b.c` where only `a.b` is a module
                t = t.rpartition(".")[0]
            if t and t != name:
                yield t


def _graph(base: Path, package: str) -> dict[str, set[str]]:
    mods = _modules(base, package)
    known = set(mods)
    return {m: set(_imports(m, p, known)) for m, p in mods.items()}


def _rank(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], ENTRY) if len(parts) > 1 else ENTRY


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_what_it_claims():
    graph = _graph(SRC, "eqsolve")
    assert "eqsolve.core.loop" in graph["eqsolve.core.driver"]
    assert "eqsolve.adapters.array" in graph["eqsolve.api"]
    assert "eqsolve.adapters.torch" in graph["eqsolve.api"]  # lazy, inside a function
    # a circle is found when there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_upward_imports():
    graph = _graph(SRC, "eqsolve")
    upward = sorted(
        f"{m} -> {t}" for m, targets in graph.items() for t in targets
        if t != "eqsolve" and _rank(t) > _rank(m)
    )
    assert upward == []


def test_no_import_circles_in_the_package():
    graph = _graph(SRC, "eqsolve")
    # the package __init__ imports its entry points, and every submodule import runs it:
    # leave it out, it is the top of the graph by construction
    graph = {m: {t for t in ts if t != "eqsolve"} for m, ts in graph.items() if m != "eqsolve"}
    assert _cycles(graph) == []


@pytest.mark.skipif(not (ROOT / "bench").is_dir(), reason="no bench/ folder in this checkout")
def test_no_import_circles_in_the_benchmark():
    graph = _graph(ROOT, "bench")
    assert _cycles(graph) == []


def test_core_imports_no_framework():
    for name, path in _modules(SRC, "eqsolve.core").items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not {"torch", "jax", "jaxlib", "cupy"} & set(roots), (name, roots)


def _source_files() -> list[Path]:
    files = []
    for folder in ("src", "bench", "tests", "examples"):
        if (ROOT / folder).is_dir():
            files += sorted((ROOT / folder).rglob("*.py")) + sorted((ROOT / folder).rglob("*.cu"))
    return files + [ROOT / "noxfile.py"]


def test_no_source_file_over_600_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _source_files()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}
