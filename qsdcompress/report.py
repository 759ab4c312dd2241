"""Size, spike and energy report (method.md section 6).

Per layer: type, weight bits, parameters, MACs (per image and time step), input firing rate,
SOPs and energy; the spike-driven self-attention products ``k^T v`` and ``q (k^T v)`` are rows
of their own. Per neuron: the histogram of spike levels ``0..D`` and its entropy in bits.

Accounting rules (all in one place so the numbers can be checked by hand):

* firing rate of a layer's input = mean spike count ``S`` per element and time step of the
  neuron that feeds it (an integer spike ``S`` counts as ``S`` binary spikes). Convs that follow
  another conv without a neuron in between (the depthwise/pointwise chain of SepConv and
  RepConv) are one linear map of the same spikes and are counted at that neuron's rate.
* ``SOPs = rate * T * MACs``; the first layer sees real-valued pixels and costs
  ``E_MAC * T * MACs``; every other layer costs ``E_AC(b) * SOPs`` with ``E_AC(b) = E_AC(32) * b/32``.
  The attention products multiply spikes by spikes, not by weights, and are charged
  ``E_AC(attention_bits)`` (32 by default). Layers fed by a non-spiking activation (a counterpart
  ANN) cost ``E_MAC * T * MACs``.
* size: quantized weights at ``b`` bits, everything else float32 (biases, BatchNorm, layer scales,
  one float32 scale per output channel); the paper's "MB" is ``params(M) * bits / 32`` with the
  parameter-weighted mean weight width as ``bits``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from .errors import QsdError
from .export import is_weight_layer, newest_qsd, quantized_weight
from .neurons import Neuron, information_entropy, iter_neurons, set_spike_mode

ENERGY_SOURCE = ("45 nm CMOS (Horowitz, ISSCC 2014) as used by the spike-driven Transformer papers: "
                 "32-bit float MAC 4.6 pJ, AC 0.9 pJ; low-bit AC scaled linearly with the weight bits "
                 "(QSD-Transformer convention)")


@dataclass
class EnergyTable:
    """Energy per operation in picojoules; replace with ``--energy-table FILE`` (JSON or YAML)."""

    e_mac_pj: float = 4.6
    e_ac32_pj: float = 0.9
    attention_bits: int = 32
    source: str = ENERGY_SOURCE

    def e_ac(self, bits: int) -> float:
        return self.e_ac32_pj * min(bits, 32) / 32.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["E_AC_pJ_by_bits"] = {b: round(self.e_ac(b), 6) for b in (1, 2, 4, 8, 32)}
        return d

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "EnergyTable":
        p = Path(path)
        if not p.is_file():
            raise QsdError(f"energy table not found: {p}")
        text = p.read_text()
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:
            raise QsdError(f"cannot parse energy table {p}: {str(e).splitlines()[0][:200]}") from None
        if not isinstance(data, dict):
            raise QsdError(f"energy table {p} must be a mapping like {{\"e_mac_pj\": 4.6, \"e_ac32_pj\": 0.9}}")
        known = {"e_mac_pj", "e_ac32_pj", "attention_bits", "source"}
        unknown = sorted(set(data) - known - {"E_AC_pJ_by_bits"})
        if unknown:
            raise QsdError(f"energy table {p}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
        kw = {k: data[k] for k in known if k in data}
        kw.setdefault("source", f"user table {p}")
        try:
            t = cls(**kw)
            t.e_mac_pj, t.e_ac32_pj, t.attention_bits = float(t.e_mac_pj), float(t.e_ac32_pj), int(t.attention_bits)
        except (TypeError, ValueError) as e:
            raise QsdError(f"energy table {p}: {e}") from None
        if t.e_mac_pj < 0 or t.e_ac32_pj < 0:
            raise QsdError(f"energy table {p}: energies must be non-negative")
        return t


# --------------------------------------------------------------------------- size


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_weight_layer(m)]


def _param_count(model: nn.Module) -> int:
    """Parameters of the model as a float model has them (quantizer scales are not counted)."""
    return sum(p.numel() for n, p in model.named_parameters() if "scaling_impl" not in n and "weight_quant" not in n)


def size_summary(model: nn.Module, bits: int | dict[str, int] | None = None) -> dict:
    """Parameters and theoretical size; ``bits`` overrides the weight width of every conv/linear
    (an int) or of named ones (a dict), so the arithmetic works on a float model (even on meta)."""
    total = _param_count(model)
    wparams = wbits = qbits = qparams = scales = 0
    for name, m in _weight_layers(model):
        b = _bits_of(m, name_bits(bits, name))
        n = m.weight.numel()
        wparams += n
        wbits += n * b
        if b < 32:
            qbits += n * b
            qparams += n
            scales += m.weight.shape[0]
    mean_bits = wbits / max(wparams, 1)
    size_bytes = (qbits + 32 * (total - qparams + scales)) / 8
    return {"params": total, "weight_params": wparams, "mean_weight_bits": round(mean_bits, 4),
            "size_bytes": int(math.ceil(size_bytes)), "size_mb_paper": total / 1e6 * mean_bits / 32}


def name_bits(bits: int | dict[str, int] | None, name: str) -> int | None:
    if isinstance(bits, int):
        return bits
    if isinstance(bits, dict):
        return bits.get(name)
    return None


def _bits_of(m: nn.Module, override: int | None) -> int:
    if override is not None:
        return int(override)
    if m.weight.is_meta:
        return 32
    return quantized_weight(m).bits


# --------------------------------------------------------------------------- spikes


def input_neuron(layer: str, neurons: set[str]) -> str | None:
    """Name of the neuron whose spikes feed ``layer`` (spike-driven Transformer naming), or None
    when the layer sees real values (the first conv)."""
    parts = layer.split(".")
    for i in range(len(parts) - 1, -1, -1):  # attention branches: q/k/v from head_lif, proj from attn_lif
        if parts[i] in ("q_conv", "k_conv", "v_conv", "proj_conv"):
            src = "head_lif" if parts[i] != "proj_conv" else "attn_lif"
            cand = ".".join(parts[:i] + [src])
            return cand if cand in neurons else None
    parent, leaf = ".".join(parts[:-1]), parts[-1]
    pre = f"{parent}." if parent else ""
    rules = {"encode_conv": "encode_lif", "pwconv1": "lif1", "dwconv": "lif2", "pwconv2": "lif2",
             "conv1": "lif1", "conv2": "lif2", "fc1_conv": "fc1_lif", "fc2_conv": "fc2_lif", "head": "lif"}
    if leaf in rules and pre + rules[leaf] in neurons:
        return pre + rules[leaf]
    return None


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
    from .models.spikedriven import MS_Attention_RepConv_qkv_id

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

    def attn_hook(name: str, m: nn.Module):
        def h(_m, inp, _o):
            _T, _B, C, H, W = inp[0].shape
            st.attn[name] = (H * W, C, m.num_heads)
        return h

    for name, n in iter_neurons(model):
        hooks.append(n.register_forward_hook(neuron_hook(name, n)))
    for name, m in _weight_layers(model):
        hooks.append(m.register_forward_hook(layer_hook(name, m)))
    for name, m in model.named_modules():
        if isinstance(m, MS_Attention_RepConv_qkv_id):
            hooks.append(m.register_forward_hook(attn_hook(name, m)))
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
    names = set(neurons)
    rows = []
    first = True
    for name, m in _weight_layers(model):
        if name not in st.macs:
            continue
        b = bits_override or _bits_of(m, None)
        src = input_neuron(name, names)
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


def totals(model: nn.Module, rows: list[dict], st: _Stats, bits_override: int | None = None) -> dict:
    size = size_summary(model, bits_override)
    energy_pj = sum(r["energy_pj"] for r in rows)
    t = {**size, "sops": sum(r["sops"] for r in rows), "macs": sum(r["macs"] for r in rows),
         "energy_mj": energy_pj * 1e-9, "images": st.seen}
    if st.labelled:
        t["top1"] = st.correct / max(st.seen, 1)
    return t


# --------------------------------------------------------------------------- report


def _float_source(model: nn.Module) -> tuple[nn.Module | None, str]:
    """The float model this one was converted from, when the metadata says where it is."""
    from . import api
    from .zoo import bundled_path

    meta = getattr(model, "qsd_meta", None) or {}
    qmeta = getattr(model, "qsd_quant_meta", None)
    if callable(qmeta):
        qmeta = qmeta()
    src = (qmeta or {}).get("source") or meta.get("source") or {}
    path = src.get("path") if isinstance(src, dict) else (src if isinstance(src, str) else None)
    if path:
        p = Path(path)
        if not p.exists() and p.name == bundled_path().name and bundled_path().exists():
            p = bundled_path()
        if p.exists():
            try:
                return api.load(p), f"source float model {p}"
            except QsdError:
                pass
    return None, "the same model with float weights (32-bit accounting of the same firing rates)"


def _is_quantized(model: nn.Module) -> bool:
    return any(_bits_of(m, None) < 32 for _, m in _weight_layers(model))


def report(model: nn.Module | str | os.PathLike | None = None, workdir: str | os.PathLike | None = None,
           data: str = "digits", split: str = "test", batches: int = 4, batch_size: int = 64,
           energy_table: EnergyTable | str | os.PathLike | None = None, compare_float: bool = True,
           onnx_path: str | os.PathLike | None = None) -> dict:
    """Size, spikes and energy of ``model`` (module, path, or None = newest .qsd of ``workdir``,
    else the bundled model), with the float model as comparison row when known."""
    from .data import DataConfig, build_loader
    from .export import resolve_source
    from .ui import progress_bar

    table = energy_table if isinstance(energy_table, EnergyTable) else (
        EnergyTable.from_file(energy_table) if energy_table else EnergyTable())
    if batches < 1:
        raise QsdError("--batches must be at least 1")
    m, source = resolve_source(model, workdir)
    m.eval()
    loader = build_loader(data, split, DataConfig.from_model(m), batch_size=batch_size, shuffle=False,
                          num_classes=getattr(m, "num_classes", 10))
    n = min(batches, len(loader))
    with progress_bar("report", n) as (bar, task):
        def it():
            for i, b in enumerate(loader):
                if i >= n:
                    return
                yield b
                bar.update(task, advance=1)
        st = collect(m, it())
    rows = layer_rows(m, st, table)
    tot = totals(m, rows, st)
    if onnx_path is None and workdir is not None and (Path(workdir) / "model.onnx").exists():
        onnx_path = Path(workdir) / "model.onnx"
    if onnx_path is not None and Path(onnx_path).exists():
        tot["onnx_file"] = str(onnx_path)
        tot["onnx_bytes"] = Path(onnx_path).stat().st_size
    result: dict[str, Any] = {"model": source, "arch": getattr(m, "arch", None), "data": data, "split": split,
                              "T": int(getattr(m, "T", 1)), "totals": tot, "layers": rows,
                              "neurons": neuron_rows(st, m), "energy_table": table.to_dict()}
    if compare_float:
        fm, how = (None, "")
        if _is_quantized(m):
            fm, how = _float_source(m)
        else:
            how = "the model itself (float weights)"
        if fm is not None:
            fm.eval()
            fst = collect(fm, (b for i, b in zip(range(n), loader)))
            frows = layer_rows(fm, fst, table)
            ftot = totals(fm, frows, fst)
            fneurons = neuron_rows(fst, fm)
        else:
            frows = layer_rows(m, st, table, bits_override=32)
            ftot = totals(m, frows, st, bits_override=32)
            fneurons = None
        result["float"] = {"what": how, "totals": ftot}
        if fneurons is not None:
            result["float"]["neurons"] = fneurons
        result["vs_float"] = {
            "size_ratio": ftot["size_bytes"] / max(tot["size_bytes"], 1),
            "size_ratio_paper": ftot["size_mb_paper"] / max(tot["size_mb_paper"], 1e-12),
            "energy_ratio": ftot["energy_mj"] / max(tot["energy_mj"], 1e-18),
        }
    return result


def layers_frame(result: dict):
    """The per-layer rows of a report as a pandas DataFrame."""
    import pandas as pd

    cols = ["name", "type", "weight_bits", "params", "macs", "input", "firing_rate", "sops", "energy_pj", "op"]
    return pd.DataFrame(result["layers"], columns=cols)


def _totals_lines(result: dict) -> list[tuple[str, str]]:
    t = result["totals"]
    lines = [("params", f"{t['params']:,}"), ("mean weight bits", f"{t['mean_weight_bits']:.2f}"),
             ("size (bytes)", f"{t['size_bytes']:,}"), ("size (paper MB = params(M)*bits/32)", f"{t['size_mb_paper']:.3f}")]
    if "onnx_bytes" in t:
        lines.append(("ONNX file (bytes)", f"{t['onnx_bytes']:,}"))
    if "top1" in t:
        lines.append((f"top-1 ({t['images']} images)", f"{t['top1'] * 100:.2f}%"))
    lines += [("SOPs per image", f"{t['sops']:.4g}"), ("energy per image (mJ)", f"{t['energy_mj']:.4g}")]
    if "float" in result:
        f = result["float"]
        lines.append(("float comparison", f["what"]))
        lines.append(("float size (bytes / paper MB)", f"{f['totals']['size_bytes']:,} / {f['totals']['size_mb_paper']:.3f}"))
        lines.append(("float energy (mJ)", f"{f['totals']['energy_mj']:.4g}"))
        if "top1" in f["totals"]:
            lines.append(("float top-1", f"{f['totals']['top1'] * 100:.2f}%"))
        v = result["vs_float"]
        lines.append(("vs float", f"size {v['size_ratio']:.2f}x smaller (paper MB {v['size_ratio_paper']:.2f}x), "
                                  f"energy {v['energy_ratio']:.2f}x less"))
    return lines


def _energy_lines(result: dict) -> list[str]:
    e = result["energy_table"]
    by = ", ".join(f"{b}-bit {v:g}" for b, v in e["E_AC_pJ_by_bits"].items())
    return [f"E_MAC = {e['e_mac_pj']:g} pJ; E_AC(32) = {e['e_ac32_pj']:g} pJ; E_AC(b) = E_AC(32)*b/32 ({by} pJ); "
            f"attention products charged at {e['attention_bits']} bits", f"source: {e['source']}"]


def render(result: dict, fmt: str = "table") -> str:
    """The report as text in ``table`` (plain), ``csv``, ``json`` or ``markdown``."""
    df = layers_frame(result)
    if fmt == "json":
        return json.dumps(result, default=_jsonable, indent=1)
    if fmt == "csv":
        head = "".join(f"# {k}: {v}\n" for k, v in _totals_lines(result))
        head += "".join(f"# energy table: {line}\n" for line in _energy_lines(result))
        return head + df.to_csv(index=False)
    if fmt == "markdown":
        out = [f"# qsdcompress report: {result['model']}", "", "| total | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in _totals_lines(result)]
        out += ["", "## Layers", "", "| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
        for _, r in df.iterrows():
            out.append("| " + " | ".join(_fmt(v) for v in r.values) + " |")
        out += ["", "## Neurons", "", "| neuron | rate | histogram 0..D | entropy (bits) |", "|---|---|---|---|"]
        for n in result["neurons"]:
            out.append(f"| {n['name']} | {n['firing_rate']:.3f} | {n['histogram']} | {n['entropy_bits']:.3f} |")
        out += ["", "## Energy table", ""] + [f"- {line}" for line in _energy_lines(result)]
        return "\n".join(out) + "\n"
    if fmt == "table":
        lines = [df.to_string(index=False, float_format=lambda v: f"{v:.4g}"), ""]
        lines += [f"{k}: {v}" for k, v in _totals_lines(result)]
        lines += ["energy table: " + _energy_lines(result)[0], "  " + _energy_lines(result)[1]]
        return "\n".join(lines) + "\n"
    raise QsdError(f"unknown format {fmt!r}; choose table, csv, json or markdown")


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def show(result: dict) -> None:
    """Rich tables on stderr: layers, neurons (entropy), totals and the energy table."""
    from rich.table import Table

    from .ui import console

    t = Table(title=f"layers of {result['model']}", show_lines=False)
    for c in ("layer", "type", "bits", "params", "MACs", "input rate", "SOPs", "energy (pJ)"):
        t.add_column(c, justify="left" if c in ("layer", "type") else "right")
    for r in result["layers"]:
        t.add_row(r["name"], r["type"], str(r["weight_bits"]), f"{r['params']:,}", f"{r['macs']:.3g}",
                  "-" if r["firing_rate"] is None else f"{r['firing_rate']:.3f}", f"{r['sops']:.3g}",
                  f"{r['energy_pj']:.3g}")
    console.print(t)
    nt = Table(title="neurons: spike levels")
    for c in ("neuron", "rate", "histogram 0..D (fractions)", "entropy (bits)"):
        nt.add_column(c, justify="left" if c != "rate" else "right")
    for n in result["neurons"]:
        tot = max(sum(n["histogram"]), 1)
        nt.add_row(n["name"], f"{n['firing_rate']:.3f}", " ".join(f"{v / tot:.2f}" for v in n["histogram"]),
                   f"{n['entropy_bits']:.3f} / {n['max_entropy_bits']:.2f}")
    console.print(nt)
    tt = Table(title="totals (per image)")
    tt.add_column("")
    tt.add_column("value", justify="right")
    for k, v in _totals_lines(result):
        tt.add_row(k, v)
    console.print(tt)
    for line in _energy_lines(result):
        console.print("energy table: " + line if not line.startswith("source") else "  " + line)


def plot(result: dict, out_dir: str | os.PathLike) -> list[str]:
    """PNG plots: firing rate per layer, q/k/v spike-level histograms (the source float model's
    plain neurons beside them when known, e.g. before IE-LIF), energy per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        p = out / name
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(str(p))

    rows = [r for r in result["layers"]]
    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.18), 4))
    ax.bar(range(len(rows)), [r["firing_rate"] or 0 for r in rows])
    ax.set_xticks(range(len(rows)), names, rotation=90, fontsize=5)
    ax.set_ylabel("input firing rate (spikes / element / step)")
    ax.set_title("firing rate per layer")
    save(fig, "firing_rate.png")

    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.18), 4))
    ax.bar(range(len(rows)), [r["energy_pj"] * 1e-9 for r in rows])
    ax.set_xticks(range(len(rows)), names, rotation=90, fontsize=5)
    ax.set_ylabel("energy per image (mJ)")
    ax.set_title("energy per layer")
    save(fig, "energy.png")

    qkv = [n for n in result["neurons"] if n["name"].rsplit(".", 1)[-1] in ("q_lif", "k_lif", "v_lif")]
    ref = {n["name"]: n for n in (result.get("float", {}).get("neurons") or [])}
    if qkv:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for ax, kind in zip(axes, ("q_lif", "k_lif", "v_lif")):
            ns = [n for n in qkv if n["name"].endswith(kind)]
            if not ns:
                continue
            levels = len(ns[0]["histogram"])
            agg = [sum(n["histogram"][i] for n in ns) for i in range(levels)]
            tot = max(sum(agg), 1)
            xs = list(range(levels))
            label = f"{ns[0]['type']} (this model)"
            ax.bar([x - 0.2 for x in xs], [a / tot for a in agg], width=0.4, label=label)
            rs = [ref[n["name"]] for n in ns if n["name"] in ref]
            if rs:
                ragg = [sum(n["histogram"][i] for n in rs) for i in range(levels)]
                rtot = max(sum(ragg), 1)
                ax.bar([x + 0.2 for x in xs], [a / rtot for a in ragg], width=0.4,
                       label=f"{rs[0]['type']} (float source model)")
            ax.set_title(f"{kind[0]} spikes, all blocks")
            ax.set_xlabel("spike level S")
            ax.legend(fontsize=6)
        axes[0].set_ylabel("fraction")
        save(fig, "qkv_histograms.png")
    return written


__all__ = ["EnergyTable", "report", "render", "show", "plot", "layers_frame", "size_summary", "collect",
           "layer_rows", "input_neuron", "ENERGY_SOURCE"]
