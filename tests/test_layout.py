"""The package's structure, checked by parsing its imports: no import cycle inside q2ext,
imports only downward through the layers, no q2ext import hidden inside a function, no
Python file over 500 lines, and every module the README lists exported by q2ext.nn."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import q2ext

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "q2ext"

# Layers, bottom up: a module may import its own layer (no cycles) and the layers below.
LAYERS = [
    ("_ops",),
    ("reference", "triton"),
    ("_ext",),
    ("backend", "qconfig"),
    ("ops",),
    ("nn",),
    ("passes",),
    # the entry points, and the package root that re-exports the public API they use
    ("demo", "benchmarks", "cli", "__main__", "__init__"),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules():
    """{dotted module name: path} of every q2ext source file."""
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name):
    return MODULES.get(name, Path()).name == "__init__.py"


def _resolve(module, node):
    """The q2ext modules an import statement of `module` loads (packages as their __init__)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "q2ext"]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        if not _is_package(module):
            anchor = anchor[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    if base.split(".")[0] != "q2ext":
        return []
    targets = []
    for alias in node.names:
        if alias.name == "_C":  # the compiled extension
            continue
        sub = f"{base}.{alias.name}"
        targets.append(sub if sub in MODULES else base)
    return targets


def _imports():
    """[(module, target, lineno, inside a function)] for every import of a q2ext module."""
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(name, node):
                    if target in MODULES and target != name:
                        found.append((name, target, node.lineno, id(node) in nested))
    return found


def _layer(module):
    parts = module.split(".")
    if len(parts) == 1:
        return RANK["__init__"]
    return RANK[parts[1]]


def test_every_module_has_a_layer():
    for name in MODULES:
        parts = name.split(".")
        assert len(parts) == 1 or parts[1] in RANK, f"{name}: not in any layer of tests/test_layout.py"


def test_no_import_cycle():
    graph = {}
    for src, dst, _, _ in _imports():
        graph.setdefault(src, set()).add(dst)
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(MODULES):
        if n not in state:
            visit(n)


def test_imports_only_downward():
    bad = [f"{src} imports {dst} (line {line})" for src, dst, line, _ in _imports()
           if _layer(dst) > _layer(src)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_lazy_q2ext_imports():
    bad = [f"{src} imports {dst} inside a function (line {line})" for src, dst, line, lazy in _imports() if lazy]
    assert not bad, "\n".join(bad)


def test_no_python_file_over_500_lines():
    files = [p for d in ("q2ext", "tests", "bench", "python") for p in (ROOT / d).rglob("*.py")]
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in files if (n := len(p.read_text().splitlines())) > 500]
    assert not long, "\n".join(long)


def test_nn_exports_every_module_the_readme_lists():
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"Modules and entry points: `q2ext\.nn` \(([^)]*)\)", readme)
    assert listed, "README lost its list of q2ext.nn modules"
    names = re.findall(r"`(\w+)`", listed.group(1))
    assert names, "README lists no q2ext.nn module"
    missing = [n for n in names if n not in q2ext.nn.__all__ or not hasattr(q2ext.nn, n)]
    assert not missing, f"q2ext.nn.__all__ lacks {missing}"


def test_no_name_shadows_a_module():
    """A package attribute that is a submodule's name must be that submodule (``q2ext.passes.prepare``
    is the module; the function is ``q2ext.prepare``)."""
    import importlib

    bad = []
    for name in MODULES:
        parent, _, leaf = name.rpartition(".")
        if not parent:
            continue
        obj = getattr(importlib.import_module(parent), leaf, None)
        if obj is not None and getattr(obj, "__name__", None) != name:
            bad.append(f"{parent}.{leaf} is {obj!r}, not the module {name}")
    assert not bad, "\n".join(bad)
