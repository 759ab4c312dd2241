"""Size, spike and energy report (docs/method.md §8).

Per layer: type, weight bits, parameters, MACs (per image and time step), input firing rate,
SOPs and energy; the spike-driven self-attention products ``k^T v`` and ``q (k^T v)`` are rows
of their own. Per neuron: the histogram of spike levels ``0..D`` and its entropy in bits.
Size: :func:`qsdcompress.sizing.model_size`, the same numbers convert, export and demo print.

* ``energy``: the replaceable :class:`EnergyTable`.
* ``accounting``: spike statistics, per-layer rows, energy by stage, totals.
* ``render``: text formats and rich tables (at most 80 columns).
* ``plots``: PNGs (energy by stage and top layers, firing rates, q/k/v spike levels).

:func:`report` is the API's ``qsdcompress.report``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from ..data import DataConfig, build_loader, data_for
from ..errors import QsdError
from ..loading import load, pick_device, resolve_source
from ..sizing import model_size
from ..ui import progress_bar
from ..zoo import of_file
from .accounting import collect, energy_by_stage, layer_rows, neuron_rows, totals
from .energy import ENERGY_SOURCE, EnergyTable
from .plots import plot
from .render import ReportResult, layers_frame, render, show


def _float_source(model: nn.Module) -> tuple[nn.Module | None, str, str | None]:
    """The float model this one was converted from, when the metadata says where it is: the
    model, what it is, and its file."""
    meta = getattr(model, "qsd_meta", None) or {}
    src = (getattr(model, "qsd_quant_meta", None) or {}).get("source") or meta.get("source") or {}
    path = src.get("path") if isinstance(src, dict) else (src if isinstance(src, str) else None)
    if path:
        p = Path(path)
        # a bundled model recorded at another installation's path: this installation's copy
        entry = of_file(p)
        if not p.exists() and entry is not None:
            p = entry.path
        if p.exists():
            try:
                return load(p), f"source float model {p}", str(p)
            except QsdError:
                pass
    return None, "the same model with float weights (32-bit accounting of the same firing rates)", None


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


class _Steps:
    """The report's progress bar in units of work: loading each model, reading the data, every
    batch of every pass and each accounting, so it moves while the work does."""

    def __init__(self, bar: Any, task: int):
        self.bar, self.task = bar, task

    def done(self, next_step: str, units: int = 1) -> None:
        """``units`` of work finished; ``next_step`` names what runs now."""
        self.bar.update(self.task, advance=units, info=next_step)

    def total(self, units: int) -> None:
        self.bar.update(self.task, total=units)

    def batches(self, what: str, n: int) -> Callable[[int], None]:
        """An ``on_batch`` callback for :func:`collect`: one unit per batch of ``n``."""
        return lambda i: self.done(f"{what}: batch {i + 1}/{n}" if i < n else f"{what}: accounting")


def _units(n: int, float_pass: bool, compare_float: bool) -> int:
    """Units of a report: model, data, n batches, accounting; then the float model, its n batches
    (when it is run) and its accounting."""
    return 3 + n + (2 + (n if float_pass else 0) if compare_float else 0)


def _float_comparison(m: nn.Module, st, batches: list, table: EnergyTable, tot: dict, steps: _Steps) -> dict:
    """The float model's totals (its own run when the source float model is known, else the same
    spikes accounted at 32 bits) and the ratios to ``tot``."""
    quantized = model_size(m)["quantized_params"] > 0
    fm, how, path = _float_source(m) if quantized else (None, "the model itself (float weights)", None)
    n = len(batches)
    out: dict[str, Any] = {}
    if fm is not None:
        steps.done(f"float model: batch 1/{n}")
        fm.to(next(m.parameters()).device).eval()
        fst = collect(fm, batches, on_batch=steps.batches("float model", n))
        ftot = totals(fm, layer_rows(fm, fst, table), fst)
        out["float"] = {"what": how, "file": path, "totals": ftot, "neurons": neuron_rows(fst, fm)}
    else:
        steps.total(_units(n, False, True))
        steps.done("float accounting")
        ftot = totals(m, layer_rows(m, st, table, bits_override=32), st, bits_override=32)
        out["float"] = {"what": how, "totals": ftot}
    steps.done("done")
    out["vs_float"] = {
        "size_ratio": ftot["size_bytes"] / max(tot["size_bytes"], 1),
        "size_ratio_paper": ftot["size_mb_paper"] / max(tot["size_mb_paper"], 1e-12),
        "energy_ratio": ftot["energy_mj"] / max(tot["energy_mj"], 1e-18),
    }
    return out


def _first_batches(loader: Iterable, n: int, keep: list, device: torch.device) -> Iterator:
    """The first ``n`` batches of ``loader`` on ``device``, kept in ``keep`` for the float model's pass."""
    for x, y in loader:
        if len(keep) >= n:
            return
        keep.append((x.to(device), y.to(device)))
        yield keep[-1]


def report(model: nn.Module | str | os.PathLike | None = None, workdir: str | os.PathLike | None = None,
           data: str | None = None, split: str = "test", batches: int = 4, batch_size: int = 64,
           energy_table: EnergyTable | str | os.PathLike | None = None, compare_float: bool = True,
           onnx_path: str | os.PathLike | None = None, device: str = "auto") -> ReportResult:
    """Size, spikes and energy of ``model`` (module, path, or None = newest .qsd of ``workdir``,
    else the bundled model of ``data``) on ``data`` (default: the model's own), with the float
    model as comparison row when known."""
    table = _energy_table(energy_table)
    if batches < 1:
        raise QsdError("--batches must be at least 1")
    with progress_bar("report", _units(batches, True, compare_float), "loading the model") as (bar, task):
        steps = _Steps(bar, task)
        m, source = resolve_source(model, workdir, data)
        data = data_for(m, data, source)
        dev = pick_device(device)
        m.to(dev).eval()
        steps.done("reading the data")
        loader = build_loader(data, split, DataConfig.from_model(m), batch_size=batch_size, shuffle=False,
                              num_classes=getattr(m, "num_classes", 10))
        n = min(batches, len(loader))
        steps.total(_units(n, True, compare_float))
        steps.done(f"spikes: batch 1/{n}")
        images: list = []
        st = collect(m, _first_batches(loader, n, images, dev), on_batch=steps.batches("spikes", n))
        rows = layer_rows(m, st, table)
        tot = {**totals(m, rows, st), **_onnx_size(onnx_path, workdir)}
        result = ReportResult(model=source, arch=getattr(m, "arch", None), data=data, split=split,
                              T=int(getattr(m, "T", 1)), totals=tot, layers=rows, stages=energy_by_stage(rows),
                              neurons=neuron_rows(st, m), energy_table=table.to_dict())
        steps.done("float model" if compare_float else "done")
        if compare_float:
            compared = _float_comparison(m, st, images, table, tot, steps)
            result.float_model, result.vs_float = compared["float"], compared["vs_float"]
    return result


__all__ = ["EnergyTable", "ReportResult", "report", "render", "show", "plot", "layers_frame", "collect", "layer_rows",
           "neuron_rows", "totals", "energy_by_stage", "ENERGY_SOURCE"]
