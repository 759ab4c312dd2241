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
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..errors import QsdError
from ..models import describe
from ..neurons import Neuron, information_entropy, iter_neurons, set_spike_mode
from ..quant import weight_layers
from ..sizing import layer_widths, model_size
from .energy import EnergyTable

class SpikeRecorder:
    """Per neuron, while active: the histogram of spike levels ``0..D``, the spike sum and the
    number of elements seen (forward hooks). The report and finetuning's per-epoch statistics
    both count spikes with it."""

    def __init__(self, model: nn.Module, histograms: set[str] | None = None):
        """``histograms``: the neurons whose level histograms are kept (None: all); the others
        only sum their spikes, which is all a firing rate needs and costs one pass."""
        self.model = model
        self.histograms = histograms
        self.hist: dict[str, torch.Tensor] = {}
        self.sums: dict[str, float] = {}
        self.elements: dict[str, int] = {}
        self._hooks: list = []

    def __enter__(self) -> "SpikeRecorder":
        for name, n in iter_neurons(self.model):
            self._hooks.append(n.register_forward_hook(self._hook(name, n)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _hook(self, name: str, n: Neuron):
        levels = n.levels
        weights = torch.arange(levels + 1, dtype=torch.float64)

        def h(_m, _i, out):
            with torch.no_grad():
                if self.histograms is not None and name not in self.histograms:
                    total = float(out.detach().sum(dtype=torch.float64)) / n.out_scale
                    self.elements[name] = self.elements.get(name, 0) + out.numel()
                    self.sums[name] = self.sums.get(name, 0.0) + total
                    return
                if n.spiking:  # outputs are exact multiples of out_scale: the counts need no rounding
                    counts = (out.detach() * (1.0 / n.out_scale)).to(torch.int64).flatten()
                    hist = torch.bincount(counts, minlength=levels + 1)[: levels + 1].cpu()
                    total = float((hist.double() * weights).sum())
                else:  # a real-valued activation (counterpart ANN): its mean, and levels by rounding
                    v = (out.detach().float() / n.out_scale).clamp(0, levels)
                    hist = torch.bincount(torch.floor(v + 0.5).long().flatten(), minlength=levels + 1)[: levels + 1]
                    total = float(v.double().sum())
                self.hist[name] = self.hist.get(name, torch.zeros(levels + 1, dtype=torch.long)) + hist.cpu()
                self.elements[name] = self.elements.get(name, 0) + out.numel()
                self.sums[name] = self.sums.get(name, 0.0) + total
        return h

    def rate(self, name: str) -> float:
        """Mean spike count per element and time step (an integer spike S counts S times)."""
        return self.sums[name] / max(self.elements[name], 1)

    def entropy(self, name: str) -> float:
        return information_entropy(self.hist[name])


def qkv_neurons(model: nn.Module) -> set[str]:
    return set(describe(model).attention_neurons(("q", "k", "v")))


def spike_statistics(model: nn.Module, rec: SpikeRecorder) -> dict[str, float]:
    """Flat statistics of a recorded run: mean firing rate per stage (top-level module),
    ``rate.<stage>``; entropy in bits of the q/k/v spikes per attention block,
    ``entropy.<block>.<q|k|v>``; and their mean, ``entropy_qkv``."""
    stages: dict[str, list[float]] = {}
    for name in rec.elements:
        acc = stages.setdefault(name.split(".")[0], [0.0, 0])
        acc[0] += rec.sums[name]
        acc[1] += rec.elements[name]
    out = {f"rate.{k}": v[0] / max(v[1], 1) for k, v in stages.items()}
    ents = []
    for site in describe(model).attention:
        block = site.name[: -len(".attn")] if site.name.endswith(".attn") else site.name
        for z in ("q", "k", "v"):
            neuron = getattr(site, z)
            if neuron in rec.hist:
                out[f"entropy.{block}.{z}"] = rec.entropy(neuron)
                ents.append(out[f"entropy.{block}.{z}"])
    if ents:
        out["entropy_qkv"] = sum(ents) / len(ents)
    return out


@dataclass
class _Stats:
    spikes: SpikeRecorder
    macs: dict[str, float] = field(default_factory=dict)            # layer -> MACs per image and step
    attn: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # attn module -> (N, C, heads)
    correct: int = 0
    seen: int = 0
    labelled: bool = False


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable, max_batches: int | None = None,
            on_batch: Callable[[int], None] | None = None) -> _Stats:
    """Run ``model`` (integer spikes) over batches, recording spike-level histograms, MACs per
    layer and top-1; ``on_batch(done)`` after each batch lets a progress bar follow the work."""
    model.eval()
    set_spike_mode(model, "integer")
    st = _Stats(SpikeRecorder(model))
    T = int(getattr(model, "T", 1))
    ctx: dict[str, int] = {"B": 1}
    hooks = []

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

    for name, m in weight_layers(model):
        hooks.append(m.register_forward_hook(layer_hook(name, m)))
    for site in describe(model).attention:
        hooks.append(model.get_submodule(site.name).register_forward_hook(attn_hook(site.name, site.num_heads)))
    try:
        with st.spikes:
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
                if on_batch is not None:
                    on_batch(i + 1)
    finally:
        for h in hooks:
            h.remove()
    if st.seen == 0:
        raise QsdError("report: the data gave no batches")
    return st


def layer_rows(model: nn.Module, st: _Stats, table: EnergyTable,
               bits_override: int | dict[str, int] | None = None) -> list[dict]:
    """One dict per weight layer and per attention product (the DataFrame rows); ``bits_override``
    prices the layers at other widths (one for all, or by name), as the float comparison and
    mixed-precision planning do."""
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
            r = st.spikes.rate(src)
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
            r = st.spikes.rate(src) if src in st.spikes.elements else 0.0
            sops = r * T * macs if spiking else 0.0
            rows.append({"name": f"{name}.{suffix}", "type": prod, "weight_bits": ab,
                         "params": 0, "macs": macs, "input": src, "firing_rate": r if spiking else None,
                         "sops": sops, "energy_pj": table.e_ac(ab) * sops if spiking else table.e_mac_pj * T * macs,
                         "op": "AC" if spiking else "MAC"})
    return rows


def neuron_rows(st: _Stats, model: nn.Module) -> list[dict]:
    out = []
    for name, n in iter_neurons(model):
        if name not in st.spikes.elements:
            continue
        hist = st.spikes.hist[name]
        out.append({"name": name, "type": type(n).__name__, "levels": n.levels, "firing_rate": st.spikes.rate(name),
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


def stage_of(name: str, blocks: Iterable[str]) -> str:
    """The stage a layer's energy is charged to: its attention block (``block3.1``) when it is in
    one, else ``stage N conv`` for a top-level module numbered N (the conv stages and the
    downsampling before each transformer stage), else the top-level module (``head``)."""
    for b in blocks:
        if name == b or name.startswith(b + "."):
            return b
    top = name.split(".", 1)[0]
    n = re.search(r"\d+", top)
    return f"stage {n.group()} conv" if n else top


def attention_blocks(rows: list[dict]) -> list[str]:
    """The blocks holding an attention module, from the report's product rows
    (``block3.1.attn.kv`` -> ``block3.1``): the result alone says where the blocks are."""
    out: list[str] = []
    for r in rows:
        if r["type"].startswith("SDSA"):
            attn = r["name"].rsplit(".", 1)[0]
            block = attn.rsplit(".", 1)[0] if "." in attn else attn
            if block not in out:
                out.append(block)
    return out


def energy_by_stage(rows: list[dict]) -> list[dict]:
    """Energy, SOPs and layer count per stage (:func:`stage_of`), in model order; the energies sum
    to the report's total, so a plot of them is the whole budget in a dozen bars."""
    blocks = attention_blocks(rows)
    stages: dict[str, dict] = {}
    for r in rows:
        s = stages.setdefault(stage_of(r["name"], blocks), {"layers": 0, "sops": 0.0, "energy_pj": 0.0})
        s["layers"] += 1
        s["sops"] += r["sops"]
        s["energy_pj"] += r["energy_pj"]
    total = sum(s["energy_pj"] for s in stages.values()) or 1.0
    return [{"stage": k, **v, "share": v["energy_pj"] / total} for k, v in stages.items()]


__all__ = ["collect", "layer_rows", "neuron_rows", "totals", "SIZE_KEYS", "SpikeRecorder", "spike_statistics",
           "qkv_neurons", "stage_of", "attention_blocks", "energy_by_stage"]
