"""The ONNX graph: tracing, packed low-bit weight initializers, and the clean-up passes that keep
the graph text a small fraction of the packed weights.

The clean-up passes are our own: onnxoptimizer 0.4.2's ``eliminate_common_subexpression`` merged
none of the traced graph's repeated shape arithmetic (2,681 nodes before and after, bundled model)
and it refuses graphs holding INT2 initializers ("Unknown tensor data type"); these passes take
the same graph to 929 nodes. onnx-ir's passes give the same graphs, but several times slower
inside this export (docs/architecture.md, stage 4).
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import QsdError
from .folding import QWeight

if TYPE_CHECKING:
    import onnx

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BASE_OPSET = 21          # INT4 DequantizeLinear; the TorchScript exporter stops at opset 20/21
INT2_OPSET = 25          # INT2 appeared in opset 25 (onnxruntime >= 1.22 runs it)
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (the int format's integer kernels)


def storage_bits(bits: int, int2: bool) -> int:
    """Bits per stored element of a b-bit signed weight: INT2 (b <= 2, when allowed), INT4, INT8."""
    if bits <= 2 and int2:
        return 2
    if bits <= 4:
        return 4
    if bits <= 8:
        return 8
    raise QsdError(f"cannot store {bits}-bit integer weights (at most 8)")


def packed_tensor(name: str, ints: np.ndarray, sbits: int):
    """An ``INT2``/``INT4``/``INT8`` initializer holding ``ints``, packed by onnx itself (ml_dtypes
    arrays; element 0 in the low bits, as the ONNX spec lays sub-byte types out)."""
    import ml_dtypes
    from onnx import numpy_helper

    lo, hi = -(1 << (sbits - 1)), (1 << (sbits - 1)) - 1
    if ints.size and (ints.min() < lo or ints.max() > hi):
        raise QsdError(f"export: {name} has integers outside the {sbits}-bit range")
    dtype = {2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}[sbits]
    return numpy_helper.from_array(np.asarray(ints).astype(dtype), name)


def trace(module: nn.Module, sample: torch.Tensor, opset: int) -> onnx.ModelProto:
    """TorchScript export (the dynamo exporter fails on data-dependent branches), dynamic batch."""
    import warnings

    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (sample,), buf, opset_version=opset, dynamo=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True, keep_initializers_as_inputs=False)
    return onnx.load_from_string(buf.getvalue())


def pack_graph(proto, registry: dict[str, QWeight], int2: bool) -> dict[str, int]:
    """Replace float weight initializers by packed integer ones + DequantizeLinear; returns
    a count of initializers per storage type."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    by_name = {t.name: t for t in g.initializer}
    # The exporter keeps parameter names; fall back on the exact bytes if it renamed one.
    by_bytes: dict[bytes, str] = {}
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            by_bytes.setdefault(numpy_helper.to_array(t).tobytes(), t.name)
    counts: dict[str, int] = {}
    new_nodes = []
    remove: set[str] = set()
    for pname, qw in registry.items():
        if qw.ints is None:
            counts["FLOAT"] = counts.get("FLOAT", 0) + 1
            continue
        init = pname if pname in by_name else by_bytes.get(qw.dequantized().float().numpy().tobytes())
        if init is None:
            raise QsdError(f"export: weight {pname} not found in the traced graph")
        sbits = storage_bits(qw.bits, int2)
        qname, sname, dq = f"{init}_q", f"{init}_s", f"{init}_dq"
        t = packed_tensor(qname, qw.ints.numpy(), sbits)
        s = numpy_helper.from_array(qw.scale.float().numpy(), sname)
        g.initializer.extend([t, s])
        new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname], [dq], axis=0))
        for node in g.node:
            for i, inp in enumerate(node.input):
                if inp == init:
                    node.input[i] = dq
        remove.add(init)
        key = TensorProto.DataType.Name(t.data_type)
        counts[key] = counts.get(key, 0) + 1
    kept = [t for t in g.initializer if t.name not in remove]
    del g.initializer[:]
    g.initializer.extend(kept)
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return counts


def foldable_dequant(proto) -> int:
    """``DequantizeLinear(w, scale, axis=0)`` of a weight initializer -> ``Mul(Cast(w, FLOAT),
    scale)``: the same float weight, but onnxruntime folds Cast and Mul at load (it never folds
    DequantizeLinear), so the float layers do not dequantize their weights on every run. The
    file keeps the packed integers. Returns the number of nodes rewritten."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    nodes, done = [], 0
    for n in g.node:
        w, s = (n.input[0], n.input[1]) if n.op_type == "DequantizeLinear" else ("", "")
        if w not in inits or s not in inits or node_attr(n, "axis", 1) != 0 or len(n.input) > 2:
            nodes.append(n)
            continue
        rank = len(inits[w].dims)
        scale = numpy_helper.to_array(inits[s]).reshape([-1] + [1] * (rank - 1))
        g.initializer.remove(inits[s])
        g.initializer.append(numpy_helper.from_array(scale.astype(np.float32), s))
        nodes.append(helper.make_node("Cast", [w], [f"{n.output[0]}_f"], to=1))
        nodes.append(helper.make_node("Mul", [f"{n.output[0]}_f", s], [n.output[0]]))
        done += 1
    del g.node[:]
    g.node.extend(nodes)
    return done


_FOLDABLE = {"Unsqueeze", "Squeeze", "Concat", "Gather", "Slice", "Cast", "Reshape", "Equal", "Where",
             "ConstantOfShape", "Expand", "Range", "Mul", "Div", "Add", "Sub", "Floor", "Identity", "Shape"}


def _partial_value(n, partial: dict[str, np.ndarray], consts: dict[str, np.ndarray]) -> np.ndarray | None:
    """Shape arithmetic on values with unknown (batch) entries, kept as object arrays with None:
    Gather, Slice, Unsqueeze, Squeeze and Concat of shapes, the ops the tracer writes around a
    ``reshape``; None when ``n`` is anything else."""
    def val(name: str) -> np.ndarray | None:
        return partial.get(name, consts.get(name))

    ins = [val(i) if i else None for i in n.input]
    if ins[0] is None or any(v is None for v, i in zip(ins, n.input) if i):
        return None
    x = np.asarray(ins[0], dtype=object)
    if n.op_type == "Gather" and node_attr(n, "axis") == 0:
        return np.asarray(x[np.asarray(ins[1], np.int64)], dtype=object)
    if n.op_type == "Slice" and x.ndim == 1 and all(v.size == 1 for v in ins[1:]):
        st, en = int(ins[1].reshape(-1)[0]), int(ins[2].reshape(-1)[0])
        step = int(ins[4].reshape(-1)[0]) if len(ins) > 4 else 1
        return x[st:en:step] if len(ins) < 4 or int(ins[3].reshape(-1)[0]) == 0 else None
    if n.op_type == "Unsqueeze" and x.ndim == 0:
        return x.reshape(1)
    if n.op_type == "Squeeze" and x.size == 1:
        return x.reshape(())
    if n.op_type == "Concat" and node_attr(n, "axis") == 0:
        return np.concatenate([np.asarray(v, dtype=object).reshape(-1) for v in ins])
    return None


def node_attr(node, name: str, default: Any = 0) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` when it has none."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def constant_values(graph) -> dict[str, np.ndarray]:
    """Output name -> value of every ``Constant`` node that holds a tensor."""
    from onnx import numpy_helper

    return {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}


def _inferred_shapes(proto) -> dict[str, list[int | None]]:
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(proto, data_prop=True)
    shapes: dict[str, list[int | None]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                               for d in tt.shape.dim]
    return shapes


def static_shapes(proto) -> dict[str, list[int | None]]:
    """Every tensor's shape with None for the dimensions that follow the batch: onnx's shape
    inference run at batch 1 and at batch 2 (with a symbolic batch it loses track of a dimension
    behind a ``reshape(T, B, -1, ...)``); a dimension is known where both runs agree."""
    runs = []
    for batch in (1, 2):
        p = type(proto)()
        p.CopyFrom(proto)
        for vi in p.graph.input:
            dims = vi.type.tensor_type.shape.dim
            if dims and not dims[0].HasField("dim_value"):
                dims[0].dim_value = batch
        for vi in p.graph.output:
            vi.type.tensor_type.ClearField("shape")
        runs.append(_inferred_shapes(p))
    return {k: [a if a == b else None for a, b in zip(v, runs[1][k])]
            for k, v in runs[0].items() if k in runs[1] and len(v) == len(runs[1][k])}


class _ShapeFolder:
    """Integer shape values of one graph: constants, and shapes with unknown (batch) entries."""

    def __init__(self, proto):
        from onnx import TensorProto, numpy_helper

        self.proto = proto
        self.shapes = static_shapes(proto)
        self.consts: dict[str, np.ndarray] = {}
        for t in proto.graph.initializer:
            if t.data_type in (TensorProto.INT64, TensorProto.INT32) and int(np.prod(t.dims)) <= 64:
                self.consts[t.name] = numpy_helper.to_array(t)
        self.partial: dict[str, np.ndarray] = {}
        self.evaluators: dict[bytes, Any] = {}

    def run(self, n) -> list[np.ndarray] | None:
        """``n`` on constant integer inputs (onnx's reference evaluator); None for float results."""
        from onnx import TensorProto, helper
        from onnx.reference import ReferenceEvaluator

        consts = self.consts
        ins = [consts[i] for i in n.input if i]
        if any(a.dtype.kind == "f" for a in ins) and n.op_type not in ("Shape", "ConstantOfShape"):
            return None
        key = n.SerializeToString()
        if key not in self.evaluators:
            vis = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(consts[i].dtype), None)
                   for i in n.input if i]
            outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in n.output]
            mm = helper.make_model(helper.make_graph([n], "f", vis, outs), opset_imports=list(self.proto.opset_import))
            mm.ir_version = self.proto.ir_version
            self.evaluators[key] = ReferenceEvaluator(mm)
        res = self.evaluators[key].run(None, {i: consts[i] for i in n.input if i})
        if any(np.asarray(r).size > 64 or np.asarray(r).dtype.kind == "f" for r in res):
            return None
        return [np.asarray(r) for r in res]

    def fold(self, n) -> bool:
        """Record ``n``'s integer outputs; True when ``n`` became a constant (drop it)."""
        from onnx import numpy_helper

        consts, partial = self.consts, self.partial
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            v = numpy_helper.to_array(n.attribute[0].t)
            if v.dtype.kind in "iu" and v.size <= 64:
                consts[n.output[0]] = v
                return True
        if n.op_type == "Shape" and n.input[0] in self.shapes:
            dims = np.array(self.shapes[n.input[0]], dtype=object)
            partial[n.output[0]] = dims[node_attr(n, "start", 0): node_attr(n, "end", len(dims))]
        elif n.op_type != "Reshape" and any(i in partial for i in n.input):
            v = _partial_value(n, partial, consts)
            if v is not None:
                partial[n.output[0]] = v
        elif n.op_type in _FOLDABLE and n.op_type != "Shape" and all((not i) or i in consts for i in n.input):
            out = self.run(n)
            if out is not None:
                consts.update(zip(n.output, out))
                return True
        if n.output and n.output[0] in partial and all(v is not None for v in partial[n.output[0]].reshape(-1)):
            consts[n.output[0]] = partial.pop(n.output[0]).astype(np.int64)
            return True
        out = self.shapes.get(n.output[0]) if n.op_type == "Reshape" and n.input[1] not in consts else None
        if out and sum(d is None for d in out) == 1 and node_attr(n, "allowzero") == 0:
            # the output's one unknown dimension (the batch) becomes -1: no Shape computation at run time
            n.input[1] = "shape_" + "_".join(str(d or -1) for d in out)
            consts[n.input[1]] = np.array([d or -1 for d in out], np.int64)
        return False


def _fold_shape_arithmetic(proto) -> None:
    """Fold the shape arithmetic the tracer writes for ``reshape(T, B, -1, H, W)``: with only the
    batch dimension dynamic, every other dimension is known, so the Shape -> Gather -> Unsqueeze
    chains that compute it become constants, and a reshape target whose one unknown entry is the
    batch gets -1 there. Only integer (shape) values are folded; float arithmetic stays in the
    graph so onnxruntime computes it exactly as before."""
    from onnx import numpy_helper

    g = proto.graph
    try:
        folder = _ShapeFolder(proto)
    except Exception:
        return
    kept = [n for n in g.node if not folder.fold(n)]
    used = {i for n in kept for i in n.input} | {o.name for o in g.output}
    have = {t.name for t in g.initializer}
    for name in sorted(used - have):
        if name in folder.consts:
            g.initializer.append(numpy_helper.from_array(np.asarray(folder.consts[name]), name))
    del g.node[:]
    g.node.extend(kept)
    drop_dead(proto)


def drop_dead(proto) -> None:
    """Remove nodes and initializers nothing reads."""
    g = proto.graph
    need = {o.name for o in g.output}
    kept = []
    for n in reversed(list(g.node)):
        if any(o in need for o in n.output):
            kept.append(n)
            need.update(i for i in n.input if i)
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    inits = [t for t in g.initializer if t.name in need]
    del g.initializer[:]
    g.initializer.extend(inits)


def _strip_default_attributes(proto) -> None:
    """Conv attributes equal to their defaults (unit strides/dilations, group 1, zero pads,
    kernel_shape, inferred from the weight) are left out."""
    for n in proto.graph.node:
        if n.op_type != "Conv":
            continue
        keep = []
        for a in n.attribute:
            if a.name in ("dilations", "strides") and all(v == 1 for v in a.ints):
                continue
            if a.name == "group" and a.i == 1:
                continue
            if a.name == "pads" and all(v == 0 for v in a.ints):
                continue
            if a.name == "kernel_shape":
                continue
            keep.append(a)
        del n.attribute[:]
        n.attribute.extend(keep)


def scalar_value(name: str, values: dict[str, np.ndarray], inits: dict) -> float | None:
    """The float scalar held by a Constant output (``values``) or an initializer, else None."""
    from onnx import numpy_helper

    arr = values.get(name)
    if arr is None and name in inits:
        arr = numpy_helper.to_array(inits[name])
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 and arr.dtype.kind == "f" else None


class Peephole:
    """Producers, consumers and scalar constants of a finished graph, for local rewrites."""

    def __init__(self, proto):
        self.g = proto.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}     # tensor -> the nodes reading it
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.readers = {name: len(ns) for name, ns in self.consumers.items()}   # graph outputs count too
        for o in self.g.output:
            self.readers[o.name] = self.readers.get(o.name, 0) + 1
        self.values = constant_values(self.g)

    def scalar(self, name: str) -> float | None:
        return scalar_value(name, self.values, self.inits)

    def only_reader(self, name: str, op: str):
        """The node producing ``name`` when it is an ``op`` and ``name`` has exactly one reader."""
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op and self.readers.get(name) == 1 else None

    def add_init(self, arr: np.ndarray, name: str, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        self.g.initializer.append(numpy_helper.from_array(np.asarray(arr).astype(dtype), name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def shared_init(self, arr: np.ndarray, name: str, dtype: Any = np.float32) -> str:
        """``name``, added once: a constant every rewrite of a kind reads (zero points, bounds)."""
        return name if name in self.inits else self.add_init(arr, name, dtype)


def dedupe(proto, alias: dict[str, str] | None = None) -> int:
    """Common-subexpression elimination: the traced graph recomputes the same shape arithmetic
    (Shape -> Gather -> Unsqueeze -> Concat) and repeats identical Constants hundreds of times.
    Merging identical nodes (same op, inputs and attributes) keeps the graph a small fraction of
    the packed weights. Returns the number of nodes removed; ``alias`` (when given) receives the
    removed outputs' replacements."""
    g = proto.graph
    alias = {} if alias is None else alias
    seen: dict[bytes, list[str]] = {}
    kept = []
    outputs = {o.name for o in g.output}
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in alias:
                n.input[i] = alias[x]
        if any(o in outputs for o in n.output) or n.op_type in ("RandomNormal", "RandomUniform"):
            kept.append(n)
            continue
        key = n.op_type.encode() + n.domain.encode() + b"|" + "|".join(n.input).encode() + b"|" + b"".join(
            a.SerializeToString() for a in sorted(n.attribute, key=lambda a: a.name))
        prev = seen.get(key)
        if prev is not None and len(prev) == len(n.output):
            for o, p in zip(n.output, prev):
                alias[o] = p
            continue
        seen[key] = list(n.output)
        kept.append(n)
    removed = len(g.node) - len(kept)
    del g.node[:]
    g.node.extend(kept)
    return removed


def compact_names(proto) -> None:
    """Short tensor names, no node names/doc strings/value_info: the graph text stays small
    beside the packed weights."""
    g = proto.graph
    keep = {INPUT_NAME, OUTPUT_NAME}
    ren: dict[str, str] = {}

    def new(name: str) -> str:
        if name == "" or name in keep:
            return name
        if name not in ren:
            ren[name] = format(len(ren), "x")
        return ren[name]

    for t in g.initializer:
        t.name = new(t.name)
        t.doc_string = ""
    for n in g.node:
        n.name = ""
        n.doc_string = ""
        for i, x in enumerate(n.input):
            n.input[i] = new(x)
        for i, x in enumerate(n.output):
            n.output[i] = new(x)
    del g.value_info[:]
    g.doc_string = ""
    proto.doc_string = ""


def clean_graph(proto) -> None:
    """Merge duplicates, fold the shape arithmetic, drop defaults and long names: the traced graph's
    text shrinks to a small fraction of the packed weights before any format rewrites it."""
    dedupe(proto)
    for _ in range(8):  # each pass makes more shapes static for the next
        before = len(proto.graph.node)
        _fold_shape_arithmetic(proto)
        dedupe(proto)
        if len(proto.graph.node) == before:
            break
    _strip_default_attributes(proto)
    compact_names(proto)
