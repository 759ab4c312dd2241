"""The Python API behind the CLI: load and save models, evaluate them.

Everything a CLI command does is a function here (or in the module of its concern), usable from
a notebook::

    import qsdcompress as q
    model = q.load()                       # the bundled digits model
    print(q.eval(model)["top1"])
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .data import DataConfig, build_loader, num_classes_of
from .errors import QsdError
from .io import (load_state_dict_checked, read_checkpoint, save_qsd, sha256_file, strip_quant_extras)
from .metrics import evaluate
from .models import create_model, list_models, model_config, resolve_name
from .neurons import set_spike_mode

DEFAULT_WORKDIR = "qsdcompress-out"


def bundled_model(ann: bool = False) -> nn.Module:
    """The bundled ``qsd_tiny`` trained on digits (``ann=True``: its counterpart ANN)."""
    from .zoo import bundled_path

    return load(bundled_path(ann))


def _infer_model_args(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if "head.weight" in sd:
        args["num_classes"] = int(sd["head.weight"].shape[0])
    if "downsample1_1.encode_conv.weight" in sd:
        args["in_chans"] = int(sd["downsample1_1.encode_conv.weight"].shape[1])
    return args


def guess_arch(sd: dict[str, torch.Tensor]) -> str | None:
    """The registered architecture whose keys and shapes match a state_dict, if exactly one does."""
    sd, _ = strip_quant_extras(sd)
    args = _infer_model_args(sd)
    hits = []
    for name in list_models():
        with torch.device("meta"):
            m = create_model(name, **args)
        own = m.state_dict()
        if set(own) == set(sd) and all(tuple(own[k].shape) == tuple(sd[k].shape) for k in own):
            hits.append(name)
    # aliases of the same topology (qsd_* and metaspikformer_* differ only by neuron) resolve to qsd_*
    return hits[0] if hits else None


def has_reference_lsq(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(".alpha") for k in sd)


def build_from_meta(meta: dict) -> nn.Module:
    """An empty model with the architecture (and quantization) a ``.qsd`` file describes."""
    model = create_model(meta["arch"], **meta.get("model_args", {}))
    if meta.get("quant"):
        from .quant import restore_quantized

        model = restore_quantized(model, meta)
    return model


def load(path: str | os.PathLike | None = None, arch: str | None = None, prefer_ema: bool = False,
         **model_args: Any) -> nn.Module:
    """Return the model stored in any supported file.

    ``.qsd`` files carry their architecture; for reference checkpoints (``.pth``, ``.pt``,
    ``.safetensors``) pass ``arch`` (e.g. ``"spikformer_8_512_CAFormer"``) or let it be inferred
    from the keys and shapes. A reference LSQ checkpoint (``alpha`` keys) is imported as a
    quantized model. ``path=None`` loads the bundled digits model.
    """
    if path is None:
        return bundled_model()
    path = Path(path)
    sd, meta = read_checkpoint(path, prefer_ema=prefer_ema)
    if meta.get("arch") and arch is None:
        model = build_from_meta(meta)
        load_state_dict_checked(model, sd, source=str(path))
        model.qsd_meta = meta  # type: ignore[assignment]
        model.eval()
        return model
    if arch is None:
        arch = guess_arch(sd)
        if arch is None:
            raise QsdError(f"cannot tell the architecture of {path}; pass --arch NAME "
                           f"(one of {', '.join(list_models())})")
    canonical = resolve_name(arch)
    args = {**_infer_model_args(sd), **model_args}
    if has_reference_lsq(sd):
        from .quant import import_reference_lsq

        model = import_reference_lsq(create_model(arch, **args), sd)
    else:
        model = create_model(arch, **args)
        clean, _ = strip_quant_extras(sd)
        load_state_dict_checked(model, clean, source=str(path))
    model.qsd_meta = {  # type: ignore[assignment]
        "kind": "reference", "arch": canonical,
        "model_args": model_config(canonical, **args).to_dict(),
        "source": {"path": str(path), "sha256": sha256_file(path)},
    }
    model.eval()
    return model


def model_meta(model: nn.Module) -> dict:
    """The metadata that rebuilds ``model`` (architecture, arguments, quantization)."""
    meta = dict(getattr(model, "qsd_meta", {}) or {})
    meta["arch"] = getattr(model, "arch", meta.get("arch"))
    meta["model_args"] = model.cfg.to_dict() if hasattr(model, "cfg") else meta.get("model_args", {})
    quant_meta = getattr(model, "qsd_quant_meta", None)
    if quant_meta is not None:
        meta.update(quant_meta() if callable(quant_meta) else quant_meta)
    return meta


def save(model: nn.Module, path: str | os.PathLike, kind: str | None = None, **extra: Any) -> Path:
    """Write ``model`` as a ``.qsd`` file (atomic), recording how to rebuild it and provenance."""
    meta = model_meta(model)
    if kind:
        meta["kind"] = kind
    meta["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    meta.update(extra)
    return save_qsd(path, model.state_dict(), meta)


def resolve_model(model: nn.Module | str | os.PathLike | None, arch: str | None = None) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if model is None and arch is not None:
        resolve_name(arch)  # an unknown name fails here with suggestions
        raise QsdError(f"--arch {arch} needs the weights: pass --checkpoint PATH (or MODEL)")
    return load(model, arch=arch)


def data_config(model: nn.Module) -> DataConfig:
    return DataConfig.from_model(model)


def eval(model: nn.Module | str | os.PathLike | None = None, data: str = "digits", split: str = "test",
         batch_size: int = 128, device: str = "cpu", spike_mode: str | None = None, arch: str | None = None,
         max_batches: int | None = None) -> dict:  # noqa: A001 - API named after the command
    """Top-1/top-5/loss of a model (or ``.qsd``/checkpoint/ONNX path; None = bundled) on a dataset."""
    if isinstance(model, (str, os.PathLike)) and str(model).lower().endswith(".onnx"):
        from .export import onnx_predictor

        predictor, cfg, num_classes = onnx_predictor(model)
        loader = build_loader(data, split, cfg, batch_size=batch_size, num_classes=num_classes)
        return {**evaluate(predictor, loader, "cpu", description="eval (onnxruntime)", max_batches=max_batches),
                "model": str(model), "data": data, "runtime": "onnxruntime"}
    m = resolve_model(model, arch)
    dev = _device(device)
    m.to(dev)
    if spike_mode:
        set_spike_mode(m, spike_mode)
    cfg = data_config(m)
    loader = build_loader(data, split, cfg, batch_size=batch_size, num_classes=m.num_classes)
    ds_classes = num_classes_of(loader.dataset)
    if ds_classes is not None and ds_classes > m.num_classes:
        raise QsdError(f"data {data!r} has {ds_classes} classes but the model predicts {m.num_classes}")
    out = evaluate(m, loader, dev, max_batches=max_batches)
    if spike_mode:
        set_spike_mode(m, "integer")
    return {**out, "model": str(model) if model is not None and not isinstance(model, nn.Module) else
            getattr(m, "arch", "model"), "data": data, "spike_mode": spike_mode or "integer"}


def convert(model: nn.Module | str | os.PathLike | None = None, config: Any = None, calib_loader: Any = None,
            **options: Any) -> nn.Module:
    """Low-bit weights + IE-LIF + calibration (see :mod:`qsdcompress.quant`); returns the converted model.

    ``config``: a :class:`qsdcompress.quant.QuantConfig` or a dict; ``options`` override its fields
    (``qsdcompress.convert(model, bits=4, ie_lif="qkv")``). The float model is left unchanged.
    """
    from dataclasses import replace

    from .quant import QuantConfig, convert as _convert

    if config is None:
        config = QuantConfig()
    elif isinstance(config, dict):
        config = QuantConfig.from_dict(config)
    if options:
        config = replace(config, **options)
    return _convert(resolve_model(model), config, calib_loader)


def finetune(model: nn.Module | str | os.PathLike | None = None, teacher: str | None = None, **options: Any) -> dict:
    """Distillation-based QAT (see :func:`qsdcompress.train.finetune`); writes ``finetuned.qsd``."""
    from .train import finetune as _finetune

    return _finetune(model, teacher=teacher, **options)


def export(model: nn.Module | str | os.PathLike | None = None, output: str | os.PathLike | None = None,
           **options: Any) -> dict:
    """Packed low-bit ONNX export with an onnxruntime parity check (see :func:`qsdcompress.export.export`)."""
    from .export import export as _export

    return _export(model, output, **options)


def report(model: nn.Module | str | os.PathLike | None = None, **options: Any) -> dict:
    """Size, spike and energy report (see :func:`qsdcompress.report.report`)."""
    from .report import report as _report

    return _report(model, **options)


def demo(workdir: str | os.PathLike = DEFAULT_WORKDIR, **options: Any) -> dict:
    """convert -> finetune -> export -> report on the bundled model (see :mod:`qsdcompress.pipeline`)."""
    from .pipeline import demo as _demo

    return _demo(workdir, **options)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QsdError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise QsdError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None


__all__ = ["load", "save", "eval", "convert", "finetune", "export", "report", "demo", "bundled_model", "model_meta", "guess_arch", "resolve_model",
           "data_config", "DEFAULT_WORKDIR"]
