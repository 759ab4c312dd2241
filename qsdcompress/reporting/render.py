"""Rendering a report: pandas frame, text formats (table, csv, json, markdown), and rich tables on
stderr that fit 80 columns whatever the paths (plots: ``plots.py``)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..errors import QsdError
from ..results import Result, json_default, optional
from ..ui import console, percent, short_name

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
        lines.append((f"top-1 ({t['images']} {result.get('split', 'test')} images)", percent(t["top1"])))
    lines += [("SOPs per image", f"{t['sops']:.4g}"), ("energy per image (mJ)", f"{t['energy_mj']:.4g}")]
    if "float" in result:
        f = result["float"]
        lines.append(("float comparison", f["what"]))
        lines.append(("float size (bytes / paper MB)", f"{f['totals']['size_bytes']:,} / {f['totals']['size_mb_paper']:.3f}"))
        lines.append(("float energy (mJ)", f"{f['totals']['energy_mj']:.4g}"))
        if "top1" in f["totals"]:
            lines.append(("float top-1 (same images)", percent(f["totals"]["top1"])))
        v = result["vs_float"]
        lines.append(("size vs float", f"{v['size_ratio']:.2f}x smaller (paper MB {v['size_ratio_paper']:.2f}x)"))
        lines.append(("energy vs float", f"{v['energy_ratio']:.2f}x less"))
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
        return json.dumps(dict(result), default=json_default, indent=1)
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
        out += ["", "## Energy by stage", "", "| stage | layers | SOPs | energy pJ | share |", "|---|---|---|---|---|"]
        out += [f"| {g['stage']} | {g['layers']} | {g['sops']:.4g} | {g['energy_pj']:.4g} | {100 * g['share']:.1f}% |"
                for g in result.get("stages") or []]
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


def short_path(path: str, width: int) -> str:
    """A file path in ``width`` characters: ``…/`` and the last components that fit (the full path
    is printed below the tables)."""
    if len(path) <= width:
        return path
    parts = path.split("/")
    for k in range(len(parts) - 1, 0, -1):
        tail = "/".join(parts[-k:])
        if len(tail) + 2 <= width:
            return "…/" + tail
    return "…" + path[-(width - 1):]


#: widest layer name a terminal table shows whole; longer ones keep their block and end (csv/json keep all)
NAME_WIDTH = 34
#: the terminal report's width: its tables fit 80 columns whatever the paths and the console
WIDTH = 80


def _table(title: str, *columns: str) -> Any:
    """A left-titled table; the first column left-aligned, the numbers right-aligned."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(title), box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    t.add_column(columns[0], no_wrap=True)
    for c in columns[1:]:
        t.add_column(c, justify="right", no_wrap=True)
    return t


def _layers_table(result: dict, width: int) -> Any:
    name = short_path(str(result["model"]), width - len("layers of "))
    t = _table(f"layers of {name}", "layer", "bits", "MACs", "rate", "SOPs", "energy pJ")
    for r in result["layers"]:
        rate = "-" if r["firing_rate"] is None else f"{r['firing_rate']:.3f}"
        t.add_row(short_name(r["name"], NAME_WIDTH), str(r["weight_bits"]), compact(r["macs"]), rate,
                  compact(r["sops"]), compact(r["energy_pj"]))
    return t


def _neurons_table(result: dict) -> Any:
    t = _table("neurons: spike levels", "neuron", "rate", "levels 0..D (fraction)", "entropy bits")
    t.columns[2].justify = "left"
    for n in result["neurons"]:
        tot = max(sum(n["histogram"]), 1)
        t.add_row(short_name(n["name"], NAME_WIDTH - 4), f"{n['firing_rate']:.3f}",
                  " ".join(f"{v / tot:.2f}" for v in n["histogram"]),
                  f"{n['entropy_bits']:.2f}/{n['max_entropy_bits']:.2f}")
    return t


def _stages_table(result: dict) -> Any:
    t = _table("energy by stage (per image)", "stage", "layers", "SOPs", "energy pJ", "share")
    for s in result.get("stages") or []:
        t.add_row(s["stage"], str(s["layers"]), compact(s["sops"]), compact(s["energy_pj"]),
                  f"{100 * s['share']:.1f}%")
    return t


def _files(result: dict) -> list[tuple[str, str]]:
    """The files the report names, in full (the tables show them shortened)."""
    out = [("model", str(result["model"]))]
    if result.get("float", {}).get("file"):
        out.append(("float model", result["float"]["file"]))
    if "onnx_file" in result["totals"]:
        out.append(("ONNX", result["totals"]["onnx_file"]))
    return out


def show_totals(result: dict, out=None) -> None:
    """The totals table, the energy table and the files in full, at most :data:`WIDTH` columns."""
    from rich.markup import escape

    out = out or console
    width = min(WIDTH, out.width)
    t = _table("totals (per image)", "", "value")
    t.columns[1].no_wrap = False
    lines = _totals_lines(result)
    room = width - max(len(k) for k, _ in lines) - 3  # the value column beside the widest key
    path = result.get("float", {}).get("file")
    for k, v in lines:
        if path and path in v:  # the file in full is printed below
            v = v.replace(path, short_path(path, max(room - len(v) + len(path), 12)))
        t.add_row(k, escape(v))
    out.print(t, width=width)
    for line in _energy_lines(result):
        out.print(escape("energy table: " + line if not line.startswith("source") else "  " + line), width=width)
    for k, v in _files(result):
        out.print(escape(f"{k}: {v}"), width=width, overflow="fold")


def show(result: dict, out=None) -> None:
    """Rich tables on stderr in at most :data:`WIDTH` columns: layers (type and parameters are in
    ``--format csv/json``), neurons (entropy), energy by stage, totals and the energy table."""
    out = out or console
    width = min(WIDTH, out.width)
    for table in (_layers_table(result, width), _neurons_table(result), _stages_table(result)):
        out.print(table, width=width)
    show_totals(result, out)


@dataclass
class ReportResult(Result):
    """Size, spikes and energy of one model (``report``); rendered by :func:`show` (tables) and
    :func:`render` (text formats)."""

    model: str
    arch: str | None
    data: str
    split: str
    T: int
    totals: dict                       # per image: size, SOPs, MACs, energy (and the ONNX file's size)
    layers: list                       # accounting.layer_rows
    stages: list                       # accounting.energy_by_stage
    neurons: list                      # accounting.neuron_rows
    energy_table: dict
    float_model: dict | None = optional("float")   # the float model's totals, when compared
    vs_float: dict | None = optional()
    plots: list | None = optional()
    output: str | None = optional()

    def render(self) -> None:
        show(self)


__all__ = ["ReportResult", "layers_frame", "render", "show", "show_totals", "compact", "short_name", "short_path"]
