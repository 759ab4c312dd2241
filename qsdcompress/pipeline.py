"""The whole pipeline in one call: convert -> finetune -> export -> report (``qsdcompress demo``).

It runs every stage through the same functions as the CLI commands, in one work directory, and
ends with one comparison of the float model, the converted model, the finetuned model and the
exported ONNX file: top-1, size, SOPs and energy, all measured here.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from .errors import QsdError


def _row(top1: float | None, rep: dict | None, size_bytes: int | None = None, **extra: Any) -> dict:
    tot = rep["totals"] if rep else {}
    return {"top1": top1, "size_bytes": size_bytes if size_bytes is not None else tot.get("size_bytes"),
            "size_mb_paper": tot.get("size_mb_paper"), "sops": tot.get("sops"),
            "energy_mj": tot.get("energy_mj"), **extra}


def demo(workdir: str | os.PathLike = "qsdcompress-out", bits: int = 4, teacher: str = "ann",
         epochs: int | None = None, data: str = "digits", report_batches: int = 4,
         on_stage: Callable[[str], None] | None = None) -> dict:
    """Run convert (``bits``-bit weights, IE-LIF on q/k/v) -> finetune (``teacher``, KD + FGD) ->
    export (packed ONNX, parity-checked) -> report on the bundled digits model.

    Returns ``{"rows": {"float", "converted", "finetuned", "onnx"}, "stages": {...}, ...}``;
    each row has ``top1``, ``size_bytes``, ``sops`` and ``energy_mj``.
    """
    from . import api
    from .export import export
    from .quant import QuantConfig, run_convert
    from .report import report
    from .train import finetune
    from .zoo import bundled_path

    if data != "digits":
        raise QsdError("the demo runs on the bundled digits model; use the individual commands for other data")
    say = on_stage or (lambda s: None)
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages: dict[str, Any] = {}

    say(f"1/4 convert: {bits}-bit weights, IE-LIF on q/k/v")
    t = time.perf_counter()
    conv = run_convert(None, QuantConfig(bits=bits), workdir=wd)
    stages["convert"] = {**{k: conv[k] for k in ("output", "top1_before", "top1_after")},
                         "seconds": round(time.perf_counter() - t, 1)}

    say(f"2/4 finetune: teacher {teacher}, logit KD + fine-grained distillation")
    t = time.perf_counter()
    ft_opts: dict[str, Any] = {"workdir": str(wd)}
    if epochs is not None:
        ft_opts["epochs"] = epochs
    ft = finetune(wd / "converted.qsd", teacher=teacher, **ft_opts)
    stages["finetune"] = {k: ft.get(k) for k in ("output", "top1", "epochs", "best_epoch")}
    stages["finetune"]["seconds"] = round(time.perf_counter() - t, 1)

    say("3/4 export: packed low-bit ONNX, checked against onnxruntime")
    t = time.perf_counter()
    ex = export(Path(ft["output"]), output=wd / "model.onnx", workdir=wd)
    stages["export"] = {k: ex.get(k) for k in ("output", "file_bytes", "weight_bits_bytes", "max_abs_diff",
                                                "top1_agreement")}
    stages["export"]["seconds"] = round(time.perf_counter() - t, 1)

    say("4/4 report: accuracy, size, spikes and energy")
    t = time.perf_counter()
    float_model = api.load(bundled_path())
    converted = api.load(wd / "converted.qsd")
    finetuned = api.load(Path(ft["output"]))
    reps = {name: report(m, data=data, batches=report_batches, compare_float=False)
            for name, m in (("float", float_model), ("converted", converted), ("finetuned", finetuned))}
    # convert and finetune already evaluated these models on the full digits test split
    tops = {"float": conv["top1_before"], "converted": conv["top1_after"], "finetuned": ft["top1"]}
    onnx_eval = api.eval(str(ex["output"]), data=data)
    stages["report"] = {"seconds": round(time.perf_counter() - t, 1)}

    rows = {
        "float": _row(tops["float"], reps["float"], what="bundled qsd_tiny, float32 weights"),
        "converted": _row(tops["converted"], reps["converted"], what=f"W{bits} after convert (no finetuning)"),
        "finetuned": _row(tops["finetuned"], reps["finetuned"], what=f"W{bits} after finetune ({teacher} teacher)"),
        # the ONNX graph is the finetuned network: same spikes and operations, its size is the file's
        "onnx": _row(onnx_eval["top1"], reps["finetuned"], size_bytes=int(ex["file_bytes"]),
                     what="exported ONNX run by onnxruntime (size: file on disk)"),
    }
    f = rows["float"]
    for r in rows.values():
        r["size_x"] = f["size_bytes"] / r["size_bytes"] if r["size_bytes"] else None
        r["energy_x"] = f["energy_mj"] / r["energy_mj"] if r.get("energy_mj") else None
    return {"workdir": str(wd), "bits": bits, "teacher": teacher, "rows": rows, "stages": stages,
            "energy_table": reps["float"]["energy_table"], "seconds": round(time.perf_counter() - t0, 1)}


def show_demo(result: dict) -> None:
    """The comparison table on stderr."""
    from rich.table import Table

    from .ui import console

    t = Table(title=f"qsdcompress demo: bundled digits model, W{result['bits']}, "
                    f"{result['seconds']:.0f} s, outputs in {result['workdir']}")
    for c in ("model", "top-1", "size", "size x", "SOPs", "energy (mJ)", "energy x"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for name, r in result["rows"].items():
        t.add_row(name, f"{r['top1'] * 100:.2f}%", _bytes(r["size_bytes"]),
                  f"{r['size_x']:.1f}x" if r["size_x"] else "-", f"{r['sops']:.3g}" if r["sops"] else "-",
                  f"{r['energy_mj']:.4g}" if r["energy_mj"] else "-",
                  f"{r['energy_x']:.1f}x" if r["energy_x"] else "-")
    console.print(t)
    for name, r in result["rows"].items():
        console.print(f"  [dim]{name}: {r['what']}[/]")
    et = result.get("energy_table") or {}
    if et:
        console.print(f"  [dim]energy per image, {et.get('source', '45 nm convention')}[/]")


def _bytes(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
