"""``export``: a model to an ONNX file with packed low-bit weights, checked against onnxruntime.

Every format is the traced graph rewritten by a list of passes (:mod:`.passes`), each list
written once, in order, in :data:`FORMAT_PASSES`. The file is written only when it passes the
parity contract against PyTorch on real images (:mod:`qsdcompress.onnx_export.parity`);
``check=False`` writes an unchecked file, marked so.
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
from ..io import META_KEY, atomic_path, ensure_writable_dir
from ..provenance import package_versions
from ..results import ExportResult
from ..loading import resolve_source
from ..sizing import model_size
from ..ui import console, quiet
from . import integer, standard
from .folding import export_module
from .graph import BASE_OPSET, INT2_OPSET, trace
from .parity import check_parity
from .passes import Pass, PassContext, clean, compact, merge_duplicates, pack_weights, run_passes, set_opsets
from .runtime import RUNTIMES, Runtime, executed_layers, openvino_core, parity_batch, parity_runtime

FORMATS = ("int", "qdq", "std-int")
# each format's passes, in order (docs/architecture.md says what each does)
FORMAT_PASSES: dict[str, tuple[Pass, ...]] = {
    "int": (clean, integer.rewrite_integer, pack_weights, integer.foldable_weights, integer.share_small_initializers,
            merge_duplicates, integer.simplify_neurons, integer.fold_into_matmul, integer.requantize_neurons,
            integer.fold_into_conv, compact, set_opsets),
    "qdq": (pack_weights, clean, set_opsets),
    "std-int": (pack_weights, clean, standard.integer_weights, standard.requantize_neurons,
                standard.drop_unit_time_axis, merge_duplicates, compact, set_opsets),
}
MODULES = {"int": integer.integer_module, "qdq": export_module, "std-int": standard.standard_module}
# formats each runtime can run: OpenVINO has no com.microsoft ops
RUNS = {"onnxruntime": FORMATS, "openvino": ("qdq", "std-int")}


@dataclass
class ExportConfig:
    """Options of :func:`export` (serialised into the result and the ONNX metadata)."""

    int2: bool = True                 # store b <= 2 weights as INT2 (opset 25); False: INT4
    opset: int | None = None          # None: 21, or 25 when INT2 initializers are written
    parity_samples: int = 64          # real images for the onnxruntime vs PyTorch check
    data: str | None = None           # parity images: None = the model's own data, else digits
    check: bool = True                # False: write the file without the parity check (marked unchecked)
    float64_samples: int = 0          # also compare file and PyTorch float32 with float64 on this many
    format: str = "int"               # int: spike-fed layers as integer kernels (onnxruntime); qdq: DequantizeLinear
                                      # + float ops; std-int: QDQ integer layers, standard ops (any runtime)
    runtime: str = "onnxruntime"      # the runtime the parity check runs under (RUNTIMES)

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
    if cfg.runtime not in RUNTIMES:
        raise QsdError(f"unknown runtime {cfg.runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if cfg.format not in RUNS[cfg.runtime]:
        raise QsdError(f"the {cfg.format} format uses onnxruntime's com.microsoft ops, which {cfg.runtime} cannot "
                       f"run; choose --format {' or '.join(RUNS[cfg.runtime])}")
    if cfg.runtime == "openvino":
        openvino_core()     # not installed: one line now, before any work
    return cfg


def _output_path(output: str | os.PathLike | None, workdir: str | os.PathLike | None) -> Path:
    out = Path(output) if output is not None else Path(workdir or ".") / "model.onnx"
    if out.suffix.lower() != ".onnx":
        raise QsdError(f"output must end in .onnx, got {out}")
    ensure_writable_dir(out.parent)
    return out


def _graph(module: nn.Module, registry: dict, sample, opset: int, use_int2: bool, fmt: str) -> tuple[Any, dict]:
    """Trace ``module`` (at opset 21 at most: the tracer stops there), then run the format's
    passes (``FORMAT_PASSES``); the last one declares ``opset``."""
    proto = trace(module, sample, min(opset, BASE_OPSET))
    return proto, run_passes(proto, PassContext(registry, use_int2, opset), FORMAT_PASSES[fmt])


def build_onnx(src_model: nn.Module, source: str, cfg: ExportConfig, sample) -> tuple[Any, dict]:
    """The checked ONNX model of ``src_model`` and facts about it (opset, initializers, bits)."""
    import onnx

    module, registry = MODULES[cfg.format](src_model)
    bits_used = {qw.bits for qw in registry.values() if qw.ints is not None}
    # OpenVINO's ONNX reader knows no INT2 (2026.4: "Unsupported data type INT2"): INT4 for it
    int2 = cfg.int2 and cfg.runtime != "openvino"
    use_int2 = int2 and any(b <= 2 for b in bits_used)
    opset = cfg.opset or (INT2_OPSET if use_int2 else BASE_OPSET)
    if use_int2 and opset < INT2_OPSET:
        raise QsdError(f"INT2 weights need opset >= {INT2_OPSET}; pass --no-int2 to store them as INT4")
    proto, graph_facts = _graph(module, registry, sample, opset, use_int2, cfg.format)
    widths = sorted({q.bits for q in registry.values()})
    own_data = model_data(src_model)
    facts = {"format": cfg.format, "opset": opset, **graph_facts, "T": int(getattr(src_model, "T", 1)),
             "int2": "used" if use_int2 else ("not needed" if int2 else "off (b<=2 stored as INT4)"
                                              + (": OpenVINO reads no INT2" if cfg.int2 else "")),
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
           workdir: str | os.PathLike | None = None, config: ExportConfig | None = None,
           **overrides: Any) -> ExportResult:
    """Export ``model`` (module, .qsd/checkpoint path, or None = newest .qsd of ``workdir``, else the
    bundled model) to ONNX with packed low-bit weights; check it against PyTorch under ``runtime``
    (onnxruntime, or OpenVINO at f32: ``runtime.PARITY_PRECISION``).

    Returns an :class:`~qsdcompress.results.ExportResult` (``output``, ``file_bytes``, ``weight_bits_bytes``,
    ``max_abs_diff``, ``top1_agreement`` and more). The file is written only when the parity check passes.
    """
    cfg = _resolve_config(config, overrides)
    t0 = time.perf_counter()
    output = _output_path(output, workdir)
    src_model, source = resolve_source(model, workdir, cfg.data)
    src_model.eval()
    data = cfg.data or model_data(src_model) or "digits"
    x = parity_batch(src_model, data, cfg.parity_samples)
    proto, facts = build_onnx(src_model, source, cfg, x[:2])
    parity = _parity(proto, src_model, x, cfg, data)
    # from a session of the file itself: the parity sessions run it with every spike tensor as an
    # output, which changes what a runtime fuses into integer kernels
    facts["integer_layers_executed"] = executed_layers(proto, parity_runtime(cfg.runtime))
    with atomic_path(output) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    size = model_size(src_model)
    sizes = {"weight_bits_bytes": size["size_bytes"], "quantized_weight_bytes": size["quantized_weight_bytes"]}
    file_bytes = output.stat().st_size
    res = ExportResult(
        output=str(output), source=source, file_bytes=file_bytes, **sizes,
        file_vs_weight_bits=round(file_bytes / max(sizes["weight_bits_bytes"], 1), 4),
        file_vs_quantized_weights=round(file_bytes / max(sizes["quantized_weight_bytes"], 1), 4),
        parity=parity, facts=facts, seconds=round(time.perf_counter() - t0, 2))
    if not quiet():
        console.print(res.line())
    return res


def _parity(proto: Any, model: nn.Module, x, cfg: ExportConfig, data: str) -> dict:
    """The parity contract under ``cfg.runtime`` (raises on failure), or the file marked unchecked;
    under OpenVINO also what its default precision does end to end."""
    if not cfg.check:
        _mark_unchecked(proto)
        return {"parity": "unchecked", "parity_ok": None}
    rt = parity_runtime(cfg.runtime)
    parity = {**check_parity(proto, model, x, float64_samples=min(cfg.float64_samples, len(x)), runtime=rt),
              "parity_data": data, "parity": "checked"}
    if rt.name == "openvino":
        parity["openvino_default_precision"] = _default_precision(proto, model, x, parity["tolerance"])
    return parity


def _default_precision(proto: Any, model: nn.Module, x, tolerance: float) -> dict:
    """What OpenVINO's default precision (bf16 on CPUs with AVX512-BF16 or AMX) does to the file's
    logits on the parity images, end to end against PyTorch: reported, not judged (the contract
    is checked at f32, where it holds)."""
    import numpy as np
    import torch

    sess = Runtime("openvino").session(proto)
    with torch.no_grad():
        ref = model(x).float().numpy()
    got = sess(x.float().numpy())
    per_image = np.abs(got - ref).max(1)
    return {"precision": sess.precision, "max_abs_diff": float(per_image.max()),
            "images_differing": int((per_image > tolerance).sum()),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}


def _mark_unchecked(proto: Any) -> None:
    """Record in the file's metadata that no parity check ran."""
    for prop in proto.metadata_props:
        if prop.key == META_KEY:
            meta = json.loads(prop.value)
            meta["parity"] = "unchecked"
            prop.value = json.dumps(meta, separators=(",", ":"))


# what exists, where users look for it: ``qsdcompress.export.FORMATS``, ``qsdcompress.export.RUNTIMES``
export.FORMATS = FORMATS  # type: ignore[attr-defined]
export.RUNTIMES = RUNTIMES  # type: ignore[attr-defined]

__all__ = ["ExportConfig", "export", "build_onnx", "FORMATS", "FORMAT_PASSES", "RUNTIMES"]
