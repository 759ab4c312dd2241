"""The parity contract of an exported file (docs/method.md §7).

A spiking network rounds every neuron's membrane input to an integer count. A count whose input
lies within float rounding of a ``k + 0.5`` boundary can fire differently in two correct float32
implementations, and on a badly conditioned model the flip cascades through the blocks (measured
on ``qsd_8_256`` with random statistics at 224 px: PyTorch float32 against float64 changes 34 of 64
images' logits, by up to 0.12 at a logit scale of 0.85). No end-to-end tolerance separates that
from an export error, so the file is checked layer by layer, fed the same spikes:

* every neuron's spike tensor in the graph is located (by value, in either channel layout), the
  graph is cut there and fed PyTorch's spikes, so each layer computes from exactly PyTorch's input
  spikes and nothing cascades;
* a count that differs from PyTorch's is allowed only where PyTorch's membrane input, moved by
  ``FRAGILE_REL`` of the tensor's largest magnitude, fires differently (float rounding can reach
  it); any other is an export error, named by its neuron and its number of flipped spikes;
* the logits computed from PyTorch's last spikes must match within ``RTOL``.

By induction, a file that passes with no flip at all gives PyTorch's logits on every image; with
flips, its end-to-end differences are float rounding cascading, reported beside the figures of
PyTorch float32 against float64 on ``float64_samples`` images when asked (float64 convolutions
cost about ten times float32 ones on a CPU).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import QsdError
from ..neurons import Neuron, set_spike_mode
from .folding import is_weight_layer, quantized_weight
from .graph import INPUT_NAME, OUTPUT_NAME
from .runtime import Runtime, parity_runtime

FRAGILE_REL = 1e-5   # float32 rounding moves a membrane input by far less (docs/method.md §7)
RTOL = 1e-4          # logits from the same spikes: |diff| <= RTOL * max(1, max |logit|)
CHUNK = 8            # images per pass (every neuron's counts of a 224 px model are held at once)
_UINT8, _FLOAT = 2, 1


def float64_reference(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` whose weight layers hold exactly the integers times scales the
    export stores (plain layers: the quantizer is not re-run in float64)."""
    m = copy.deepcopy(model).cpu().eval()
    set_spike_mode(m, "integer")
    for name, layer in list(m.named_modules()):
        if is_weight_layer(layer) and getattr(layer, "quant_weight", None) is not None:
            m.set_submodule(name, _plain_layer(layer))
    return m.double().eval()


def _plain_layer(layer: nn.Module) -> nn.Module:
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=bias)
    else:
        kind = nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d
        new = kind(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                   padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=bias,
                   padding_mode=getattr(layer, "padding_mode", "zeros"))
    new = new.double()
    with torch.no_grad():
        new.weight.copy_(quantized_weight(layer).dequantized().reshape(new.weight.shape))
        if bias:
            new.bias.copy_(layer.bias.detach().double())
    return new


@dataclass
class _Record:
    """One neuron call of the reference: counts and fragile positions as ``(T*B, C, S)``."""
    name: str
    counts: torch.Tensor
    fragile: torch.Tensor


def _reference_pass(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, list[_Record]]:
    """PyTorch's logits and, per spiking neuron in call order, its counts and fragile positions."""
    records: list[_Record] = []

    def hook(mod: Neuron, args: tuple, _out: Any, name: str) -> None:
        u = args[0]
        s = mod.spike_count(u)
        eps = FRAGILE_REL * max(1.0, float(u.abs().max()))
        fragile = (mod.spike_count(u + eps) != s) | (mod.spike_count(u - eps) != s)
        tb = s.shape[0] * s.shape[1]
        records.append(_Record(name, s.reshape(tb, s.shape[2], -1).to(torch.uint8),
                               fragile.reshape(tb, s.shape[2], -1)))

    handles = [n.register_forward_hook(lambda m, a, o, _n=name: hook(m, a, o, _n))
               for name, n in model.named_modules() if isinstance(n, Neuron) and n.spiking]
    try:
        with torch.no_grad():
            logits = model(x).float().numpy()
    finally:
        for h in handles:
            h.remove()
    return logits, records


def _flat(rec_t: torch.Tensor, layout: str) -> np.ndarray:
    """A ``(T*B, C, S)`` tensor flattened channels-first (``cf``) or channels-last (``cl``, token-major)."""
    tb = rec_t.shape[0]
    return (rec_t if layout == "cf" else rec_t.permute(0, 2, 1)).reshape(tb, -1).numpy()


LAYOUTS = ("cf", "cl")


def spike_tensors(proto: Any) -> list[tuple[str, int]]:
    """Tensors of the graph that may hold a neuron's counts, in graph order: uint8 casts and
    ``Min`` outputs (the integer format), uint8 ``QuantizeLinear`` outputs (``std-int``), ``Floor``
    outputs (float neurons; not one a ``QuantizeLinear`` alone reads: that one is the count),
    float ``Concat`` outputs (the time steps of a LIF neuron)."""
    import onnx

    types = {v.name: v.type.tensor_type.elem_type
             for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    readers: dict[str, list[str]] = {}
    for n in proto.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    out = []
    for n in proto.graph.node:
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        if n.op_type == "Cast" and to == _UINT8:
            out.append((n.output[0], _UINT8))
        elif n.op_type in ("Min", "QuantizeLinear") and types.get(n.output[0]) == _UINT8:
            out.append((n.output[0], _UINT8))
        elif n.op_type == "Floor" and readers.get(n.output[0]) == ["QuantizeLinear"]:
            continue
        elif n.op_type == "Floor" or (n.op_type == "Concat" and types.get(n.output[0]) == _FLOAT):
            out.append((n.output[0], _FLOAT))  # Concat: a multi-step (LIF) neuron stacks its steps
    return out


@dataclass
class _Site:
    """A neuron located in the graph: its tensor, dtype and layout."""
    neuron: str
    tensor: str
    elem_type: int
    layout: str
    flips: int = 0           # counts that differ from the reference, fed the same spikes
    unexplained: int = 0     # of those, not at a fragile position
    fragile: int = 0
    elements: int = 0


def _with_outputs(proto: Any, names: list[tuple[str, int]]) -> Any:
    import onnx

    p = onnx.ModelProto()
    p.CopyFrom(proto)
    have = {o.name for o in p.graph.output}
    for name, et in names:
        if name not in have:
            p.graph.output.append(onnx.helper.make_tensor_value_info(name, et, None))
    return p


def _cut(proto: Any, sites: list[_Site], ranks: dict[str, int]) -> Any:
    """The graph with every site's readers fed from a new input ``<tensor>__fed`` of the tensor's
    rank (OpenVINO converts each op when it reads the file, and a conv needs its input's rank)."""
    import onnx

    p = _with_outputs(proto, [(s.tensor, s.elem_type) for s in sites])
    fed = {s.tensor: s for s in sites}
    for node in p.graph.node:
        for i, name in enumerate(node.input):
            if name in fed:
                node.input[i] = name + "__fed"
    for s in sites:
        p.graph.input.append(onnx.helper.make_tensor_value_info(s.tensor + "__fed", s.elem_type,
                                                                [None] * ranks[s.tensor]))
    return p


MATCH_SAMPLE = 16384  # counts compared when locating a neuron (evenly spaced over the whole tensor)
MATCH_TIE = 1e-3     # candidates this close to the best are told apart by graph order


def _layouts(shape: tuple[int, ...], counts: torch.Tensor) -> tuple[str, ...]:
    """The layouts a graph tensor of ``shape`` can hold a ``(T*B, C, S)`` neuron in, read from its
    shape: channels then positions (``cf``: ``(.., C, H, W)``, ``(TB, C, S)``) or positions then
    channels (``cl``: ``(TB, S, C)``, ``(TB*S, C)``); both where the shape cannot tell (C == S)."""
    tb, c, n = counts.shape
    cf = any(shape[k] == c and math.prod(shape[k + 1:]) == n for k in range(len(shape)))
    cl = len(shape) > 0 and shape[-1] == c and math.prod(shape) == tb * n * c
    found = tuple(name for name, ok in (("cf", cf), ("cl", cl)) if ok)
    return found or LAYOUTS


def _sample(flat: np.ndarray) -> np.ndarray:
    return flat[:: max(1, -(-flat.size // MATCH_SAMPLE))]


def _match(records: list[_Record], values: dict[str, np.ndarray], candidates: list[tuple[str, int]]
           ) -> tuple[list[_Site], list[str]]:
    """Each neuron's tensor: among unused candidates of its size, the one (and layout) closest in
    value, the next in graph order among near-equals (a fresh model's consecutive blocks fire
    almost alike); a neuron whose best candidate differs in over half its counts stays unmatched.
    The layout comes from the tensor's shape where it tells (:func:`_layouts`): a neuron that
    mostly saturates matches its own tensor read in either layout almost as well, and reading it
    transposed would count every unsaturated count as a flip."""
    order = {name: k for k, (name, _) in enumerate(candidates)}
    sampled = {name: _sample(values[name].reshape(-1)) for name, _ in candidates}
    used: set[str] = set()
    last = -1
    sites, unmatched = [], []
    for rec in records:
        layouts = {k: _sample(_flat(rec.counts, k).reshape(-1)) for k in LAYOUTS}
        scored = [(float((sampled[name] != layouts[layout]).mean()), name, et, layout)
                  for name, et in candidates if name not in used and values[name].size == rec.counts.numel()
                  for layout in _layouts(values[name].shape, rec.counts)]
        if not scored or min(sc[0] for sc in scored) > 0.5:
            unmatched.append(rec.name)
            continue
        best = min(sc[0] for sc in scored)
        near = [sc for sc in scored if sc[0] <= best + MATCH_TIE]
        frac, name, et, layout = min(near, key=lambda sc: (order[sc[1]] <= last, order[sc[1]], sc[0]))
        used.add(name)
        last = order[name]
        sites.append(_Site(rec.name, name, et, layout))
    return sites, unmatched


@dataclass
class ParityReport:
    """What the check measured, gathered over the chunks."""
    n: int = 0
    logits: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"x": [], "pt": [], "cut": []})
    sites: list[_Site] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    cut_session: Any = None   # the file cut at the located neurons (made on the first chunk)
    runtime: Runtime = field(default_factory=Runtime)


def _feed(site: _Site, rec: _Record, shape: tuple[int, ...]) -> np.ndarray:
    arr = _flat(rec.counts, site.layout).reshape(shape)
    return arr.astype(np.uint8 if site.elem_type == _UINT8 else np.float32)


def _check_chunk(rep: ParityReport, sess: Any, proto: Any, model: nn.Module, x: torch.Tensor,
                 candidates: list[tuple[str, int]]) -> None:
    """One chunk: PyTorch with its spikes, the file as is (with the candidate tensors), the cut file."""
    logits, records = _reference_pass(model, x)
    rep.logits["pt"].append(logits)
    names = [c[0] for c in candidates]
    outs = sess.run([OUTPUT_NAME] + names, {INPUT_NAME: x.float().numpy()})
    rep.logits["x"].append(outs[0])
    values = dict(zip(names, outs[1:]))
    if rep.cut_session is None:  # the first chunk locates the neurons
        rep.sites, rep.unmatched = _match(records, values, candidates)
        rep.cut_session = rep.runtime.session(_cut(proto, rep.sites, {k: v.ndim for k, v in values.items()}))
    by_name = {r.name: r for r in records}
    feeds = {INPUT_NAME: x.float().numpy()}
    for s in rep.sites:
        feeds[s.tensor + "__fed"] = _feed(s, by_name[s.neuron], values[s.tensor].shape)
    cut_out = rep.cut_session.run([OUTPUT_NAME] + [s.tensor for s in rep.sites], feeds)
    rep.logits["cut"].append(cut_out[0])
    for s, got in zip(rep.sites, cut_out[1:]):
        rec = by_name[s.neuron]
        want = _flat(rec.counts, s.layout)
        fragile = _flat(rec.fragile, s.layout)
        diff = got.reshape(want.shape).astype(np.int64) != want
        s.flips += int(diff.sum())
        s.unexplained += int((diff & ~fragile).sum())
        s.fragile += int(fragile.sum())
        s.elements += int(want.size)


def measure_parity(proto: Any, model: nn.Module, x: torch.Tensor, float64_samples: int = 0,
                   chunk: int = CHUNK, runtime: Runtime | None = None) -> dict:
    """Run the contract on images ``x`` under ``runtime`` (onnxruntime by default); the result dict
    (``parity_ok`` and the figures). With ``float64_samples``, the first that many images also
    compare the file and PyTorch float32 with PyTorch float64."""
    model.eval()
    candidates = spike_tensors(proto)
    rt = runtime or Runtime()
    sess = rt.session(_with_outputs(proto, candidates))
    rep = ParityReport(n=int(x.shape[0]), runtime=rt)
    for i in range(0, x.shape[0], chunk):
        _check_chunk(rep, sess, proto, model, x[i:i + chunk], candidates)
    res = {**_summary(rep), "parity_runtime": rt.name, "parity_precision": sess.precision}
    if float64_samples > 0:
        res["float64"] = _against_float64(model, x[:float64_samples], np.concatenate(rep.logits["x"]),
                                          np.concatenate(rep.logits["pt"]))
    return res


def _against_float64(model: nn.Module, x: torch.Tensor, file_logits: np.ndarray, pt_logits: np.ndarray) -> dict:
    """How far the file and PyTorch float32 each are from PyTorch float64 on ``x``."""
    with torch.no_grad():
        l64 = float64_reference(model)(x.double()).numpy()
    n = int(x.shape[0])
    lx, l32 = file_logits[:n], pt_logits[:n]
    tol = RTOL * max(1.0, float(np.abs(l64).max()))
    return {"samples": n, "tolerance": tol,
            "file_images_beyond_tolerance": int((np.abs(lx - l64).max(1) > tol).sum()),
            "pytorch_float32_images_beyond_tolerance": int((np.abs(l32 - l64).max(1) > tol).sum()),
            "file_top1_agreement": float((lx.argmax(1) == l64.argmax(1)).mean()),
            "pytorch_float32_top1_agreement": float((l32.argmax(1) == l64.argmax(1)).mean())}


def _summary(rep: ParityReport) -> dict:
    lx, lpt, lcut = (np.concatenate(rep.logits[k]) for k in ("x", "pt", "cut"))
    scale = float(np.abs(lpt).max())
    tol = RTOL * max(1.0, scale)
    per_image = np.abs(lx - lpt).max(1)
    cut_diff = float(np.abs(lcut - lpt).max())
    first_bad = next((s for s in rep.sites if s.unexplained), None)
    match = per_image <= tol
    return {
        "parity_ok": bool(first_bad is None and not rep.unmatched and cut_diff <= tol),
        "parity_samples": rep.n, "layers_checked": len(rep.sites), "layers_unmatched": rep.unmatched,
        "spike_flips": int(sum(s.flips for s in rep.sites)),
        "spike_flips_unexplained": int(sum(s.unexplained for s in rep.sites)),
        "fragile_spikes": int(sum(s.fragile for s in rep.sites)),
        "spikes_checked": int(sum(s.elements for s in rep.sites)),
        "first_divergent_layer": ({"neuron": first_bad.neuron, "flips": first_bad.unexplained,
                                   "of": first_bad.elements} if first_bad else None),
        "logits_from_same_spikes_max_diff": cut_diff,
        # end to end, the file against PyTorch float32 (flips at fragile spikes cascade here)
        "max_abs_diff": float(per_image.max()),
        "max_abs_diff_matching": float(per_image[match].max()) if match.any() else None,
        "top1_agreement": float((lx.argmax(1) == lpt.argmax(1)).mean()), "images_differing": int((~match).sum()),
        "logit_scale": scale, "tolerance": tol,
    }


def parity_error(res: dict) -> QsdError:
    """The one-line error of a failed check: the first layer that diverges, else what failed."""
    bad = res.get("first_divergent_layer")
    if bad:
        why = (f"layer {bad['neuron']} diverges: fed PyTorch's input spikes, {bad['flips']} of its "
               f"{bad['of']} spikes differ beyond float rounding")
    elif res.get("layers_unmatched"):
        why = f"no tensor of the graph reproduces the spikes of {res['layers_unmatched'][0]}"
    else:
        why = (f"the logits computed from PyTorch's last spikes differ by "
               f"{res['logits_from_same_spikes_max_diff']:.3g} (tolerance {res['tolerance']:.3g})")
    where = f" under {res['parity_runtime']} ({res['parity_precision']})" if res.get("parity_runtime") else ""
    return QsdError(f"ONNX parity failed{where} on {res['parity_samples']} images: {why}; the file was not written "
                    f"(--unchecked writes it anyway, marked so)")


def check_parity(proto_or_path: Any, model: nn.Module, x: torch.Tensor, raise_error: bool = True,
                 float64_samples: int = 0, runtime: Runtime | str = "onnxruntime") -> dict:
    """The parity contract (:mod:`.parity`, docs/method.md §7) of an ONNX model or file against
    ``model`` on images ``x``, run by ``runtime`` (a name: at the precision the contract holds in,
    OpenVINO at f32; or a :class:`Runtime`): every layer fed PyTorch's spikes reproduces them
    except where float rounding can reach, and the logits from PyTorch's last spikes match.
    Raises a one-line :class:`QsdError` naming the first layer that diverges unless
    ``raise_error`` is False."""
    import onnx

    proto = proto_or_path
    if not hasattr(proto, "graph"):
        p = Path(proto_or_path)
        if not p.exists():
            raise QsdError(f"file not found: {p}")
        proto = onnx.load(str(p))
    rt = runtime if isinstance(runtime, Runtime) else parity_runtime(runtime)
    res = measure_parity(proto, model, x, float64_samples=float64_samples, runtime=rt)
    if raise_error and not res["parity_ok"]:
        raise parity_error(res)
    return res


__all__ = ["check_parity", "measure_parity", "float64_reference", "spike_tensors", "parity_error", "FRAGILE_REL", "RTOL"]
