"""Spike and operation accounting: run a model over images, count spike levels per neuron, MACs
per layer, and turn them into SOPs and energy (docs/method.md §8).

* firing rate of a layer's input = mean spike count ``S`` per element and time step of the
  neuron that feeds it (the model says which: ``structure().layer_input``; an integer spike ``S``
  counts as ``S`` binary spikes). Convs that follow another conv without a neuron in between (the
  depthwise/pointwise chain of SepConv and RepConv) are one linear map of the same spikes and are
  counted at that neuron's rate.
* ``SOPs = rate * T * MACs``; the first layer sees real-valued pixels and costs
  ``E_MAC * T * MACs``; every other layer costs ``E_AC(b) * SOPs`` with ``E_AC(b) = E_AC(32) * b/32``.
  The attention products multiply spikes by spikes, not by weights, and are charged
  ``E_AC(attention_bits)`` (32 by default). Layers fed by a non-spiking activation (a counterpart
  ANN) cost ``E_MAC * T * MACs``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from ..errors import QsdError
from ..models import describe
from ..neurons import Neuron, information_entropy, iter_neurons, set_spike_mode
from ..quant import weight_layers
from ..sizing import layer_widths, model_size
from .energy import EnergyTable

@dataclass
class _Stats:
    spikes: dict[str, torch.Tensor] = field(default_factory=dict)   # neuron -> histogram (D+1,)
    elements: dict[str, int] = field(default_factory=dict)          # neuron -> elements*T seen
    macs: dict[str, float] = field(default_factory=dict)            # layer -> MACs per image and step
    attn: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # attn module -> (N, C, heads)
    correct: int = 0
    seen: int = 0
    labelled: bool = False


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> _Stats:
    """Run ``model`` (integer spikes) over batches, recording spike-level histograms, MACs per
    layer and top-1."""
    model.eval()
    set_spike_mode(model, "integer")
    st = _Stats()
    T = int(getattr(model, "T", 1))
    ctx: dict[str, int] = {"B": 1}
    hooks = []

    def neuron_hook(name: str, n: Neuron):
        def h(_m, _i, out):
            s = torch.floor(out.detach().float() / n.out_scale + 0.5) if n.spiking else out.detach().float() / n.out_scale
            s = s.clamp(0, n.levels)
            hist = torch.bincount(torch.floor(s + 0.5).long().flatten(), minlength=n.levels + 1)[: n.levels + 1]
            st.spikes[name] = st.spikes.get(name, torch.zeros(n.levels + 1, dtype=torch.long)) + hist
            st.elements[name] = st.elements.get(name, 0) + s.numel()
            st.spikes.setdefault(name + "#sum", torch.zeros((), dtype=torch.float64))
            st.spikes[name + "#sum"] += s.double().sum()
        return h

    def layer_hook(name: str, m: nn.Module):
        def h(_m, _i, out):
            if name in st.macs:
                return
            fan_in = m.weight.numel() // m.weight.shape[0]
            st.macs[name] = out.numel() / (T * ctx["B"]) * fan_in
        return h

    def attn_hook(name: str, heads: int):
        def h(_m, inp, _o):
            _T, _B, C, H, W = inp[0].shape
            st.attn[name] = (H * W, C, heads)
        return h

    for name, n in iter_neurons(model):
        hooks.append(n.register_forward_hook(neuron_hook(name, n)))
    for name, m in weight_layers(model):
        hooks.append(m.register_forward_hook(layer_hook(name, m)))
    for site in describe(model).attention:
        hooks.append(model.get_submodule(site.name).register_forward_hook(attn_hook(site.name, site.num_heads)))
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) and len(batch) > 1 else (batch, None)
            ctx["B"] = int(x.shape[0])
            logits = model(x)
            if y is not None:
                st.labelled = True
                st.correct += int((logits.argmax(1) == y).sum())
            st.seen += int(x.shape[0])
    finally:
        for h in hooks:
            h.remove()
    if st.seen == 0:
        raise QsdError("report: the data gave no batches")
    return st


def _rate(st: _Stats, neuron: str) -> float:
    return float(st.spikes[neuron + "#sum"]) / max(st.elements[neuron], 1)


def layer_rows(model: nn.Module, st: _Stats, table: EnergyTable, bits_override: int | None = None) -> list[dict]:
    """One dict per weight layer and per attention product (the DataFrame rows)."""
    T = int(getattr(model, "T", 1))
    neurons = dict(iter_neurons(model))
    feeds = describe(model).layer_input
    widths = layer_widths(model, bits_override)
    rows = []
    first = True
    for name, m in weight_layers(model):
        if name not in st.macs:
            continue
        b = widths[name]
        src = feeds.get(name)
        src = src if src in neurons else None
        macs = st.macs[name]
        row = {"name": name, "type": type(m).__name__.replace("Quant", ""), "weight_bits": b,
               "params": m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0),
               "macs": macs, "input": src or "real-valued"}
        if src is None or not neurons[src].spiking:
            row.update(firing_rate=None, sops=0.0, energy_pj=table.e_mac_pj * T * macs,
                       op="MAC (first layer, real input)" if src is None and first else "MAC")
        else:
            r = _rate(st, src)
            sops = r * T * macs
            row.update(firing_rate=r, sops=sops, energy_pj=table.e_ac(b) * sops, op="AC")
        first = False
        rows.append(row)
    ab = table.attention_bits
    for name, (N, C, h) in st.attn.items():
        c = C // h
        for prod, suffix, src in (("SDSA k^T v", "kv", f"{name}.k_lif"), ("SDSA q (k^T v)", "q_kv", f"{name}.q_lif")):
            macs = float(N * C * c)
            spiking = src in neurons and neurons[src].spiking
            r = _rate(st, src) if src in st.elements else 0.0
            sops = r * T * macs if spiking else 0.0
            rows.append({"name": f"{name}.{suffix}", "type": prod, "weight_bits": ab,
                         "params": 0, "macs": macs, "input": src, "firing_rate": r if spiking else None,
                         "sops": sops, "energy_pj": table.e_ac(ab) * sops if spiking else table.e_mac_pj * T * macs,
                         "op": "AC" if spiking else "MAC"})
    return rows


def neuron_rows(st: _Stats, model: nn.Module) -> list[dict]:
    out = []
    for name, n in iter_neurons(model):
        if name not in st.elements:
            continue
        hist = st.spikes[name]
        out.append({"name": name, "type": type(n).__name__, "levels": n.levels, "firing_rate": _rate(st, name),
                    "histogram": [int(v) for v in hist], "entropy_bits": information_entropy(hist),
                    "max_entropy_bits": math.log2(n.levels + 1)})
    return out


#: the size figures a report's totals carry (from :func:`qsdcompress.sizing.model_size`)
SIZE_KEYS = ("params", "weight_params", "mean_weight_bits", "size_bytes", "size_mb_paper")


def totals(model: nn.Module, rows: list[dict], st: _Stats, bits_override: int | None = None) -> dict:
    full = model_size(model, bits_override)
    size = {k: full[k] for k in SIZE_KEYS}
    energy_pj = sum(r["energy_pj"] for r in rows)
    t = {**size, "sops": sum(r["sops"] for r in rows), "macs": sum(r["macs"] for r in rows),
         "energy_mj": energy_pj * 1e-9, "images": st.seen}
    if st.labelled:
        t["top1"] = st.correct / max(st.seen, 1)
    return t



__all__ = ["collect", "layer_rows", "neuron_rows", "totals", "SIZE_KEYS"]
