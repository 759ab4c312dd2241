"""Running an exported file: onnxruntime sessions, the stored metadata, and the parity check
against PyTorch that every export must pass."""
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
# Parity tolerance on logits: float32 summation order differs between PyTorch and onnxruntime
# (relative error ~1e-6 per layer); anything above this means a real mismatch or a spike that
# flipped at a .5 boundary.
DEFAULT_RTOL = 1e-4
# Images allowed to differ (spikes flipped at a rounding boundary), as a fraction of the batch.
DEFAULT_FLIP_FRACTION = 0.05

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


def check_parity(session_or_path, model: nn.Module, x: torch.Tensor, rtol: float = DEFAULT_RTOL,
                 max_flip_fraction: float = DEFAULT_FLIP_FRACTION, raise_error: bool = True) -> dict:
    """onnxruntime vs PyTorch eval logits on ``x``.

    An image *matches* when its logits agree within ``rtol * max(1, max |logit|)``. Integer spikes
    make an exact contract impossible on every image: a pre-activation within float rounding
    (~1e-6) of a ``k + 0.5`` boundary fires differently in the two runtimes and the difference
    propagates. Such images are rare (measured: 0-4 of 360 digits images) while a real export
    bug changes almost every image, so the check passes when at most
    ``max(1, max_flip_fraction * n)`` images differ and top-1 disagrees on at most as many.
    """
    sess = session_or_path if hasattr(session_or_path, "run") else ort_session(session_or_path)
    model.eval()
    with torch.no_grad():
        ref = model(x).float().numpy()
    out = sess.run([OUTPUT_NAME], {INPUT_NAME: x.detach().cpu().float().numpy()})[0]
    per_image = np.abs(out - ref).max(axis=1)
    scale = float(np.abs(ref).max())
    tol = rtol * max(1.0, scale)
    match = per_image <= tol
    n = int(x.shape[0])
    agree = out.argmax(1) == ref.argmax(1)
    allowed = max(1, int(max_flip_fraction * n))
    differing = int((~match).sum())
    res = {"max_abs_diff": float(per_image.max()),
           "max_abs_diff_matching": float(per_image[match].max()) if match.any() else None,
           "top1_agreement": float(agree.mean()), "images_differing": differing, "images_allowed_to_differ": allowed,
           "logit_scale": scale, "tolerance": tol, "parity_samples": n,
           "parity_ok": differing <= allowed and int((~agree).sum()) <= allowed and bool(match.any())}
    if raise_error and not res["parity_ok"]:
        raise QsdError(f"ONNX parity failed: {differing} of {n} images differ by more than {tol:.3g} "
                       f"(max |logit diff| {res['max_abs_diff']:.3g}), top-1 agreement {agree.mean() * 100:.1f}%; "
                       f"the file was not written")
    return res



__all__ = ["ORT_CONFIG", "ort_session", "onnx_metadata", "onnx_predictor", "parity_batch", "check_parity",
           "DEFAULT_RTOL", "DEFAULT_FLIP_FRACTION"]
