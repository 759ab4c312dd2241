"""The package's shape: no import cycles (function-level imports count), imports go down the layers
docs/architecture.md describes, functions stay short, modules stay modules."""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qsdcompress"

# Lower layers never import higher ones. A module's layer is that of its top-level name.
LAYERS = {
    "errors": 0, "ui": 0, "provenance": 0,
    "io": 1, "qsdfile": 1, "config": 1, "results": 1, "neurons": 1, "metrics": 1,
    "data": 2, "zoo": 2,
    "models": 3,
    "quant": 4,
    "loading": 5, "sizing": 5,
    "distill": 6, "onnx_export": 6, "reporting": 6,
    "train": 7, "mixed": 7,
    "pipeline": 8,
    "api": 9,
    "cli": 10, "__init__": 10, "__main__": 10,
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (resolving relative imports)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            cands = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in cands if c in mods and c != name)
    # a subpackage's modules import their own package's __init__ implicitly: not an edge
    return {t for t in found if not name.startswith(t + ".")}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"{module}: add its top-level name to LAYERS (and to the layer table in docs/architecture.md)"
    return LAYERS[top]


def test_no_import_cycles():
    graph = _graph()
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    # the check itself must be able to fail: two modules importing each other inside functions
    pkg = tmp_path / "qsdcompress"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("def g():\n    from .a import f\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(_graph()).static_order())


def test_imports_go_down_the_layers():
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
           for m, targets in _graph().items() for t in targets
           if _layer(t) > _layer(m) and m.split(".")[:2] != t.split(".")[:2]]
    assert not bad, "\n".join(bad)


def test_no_function_longer_than_80_lines():
    long = []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{f.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_no_function_shadows_a_module_of_its_package():
    """``pkg.name`` is either a submodule or a function, never both (a function named after its
    own submodule is replaced by the module as soon as the submodule is imported)."""
    bad = []
    for init in PKG.rglob("__init__.py"):
        subs = {p.stem for p in init.parent.glob("*.py")} | {p.name for p in init.parent.iterdir() if p.is_dir()}
        for node in ast.parse(init.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in subs:
                bad.append(f"{init.relative_to(PKG)}: {node.name}")
    assert not bad, "\n".join(bad)


def test_the_api_functions_and_their_packages(tmp_path):
    import importlib
    import types

    import qsdcompress as q

    for name in ("onnx_export", "reporting", "train", "quant", "mixed"):
        assert isinstance(importlib.import_module(f"qsdcompress.{name}"), types.ModuleType), name
    for name in ("export", "report", "eval", "sensitivity", "finetune", "convert"):
        assert isinstance(getattr(q, name), types.FunctionType), name
    assert q.export.FORMATS == ("int", "qdq", "std-int") and "onnxruntime" in q.export.RUNTIMES
    ns: dict = {}
    exec("from qsdcompress import *", ns)
    assert "eval" not in ns  # the builtin survives a star import
    out = q.export(q.load(), tmp_path / "m.onnx", parity_samples=8)
    assert out["parity_ok"] and (tmp_path / "m.onnx").exists()
