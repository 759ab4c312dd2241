"""A neuron fused into the integer conv before it: ``QLinearConv`` writes the spike counts as uint8.

In the ``int`` graph a neuron after an integer layer is ``Cast(Clip(acc * A + B, 0, D), UINT8)``
on the float output of ``MatMulIntegerToFloat`` (``A``, ``B`` per channel: BatchNorm, IE-LIF,
``D`` and the neuron's ``+0.5`` folded in). That float tensor is written and read again only to
be turned back into bytes; at the large early stages this traffic, not the arithmetic, is the
cost. ``QLinearConv`` (uint8 x int8, int32 sums) requantizes in the kernel instead:
``clamp(round_half_even(float(m * acc + b) * M), 0, 255)`` with an int32 bias ``b`` and a float
per-channel multiplier ``M``, and onnxruntime runs it channels-last without the im2col we would
otherwise write. Half-even rounding of a float multiplier is not the neuron's floor, but the
accumulator is an integer: the neuron's count is a step function of ``acc`` with integer
thresholds ``c_1 <= ... <= c_D``, and any ``(m, b, M)`` that puts every rounding boundary strictly
between ``c_k - 1`` and ``c_k`` gives the same counts for every input, with no tie to break
(docs/method.md §7). The weights are multiplied by an integer ``m`` (int4 values x 16 still fit
int8) so the integer bias can place the boundaries finely. :func:`requant_params` finds such
parameters per channel and checks them with the kernel's own float32 arithmetic; a layer where
some channel has none keeps the unfused form.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .graph import Peephole, node_attr, packed_tensor

_EXACT = 2 ** 24   # int32 -> float32 is exact below this
_MARGIN = 2e-6     # distance kept between a rounding boundary and the nearest reachable value (> float32 error at v <= 16)


@dataclass
class ConvSite:
    """What the integer rewrite knew about a conv it turned into ``MatMulIntegerToFloat``: its
    channels-last uint8 input (before any im2col) and its geometry."""

    x: str                 # (N, *spatial, Cin) uint8 spikes
    ints: np.ndarray       # (Cout, Cin, *kernel) integer weights
    pads: list[int]
    strides: list[int]
    spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    in_max: int            # largest input spike count
    sbits: int             # storage bits of the packed weights


@dataclass
class Requant:
    """Per output channel: the weights' integer factor (sign included), the int32 bias and the
    float32 multiplier of ``QLinearConv``."""

    factor: np.ndarray     # int64 (Cout,)
    bias: np.ndarray       # int32 (Cout,)
    scale: np.ndarray      # float32 (Cout,)


def spike_thresholds(A: np.ndarray, B: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """The count ``clip(floor(A*acc + B), 0, D)`` as a function of ``a = sign * acc``: ``sign``
    (C,) and integer thresholds ``c`` (C, D) with ``count = #{k: a >= c_k}`` (real arithmetic;
    ``A = 0`` gives sign 0)."""
    A = A.astype(np.float64)[:, None]
    B = B.astype(np.float64)[:, None]
    k = np.arange(1, levels + 1, dtype=np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (k - B) / A
    sign = np.sign(A[:, 0]).astype(np.int64)
    pos = np.ceil(t)
    neg = -np.floor(t)
    c = np.where(sign[:, None] > 0, pos, neg)
    c = np.where(sign[:, None] == 0, np.where(B >= k, -np.inf, np.inf), c)
    return sign, c


def _simulate(m: np.ndarray, b: np.ndarray, scale: np.ndarray, a: np.ndarray, levels: int) -> np.ndarray:
    """onnxruntime's requantization of ``m*a + b`` (int32 -> float32, times the float32 scale,
    round half to even, clamp to uint8), then the neuron's upper clamp."""
    v = (m * a + b).astype(np.float32) * scale.astype(np.float32)
    return np.minimum(np.clip(np.rint(v), 0, 255), levels)


def _best_bias(m: np.ndarray, lo_pts: np.ndarray, hi_pts: np.ndarray, k: np.ndarray, b0: np.ndarray,
               span: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For integer biases near ``b0`` the interval of ``u = 1/M`` that puts every boundary
    ``k - 0.5`` strictly between ``hi_pts`` (largest a below level k) and ``lo_pts`` (smallest a
    at level k); returns the bias with the widest interval (relative), and that interval."""
    cand = np.round(b0)[:, None] + np.arange(-span, span + 1)[None, :]          # (C, nb)
    mm = m[:, None, None]
    num_hi = mm * lo_pts[:, None, :] + cand[:, :, None]    # v(lo_pt) * u  must be >= (k - .5 + eps) u
    num_lo = mm * hi_pts[:, None, :] + cand[:, :, None]    # v(hi_pt) * u  must be <= (k - .5 - eps) u
    kk = k[None, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(np.isfinite(lo_pts)[:, None, :], num_hi / (kk - 0.5 + _MARGIN), np.inf).min(-1)
        low = np.where(np.isfinite(hi_pts)[:, None, :], num_lo / (kk - 0.5 - _MARGIN), 0.0).max(-1)
    low = np.maximum(low, 0.0)
    width = np.where(up > low, np.log(np.maximum(up, 1e-300)) - np.log(np.maximum(low, 1e-300)), -np.inf)
    pick = width.argmax(1)
    rows = np.arange(len(m))
    return cand[rows, pick], low[rows, pick], up[rows, pick]


def requant_params(ints: np.ndarray, A: np.ndarray, B: np.ndarray, levels: int, in_max: int) -> Requant | None:
    """``QLinearConv`` parameters that reproduce ``clip(floor(A*acc + B), 0, D)`` for every
    reachable ``acc = sum(ints * S)`` (``S`` in ``0..in_max``), or None when some channel has
    none. ``ints``: (Cout, K)."""
    w = ints.reshape(ints.shape[0], -1).astype(np.int64)
    sign, c = spike_thresholds(A, B, levels)
    lo_acc = in_max * np.minimum(w, 0).sum(1)
    hi_acc = in_max * np.maximum(w, 0).sum(1)
    s = np.where(sign == 0, 1, sign)
    alo = np.where(s > 0, lo_acc, -hi_acc).astype(np.float64)
    ahi = np.where(s > 0, hi_acc, -lo_acc).astype(np.float64)
    # level k is reached inside the range at lo_pt = max(c_k, alo); missed below hi_pt = min(c_k - 1, ahi)
    reached = c <= ahi[:, None]
    missed = c > alo[:, None]
    lo_pts = np.where(reached, np.maximum(c, alo[:, None]), np.inf)
    hi_pts = np.where(missed, np.minimum(c - 1, ahi[:, None]), -np.inf)
    constant = (sign == 0) | ~(reached & missed).any(1)
    count = reached.sum(1)                                  # the count where it is constant
    sw = w * s[:, None]
    pos = np.maximum(sw.max(1), 1)
    neg = np.maximum(-sw.min(1), 1)
    amax = np.maximum(np.abs(alo), np.abs(ahi)) + 1
    m = np.minimum(np.minimum(127 // pos, 128 // neg), (_EXACT // 4) // amax.astype(np.int64))
    if (m[~constant] < 1).any():
        return None
    m = np.maximum(m, 1)
    k = np.arange(1, levels + 1, dtype=np.float64)
    absA = np.abs(A.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        u0 = np.where(absA > 0, m / absA, 1.0)
    b0 = np.nan_to_num((B.astype(np.float64) - 0.5) * u0)
    b, low, up = _best_bias(m.astype(np.float64), lo_pts, hi_pts, k, b0, span=2 * int(m.max()) + 2)
    ok = constant | (up > low)
    if not ok.all():
        return None
    u = np.where(low > 0, np.sqrt(np.maximum(low, 1e-300) * np.maximum(up, 1e-300)), up / 2)
    scale = np.where(constant, 1.0, 1.0 / u).astype(np.float32)
    factor = np.where(constant, 0, m * s)
    bias = np.where(constant, count, b)
    if np.abs(bias).max(initial=0) + (np.abs(factor) * amax).max(initial=0) >= _EXACT:
        return None
    r = Requant(factor.astype(np.int64), bias.astype(np.int32), scale)
    return r if verify(r, sign, c, alo, ahi, levels) else None


def verify(r: Requant, sign: np.ndarray, c: np.ndarray, alo: np.ndarray, ahi: np.ndarray, levels: int) -> bool:
    """The requantized count equals the neuron's at every threshold (both counts are
    nondecreasing in ``a``, so agreeing at every step agrees everywhere in ``[alo, ahi]``)."""
    m = np.abs(r.factor)
    for k in range(1, levels + 1):
        ck = c[:, k - 1]
        at = np.clip(ck, alo, ahi)        # the count there must be >= k exactly when ck <= at
        below = np.clip(ck - 1, alo, ahi)
        got_at = _simulate(m, r.bias.astype(np.int64), r.scale, at.astype(np.int64), levels)
        got_below = _simulate(m, r.bias.astype(np.int64), r.scale, below.astype(np.int64), levels)
        if ((got_at >= k) != (ck <= at)).any() or ((got_below >= k) != (ck <= below)).any():
            return False
    return True


def _resolve(name: str, alias: dict[str, str]) -> str:
    while name in alias:
        name = alias[name]
    return name


def _qlinear_conv(pp: Peephole, site: ConvSite, r: Requant, out: str, tag: str) -> list:
    """Nodes computing the uint8 spike counts (before the upper clamp) channels-last into
    ``out``, shaped like the ``MatMulIntegerToFloat`` output they replace: (N, *out_spatial, Cout).
    1-d convs run as 2-d ones of width 1."""
    from onnx import helper

    cout, cin = site.ints.shape[:2]
    nd = len(site.spatial)
    w4 = site.ints.reshape(cout, cin, *site.ints.shape[2:], *([1] * (2 - nd)))
    pads = [*site.pads[:nd], *([0] * (2 - nd)), *site.pads[nd:], *([0] * (2 - nd))]
    strides = [*site.strides, *([1] * (2 - nd))]
    w = pp.g.initializer.add()
    w.CopyFrom(packed_tensor(f"{tag}_w", w4, site.sbits))
    i32, i8 = 6, 3   # TensorProto.INT32, INT8
    add = pp.add_init
    factor = add(r.factor.reshape(-1, 1, 1, 1), f"{tag}_m", np.int16)   # |m| <= 127
    nodes = [helper.make_node("Cast", [w.name], [f"{tag}_w32"], to=i32),
             helper.make_node("Cast", [factor], [f"{tag}_m32"], to=i32),
             helper.make_node("Mul", [f"{tag}_w32", f"{tag}_m32"], [f"{tag}_wm"]),
             helper.make_node("Cast", [f"{tag}_wm"], [f"{tag}_w8"], to=i8)]
    x = site.x
    if nd == 1:
        shape = add(np.array([-1, site.spatial[0], 1, cin]), f"{tag}_s4", np.int64)
        nodes.append(helper.make_node("Reshape", [x, shape], [f"{tag}_x4"]))
        x = f"{tag}_x4"
    one = pp.shared_init(np.array(1.0), "rq_one")
    zero_u8 = pp.shared_init(np.array(0), "rq_zero", np.uint8)
    wz = pp.shared_init(np.array(0), "rq_wzero", np.int8)
    inputs = [f"{tag}_xc", one, zero_u8, f"{tag}_w8", add(r.scale, f"{tag}_ws"),
              wz, one, zero_u8, add(r.bias, f"{tag}_b", np.int32)]
    nodes += [helper.make_node("Transpose", [x], [f"{tag}_xc"], perm=[0, 3, 1, 2]),
              helper.make_node("QLinearConv", inputs, [f"{tag}_q"], kernel_shape=list(w4.shape[2:]),
                               pads=pads, strides=strides),
              helper.make_node("Transpose", [f"{tag}_q"], [f"{tag}_ql" if nd == 1 else out], perm=[0, 2, 3, 1])]
    if nd == 1:
        shape = add(np.array([-1, site.out_spatial[0], cout]), f"{tag}_s3", np.int64)
        nodes.append(helper.make_node("Reshape", [f"{tag}_ql", shape], [out]))
    return nodes


def _neuron_on_gemm(pp: Peephole, clip: Any, sites: dict[str, ConvSite], have: set[str]) -> tuple | None:
    """For ``Clip(v, 0, D)`` whose value is read only as uint8 counts (``Cast``) or float counts
    (``Floor``), over a ``MatMulIntegerToFloat`` of a recorded conv (through reshapes) with
    constant scales and bias: ``(gemm, site, v, D, casts, floors)``; else None."""
    if clip.op_type != "Clip" or len(clip.input) != 3 or pp.scalar(clip.input[1]) != 0.0 \
            or pp.scalar(clip.input[2]) is None:
        return None
    outs = pp.consumers.get(clip.output[0], [])
    casts = [n for n in outs if n.op_type == "Cast" and node_attr(n, "to", 0) == 2]
    floors = [n for n in outs if n.op_type == "Floor"]
    if not casts or len(casts) + len(floors) != len(outs) or pp.readers.get(clip.output[0]) != len(outs):
        return None
    levels = pp.scalar(clip.input[2])
    v = clip.input[0]
    while pp.only_reader(v, "Reshape"):
        v = pp.producer[v].input[0]
    mm = pp.only_reader(v, "MatMulIntegerToFloat")
    site = sites.get(mm.input[1]) if mm is not None else None
    if mm is None or site is None or levels != int(levels) or site.x not in have:
        return None
    if len(mm.input) < 4 or any(i not in pp.inits for i in mm.input[2:4]) or (
            len(mm.input) > 6 and mm.input[6] and mm.input[6] not in pp.inits):
        return None
    return mm, site, v, int(levels), casts, floors


def _gemm_requant(pp: Peephole, mm: Any, site: ConvSite, levels: int) -> Requant | None:
    """The ``QLinearConv`` parameters of the neuron ``clip(floor(A*acc + B), 0, D)`` that the
    GEMM's scales and bias (the neuron's D and 0.5 folded in) describe, when they exist."""
    from onnx import numpy_helper

    arr = lambda name: numpy_helper.to_array(pp.inits[name]).astype(np.float32)  # noqa: E731
    scale = arr(mm.input[3]).reshape(-1)
    A = (np.float32(arr(mm.input[2]).reshape(-1)[0]) * scale).astype(np.float32)
    B = arr(mm.input[6]).reshape(-1) if len(mm.input) > 6 and mm.input[6] else np.zeros_like(A)
    return requant_params(site.ints, A, B, levels, site.in_max)


def _counts_from(pp: Peephole, clip: Any, levels: int, casts: list, floors: list) -> str:
    """``clip`` becomes ``Min(counts, D)`` on uint8 and writes the first Cast's tensor; the Floors
    read those counts cast back to float. Returns that tensor."""
    from onnx import helper

    u8 = casts[0].output[0]
    clip.op_type = "Min"
    clip.input[:] = [clip.input[0], pp.shared_init(np.array(levels), f"rq_levels{levels}", np.uint8)]
    clip.output[0] = u8
    for f in floors:   # float counts: the uint8 counts cast back
        f.op_type = "Cast"
        f.input[:] = [u8]
        f.attribute.append(helper.make_attribute("to", 1))
    return u8


def fuse_neurons(proto: Any, sites: dict[str, ConvSite], alias: dict[str, str]) -> int:
    """``Cast(Clip(MatMulIntegerToFloat(...), 0, D), UINT8)`` over a conv recorded in ``sites``
    (keyed by the integer weight tensor the GEMM reads: folds rename the GEMM's output, not that)
    -> ``Min(QLinearConv(...), D)`` with uint8 out, where :func:`requant_params` finds exact
    parameters (module docstring). Returns the number of layers fused."""
    pp = Peephole(proto)
    # names as they are after the merges of duplicate nodes
    sites = {_resolve(w, alias): replace(site, x=_resolve(site.x, alias)) for w, site in sites.items()}
    have = set(pp.producer) | {i.name for i in pp.g.input} | set(pp.inits)
    fused: dict[int, list] = {}
    drop: set[int] = set()
    position = {id(n): k for k, n in enumerate(pp.g.node)}
    rename: dict[str, str] = {}
    for clip in list(pp.g.node):
        found = _neuron_on_gemm(pp, clip, sites, have)
        r = found and _gemm_requant(pp, found[0], found[1], found[3])
        if not found or r is None:
            continue
        mm, site, v, levels, casts, floors = found
        fused[position[id(mm)]] = _qlinear_conv(pp, site, r, v, f"{v}_rq")
        u8 = _counts_from(pp, clip, levels, casts, floors)
        for c in casts:
            drop.add(position[id(c)])
            rename[c.output[0]] = u8
    nodes = []
    for k, n in enumerate(pp.g.node):
        if k in fused:
            nodes.extend(fused[k])
        elif k not in drop:
            n.input[:] = [rename.get(i, i) for i in n.input]
            nodes.append(n)
    for o in pp.g.output:
        o.name = rename.get(o.name, o.name)
    del pp.g.node[:]
    pp.g.node.extend(nodes)
    return len(fused)
