"""The ``std-int`` format: integer arithmetic that any ONNX runtime can lower itself, standard ops only.

A spiking neuron's output is ``S * out_scale`` with ``S`` an integer in ``0..D``. Here the neuron is
traced as ``DequantizeLinear(QuantizeLinear(Floor(Clip(D*x, 0, D) + 0.5), 1, 0), out_scale, 0)``:
the quantize step of scale 1 turns an integer-valued float into the same uint8 (no rounding
happens), and the dequantize step gives back exactly ``S * out_scale``. Every layer fed by spikes
then reads ``DequantizeLinear(uint8)`` and a weight ``DequantizeLinear(int8, per-channel scale)``,
the QDQ pattern from which onnxruntime and OpenVINO build integer kernels (u8 x s8, int32 sums).
The weights stay packed INT4/INT2 in the file; a ``Cast`` to INT8 before their
``DequantizeLinear`` is folded at load (both runtimes take int8 weights only for their integer
kernels: measured, an INT4 ``DequantizeLinear`` runs as a bf16/f32 conv in OpenVINO). No
``com.microsoft`` op is written.

The format's own passes (:mod:`.passes`; ``exporter.FORMAT_PASSES`` lists the order, after the
shared ``pack_weights`` and ``clean``, before the shared ``merge_duplicates``, ``compact`` and
``set_opsets``):

* ``integer_weights``: a ``Cast(INT8)`` before the weights of layers fed by spikes, the others'
  weights as ``Mul(Cast(w), scale)``;
* ``requantize_neurons``: a neuron after a dense conv fed by spikes joins it through a
  ``QuantizeLinear`` (an integer conv that writes the counts: ``QLinearConv`` in onnxruntime);
* ``drop_unit_time_axis``: at T = 1, the Reshapes that only add and remove the time axis around
  elementwise ops go (the runtimes then keep channels-last layouts between integer convs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .folding import CountingNeuron, QWeight, counting_module
from .graph import Peephole, drop_dead, foldable_dequant, node_attr, static_shapes
from .passes import PassContext
from .requant import Requant, requant_params

FORMAT = "std-int"
_UINT8, _INT8, _FLOAT = 2, 3, 1   # TensorProto element types
_VIEW_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
_WEIGHT_OPS = {"Conv", "Gemm", "MatMul"}


class _SpikeQDQ(torch.autograd.Function):
    """``floor(clamp(D*x, 0, D) + 0.5) * out_scale``, traced with the count as a uint8 QDQ pair."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, levels: int, out_scale: float) -> torch.Tensor:  # type: ignore[override]
        return torch.floor(torch.clamp(x * levels, 0, levels) + 0.5) * out_scale

    @staticmethod
    def symbolic(g, x, levels: int, out_scale: float):  # pragma: no cover - runs inside torch.onnx.export
        def const(v: float, dtype: torch.dtype = torch.float32):
            return g.op("Constant", value_t=torch.tensor(v, dtype=dtype))

        s = g.op("Clip", g.op("Mul", x, const(float(levels))), const(0.0), const(float(levels)))
        s = g.op("Floor", g.op("Add", s, const(0.5)))
        zero = const(0, torch.uint8)
        q = g.op("QuantizeLinear", s, const(1.0), zero)
        return g.op("DequantizeLinear", q, const(float(out_scale)), zero)


class StdExportNeuron(CountingNeuron):
    """A spiking neuron whose count traces as a uint8 QDQ pair."""

    def spike_count(self, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(torch.clamp(self._input(x) * self.levels, 0, self.levels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SpikeQDQ.apply(self._input(x), self.levels, self.out_scale)


def standard_module(model: nn.Module) -> tuple[nn.Module, dict[str, QWeight]]:
    """The folded plain-op module whose integer neurons trace as QDQ pairs (:class:`StdExportNeuron`)."""
    return counting_module(model, StdExportNeuron)


def _spike_source(pp: Peephole, name: str) -> Any:
    """The ``DequantizeLinear`` of uint8 spikes that ``name`` is a view of, else None."""
    for _ in range(8):
        n = pp.producer.get(name)
        if n is None:
            return None
        if n.op_type == "DequantizeLinear":
            return n if n.input[0] not in pp.inits else None
        if n.op_type not in _VIEW_OPS:
            return None
        name = n.input[0]
    return None


def _weight_dequant(pp: Peephole, layer: Any) -> Any:
    """The ``DequantizeLinear`` of a packed weight initializer that ``layer`` reads, else None."""
    if len(layer.input) < 2:
        return None
    dq = pp.producer.get(layer.input[1])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    cast = pp.producer.get(dq.input[0])   # the Cast(INT8) ``integer_weights`` writes
    return dq if dq.input[0] in pp.inits or (cast is not None and cast.op_type == "Cast"
                                             and cast.input[0] in pp.inits) else None


def integer_weights(proto: Any, ctx: PassContext) -> dict:
    """Layers fed by spikes read their packed weights through ``Cast(INT8)`` then
    ``DequantizeLinear``: the QDQ pattern runtimes turn into integer kernels (they take int8
    weights only; the Cast is folded at load). The other layers' weights become
    ``Mul(Cast(w, FLOAT), scale)`` (``graph.foldable_dequant``): onnxruntime folds that once
    at load and never folds a ``DequantizeLinear``."""
    from onnx import helper

    pp = Peephole(proto)
    casts: dict[int, Any] = {}   # DequantizeLinear node -> the Cast written before it
    kinds: dict[str, int] = {}
    for layer in pp.g.node:
        dq = _weight_dequant(pp, layer) if layer.op_type in _WEIGHT_OPS else None
        if dq is None or _spike_source(pp, layer.input[0]) is None:
            continue
        kind = f"{layer.op_type.lower()} {'depthwise' if node_attr(layer, 'group', 1) > 1 else 'dense'}"
        kinds[kind] = kinds.get(kind, 0) + 1
        if pp.inits[dq.input[0]].data_type != _INT8 and id(dq) not in casts:
            wide = f"{dq.input[0]}_i8"
            casts[id(dq)] = helper.make_node("Cast", [dq.input[0]], [wide], to=_INT8)
            dq.input[0] = wide
    nodes = [n for old in pp.g.node for n in ([casts[id(old)], old] if id(old) in casts else [old])]
    del pp.g.node[:]
    pp.g.node.extend(nodes)
    float_layers = foldable_dequant(proto)
    return {"spike_fed_layers": sum(kinds.values()), "spike_fed_kinds": kinds, "float_fed_layers": float_layers}


@dataclass
class _Neuron:
    """A neuron ``QuantizeLinear(Floor(Clip(D*v, 0, D) + 0.5), 1, 0)`` found in the graph."""

    value: str     # its float input v
    levels: int    # D
    quant: Any     # the QuantizeLinear node (its output: the uint8 counts)


def _neuron_at(pp: Peephole, q: Any) -> _Neuron | None:
    """The neuron whose counts ``q`` writes, when the graph holds exactly that pattern."""
    if q.op_type != "QuantizeLinear" or len(q.input) < 3 or pp.scalar(q.input[1]) != 1.0 \
            or not _is_zero_u8(pp, q.input[2]):
        return None
    floor = pp.only_reader(q.input[0], "Floor")
    add = floor and pp.only_reader(floor.input[0], "Add")
    clip = add and pp.only_reader(add.input[0], "Clip")
    mul = clip and pp.only_reader(clip.input[0], "Mul")
    if not mul or pp.scalar(add.input[1]) != 0.5 or len(clip.input) != 3 or pp.scalar(clip.input[1]) != 0.0:
        return None
    levels, d = pp.scalar(clip.input[2]), pp.scalar(mul.input[1])
    if levels is None or levels != d or levels != int(levels) or not 0 < levels < 256:
        return None
    return _Neuron(mul.input[0], int(levels), q)


def _is_zero_u8(pp: Peephole, name: str) -> bool:
    from onnx import numpy_helper

    t = pp.inits.get(name)
    return t is not None and t.data_type == _UINT8 and int(numpy_helper.to_array(t).reshape(-1)[0]) == 0


def _levels(pp: Peephole, u8: str) -> int:
    """The largest count a uint8 spike tensor holds: its neuron's D (255 when the graph hides it)."""
    n = pp.producer.get(u8)
    while n is not None and n.op_type in _VIEW_OPS:
        n = pp.producer.get(n.input[0])
    found = _neuron_at(pp, n) if n is not None else None
    return found.levels if found else 255


def _views_between(pp: Peephole, start: str, stop: str) -> list | None:
    """The view nodes (reshapes, transposes) from tensor ``stop`` down to tensor ``start``, in
    graph order, when ``start`` is ``stop`` seen through views only; else None."""
    views, name = [], start
    while name != stop:
        n = pp.producer.get(name)
        if n is None or n.op_type not in _VIEW_OPS:
            return None
        views.append(n)
        name = n.input[0]
    return views[::-1]


def _replay(views: list, src: str, out: str, tag: str) -> list:
    """``views`` applied to ``src`` instead, the last one writing ``out``."""
    from onnx import helper

    nodes = []
    for k, v in enumerate(views):
        dst = out if k == len(views) - 1 else f"{tag}_v{k}"
        nodes.append(helper.make_node(v.op_type, [src, *v.input[1:]], [dst], **{
            a.name: helper.get_attribute_value(a) for a in v.attribute}))
        src = dst
    return nodes


@dataclass
class _ConvSite:
    """A dense conv fed by spikes whose output is read by one neuron only (through views)."""

    conv: Any
    neuron: _Neuron
    in_views: list      # views from the input spikes' DequantizeLinear to the conv
    out_views: list     # views from the conv to the neuron
    spikes: str         # the uint8 input counts
    in_scale: float     # the value of one input spike
    weight: str         # the packed integer initializer
    scale: np.ndarray   # the weight's per-channel scale


def _conv_site(pp: Peephole, nrn: _Neuron) -> _ConvSite | None:
    v = nrn.value
    while pp.producer.get(v) is not None and pp.producer[v].op_type in _VIEW_OPS and pp.readers.get(v) == 1:
        v = pp.producer[v].input[0]
    conv = pp.only_reader(v, "Conv")
    wdq = conv and _weight_dequant(pp, conv)
    src = conv and _spike_source(pp, conv.input[0])
    if not wdq or not src or node_attr(conv, "group", 1) != 1 \
            or any(d != 1 for d in node_attr(conv, "dilations", [])):
        return None
    in_scale = pp.scalar(src.input[1])
    if in_scale is None or (len(src.input) > 2 and not _is_zero_u8(pp, src.input[2])) \
            or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in pp.inits):
        return None
    from onnx import numpy_helper

    weight = wdq.input[0]
    if weight not in pp.inits:   # the Cast(INT8) that ``integer_weights`` put before the DequantizeLinear
        weight = pp.producer[weight].input[0]
    if len(pp.inits[weight].dims) not in (3, 4):
        return None
    return _ConvSite(conv, nrn, _views_between(pp, conv.input[0], src.output[0]) or [],
                     _views_between(pp, nrn.value, conv.output[0]) or [], src.input[0], in_scale, weight,
                     numpy_helper.to_array(pp.inits[wdq.input[1]]).astype(np.float64).reshape(-1))


def _fused_nodes(pp: Peephole, site: _ConvSite, r: Requant, tag: str) -> list:
    """``DequantizeLinear(x, 1) -> Conv(DequantizeLinear(m*w, M), DequantizeLinear(b, M)) ->
    QuantizeLinear(1) -> Min(D)``, the counts written where the neuron wrote them."""
    from onnx import helper

    add, shared = pp.add_init, pp.shared_init
    one, zero = shared(np.array(1.0), "std_one"), shared(np.array(0), "std_zero", np.uint8)
    cout = len(r.scale)
    # m * w through float32 (exact: |m * w| <= 128): OpenVINO folds a float Mul of a widened
    # integer weight before it lowers the conv, not an int32 one (measured: that conv ran in bf16)
    m = add(r.factor.reshape(cout, *[1] * (len(pp.inits[site.weight].dims) - 1)), f"{tag}_m")
    scale = add(r.scale, f"{tag}_M")
    nodes = [helper.make_node("Cast", [site.weight], [f"{tag}_wf"], to=_FLOAT),
             helper.make_node("Mul", [f"{tag}_wf", m], [f"{tag}_wm"]),
             helper.make_node("Cast", [f"{tag}_wm"], [f"{tag}_w8"], to=_INT8),
             helper.make_node("DequantizeLinear", [f"{tag}_w8", scale], [f"{tag}_wd"], axis=0),
             helper.make_node("DequantizeLinear", [add(r.bias, f"{tag}_b", np.int32), scale], [f"{tag}_bd"], axis=0)]
    x = site.spikes
    if site.in_views:
        nodes += _replay(site.in_views, x, f"{tag}_xv", tag)
        x = f"{tag}_xv"
    nodes.append(helper.make_node("DequantizeLinear", [x, one, zero], [f"{tag}_x"]))
    attrs = {a.name: helper.get_attribute_value(a) for a in site.conv.attribute}
    nodes.append(helper.make_node("Conv", [f"{tag}_x", f"{tag}_wd", f"{tag}_bd"], [f"{tag}_y"], **attrs))
    nodes.append(helper.make_node("QuantizeLinear", [f"{tag}_y", one, zero], [f"{tag}_q"]))
    levels = shared(np.array(site.neuron.levels), f"std_levels{site.neuron.levels}", np.uint8)
    counts = site.neuron.quant.output[0]
    if not site.out_views:
        return nodes + [helper.make_node("Min", [f"{tag}_q", levels], [counts])]
    nodes.append(helper.make_node("Min", [f"{tag}_q", levels], [f"{tag}_c"]))
    return nodes + _replay(site.out_views, f"{tag}_c", counts, tag)


def requantize_neurons(proto: Any, ctx: PassContext) -> dict:
    """A neuron after a dense conv fed by spikes joins the conv: ``QuantizeLinear`` of scale 1
    after it writes the counts, so runtimes run the pair as one integer conv that requantizes in
    the kernel (onnxruntime's ``QLinearConv``). The conv's weights are ``m`` times the integers,
    its int32 bias and per-channel scale those :func:`.requant.requant_params` finds and checks:
    the half-to-even rounding of the kernel then gives the neuron's half-up count for every
    reachable accumulator (docs/method.md §7). Layers where no exact parameters exist stay."""
    from onnx import numpy_helper

    pp = Peephole(proto)
    replace: dict[int, list] = {}
    for q in pp.g.node:
        nrn = _neuron_at(pp, q)
        site = nrn and _conv_site(pp, nrn)
        if not site:
            continue
        ints = numpy_helper.to_array(pp.inits[site.weight]).astype(np.int64)
        bias = (numpy_helper.to_array(pp.inits[site.conv.input[2]]).astype(np.float64)
                if len(site.conv.input) > 2 and site.conv.input[2] else np.zeros(ints.shape[0]))
        D = float(nrn.levels)
        r = requant_params(ints.reshape(ints.shape[0], -1), D * site.in_scale * site.scale, D * bias + 0.5,
                           nrn.levels, _levels(pp, site.spikes))
        if r is not None:
            replace[id(q)] = _fused_nodes(pp, site, r, f"rq{len(replace)}")
    nodes = [n for old in pp.g.node for n in replace.get(id(old), [old])]
    del pp.g.node[:]
    pp.g.node.extend(nodes)
    drop_dead(proto)
    return {"requantized_layers": len(replace)}


_ELEMENTWISE = {"Mul", "Add", "Sub", "Div", "Clip", "Floor", "QuantizeLinear", "DequantizeLinear", "Min", "Max",
                "Cast", "Relu", "Identity"}


def _unit_lead(shapes: dict, n: Any) -> bool:
    """``n`` is a Reshape that only puts a leading axis of 1 in front (the time axis at T = 1)."""
    if n.op_type != "Reshape":
        return False
    a, b = shapes.get(n.input[0]), shapes.get(n.output[0])
    return a is not None and b is not None and b == [1, *a]


def _rank_free(pp: Peephole, start: str, outputs: set[str]) -> bool:
    """Every reader of ``start``, followed through elementwise ops, is elementwise or a Reshape to
    explicit dimensions: the values then do not depend on ``start`` having its leading unit axis."""
    from onnx import numpy_helper

    todo, seen = [start], set()
    while todo:
        name = todo.pop()
        if name in outputs:
            return False
        for r in pp.consumers.get(name, []):
            if r.op_type == "Reshape" and r.input[0] == name:
                target = pp.inits.get(r.input[1])
                if target is None or (numpy_helper.to_array(target) == 0).any():
                    return False
            elif r.op_type in _ELEMENTWISE:
                if r.output[0] not in seen:
                    seen.add(r.output[0])
                    todo.append(r.output[0])
            else:
                return False
    return True


def drop_unit_time_axis(proto: Any, ctx: PassContext) -> dict:
    """At T = 1 the traced graph puts a time axis of 1 in front of every neuron's input
    (``reshape(T, B, ...)``) and takes it off after: a Reshape each way around elementwise ops.
    Where nothing in between needs the axis, it goes: the runtimes then keep their channels-last
    layouts from one integer conv to the next instead of reordering every tensor to plain layout
    for each Reshape (measured in OpenVINO's profile: the largest cost after the convs)."""
    shapes = static_shapes(proto)
    pp = Peephole(proto)
    outputs = {o.name for o in pp.g.output}
    alias = {n.output[0]: n.input[0] for n in pp.g.node
             if _unit_lead(shapes, n) and _rank_free(pp, n.output[0], outputs)}
    for n in pp.g.node:
        n.input[:] = [alias.get(i, i) for i in n.input]
    drop_dead(proto)
    shapes = static_shapes(proto)     # a Reshape back to the shape its input now has is a no-op
    pp = Peephole(proto)
    noop = {n.output[0]: n.input[0] for n in pp.g.node if n.op_type == "Reshape" and n.output[0] not in outputs
            and shapes.get(n.input[0]) is not None and shapes.get(n.input[0]) == shapes.get(n.output[0])
            and sum(d is None for d in shapes[n.input[0]]) <= 1}
    for n in pp.g.node:
        n.input[:] = [noop.get(i, i) for i in n.input]
    drop_dead(proto)
    return {"time_axes_dropped": len(alias), "reshapes_dropped": len(alias) + len(noop)}


__all__ = ["FORMAT", "StdExportNeuron", "standard_module", "integer_weights", "requantize_neurons",
           "drop_unit_time_axis"]
