"""Orchestration above the concerns: what each command does from end to end, and the demo.

* :func:`run_eval` (``eval``): a model, checkpoint or ONNX file on a dataset.
* :func:`convert_model` (API ``convert``) and :func:`run_convert` (``convert``: load, convert,
  evaluate before/after, save).
* :func:`demo`: convert -> finetune -> export -> report in one work directory, ending with one
  comparison of the float, converted, finetuned and exported models: top-1, size, SOPs and
  energy, all measured here.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch.nn as nn

from .config import DEFAULT_WORKDIR
from .data import (DataConfig, build_loader, class_mismatch, data_for, data_name, foreign_data_reason,
                   num_classes_of)
from .errors import QsdError
from .onnx_export import export
from .onnx_export.runtime import onnx_metadata, onnx_predictor
from .io import ensure_writable_dir, sha256_file
from .loading import load, locate_model, pick_device, resolve_model, resolve_source, save
from .metrics import evaluate
from .mixed import Budget, convert_to_budget
from .neurons import IELIF, iter_neurons, set_spike_mode
from .quant import QuantConfig, calibration_data, convert
from .reporting import report
from .results import ConvertResult, DemoResult, EvalResult
from .sizing import model_size
from .train import finetune


def run_eval(model: nn.Module | str | os.PathLike | None = None, data: str | None = None, split: str = "test",
             batch_size: int = 64, device: str = "auto", spike_mode: str | None = None,
             arch: str | None = None, max_batches: int | None = None,
             workdir: str | os.PathLike | None = None, runtime: str = "onnxruntime",
             precision: str | None = None) -> EvalResult:
    """Top-1/top-5/loss of a model (a module, a file, an ONNX file or a bundled name; None: the
    one rule of :func:`~qsdcompress.loading.locate_model`) on ``data``, else the data the model
    records as its own, else digits. Data of another data set or other classes is refused. An
    ONNX file runs under ``runtime`` (``precision``: OpenVINO's inference precision)."""
    if isinstance(model, (str, os.PathLike)) and str(model).lower().endswith(".onnx"):
        predictor, cfg, num_classes = onnx_predictor(model, runtime=runtime, precision=precision)
        data = data or onnx_metadata(model).get("data") or "digits"
        loader = build_loader(data, split, cfg, batch_size=batch_size, num_classes=num_classes)
        _check_classes(num_classes, data, loader, str(model))
        ran = f"eval ({predictor.runtime}, {predictor.precision})"
        return EvalResult(**evaluate(predictor, loader, "cpu", description=ran, max_batches=max_batches),
                          model=str(model), data=data, split=split, runtime=predictor.runtime,
                          precision=predictor.precision)
    if runtime != "onnxruntime" or precision is not None:
        raise QsdError("--runtime and --precision apply to an exported .onnx file; a PyTorch model runs in PyTorch",
                       hint="export it first (qsdcompress export), then eval the .onnx file")
    m, name = resolve_source(model, workdir, data, "any", arch)
    data = data_for(m, data, name)
    dev = pick_device(device)
    m.to(dev)
    if spike_mode:
        set_spike_mode(m, spike_mode)
    loader = build_loader(data, split, DataConfig.from_model(m), batch_size=batch_size, num_classes=m.num_classes)
    _check_classes(m.num_classes, data, loader, name)
    out = evaluate(m, loader, dev, max_batches=max_batches)
    if spike_mode:
        set_spike_mode(m, "integer")
    return EvalResult(**out, model=name, data=data, split=split, spike_mode=spike_mode or "integer",
                      parameters=sum(p.numel() for p in m.parameters()))


def _check_classes(num_classes: int, data: str, loader: Any, name: str) -> None:
    mismatch = class_mismatch(num_classes, f"--data {data}", loader.dataset)
    if mismatch:
        raise QsdError(f"{name}: {mismatch}: an accuracy would mean nothing; pass --data with the model's own "
                       f"test data")


def _budget(budget: Budget | Mapping[str, Any] | None, options: dict[str, Any]) -> Budget | None:
    """The budget from ``budget`` and the options naming its fields (removed from ``options``)."""
    names = set(Budget.__dataclass_fields__)
    mine = {k: options.pop(k) for k in list(options) if k in names}
    if budget is None and not mine:
        return None
    base = budget if isinstance(budget, Budget) else Budget.from_dict(budget or {})
    return replace(base, **mine)


def convert_model(model: nn.Module | str | os.PathLike | None = None,
                  config: QuantConfig | Mapping[str, Any] | None = None, calib_loader: Any = None,
                  budget: Budget | Mapping[str, Any] | None = None, **options: Any) -> nn.Module:
    """Low-bit weights + IE-LIF + calibration (see :mod:`qsdcompress.quant`); returns the converted model.

    ``config``: a :class:`~qsdcompress.quant.QuantConfig` or a dict; ``options`` override its fields
    (``qsdcompress.convert(model, bits=4, ie_lif="qkv")``). The float model is left unchanged.
    A budget (``target_size_mb=``, ``target_energy_mj=``, ``max_drop=``, or a
    :class:`~qsdcompress.mixed.Budget`) gives each layer group its own width (docs/method.md §9);
    the plan is in ``model.qsd_quant_meta["mixed_precision"]``.
    """
    if config is None:
        config = QuantConfig()
    elif isinstance(config, Mapping):
        config = QuantConfig.from_dict(config)
    options = dict(options)
    plan_budget = _budget(budget, options)
    if options:
        config = replace(config, **options)
    float_model = resolve_model(model)
    if plan_budget is not None and plan_budget.active:
        return convert_to_budget(float_model, config.validate(), plan_budget, calib_loader)[0]
    return convert(float_model, config, calib_loader)


def convert_summary(model: nn.Module) -> dict:
    """What ``convert`` reports about a converted model: layers and parameters per bit width, IE-LIF
    neurons and the size (:func:`qsdcompress.sizing.model_size`, the figures report and export print)."""
    size = model_size(model)
    ie = [name for name, n in iter_neurons(model) if isinstance(n, IELIF)]
    return {"layers_per_bits": size["layers_per_bits"], "neurons_replaced": len(ie), "ie_lif_neurons": ie,
            "parameters": size["params"], "quantized_parameters": size["quantized_params"],
            **{k: size[k] for k in ("size_bytes", "float_size_bytes", "compression", "size_mb_paper",
                                    "float_size_mb_paper")}}


def _top1_before_after(float_model: nn.Module, converted: nn.Module, data: str | None, device: Any = "cpu"
                       ) -> tuple[float | None, float | None, str | None, int | None]:
    """Test top-1 of both models on ``data`` when its classes are the model's, and the number of
    images; else ``(None, None, why, None)``."""
    if not data:
        return None, None, ("no data of the model's own is known (a reference checkpoint records none): top-1 "
                            "not measured; pass --data with its test images"), None
    try:
        loader = build_loader(data, "test", DataConfig.from_model(converted), batch_size=128,
                              num_classes=converted.num_classes)
    except QsdError as e:
        return None, None, f"top-1 not measured: {e}", None
    foreign = foreign_data_reason(converted, data, loader)
    if foreign or num_classes_of(loader.dataset) is None:
        return None, None, f"top-1 not measured: {foreign or f'{data} has no class labels'}", None
    before = evaluate(float_model, loader, device, description="eval float")
    after = evaluate(converted, loader, device, description="eval converted")
    return before["top1"], after["top1"], None, after["samples"]


def run_convert(model: str | os.PathLike | nn.Module | None = None, config: QuantConfig | None = None,
                arch: str | None = None, workdir: str | os.PathLike = DEFAULT_WORKDIR,
                output: str | os.PathLike | None = None, evaluate_top1: bool = True, keep_float: bool = False,
                budget: Budget | None = None, device: str = "auto") -> ConvertResult:
    """What ``qsdcompress convert`` does: load, convert, evaluate before/after, save; a :class:`~qsdcompress.results.ConvertResult`.

    The ``.qsd`` holds bit-packed integer weights; ``keep_float`` also keeps the float latent
    weights, so that finetuning starts from the float model's weights rather than their grid points.
    With an active ``budget`` the widths come from a mixed-precision plan (``plan`` in the result).
    Calibration and top-1 use ``config.calib_data``, else the data the model records as its own;
    without either the conversion is weight-only and ``top1_before``/``top1_after`` are None with
    ``top1_note`` saying why.
    """
    config = (config or QuantConfig()).validate()
    if budget is not None:
        budget.validate()  # a bad option is an error whether or not a budget is active
    out_path = Path(output) if output is not None else Path(workdir) / "converted.qsd"
    ensure_writable_dir(out_path.parent)  # before minutes of calibration, not after
    t0 = time.perf_counter()
    dev = pick_device(device)
    float_model = _float_model(model, arch, config.calib_data, workdir).to(dev)
    plan = None
    if budget is not None and budget.active:
        converted, plan = convert_to_budget(float_model, config, budget)
    else:
        converted = convert(float_model, config)
    seconds = time.perf_counter() - t0
    data = calibration_data(float_model, config)
    if data:
        converted.qsd_meta = {**(getattr(converted, "qsd_meta", None) or {}), "data": data}
    save(converted, out_path, kind="converted", keep_float=keep_float)
    before, after, note, images = (_top1_before_after(float_model, converted, data, dev) if evaluate_top1
                                   else (None, None, "top-1 not measured (--no-eval)", None))
    return ConvertResult(output=str(out_path), arch=getattr(converted, "arch", None), top1_before=before,
                         top1_after=after, top1_data=data if before is not None else None, top1_note=note,
                         top1_images=images,
                         calibration=dict(converted.qsd_quant_meta.get("calibration") or {}),
                         config=config.to_dict(), summary=convert_summary(converted),
                         source=converted.qsd_quant_meta.get("source", {}), convert_seconds=round(seconds, 2),
                         plan=plan)


def _float_model(model: str | os.PathLike | nn.Module | None, arch: str | None, data: str | None,
                 workdir: str | os.PathLike | None) -> nn.Module:
    """The model to convert, in eval mode, its file's path and sha256 recorded as its source."""
    if isinstance(model, nn.Module):
        return model.eval()
    if model is None and arch is not None:
        resolve_model(None, arch)  # explains that weights are needed
    path = locate_model(model, workdir, data, "float")
    float_model = load(path, arch=arch).eval()
    float_model.qsd_meta = {**(getattr(float_model, "qsd_meta", None) or {}),
                            "source": {"path": str(path), "sha256": sha256_file(path)}}
    return float_model


def _row(top1: float | None, rep: dict | None, size_bytes: int | None = None, **extra: Any) -> dict:
    tot = rep["totals"] if rep else {}
    return {"top1": top1, "size_bytes": size_bytes if size_bytes is not None else tot.get("size_bytes"),
            "size_mb_paper": tot.get("size_mb_paper"), "sops": tot.get("sops"),
            "energy_mj": tot.get("energy_mj"), **extra}


def demo(workdir: str | os.PathLike = DEFAULT_WORKDIR, bits: int = 4, teacher: str = "ann",
         epochs: int | None = None, data: str = "digits", report_batches: int = 4,
         on_stage: Callable[[str], None] | None = None, device: str = "auto") -> DemoResult:
    """Run convert (``bits``-bit weights, IE-LIF on q/k/v) -> finetune (``teacher``, KD + FGD) ->
    export (packed ONNX, parity-checked) -> report on the bundled model of ``data`` (digits, or
    ``fashion-mnist`` where its bundled model and data are installed).

    Returns a :class:`~qsdcompress.results.DemoResult`: ``rows`` (float, converted, finetuned, onnx);
    each row has ``top1``, ``size_bytes``, ``sops`` and ``energy_mj``.
    """
    if data_name(data) not in ("digits", "fashion-mnist"):
        raise QsdError("the demo runs on a bundled model: --data digits or fashion-mnist[:DIR]; use the "
                       "individual commands for other data")
    float_model = resolve_model(None, data=data)  # fails here, before any work, when it is missing
    say = on_stage or (lambda s: None)
    wd = ensure_writable_dir(workdir, "work directory")
    t0 = time.perf_counter()
    stages: dict[str, Any] = {}

    say(f"1/4 convert: {bits}-bit weights, IE-LIF on q/k/v")
    t = time.perf_counter()
    conv = run_convert(None, QuantConfig(bits=bits, calib_data=data), workdir=wd,
                       keep_float=True, device=device)  # finetune starts from the float weights
    stages["convert"] = {**{k: conv[k] for k in ("output", "top1_before", "top1_after")},
                         "seconds": round(time.perf_counter() - t, 1)}

    say(f"2/4 finetune: teacher {teacher}, logit KD + fine-grained distillation")
    t = time.perf_counter()
    ft_opts: dict[str, Any] = {"workdir": str(wd), "data": data, "device": device}
    if epochs is not None:
        ft_opts["epochs"] = epochs
    ft = finetune(wd / "converted.qsd", teacher=teacher, **ft_opts)
    stages["finetune"] = {k: ft.get(k) for k in ("output", "top1", "epochs", "best_epoch")}
    stages["finetune"]["seconds"] = round(time.perf_counter() - t, 1)

    say("3/4 export: packed low-bit ONNX, checked against onnxruntime")
    t = time.perf_counter()
    ex = export(Path(ft["output"]), output=wd / "model.onnx", workdir=wd, data=data)
    stages["export"] = {k: ex.get(k) for k in ("output", "file_bytes", "weight_bits_bytes", "max_abs_diff",
                                                "top1_agreement")}
    stages["export"]["seconds"] = round(time.perf_counter() - t, 1)

    say("4/4 report: accuracy, size, spikes and energy")
    t = time.perf_counter()
    converted = load(wd / "converted.qsd")
    finetuned = load(Path(ft["output"]))
    reps = {name: report(m, data=data, batches=report_batches, compare_float=False, device=device)
            for name, m in (("float", float_model), ("converted", converted), ("finetuned", finetuned))}
    # convert and finetune already evaluated these models on the full test split
    tops = {"float": conv["top1_before"], "converted": conv["top1_after"], "finetuned": ft["top1"]}
    # what finetune chose on: val top-1, ties broken by val loss
    vals = {"converted": (ft.get("input_val_top1"), ft.get("input_val_loss")),
            "finetuned": (ft.get("val_top1"), ft.get("val_loss"))}
    onnx_eval = run_eval(str(ex["output"]), data=data)
    stages["report"] = {"seconds": round(time.perf_counter() - t, 1)}
    stages["images"] = {"val": ft.get("val_images"), "test": onnx_eval["samples"]}

    rows = {
        "float": _row(tops["float"], reps["float"], what=f"bundled {float_model.arch}, float32 weights"),
        "converted": _row(tops["converted"], reps["converted"], what=f"W{bits} after convert (no finetuning)",
                          val_top1=vals["converted"][0], val_loss=vals["converted"][1]),
        "finetuned": _row(tops["finetuned"], reps["finetuned"], what=f"W{bits} after finetune ({teacher} teacher)",
                          val_top1=vals["finetuned"][0], val_loss=vals["finetuned"][1]),
        # the ONNX graph is the finetuned network: same spikes and operations, its size is the file's
        "onnx": _row(onnx_eval["top1"], reps["finetuned"], size_bytes=int(ex["file_bytes"]),
                     what="exported ONNX run by onnxruntime (size: file on disk)"),
    }
    f = rows["float"]
    for r in rows.values():
        r["size_x"] = f["size_bytes"] / r["size_bytes"] if r["size_bytes"] else None
        r["energy_x"] = f["energy_mj"] / r["energy_mj"] if r.get("energy_mj") else None
    return DemoResult(workdir=str(wd), data=data, bits=bits, teacher=teacher, rows=rows, stages=stages,
                      energy_table=reps["float"]["energy_table"], seconds=round(time.perf_counter() - t0, 1))


__all__ = ["run_eval", "convert_model", "run_convert", "convert_summary", "demo"]
