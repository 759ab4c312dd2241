"""Model size: the one formula that convert, report, export and demo all print (docs/method.md §8).

* ``size_bytes``: quantized weights at ``b`` bits, everything else float32: biases, BatchNorm,
  layer scales, IE-LIF parameters and one float32 scale per output channel of every quantized
  layer. Rounded up to whole bytes.
* ``size_mb_paper``: the paper's convention, ``params(M) * bits / 32`` "MB", with ``bits`` the
  parameter-weighted mean width of the conv/linear weights (so SDT-V2 55.4M at 32 bits is
  "55.4 MB" and the same model at 4 bits "6.9 MB").

Quantizer scales are not counted as parameters (a float model has none), but their bytes are.
"""
from __future__ import annotations

import math

import torch.nn as nn

from .quant import FLOAT_BITS, is_quant_layer, quant_bits, weight_layers


def _override(bits: int | dict[str, int] | None, name: str) -> int | None:
    if isinstance(bits, int):
        return bits
    if isinstance(bits, dict):
        return bits.get(name)
    return None


def layer_widths(model: nn.Module, bits: int | dict[str, int] | None = None) -> dict[str, int]:
    """Weight bits per conv/linear layer: the override (an int for every layer, or a dict by
    name), else the layer's quantizer, else 32. Works on a meta-device model."""
    out = {}
    for name, m in weight_layers(model):
        b = _override(bits, name)
        out[name] = int(b) if b is not None else (quant_bits(m) if is_quant_layer(m) else FLOAT_BITS)
    return out


def parameter_count(model: nn.Module) -> int:
    """Parameters as the float model has them (quantizer scales excluded)."""
    return sum(p.numel() for n, p in model.named_parameters() if "scaling_impl" not in n and "weight_quant" not in n)


def model_size(model: nn.Module, bits: int | dict[str, int] | None = None) -> dict:
    """Parameters, per-width layer counts and the theoretical size of ``model`` (see the module doc)."""
    widths = layer_widths(model, bits)
    total = parameter_count(model)
    per_bits: dict[str, dict[str, int]] = {}
    wparams = wbits = qbits = qparams = scales = 0
    for name, m in weight_layers(model):
        b, n = widths[name], m.weight.numel()
        e = per_bits.setdefault(str(b), {"layers": 0, "params": 0})
        e["layers"] += 1
        e["params"] += n
        wparams += n
        wbits += n * b
        if b < FLOAT_BITS:
            qbits += n * b
            qparams += n
            scales += m.weight.shape[0]
    mean_bits = wbits / max(wparams, 1)
    size_bits = qbits + FLOAT_BITS * (total - qparams + scales)  # exact: mixed-precision budgets add it up
    size_bytes = int(math.ceil(size_bits / 8))
    float_bytes = 4 * total
    return {
        "params": total, "weight_params": wparams, "quantized_params": qparams,
        "mean_weight_bits": round(mean_bits, 4),
        "layers_per_bits": dict(sorted(per_bits.items(), key=lambda kv: int(kv[0]))),
        "size_bytes": size_bytes, "size_bits": size_bits, "quantized_weight_bytes": int(math.ceil(qbits / 8)),
        "float_size_bytes": float_bytes, "compression": round(float_bytes / size_bytes, 3) if size_bytes else None,
        "size_mb_paper": round(total / 1e6 * mean_bits / 32, 4), "float_size_mb_paper": round(total / 1e6, 4),
    }


__all__ = ["model_size", "layer_widths", "parameter_count"]
