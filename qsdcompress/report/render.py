"""Rendering a report: pandas frame, text formats (table, csv, json, markdown), rich tables on
stderr readable in an 80-column terminal, and PNG plots."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import QsdError
from ..io import atomic_path
from ..ui import console

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


def compact(v: float | int | None) -> str:
    """A number in at most 5 characters: ``0``, ``0.123``, ``12.3``, ``138k``, ``1.38M``, ``2.1e+15``."""
    if v is None:
        return "-"
    a = abs(float(v))
    if a == 0:
        return "0"
    if a < 1000:
        return f"{v:.3g}"
    for div, suffix in ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
        if a < div * 1000:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.1e}"


def short_name(name: str, width: int) -> str:
    """``name`` kept by its informative end: ``…`` plus the last dotted parts that fit ``width``."""
    if len(name) <= width:
        return name
    tail = name[-(width - 1):]
    dot = tail.find(".")
    return "…" + (tail[dot + 1:] if 0 <= dot < len(tail) - 1 else tail)


#: widest layer name a terminal table shows whole; longer names keep their end (csv/json keep all)
NAME_WIDTH = 34


def show(result: dict, out=None) -> None:
    """Rich tables on stderr, readable at 80 columns: layers (type and parameters are in
    ``--format csv/json``), neurons (entropy), totals and the energy table."""
    from rich import box
    from rich.table import Table

    out = out or console
    t = Table(title=f"layers of {result['model']}", box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    t.add_column("layer", no_wrap=True)
    for c in ("bits", "MACs", "rate", "SOPs", "energy pJ"):
        t.add_column(c, justify="right", no_wrap=True)
    for r in result["layers"]:
        rate = "-" if r["firing_rate"] is None else f"{r['firing_rate']:.3f}"
        t.add_row(short_name(r["name"], NAME_WIDTH), str(r["weight_bits"]), compact(r["macs"]), rate,
                  compact(r["sops"]), compact(r["energy_pj"]))
    out.print(t)
    nt = Table(title="neurons: spike levels", box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    nt.add_column("neuron", no_wrap=True)
    nt.add_column("rate", justify="right", no_wrap=True)
    nt.add_column("levels 0..D (fraction)", no_wrap=True)
    nt.add_column("entropy bits", justify="right", no_wrap=True)
    for n in result["neurons"]:
        tot = max(sum(n["histogram"]), 1)
        nt.add_row(short_name(n["name"], NAME_WIDTH - 4), f"{n['firing_rate']:.3f}",
                   " ".join(f"{v / tot:.2f}" for v in n["histogram"]),
                   f"{n['entropy_bits']:.2f}/{n['max_entropy_bits']:.2f}")
    out.print(nt)
    tt = Table(title="totals (per image)", box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    tt.add_column("")
    tt.add_column("value", justify="right", overflow="fold")
    for k, v in _totals_lines(result):
        tt.add_row(k, v)
    out.print(tt)
    for line in _energy_lines(result):
        out.print("energy table: " + line if not line.startswith("source") else "  " + line)


def plot(result: dict, out_dir: str | os.PathLike) -> list[str]:
    """PNG plots: firing rate per layer, q/k/v spike-level histograms (the source float model's
    plain neurons beside them when known, e.g. before IE-LIF), energy per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


__all__ = ["layers_frame", "render", "show", "plot", "compact", "short_name"]
