"""Export passes (``onnx_export/passes.py``): every format is one list of passes, the opset is
declared by one pass of each list, and the state a pass leaves for another is declared."""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import onnx
import pytest
from onnx import helper

import qsdcompress as q
from qsdcompress.onnx_export.exporter import FORMAT_PASSES, FORMATS, MODULES
from qsdcompress.onnx_export.graph import BASE_OPSET, INT2_OPSET, MS_DOMAIN, trace
from qsdcompress.onnx_export.passes import PassContext, set_opsets
from qsdcompress.onnx_export.runtime import parity_batch
from qsdcompress.quant import convert

PKG = Path(__file__).resolve().parents[1] / "qsdcompress" / "onnx_export"


@pytest.fixture(scope="module")
def w2_model():
    """The bundled digits model at W2: INT2 weights, so the file's opset (25) is not the traced one (21)."""
    return convert(q.load(), {"bits": 2, "calib_batches": 0, "scale_init": "lsq"}).eval()


def _opsets(proto) -> tuple:
    return tuple((o.domain, o.version) for o in proto.opset_import), proto.ir_version


def test_every_format_is_a_list_of_passes_ending_in_set_opsets():
    assert set(FORMAT_PASSES) == set(FORMATS)
    for fmt, passes in FORMAT_PASSES.items():
        assert passes.count(set_opsets) == 1 and passes[-1] is set_opsets, fmt
        assert len(set(passes)) == len(passes), f"{fmt}: a pass listed twice"


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_pass_of_each_format_declares_the_opset(fmt, w2_model):
    """Run the format's passes one by one on a traced graph: only ``set_opsets`` changes the opset
    or the IR version, and the file declares the standard opset and the contrib domains it uses."""
    module, registry = MODULES[fmt](w2_model)
    proto = trace(module, parity_batch(w2_model, "digits", 2), BASE_OPSET)
    ctx = PassContext(registry, True, INT2_OPSET)
    changed, facts = [], {}
    for p in FORMAT_PASSES[fmt]:
        before = _opsets(proto)
        facts.update(p(proto, ctx))
        json.dumps(facts)   # facts are plain values, never state for another pass
        if _opsets(proto) != before:
            changed.append(p.__name__)
    assert changed == ["set_opsets"]
    used = {n.domain for n in proto.graph.node} - {""}
    assert used == ({MS_DOMAIN} if fmt == "int" else set())
    standard = helper.make_opsetid("", INT2_OPSET)
    assert _opsets(proto) == (tuple(("", INT2_OPSET) if d == "" else (d, 1) for d in ["", *sorted(used)]),
                              helper.find_min_ir_version_for([standard]))
    onnx.checker.check_model(proto)
    if fmt == "int":   # the int format's state, on its declared fields
        assert ctx.rewritten and ctx.sites and ctx.alias and facts["requantized_layers"] > 0
        assert ctx.left_float() and not set(ctx.left_float()) & set(ctx.rewritten)


def test_only_set_opsets_writes_the_opset():
    """No other function of the export writes the graph's (``proto``'s) ``opset_import`` or
    ``ir_version`` (a one-node model built to evaluate a constant has its own)."""
    writers = set()
    for f in PKG.glob("*.py"):
        for fn in ast.walk(ast.parse(f.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else []
                calls = [node.func.value] if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("extend", "append", "add", "CopyFrom") else []
                for t in [*targets, *calls]:
                    t = t.value if isinstance(t, ast.Subscript) else t
                    if isinstance(t, ast.Attribute) and t.attr in ("opset_import", "ir_version") \
                            and isinstance(t.value, ast.Name) and t.value.id == "proto":
                        writers.add(f"{f.name}:{fn.name}")
    assert writers == {"passes.py:set_opsets"}


def test_pass_state_is_declared_on_the_context():
    """``PassContext`` has slots: a pass cannot park state in an undeclared attribute."""
    ctx = PassContext({}, True, BASE_OPSET)
    with pytest.raises(AttributeError):
        ctx.remaining = {}   # type: ignore[attr-defined]
    assert {f.name for f in dataclasses.fields(PassContext)} >= {"rewritten", "packed", "sites", "alias"}


def test_classes_create_their_attributes_in_init():
    """An attribute a method sets is created by ``__init__`` (or declared as a dataclass field)."""
    late = []
    for f in PKG.glob("*.py"):
        for cls in (n for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.ClassDef)):
            declared = {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
            made: dict[str, set[str]] = {}
            for fn in (s for s in cls.body if isinstance(s, ast.FunctionDef)):
                for node in ast.walk(fn):
                    targets = node.targets if isinstance(node, ast.Assign) else \
                        [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
                    made.setdefault(fn.name, set()).update(
                        t.attr for t in targets
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self")
            init = made.get("__init__", set()) | declared
            late += [f"{f.name}:{cls.name}.{m} sets {sorted(a - init)}" for m, a in made.items() if a - init]
    assert not late, "\n".join(late)
