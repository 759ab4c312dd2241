"""The integer ONNX format: every layer whose input is spikes runs as an integer kernel.

A spiking neuron's output is ``S * out_scale`` with ``S`` an integer in ``0..D``. In the traced
graph the neuron is ``Cast(Floor(Clip(D*x, 0, D) + 0.5), UINT8)`` (``S`` as uint8, exact), and its
float value ``Cast(S, FLOAT) * out_scale`` is kept for the layers that stay float. The rewrite
below follows ``S`` through shape-only ops and replaces

* a conv/linear fed by spikes (dense, any kernel and stride) by ``MatMulIntegerToFloat``
  (com.microsoft): spikes uint8 token-major (a k x k conv gathers its k*k shifted windows first:
  im2col with Pad/Slice/Concat on uint8) times the layer's b-bit integers as int8 (stored packed
  INT4/INT2 and widened at load by ``Cast``), int32 accumulation, then
  ``out_scale * per-channel scale`` (BatchNorm and IE-LIF already folded in) plus the bias;
* a product of two spike tensors (attention ``k_s^T @ v_s``) by ``MatMulInteger`` (uint8 x
  uint8 -> int32) and a product of spikes with such an int32 result (``q_s @ (k_s^T v_s)``) by a
  ``MatMul`` of the same integers (in float32 where no sum can reach 2**24, else in int32): exact
  integers, scaled once at the end.

The neuron stays ``Floor(Clip(...))`` (half up) on the float pre-activation, except where it
follows an integer conv and :mod:`.requant` finds an exact ``QLinearConv`` for the pair (its
half-to-even requantization then never meets a tie: docs/method.md §7). Depthwise convs
(onnxruntime's integer depthwise kernel is not faster) and layers fed by real values (pixels, the
output of another conv) stay float; their packed weights are widened by ``Mul(Cast(w), scale)``,
which onnxruntime folds once at load.

The format is a list of passes (:mod:`.passes`; ``exporter.FORMAT_PASSES`` lists them in order):
:func:`rewrite_integer` is the rewrite above; the passes here after it fold what it leaves
(weights of float layers, shorter neurons, scalars into the GEMMs and convs, the requantizing
``QLinearConv``), the shared ones clean, pack, merge, shorten names and declare the opsets.
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .folding import CountingNeuron, QWeight, counting_module
from .graph import (MS_DOMAIN, Peephole, constant_values, foldable_dequant, node_attr, packed_tensor, scalar_value,
                    static_shapes, storage_bits)
from .passes import PassContext
from .requant import ConvSite, fuse_neurons

# im2col by one Gather copies C bytes per index: faster than Slice+Concat for wide inputs, slower
# for narrow ones (qsd_8_256, 2 threads: 24 channels at 112x112 4x slower at batch 1).
GATHER_MIN_CHANNELS = 48
# Integers below this are exact in float32, and so is every partial sum of a product whose total
# stays below it: the bound under which ``q_s @ (k_s^T v_s)`` runs as a float MatMul.
FLOAT32_EXACT = 2 ** 24
_SHAPE_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}


class _SpikeCount(torch.autograd.Function):
    """``floor(clamp(levels * x, 0, levels) + 0.5)`` exported as a uint8 tensor cast back to float."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, levels: int) -> torch.Tensor:  # type: ignore[override]
        return torch.floor(torch.clamp(x * levels, 0, levels) + 0.5)

    @staticmethod
    def symbolic(g, x, levels: int):  # pragma: no cover - runs inside torch.onnx.export
        def const(v: float):
            return g.op("Constant", value_t=torch.tensor(v, dtype=torch.float32))

        s = g.op("Clip", g.op("Mul", x, const(float(levels))), const(0.0), const(float(levels)))
        s = g.op("Floor", g.op("Add", s, const(0.5)))
        u8 = g.op("Cast", s, to_i=2)          # TensorProto.UINT8
        return g.op("Cast", u8, to_i=1)       # TensorProto.FLOAT


class IntExportNeuron(CountingNeuron):
    """A spiking neuron as ``S * out_scale`` with ``S`` visible to the exporter as uint8."""

    def spike_count(self, x: torch.Tensor) -> torch.Tensor:
        return _SpikeCount.apply(self._input(x), self.levels)


def integer_module(model: nn.Module) -> tuple[nn.Module, dict[str, QWeight]]:
    """The folded plain-op module whose integer neurons trace as uint8 (:class:`IntExportNeuron`)."""
    return counting_module(model, IntExportNeuron)


class _Rewriter:
    """One pass over a cleaned, traced graph: spikes followed through shape ops, integer layers
    emitted in place of the float ones they replace."""

    def __init__(self, proto, registry: dict[str, QWeight], int2: bool):
        self.g = proto.graph
        self.int2 = int2
        self.inits = {t.name: t for t in self.g.initializer}
        self.consts: dict[str, np.ndarray] = constant_values(self.g)
        by_bytes = {qw.dequantized().float().numpy().tobytes(): name
                    for name, qw in registry.items() if qw.ints is not None}
        self.weight_of: dict[str, str] = {}   # initializer name -> registry parameter name
        for t in self.g.initializer:
            if t.data_type == 1 and t.raw_data in by_bytes:
                self.weight_of[t.name] = by_bytes[t.raw_data]
        self.registry = registry
        self.shapes = static_shapes(proto)
        self.alt: dict[str, tuple[str, float, str]] = {}  # float tensor -> (integer tensor, scale, u8|i32)
        # tensor (lead..., C, *spatial) -> its channels-last twin (prod(lead), *spatial, C), C, spatial
        self.cl: dict[str, tuple[str, int, tuple[int, ...]]] = {}
        self.nodes: list = []
        self.new_inits: list = []
        self.done: dict[str, str] = {}        # parameter name -> how it runs
        self.skipped: dict[str, str] = {}     # parameter name -> why it stays float
        self.sites: dict[str, ConvSite] = {}   # integer weight tensor -> its conv (for fuse_neurons)
        self.levels: dict[str, int] = {}       # uint8 spike tensor -> its largest count
        self.bounds: dict[str, int | None] = {}  # int32 product -> its largest value (None: unknown)
        self.products = 0
        self.gemms = 0                        # MatMulIntegerToFloat nodes (q/k/v share one)
        self.counts: dict[str, int] = {}      # stored integer weights per storage type
        self._n = 0
        self.u8: set[str] = set()              # uint8 spike tensors met so far
        self.fused: set[str] = set()           # conv outputs already written by a shared GEMM
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.readers_of: dict[str, list] = {}  # spikes -> the integer-weight convs reading them
        for n in self.g.node:
            if n.op_type == "Conv" and n.input[1] in self.weight_of:
                self.readers_of.setdefault(n.input[0], []).append(n)

    # -- small helpers -------------------------------------------------------------------------
    def name(self, hint: str) -> str:
        self._n += 1
        return f"int_{hint}_{self._n}"

    def node(self, op: str, inputs: list[str], hint: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        out = self.name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], domain=domain or None, **attrs))
        return out

    def init(self, arr: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.new_inits.append(numpy_helper.from_array(arr, name))
        return name

    def scalar(self, name: str) -> float | None:
        return scalar_value(name, self.consts, self.inits)

    def emit(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], domain=domain or None, **attrs))
        return output

    # -- integer kernels -----------------------------------------------------------------------
    def int_weight(self, ints: np.ndarray, bits: int, layers: int = 1) -> str:
        """The (K, Cout) integers of ``layers`` layers as one packed initializer, widened to int8
        at load by Cast."""
        from onnx import TensorProto

        sbits = storage_bits(bits, self.int2)
        name = self.name("w")
        t = packed_tensor(name, ints, sbits)
        self.new_inits.append(t)
        key = TensorProto.DataType.Name(t.data_type)
        self.counts[key] = self.counts.get(key, 0) + layers
        if sbits == 8:
            return name
        return self.node("Cast", [name], "w8", to=3)  # TensorProto.INT8

    def int_matmul(self, a: str, ints: np.ndarray, a_scale: float, qw: QWeight, bias: str, out: str) -> str:
        """``(a_u8 @ ints) * a_scale * scale[col] + bias`` by MatMulIntegerToFloat."""
        return self.emit_matmul(a, self.int_weight(ints, qw.bits), a_scale, qw.scale.float().numpy(), bias, out)

    def emit_matmul(self, a: str, b: str, a_scale: float, scale: np.ndarray, bias: str, out: str) -> str:
        self.gemms += 1
        sa = self.init(np.array(a_scale, np.float32), "as")
        sb = self.init(scale.astype(np.float32), "bs")
        inputs = [a, b, sa, sb, "", ""] + ([bias] if bias else [])
        return self.emit("MatMulIntegerToFloat", inputs, out, domain=MS_DOMAIN)

    def pointwise_siblings(self, n) -> list:
        """The 1x1 convs reading the same spikes as ``n`` (the q, k and v projections read the
        head neuron's spikes), when they can share one GEMM: same storage width, no windows."""
        sibs = self.readers_of.get(n.input[0], [])
        qws = [self.registry.get(self.weight_of.get(s.input[1], "")) for s in sibs]
        if len(sibs) < 2 or any(q is None or q.ints is None for q in qws):
            return []
        if any(len(s.input) > 2 and s.input[2] and s.input[2] not in self.inits for s in sibs):
            return []
        if any(int(np.prod(q.ints.shape[2:])) != 1 or node_attr(s, "group", 1) != 1
               or any(node_attr(s, "pads", [])) or any(v != 1 for v in node_attr(s, "strides", []))
               for s, q in zip(sibs, qws)):
            return []
        if len({storage_bits(q.bits, self.int2) for q in qws}) != 1 or len({q.ints.shape[1] for q in qws}) != 1:
            return []
        return sibs

    def fused_pointwise(self, sibs: list, t: str, c: float, nd: int) -> str:
        """One GEMM for 1x1 convs reading the same spikes ``t`` (channels-last): weights, scales
        and biases concatenated along the output channels, the result split back (§7)."""
        from onnx import numpy_helper

        qws = [self.registry[self.weight_of[s.input[1]]] for s in sibs]
        mats = [q.ints.reshape(q.ints.shape[0], -1).t().numpy() for q in qws]
        couts = [m.shape[1] for m in mats]
        biases = [numpy_helper.to_array(self.inits[s.input[2]]).reshape(-1) if len(s.input) > 2 and s.input[2]
                  in self.inits else np.zeros(co, np.float32) for s, co in zip(sibs, couts)]
        b = self.int_weight(np.concatenate(mats, axis=1), qws[0].bits, layers=len(sibs))
        has_bias = any(len(s.input) > 2 and s.input[2] for s in sibs)
        bias = self.init(np.concatenate(biases).astype(np.float32), "bias") if has_bias else ""
        scale = np.concatenate([q.scale.float().numpy().reshape(-1) for q in qws])
        y = self.emit_matmul(t, b, c, scale, bias, self.name("y"))
        from onnx import helper

        split = self.init(np.array(couts, np.int64), "split")
        outs = [self.name("y") for _ in sibs]
        self.nodes.append(helper.make_node("Split", [y, split], outs, axis=-1))
        for s, q, o in zip(sibs, qws, outs):
            self.emit("Transpose", [o], s.output[0], perm=[0, nd + 1, *range(1, nd + 1)])
            spatial = (self.shapes.get(s.output[0]) or [None])[2:]
            if len(spatial) == nd and None not in spatial:
                self.cl[s.output[0]] = (o, int(q.ints.shape[0]), tuple(spatial))
            self.done[self.weight_of[s.input[1]]] = f"conv {'x'.join(['1'] * nd)} (one GEMM for {len(sibs)})"
            self.fused.add(s.output[0])
        return y

    def im2col(self, t: str, spatial: list[int], k: tuple[int, ...], pads: list[int], strides: list[int],
               channels: int) -> str:
        """Channels-last uint8 ``t`` -> (N, *out, prod(k) * C): the k-window of every output
        position, kernel offsets outer and channels inner (zero padding). Wide inputs gather the
        windows in one ``Gather`` (indices computed from small constants, folded at load); narrow
        ones, where a Gather copies too little per index, slice each offset and concatenate."""
        nd = len(k)
        begin, end = pads[:nd], pads[nd:]
        outs = [(spatial[d] + begin[d] + end[d] - k[d]) // strides[d] + 1 for d in range(nd)]
        if any(pads):
            p = self.init(np.array([0, *begin, 0, 0, *end, 0], np.int64), "pads")
            t = self.node("Pad", [t, p], "pad")
        if nd == 2 and channels >= GATHER_MIN_CHANNELS:
            return self.gather_windows(t, [spatial[d] + begin[d] + end[d] for d in range(2)], outs, k, strides, channels)
        axes = self.init(np.arange(1, nd + 1, dtype=np.int64), "axes")
        steps = self.init(np.array(strides, np.int64), "steps")
        cols = []
        for off in itertools.product(*(range(kd) for kd in k)):
            st = self.init(np.array(off, np.int64), "st")
            en = self.init(np.array([off[d] + strides[d] * (outs[d] - 1) + 1 for d in range(nd)], np.int64), "en")
            cols.append(self.node("Slice", [t, st, en, axes, steps], "win"))
        return cols[0] if len(cols) == 1 else self.node("Concat", cols, "col", axis=-1)

    def gather_windows(self, t: str, padded: list[int], outs: list[int], k: tuple[int, ...], strides: list[int],
                       channels: int) -> str:
        """im2col of a padded (N, H, W, C) tensor as one Gather over its H*W positions."""
        wp = padded[1]
        rows = self.init((np.arange(outs[0]) * strides[0] * wp).reshape(-1, 1, 1).astype(np.int64), "rows")
        cols = self.init((np.arange(outs[1]) * strides[1]).reshape(1, -1, 1).astype(np.int64), "cols")
        offs = np.array([a * wp + b for a in range(k[0]) for b in range(k[1])], np.int64).reshape(1, 1, -1)
        idx = self.node("Add", [self.node("Add", [rows, cols], "idx"), self.init(offs, "offs")], "idx")
        flat = self.node("Reshape", [t, self.init(np.array([-1, padded[0] * wp, channels], np.int64), "shape")], "flat")
        g = self.node("Gather", [flat, idx], "gather", axis=1)
        shape = self.init(np.array([-1, *outs, k[0] * k[1] * channels], np.int64), "shape")
        return self.node("Reshape", [g, shape], "col")

    def spikes_channels_last(self, u: str, cin: int, spatial: list) -> str:
        """The uint8 spikes ``u`` (N, C, *spatial) channels-last: their twin when the layer before
        left one (no layout change at all), else a Transpose."""
        twin = self.cl.get(u)
        if twin is not None and twin[1] == cin and list(twin[2]) == list(spatial):
            return twin[0]
        nd = len(spatial)
        return self.node("Transpose", [u], "nhwc", perm=[0, *range(2, nd + 2), 1])

    def conv(self, n) -> bool:
        u, c, kind = self.alt[n.input[0]]
        pname = self.weight_of.get(n.input[1])
        if kind != "u8" or pname is None:
            return False
        qw = self.registry[pname]
        ints = qw.ints
        nd = ints.dim() - 2
        if node_attr(n, "group", 1) != 1:
            self.skipped[pname] = "depthwise/grouped conv (integer kernel not faster)"
            return False
        pads = list(node_attr(n, "pads", [0] * 2 * nd))
        strides = list(node_attr(n, "strides", [1] * nd))
        k = tuple(int(v) for v in ints.shape[2:])
        windows = any(v > 1 for v in k) or any(pads) or any(s > 1 for s in strides)
        spatial = (self.shapes.get(n.input[0]) or [None])[2:]
        if any(d != 1 for d in node_attr(n, "dilations", [1] * nd)) or (
                windows and (len(spatial) != nd or None in spatial)):
            self.skipped[pname] = "dilated conv or unknown input size"
            return False
        if n.output[0] in self.fused:
            return True
        t = self.spikes_channels_last(u, int(ints.shape[1]), spatial)
        sibs = [] if windows else self.pointwise_siblings(n)
        if sibs:
            self.fused_pointwise(sibs, t, c, nd)
            return True
        x = t
        if windows:
            t = self.im2col(t, spatial, k, pads, strides, int(ints.shape[1]))
        b = ints.permute(*range(2, nd + 2), 1, 0).reshape(-1, ints.shape[0]).numpy()
        bias = n.input[2] if len(n.input) > 2 else ""
        w = self.int_weight(b, qw.bits)
        y = self.emit_matmul(t, w, c, qw.scale.float().numpy(), bias, self.name("y"))
        out_spatial = (self.shapes.get(n.output[0]) or [None])[2:]
        if nd in (1, 2) and len(spatial) == len(out_spatial) == nd and None not in (*spatial, *out_spatial):
            self.sites[w] = ConvSite(x, ints.numpy(), pads, strides, tuple(spatial), tuple(out_spatial),
                                     self.levels.get(u, 255), storage_bits(qw.bits, self.int2))
        self.emit("Transpose", [y], n.output[0], perm=[0, nd + 1, *range(1, nd + 1)])
        if len(out_spatial) == nd and None not in out_spatial:
            self.cl[n.output[0]] = (y, int(ints.shape[0]), tuple(out_spatial))
        self.done[pname] = f"conv {'x'.join(map(str, k))}" + (" (im2col)" if windows else "")
        return True

    def gemm(self, n) -> bool:
        u, c, kind = self.alt[n.input[0]]
        pname = self.weight_of.get(n.input[1])
        plain = (node_attr(n, "transA", 0) == 0 and node_attr(n, "transB", 0) == 1
                 and node_attr(n, "alpha", 1.0) == 1.0 and node_attr(n, "beta", 1.0) == 1.0)
        if kind != "u8" or pname is None or not plain:
            return False
        qw = self.registry[pname]
        bias = n.input[2] if len(n.input) > 2 else ""
        self.int_matmul(u, qw.ints.t().numpy(), c, qw, bias, n.output[0])
        self.done[pname] = "linear"
        return True

    def matmul(self, n) -> bool:
        """spikes x spikes -> MatMulInteger (uint8 x uint8 -> int32); spikes x such an int32
        result -> a float ``MatMul`` of the same integers when no sum can reach 2**24 (every
        partial sum is then an exact float32, in any order: onnxruntime's float GEMM is
        multi-threaded, its int32 ``MatMul`` is not), else an int32 ``MatMul``. Exact either way."""
        (ua, ca, ka), (ub, cb, kb) = self.alt[n.input[0]], self.alt[n.input[1]]
        if ka == "i32" and kb == "i32":
            return False
        inner = (self.shapes.get(n.input[0]) or [None])[-1]
        ba, bb = (self.bounds.get(u) if k == "i32" else self.levels.get(u, 255) for u, k in ((ua, ka), (ub, kb)))
        bound = ba * bb * inner if None not in (ba, bb, inner) else None
        scale = self.init(np.array(ca * cb, np.float32), "ps")
        self.products += 1
        if ka != kb and bound is not None and bound < FLOAT32_EXACT:
            # both operands as float (the int32 one's Cast is the one its float value already has)
            a, b = (self.node("Cast", [u], "f", to=1) for u in (ua, ub))
            self.emit("Mul", [self.node("MatMul", [a, b], "mm"), scale], n.output[0])
            return True
        if ka == kb == "u8":
            y = self.node("MatMulInteger", [ua, ub], "mmi")
        else:
            a = ua if ka == "i32" else self.node("Cast", [ua], "i32", to=6)  # TensorProto.INT32
            b = ub if kb == "i32" else self.node("Cast", [ub], "i32", to=6)
            y = self.node("MatMul", [a, b], "mm")
        self.emit("Mul", [self.node("Cast", [y], "f", to=1), scale], n.output[0])
        self.alt[n.output[0]] = (y, ca * cb, "i32")
        # the largest |value| of the product: what decides whether a next product is exact in float
        self.bounds[y] = bound
        return True

    # -- channels-last twins -------------------------------------------------------------------
    def reshaped_twin(self, twin: tuple[str, int, tuple[int, ...]], out: list | None):
        """The twin of a reshape to ``out`` that keeps the channel axis and the spatial size (a
        (T, B) merge or split, H, W <-> H*W); None for any other reshape."""
        name, c, sp = twin
        if not out:
            return None
        size = int(np.prod(sp))
        axes = [i for i in range(len(out)) if out[i] == c and None not in out[i + 1:]
                and int(np.prod(out[i + 1:])) == size]
        if len(axes) != 1:
            return None
        new_sp = tuple(out[axes[0] + 1:])
        if new_sp == sp:
            return twin
        shape = self.init(np.array([-1, *new_sp, c], np.int64), "shape")
        return self.node("Reshape", [name, shape], "twin"), c, new_sp

    def layout(self, n, shape_of: str = "") -> None:
        """Follow channels-last twins (left by integer convs) through reshapes and the neuron's
        elementwise ops with scalar constants, so the next integer layer reads its spikes without
        a Transpose (docs/method.md §7). Twins nobody reads are dropped with the dead nodes."""
        ins = [i for i in n.input if i]
        src = [i for i in ins if i in self.cl]
        if len(src) != 1 or not n.output:
            return
        twin = self.cl[src[0]]
        op, others = n.op_type, [i for i in ins if i != src[0]]
        if op == "Reshape" and src[0] == n.input[0]:
            new = self.reshaped_twin(twin, self.shapes.get(shape_of or n.output[0]))
            if new is not None:
                self.cl[n.output[0]] = new
            return
        if op in ("Identity", "Floor", "Cast", "Relu") or (
                op in ("Mul", "Add", "Sub", "Div", "Clip") and all(self.scalar(o) is not None for o in others)):
            from onnx import helper

            out = self.node(op, [twin[0] if i == src[0] else i for i in n.input], "twin", **{
                a.name: helper.get_attribute_value(a) for a in n.attribute})
            self.cl[n.output[0]] = (out, twin[1], twin[2])

    def spikes_from_twin(self, u: str) -> bool:
        """Spikes computed channels-last are the ones every reader gets: a reader that needs them
        channels-first (a float conv, the attention) transposes the uint8 counts, not the float
        pre-activation, and the neuron runs once."""
        twin, c, sp = self.cl[u]
        shape = self.shapes.get(u)
        if not shape or sum(d is None for d in shape) != 1:
            return False
        t = self.node("Transpose", [twin], "nchw", perm=[0, len(sp) + 1, *range(1, len(sp) + 1)])
        target = self.init(np.array([-1 if d is None else d for d in shape], np.int64), "shape")
        self.emit("Reshape", [t, target], u)
        return True

    def neuron_levels(self, cast) -> int:
        """The ``D`` of the neuron whose count ``cast`` turns into uint8 (the upper bound of the
        ``Clip`` a few nodes up); 255 when the graph does not show it."""
        name = cast.input[0]
        for _ in range(4):
            n = self.producer.get(name)
            if n is None:
                break
            if n.op_type == "Clip" and len(n.input) == 3:
                hi = self.scalar(n.input[2])
                return int(hi) if hi is not None and 0 < hi <= 255 else 255
            name = n.input[0]
        return 255

    # -- the walk ------------------------------------------------------------------------------
    def follow(self, n) -> bool:
        """Record integer views of ``n``'s output; True when ``n`` was replaced."""
        ins = [i for i in n.input if i]
        self.layout(n)
        if n.op_type == "Cast" and node_attr(n, "to", 0) == 2:
            self.u8.add(n.output[0])
            self.levels[n.output[0]] = self.neuron_levels(n)
            if n.output[0] in self.cl:
                return self.spikes_from_twin(n.output[0])
        elif n.op_type == "Cast" and node_attr(n, "to", 0) == 1 and ins and ins[0] in self.u8:
            self.alt[n.output[0]] = (ins[0], 1.0, "u8")
        elif n.op_type == "Mul" and len(ins) == 2 and any(i in self.alt for i in ins):
            a, b = ins if ins[0] in self.alt else ins[::-1]
            c = self.scalar(b)
            if c is not None:
                t, s, kind = self.alt[a]
                self.alt[n.output[0]] = (t, s * c, kind)
        elif n.op_type in _SHAPE_OPS and ins and ins[0] in self.alt:
            t, s, kind = self.alt[ins[0]]
            from onnx import helper

            out = self.name("view")
            self.nodes.append(helper.make_node(n.op_type, [t, *n.input[1:]], [out], **{
                a.name: helper.get_attribute_value(a) for a in n.attribute}))
            self.alt[n.output[0]] = (out, s, kind)
            if t in self.levels:
                self.levels[out] = self.levels[t]
            self.layout(self.nodes[-1], shape_of=n.output[0])
        elif ins and ins[0] in self.alt:
            if n.op_type == "Conv":
                return self.conv(n)
            if n.op_type == "Gemm":
                return self.gemm(n)
            if n.op_type == "MatMul" and len(ins) == 2 and ins[1] in self.alt:
                return self.matmul(n)
        return False

    def run(self) -> None:
        for n in list(self.g.node):
            if not self.follow(n):
                self.nodes.append(n)
        del self.g.node[:]
        self.g.node.extend(self.nodes)
        self.g.initializer.extend(self.new_inits)


def rewrite_integer(proto: Any, ctx: PassContext) -> dict:
    """Every layer fed by spikes as an integer kernel (the module docstring), on the cleaned,
    traced graph. Reports what runs as integers (``integer_layers``, ``integer_products``,
    reasons for the float layers) and the stored integer weights per type (``initializers``);
    leaves which layers it took (``ctx.rewritten``: ``pack_weights`` packs the rest) and the
    convs a neuron may join (``ctx.sites``: :func:`requantize_neurons`)."""
    rw = _Rewriter(proto, ctx.registry, ctx.int2)
    rw.run()
    ctx.rewritten.update(rw.done)
    ctx.sites.update(rw.sites)
    quantized = [p for p, qw in ctx.registry.items() if qw.ints is not None]
    float_layers = {p: rw.skipped.get(p, "real-valued input (pixels or another layer's output)")
                    for p in quantized if p not in rw.done}
    kinds: dict[str, int] = {}
    for how in rw.done.values():
        kinds[how] = kinds.get(how, 0) + 1
    reasons: dict[str, int] = {}
    for why in float_layers.values():
        reasons[why] = reasons.get(why, 0) + 1
    return {"initializers": ctx.count_packed(rw.counts), "integer_layers": len(rw.done), "integer_gemms": rw.gemms,
            "weight_layers": len(ctx.registry), "integer_products": rw.products, "integer_kinds": kinds,
            "float_layer_reasons": reasons}


def foldable_weights(proto: Any, ctx: PassContext) -> dict:
    """The float layers' packed weights as ``Mul(Cast(w), scale)`` (``graph.foldable_dequant``):
    onnxruntime folds that once at load and never folds a ``DequantizeLinear``."""
    foldable_dequant(proto)
    return {}


def share_small_initializers(proto: Any, ctx: PassContext, max_bytes: int = 64) -> dict:
    """One initializer per distinct small constant (the im2col offsets, steps and scalar scales
    repeat in every layer); the graph text stays small beside the packed weights."""
    g = proto.graph
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    kept = []
    for t in g.initializer:
        key = (t.data_type, tuple(t.dims), t.raw_data) if t.raw_data and len(t.raw_data) <= max_bytes else None
        if key is not None and key in first:
            alias[t.name] = first[key]
            continue
        if key is not None:
            first[key] = t.name
        kept.append(t)
    del g.initializer[:]
    g.initializer.extend(kept)
    for n in g.node:
        n.input[:] = [alias.get(i, i) for i in n.input]
    return {}


def simplify_neurons(proto: Any, ctx: PassContext) -> dict:
    """``Cast(Floor(Clip(v, 0, D) + 0.5), UINT8)`` -> ``Cast(Clip(v + 0.5, 0, D), UINT8)``: the same
    spike count with one pass less. For v in [0, D] both add 0.5 to the same value; ONNX's Cast to
    an integer type truncates, which is floor on [0, D]; below 0 or above D both give 0 or D (§1:
    still half up)."""
    pp = Peephole(proto)
    done = 0
    for cast in pp.g.node:
        if cast.op_type != "Cast" or node_attr(cast, "to", 0) != 2:
            continue
        floor = pp.only_reader(cast.input[0], "Floor")
        add = floor and pp.only_reader(floor.input[0], "Add")
        if not add or len(add.input) != 2:
            continue
        clip_in, half = (add.input[0], add.input[1]) if pp.scalar(add.input[1]) is not None else (add.input[1], add.input[0])
        clip = pp.only_reader(clip_in, "Clip")
        if pp.scalar(half) != 0.5 or not clip or len(clip.input) != 3 or pp.scalar(clip.input[1]) != 0.0 \
                or pp.scalar(clip.input[2]) is None:
            continue
        v, lo, hi = clip.input
        if not done:
            pp.add_init(np.array(0.5, np.float32), "neuron_half")
        # the Clip node becomes the Add and the Add node the Clip: both keep their place in the order
        clip.op_type, add.op_type = "Add", "Clip"
        clip.input[:] = [v, "neuron_half"]
        add.input[:] = [clip.output[0], lo, hi]
        cast.input[0] = add.output[0]
        done += 1
    return {}


def fold_into_matmul(proto: Any, ctx: PassContext) -> dict:
    """``MatMulIntegerToFloat`` followed by ``* c`` or ``+ c`` (a scalar; the neuron's D and 0.5)
    that alone reads its output: folded into its per-channel scale and bias, one pass less over
    the activations."""
    from onnx import numpy_helper

    pp = Peephole(proto)
    arr = lambda name: numpy_helper.to_array(pp.inits[name]).astype(np.float32)  # noqa: E731
    drop, done = set(), 0
    for k, n in enumerate(pp.g.node):
        if n.op_type not in ("Mul", "Add") or len(n.input) != 2:
            continue
        y, c = (n.input[0], n.input[1]) if pp.scalar(n.input[1]) is not None else (n.input[1], n.input[0])
        views = []
        while pp.only_reader(y, "Transpose") or pp.only_reader(y, "Reshape"):
            views.append(pp.producer[y])
            y = views[-1].input[0]
        mm, val = pp.only_reader(y, "MatMulIntegerToFloat"), pp.scalar(c)
        if mm is None or val is None:
            continue
        has_bias = len(mm.input) > 6 and bool(mm.input[6])
        if mm.input[3] not in pp.inits or (has_bias and mm.input[6] not in pp.inits):
            continue  # a scale or bias the graph computes (a Constant node, not an initializer) stays
        scale = arr(mm.input[3])
        bias = arr(mm.input[6]) if has_bias else np.zeros_like(scale)
        if n.op_type == "Mul":
            scale, bias = scale * val, bias * val
        else:
            bias = bias + val
        mm.input[3] = pp.add_init(scale, f"{mm.output[0]}_scale{done}")
        inputs = list(mm.input) + [""] * (7 - len(mm.input))
        inputs[6] = pp.add_init(bias, f"{mm.output[0]}_bias{done}")
        mm.input[:] = inputs
        last = views[0] if views else mm   # scalar ops commute with layout ops: bypass ``n``
        last.output[0], pp.producer[n.output[0]] = n.output[0], last
        drop.add(k)
        done += 1
    _remove_nodes(pp.g, drop)
    return {}


def _remove_nodes(g, positions: set[int]) -> None:
    kept = [n for k, n in enumerate(g.node) if k not in positions]
    del g.node[:]
    g.node.extend(kept)


def fold_into_conv(proto: Any, ctx: PassContext) -> dict:
    """``Conv(x * c, W)`` with a scalar ``c`` (the neuron's output scale before a float conv) ->
    ``Conv(x, W * c)``: the weights are ``Cast(w) * scale`` of the packed integers, folded once
    at load, so ``c`` joins ``scale`` and the activations skip one pass."""
    from onnx import numpy_helper

    pp = Peephole(proto)
    position = {o: k for k, n in enumerate(pp.g.node) for o in n.output}
    drop, done = set(), 0
    for conv in pp.g.node:
        if conv.op_type != "Conv" or len(conv.input) < 2:
            continue
        x, views = conv.input[0], []
        while pp.only_reader(x, "Reshape"):
            views.append(pp.producer[x])
            x = views[-1].input[0]
        mul, wmul = pp.only_reader(x, "Mul"), pp.only_reader(conv.input[1], "Mul")
        if mul is None or wmul is None or wmul.input[1] not in pp.inits:
            continue
        src, c = (mul.input[0], mul.input[1]) if pp.scalar(mul.input[1]) is not None else (mul.input[1], mul.input[0])
        if pp.scalar(c) is None:
            continue
        scale = numpy_helper.to_array(pp.inits[wmul.input[1]]).astype(np.float32) * pp.scalar(c)
        wmul.input[1] = pp.add_init(scale, f"{conv.input[1]}_scaled{done}")
        (views[-1] if views else conv).input[0] = src
        drop.add(position[mul.output[0]])
        done += 1
    _remove_nodes(pp.g, drop)
    return {}


def requantize_neurons(proto: Any, ctx: PassContext) -> dict:
    """A neuron after an integer conv (``ctx.sites``, names as ``ctx.alias`` merged them) joins it
    in one ``QLinearConv`` that writes the uint8 counts, where exact parameters exist
    (:func:`.requant.fuse_neurons`). Reports how many layers write uint8 spikes."""
    return {"requantized_layers": fuse_neurons(proto, ctx.sites, ctx.alias)}


__all__ = ["IntExportNeuron", "integer_module", "rewrite_integer", "foldable_weights", "share_small_initializers",
           "simplify_neurons", "fold_into_matmul", "requantize_neurons", "fold_into_conv", "MS_DOMAIN"]
