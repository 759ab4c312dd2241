"""Running an exported file: onnxruntime sessions, the stored metadata, the parity images."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..data import DataConfig, build_loader
from ..errors import QsdError, one_line
from ..io import META_KEY
from .graph import INPUT_NAME, OUTPUT_NAME

ORT_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}  # no int8 rounding of activations

def ort_session(path_or_bytes: str | os.PathLike | bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    for k, v in ORT_CONFIG.items():
        so.add_session_config_entry(k, v)
    # all graph optimizations (the default, stated): constant folding widens the packed weights
    # and computes the im2col indices once at load
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    src = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def onnx_metadata(path: str | os.PathLike) -> dict:
    """The qsdcompress metadata stored in an exported ONNX file."""
    import onnx

    p = Path(path)
    if not p.exists():
        raise QsdError(f"file not found: {p}")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # not an ONNX file
        raise QsdError(f"{p} is not a readable ONNX file: {one_line(e)}") from None
    props = {m.key: m.value for m in proto.metadata_props}
    if META_KEY not in props:
        raise QsdError(f"{p} was not exported by qsdcompress (no '{META_KEY}' metadata); "
                       "its input size and normalisation are unknown")
    return json.loads(props[META_KEY])


def onnx_predictor(path: str | os.PathLike) -> tuple[Callable[[torch.Tensor], torch.Tensor], DataConfig, int]:
    """An onnxruntime predictor of an exported file, its DataConfig and number of classes."""
    meta = onnx_metadata(path)
    sess = ort_session(path)
    dc = meta.get("data_config", {})
    cfg = DataConfig(input_size=tuple(dc.get("input_size", (3, 224, 224))), mean=tuple(dc.get("mean", (0.5,) * 3)),
                     std=tuple(dc.get("std", (0.5,) * 3)), interpolation=dc.get("interpolation", "bicubic"),
                     crop_pct=float(dc.get("crop_pct", 0.875)))

    def predict(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
        return torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: arr})[0])

    return predict, cfg, int(meta.get("num_classes", 0))


def parity_batch(model: nn.Module, data: str, n: int) -> torch.Tensor:
    """``n`` real images prepared the way the model expects."""
    cfg = DataConfig.from_model(model)
    loader = build_loader(data, "test", cfg, batch_size=n, shuffle=False,
                          num_classes=getattr(model, "num_classes", 10))
    x = next(iter(loader))[0]
    return x


__all__ = ["ORT_CONFIG", "ort_session", "onnx_metadata", "onnx_predictor", "parity_batch"]
