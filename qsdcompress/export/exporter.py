"""``export``: a model to an ONNX file with packed low-bit weights, checked against onnxruntime.

The file is written only when it passes the parity contract against PyTorch on real images
(:mod:`qsdcompress.export.parity`); ``check=False`` writes an unchecked file, marked so.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..data import DataConfig, model_data
from ..errors import QsdError, one_line
from ..io import META_KEY, atomic_path, ensure_writable_dir, package_versions
from ..loading import resolve_source
from ..sizing import model_size
from ..ui import console, quiet
from .folding import export_module
from .graph import BASE_OPSET, INT2_OPSET, clean_graph, pack_graph, trace
from .integer import finish_integer_graph, integer_module, rewrite_integer
from .parity import check_parity
from .runtime import parity_batch


FORMATS = ("int", "qdq")


@dataclass
class ExportConfig:
    """Options of :func:`export` (serialised into the result and the ONNX metadata)."""

    int2: bool = True                 # store b <= 2 weights as INT2 (opset 25); False: INT4
    opset: int | None = None          # None: 21, or 25 when INT2 initializers are written
    parity_samples: int = 64          # real images for the onnxruntime vs PyTorch check
    data: str | None = None           # parity images: None = the model's own data, else digits
    check: bool = True                # False: write the file without the parity check (marked unchecked)
    float64_samples: int = 0          # also compare file and PyTorch float32 with float64 on this many
    format: str = "int"               # int: spike-fed layers as integer kernels; qdq: DequantizeLinear + float ops

    def to_dict(self) -> dict:
        return asdict(self)


def _data_config_dict(model: nn.Module) -> dict:
    cfg = DataConfig.from_model(model)
    return {"input_size": list(cfg.input_size), "mean": list(cfg.mean), "std": list(cfg.std),
            "interpolation": cfg.interpolation, "crop_pct": cfg.crop_pct}


def _resolve_config(config: ExportConfig | None, overrides: dict[str, Any]) -> ExportConfig:
    cfg = config or ExportConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise QsdError(f"unknown export option {k!r}")
        setattr(cfg, k, v)
    if cfg.parity_samples < 1:
        raise QsdError("parity samples must be at least 1")
    if cfg.float64_samples < 0:
        raise QsdError("--float64-samples must be >= 0")
    if cfg.format not in FORMATS:
        raise QsdError(f"unknown export format {cfg.format!r}; choose one of {', '.join(FORMATS)}")
    return cfg


def _output_path(output: str | os.PathLike | None, workdir: str | os.PathLike | None) -> Path:
    out = Path(output) if output is not None else Path(workdir or ".") / "model.onnx"
    if out.suffix.lower() != ".onnx":
        raise QsdError(f"output must end in .onnx, got {out}")
    ensure_writable_dir(out.parent)
    return out


def _graph(module: nn.Module, registry: dict, sample, opset: int, use_int2: bool, fmt: str) -> tuple[Any, dict]:
    """Trace ``module``; ``qdq``: packed weights + DequantizeLinear everywhere; ``int``: spike-fed
    layers rewritten to integer kernels (see ``integer.py``), the rest as in ``qdq``."""
    proto = trace(module, sample, min(opset, BASE_OPSET))
    if fmt == "qdq":
        counts = pack_graph(proto, registry, use_int2)
        clean_graph(proto, opset)
        return proto, {"initializers": counts}
    clean_graph(proto, opset)
    info = rewrite_integer(proto, registry, use_int2)
    counts = dict(info.pop("initializers"))
    for k, v in pack_graph(proto, info.pop("remaining"), use_int2).items():
        counts[k] = counts.get(k, 0) + v
    sites = info.pop("sites")
    info["requantized_layers"] = finish_integer_graph(proto, opset, sites)
    return proto, {"initializers": counts, **info}


def build_onnx(src_model: nn.Module, source: str, cfg: ExportConfig, sample) -> tuple[Any, dict]:
    """The checked ONNX model of ``src_model`` and facts about it (opset, initializers, bits)."""
    import onnx

    module, registry = integer_module(src_model) if cfg.format == "int" else export_module(src_model)
    bits_used = {qw.bits for qw in registry.values() if qw.ints is not None}
    use_int2 = cfg.int2 and any(b <= 2 for b in bits_used)
    opset = cfg.opset or (INT2_OPSET if use_int2 else BASE_OPSET)
    if use_int2 and opset < INT2_OPSET:
        raise QsdError(f"INT2 weights need opset >= {INT2_OPSET}; pass --no-int2 to store them as INT4")
    proto, graph_facts = _graph(module, registry, sample, opset, use_int2, cfg.format)
    widths = sorted({q.bits for q in registry.values()})
    own_data = model_data(src_model)
    facts = {"format": cfg.format, "opset": opset, **graph_facts, "T": int(getattr(src_model, "T", 1)),
             "int2": "used" if use_int2 else ("not needed" if cfg.int2 else "off (b<=2 stored as INT4)"),
             "layer_bits": {b: sum(1 for q in registry.values() if q.bits == b) for b in widths}}
    meta = {
        "format_version": 1, "arch": getattr(src_model, "arch", None), "source": source,
        "num_classes": int(getattr(src_model, "num_classes", 0)), "T": facts["T"],
        "data_config": _data_config_dict(src_model),
        "weight_bits": {k[: -len(".weight")]: v.bits for k, v in registry.items()},
        "export": cfg.to_dict(), "format": cfg.format, "opset": opset, "versions": package_versions(),
        **({"data": own_data} if own_data else {}),
    }
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta, separators=(",", ":")))
    proto.producer_name = "qsdcompress"
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise QsdError(f"export produced an invalid ONNX graph: {one_line(e, 300)}") from None
    return proto, facts


def export(model: nn.Module | str | os.PathLike | None = None, output: str | os.PathLike | None = None,
           workdir: str | os.PathLike | None = None, config: ExportConfig | None = None, **overrides: Any) -> dict:
    """Export ``model`` (module, .qsd/checkpoint path, or None = newest .qsd of ``workdir``, else the
    bundled model) to ONNX with packed low-bit weights; check it against PyTorch with onnxruntime.

    Returns a dict with ``output``, ``file_bytes``, ``weight_bits_bytes``, ``max_abs_diff``,
    ``top1_agreement`` and more. The file is written only when the parity check passes.
    """
    cfg = _resolve_config(config, overrides)
    t0 = time.perf_counter()
    output = _output_path(output, workdir)
    src_model, source = resolve_source(model, workdir, cfg.data or "digits")
    src_model.eval()
    data = cfg.data or model_data(src_model) or "digits"
    x = parity_batch(src_model, data, cfg.parity_samples)
    proto, facts = build_onnx(src_model, source, cfg, x[:2])
    if cfg.check:
        parity = {**check_parity(proto, src_model, x, float64_samples=min(cfg.float64_samples, len(x))),
                  "parity_data": data, "parity": "checked"}
    else:
        parity = {"parity": "unchecked", "parity_ok": None}
        _mark_unchecked(proto)
    with atomic_path(output) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    size = model_size(src_model)
    sizes = {"weight_bits_bytes": size["size_bytes"], "quantized_weight_bytes": size["quantized_weight_bytes"]}
    file_bytes = output.stat().st_size
    res = {
        "output": str(output), "source": source, "file_bytes": file_bytes, **sizes,
        "file_vs_weight_bits": round(file_bytes / max(sizes["weight_bits_bytes"], 1), 4),
        "file_vs_quantized_weights": round(file_bytes / max(sizes["quantized_weight_bytes"], 1), 4),
        **parity, **facts, "seconds": round(time.perf_counter() - t0, 2),
    }
    if not quiet():
        check = ("NOT parity-checked (--unchecked)" if not cfg.check else
                 f"parity checked on {parity['parity_samples']} images of {data}: {parity['layers_checked']} layers "
                 f"fed PyTorch's spikes, {parity['spike_flips']} flips at fragile spikes, top-1 agreement "
                 f"{parity['top1_agreement'] * 100:.1f}%")
        console.print(f"exported {output} ({cfg.format} format, {file_bytes:,} bytes; "
                      f"{res['file_vs_weight_bits']:.3f}x params*bits/8); {check}")
    return res


def _mark_unchecked(proto: Any) -> None:
    """Record in the file's metadata that no parity check ran."""
    for prop in proto.metadata_props:
        if prop.key == META_KEY:
            meta = json.loads(prop.value)
            meta["parity"] = "unchecked"
            prop.value = json.dumps(meta, separators=(",", ":"))


__all__ = ["ExportConfig", "export", "build_onnx", "FORMATS"]
