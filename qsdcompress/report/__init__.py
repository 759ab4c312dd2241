"""Size, spike and energy report (docs/method.md §8).

Per layer: type, weight bits, parameters, MACs (per image and time step), input firing rate,
SOPs and energy; the spike-driven self-attention products ``k^T v`` and ``q (k^T v)`` are rows
of their own. Per neuron: the histogram of spike levels ``0..D`` and its entropy in bits.
Size: :func:`qsdcompress.sizing.model_size`, the same numbers convert, export and demo print.

* ``energy``: the replaceable :class:`EnergyTable`.
* ``accounting``: spike statistics, per-layer rows, totals.
* ``render``: text formats, rich tables, plots.

The module is callable: ``qsdcompress.report(model)`` is :func:`report`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from .._module import make_callable
from ..data import DataConfig, build_loader
from ..errors import QsdError
from ..loading import load, resolve_source
from ..sizing import model_size
from ..ui import progress_bar
from ..zoo import bundled_path
from .accounting import collect, layer_rows, neuron_rows, totals
from .energy import ENERGY_SOURCE, EnergyTable
from .render import layers_frame, plot, render, show


def _float_source(model: nn.Module) -> tuple[nn.Module | None, str]:
    """The float model this one was converted from, when the metadata says where it is."""
    meta = getattr(model, "qsd_meta", None) or {}
    src = (getattr(model, "qsd_quant_meta", None) or {}).get("source") or meta.get("source") or {}
    path = src.get("path") if isinstance(src, dict) else (src if isinstance(src, str) else None)
    if path:
        p = Path(path)
        # a bundled model recorded at another installation's path: this installation's copy
        here = {b.name: b for b in (bundled_path(), bundled_path(data="fashion-mnist"))}
        if not p.exists() and p.name in here:
            p = here[p.name]
        if p.exists():
            try:
                return load(p), f"source float model {p}"
            except QsdError:
                pass
    return None, "the same model with float weights (32-bit accounting of the same firing rates)"


def _energy_table(energy_table: EnergyTable | str | os.PathLike | None) -> EnergyTable:
    if isinstance(energy_table, EnergyTable):
        return energy_table
    return EnergyTable.from_file(energy_table) if energy_table else EnergyTable()


def _onnx_size(onnx_path: str | os.PathLike | None, workdir: str | os.PathLike | None) -> dict:
    if onnx_path is None and workdir is not None and (Path(workdir) / "model.onnx").exists():
        onnx_path = Path(workdir) / "model.onnx"
    if onnx_path is not None and Path(onnx_path).exists():
        return {"onnx_file": str(onnx_path), "onnx_bytes": Path(onnx_path).stat().st_size}
    return {}


def _float_comparison(m: nn.Module, st, batches: list, table: EnergyTable, tot: dict) -> dict:
    """The float model's totals (its own run when the source float model is known, else the same
    spikes accounted at 32 bits) and the ratios to ``tot``."""
    quantized = model_size(m)["quantized_params"] > 0
    fm, how = _float_source(m) if quantized else (None, "the model itself (float weights)")
    out: dict[str, Any] = {}
    if fm is not None:
        fm.eval()
        fst = collect(fm, batches)
        ftot = totals(fm, layer_rows(fm, fst, table), fst)
        out["float"] = {"what": how, "totals": ftot, "neurons": neuron_rows(fst, fm)}
    else:
        ftot = totals(m, layer_rows(m, st, table, bits_override=32), st, bits_override=32)
        out["float"] = {"what": how, "totals": ftot}
    out["vs_float"] = {
        "size_ratio": ftot["size_bytes"] / max(tot["size_bytes"], 1),
        "size_ratio_paper": ftot["size_mb_paper"] / max(tot["size_mb_paper"], 1e-12),
        "energy_ratio": ftot["energy_mj"] / max(tot["energy_mj"], 1e-18),
    }
    return out


def report(model: nn.Module | str | os.PathLike | None = None, workdir: str | os.PathLike | None = None,
           data: str = "digits", split: str = "test", batches: int = 4, batch_size: int = 64,
           energy_table: EnergyTable | str | os.PathLike | None = None, compare_float: bool = True,
           onnx_path: str | os.PathLike | None = None) -> dict:
    """Size, spikes and energy of ``model`` (module, path, or None = newest .qsd of ``workdir``,
    else the bundled model), with the float model as comparison row when known."""
    table = _energy_table(energy_table)
    if batches < 1:
        raise QsdError("--batches must be at least 1")
    m, source = resolve_source(model, workdir, data)
    m.eval()
    loader = build_loader(data, split, DataConfig.from_model(m), batch_size=batch_size, shuffle=False,
                          num_classes=getattr(m, "num_classes", 10))
    n = min(batches, len(loader))
    images = []
    with progress_bar("report", n) as (bar, task):
        for b in loader:
            if len(images) >= n:
                break
            images.append(b)
            bar.update(task, advance=1)
    st = collect(m, images)
    rows = layer_rows(m, st, table)
    tot = {**totals(m, rows, st), **_onnx_size(onnx_path, workdir)}
    result: dict[str, Any] = {"model": source, "arch": getattr(m, "arch", None), "data": data, "split": split,
                              "T": int(getattr(m, "T", 1)), "totals": tot, "layers": rows,
                              "neurons": neuron_rows(st, m), "energy_table": table.to_dict()}
    if compare_float:
        result.update(_float_comparison(m, st, images, table, tot))
    return result


__all__ = ["EnergyTable", "report", "render", "show", "plot", "layers_frame", "collect", "layer_rows",
           "neuron_rows", "totals", "ENERGY_SOURCE"]

make_callable(__name__, report)
