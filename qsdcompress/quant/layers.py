"""Low-bit weights (docs/method.md §3): Brevitas layers with a weight-only, per-output-channel,
signed, full-range quantizer and a learned scale; scale initialisation; the per-layer bit plan.

``w_q = s * clamp(round(w / s), -2^(b-1), 2^(b-1)-1)``. Brevitas' learned parameter is a threshold
``s * 2^(b-1)``; 1 bit is a true binary ``{-s, +s}`` quantizer (``s * sign(w)``, sign(0) = +1), its
parameter is ``s`` itself. Inputs, outputs and biases are not quantized (inputs are spikes);
BatchNorm stays float.
"""
from __future__ import annotations

import fnmatch
import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from ..errors import QsdError
from ..config import FLOAT_BITS, SCALE_INITS, QuantConfig, parse_bits

_FLOAT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)

def _quantizers() -> tuple[type, type]:
    """(multi-bit, binary) Brevitas weight quantizers; imported lazily (brevitas is slow to import)."""
    global _QUANTIZERS
    if _QUANTIZERS is None:
        from brevitas.core.quant import BinaryQuant
        from brevitas.inject.enum import ScalingImplType
        from brevitas.quant import Int8WeightPerChannelFloat

        class QsdIntWeightPerChannel(Int8WeightPerChannelFloat):
            """Signed, full range (not narrow), per-output-channel learned scale (threshold parameter)."""

            scaling_impl_type = ScalingImplType.PARAMETER
            narrow_range = False

        class QsdBinaryWeightPerChannel(Int8WeightPerChannelFloat):
            """``s * sign(w)`` with a learned per-output-channel ``s`` (integers -1, +1)."""

            tensor_quant = BinaryQuant
            scaling_impl_type = ScalingImplType.PARAMETER
            bit_width = 1
            narrow_range = False

        _QUANTIZERS = (QsdIntWeightPerChannel, QsdBinaryWeightPerChannel)
    return _QUANTIZERS


_QUANTIZERS: tuple[type, type] | None = None


def _quant_classes() -> dict[type, type]:
    import brevitas.nn as qnn

    return {nn.Conv1d: qnn.QuantConv1d, nn.Conv2d: qnn.QuantConv2d, nn.Linear: qnn.QuantLinear}


def is_quant_layer(m: nn.Module) -> bool:
    return hasattr(m, "quant_weight") and hasattr(m, "weight_quant")


def quant_bits(m: nn.Module) -> int:
    """Weight bit width of a Brevitas layer."""
    return int(m.weight_quant.tensor_quant.bit_width().item()) if hasattr(
        m.weight_quant.tensor_quant, "bit_width") else int(m.quant_weight().bit_width.item())


def scale_param(m: nn.Module) -> nn.Parameter:
    return m.weight_quant.tensor_quant.scaling_impl.value


def attach_lsq_grad_scale(model: nn.Module) -> list:
    """LSQ gradient scaling: multiply each learned scale's gradient by ``1/sqrt(numel * Qp)``.

    Brevitas applies none; without it the scales of large layers move far faster than their
    weights. Call after any ``load_state_dict`` (which replaces the scale Parameters).
    Returns the hook handles.
    """
    handles = []
    for m in model.modules():
        if is_quant_layer(m):
            bits = quant_bits(m)
            qp = max(2 ** (bits - 1) - 1, 1)
            g = 1.0 / math.sqrt(m.weight.numel() * qp)
            handles.append(scale_param(m).register_hook(lambda grad, g=g: grad * g))
    return handles

def _value_from_step(step: torch.Tensor, bits: int) -> torch.Tensor:
    return step if bits == 1 else step * float(2 ** (bits - 1))


@contextmanager
def _no_weight_init() -> Iterator[None]:
    """Skip the random weight initialisation of conv/linear constructors (seconds on big models)."""
    saved = (nn.modules.conv._ConvNd.reset_parameters, nn.Linear.reset_parameters)
    nn.modules.conv._ConvNd.reset_parameters = lambda self: None  # type: ignore[method-assign]
    nn.Linear.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.modules.conv._ConvNd.reset_parameters, nn.Linear.reset_parameters = saved  # type: ignore[method-assign]


def make_quant_layer(m: nn.Module, bits: int, step: torch.Tensor | None = None) -> nn.Module:
    """The Brevitas counterpart of ``m`` (sharing its weight and bias) with per-channel step ``step``."""
    if type(m) not in _FLOAT_TYPES:
        raise TypeError(f"cannot quantize {type(m).__name__}")
    bits = parse_bits(bits)
    int_q, bin_q = _quantizers()
    cout = m.weight.shape[0]
    if step is None:
        step = torch.ones(cout)
    value = _value_from_step(step.detach().float().reshape(-1), bits)
    value = value.view(cout, *([1] * (m.weight.dim() - 1)))
    kw: dict[str, Any] = dict(weight_quant=bin_q if bits == 1 else int_q, weight_scaling_init=value,
                              input_quant=None, output_quant=None, bias_quant=None, return_quant_tensor=False,
                              bias=m.bias is not None)
    if bits > 1:
        kw["weight_bit_width"] = bits
    cls = _quant_classes()[type(m)]
    with _no_weight_init():  # the weight is replaced by m's right after: skip its random init
        if isinstance(m, nn.Linear):
            q = cls(m.in_features, m.out_features, **kw)
        else:
            q = cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode, **kw)
    q.weight = m.weight
    if m.bias is not None:
        q.bias = m.bias
    q.to(device=m.weight.device)
    scale_param(q).data = scale_param(q).data.to(device=m.weight.device, dtype=m.weight.dtype)
    q.train(m.training)
    return q


@torch.no_grad()
def init_step(weight: torch.Tensor, bits: int, method: str = "mse", grid: int = 16) -> torch.Tensor:
    """Initial per-output-channel step ``s`` (shape ``(C_out,)``) of a weight tensor.

    ``mse``: coarse grid of ``grid`` clipping ratios in (0, 1] of the no-clip step, then as many
    around the best, minimising ``||w - w_q||^2`` per channel (1 bit: the closed-form optimum
    ``mean|w|``). ``lsq``: ``2 mean|w| / sqrt(Qp)`` (1 bit: ``mean|w|``). ``absmax``: ``max|w| / Qp``.
    """
    w = weight.detach().float().reshape(weight.shape[0], -1)
    tiny = torch.finfo(torch.float32).tiny
    amax = w.abs().amax(1).clamp_min(1e-12)
    if bits == 1:
        return (amax if method == "absmax" else w.abs().mean(1)).clamp_min(1e-12)
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if method == "absmax":
        return amax / qp
    if method == "lsq":
        return (2 * w.abs().mean(1) / qp ** 0.5).clamp_min(1e-12)
    if method != "mse":
        raise QsdError(f"--scale-init must be one of {', '.join(SCALE_INITS)}, got {method!r}")
    base = amax / qp
    lo = 1.0 / (2 * grid)

    def search(ratios: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ratios: (n,) shared, or (n, C) per channel
        best_err = torch.full_like(amax, float("inf"))
        best_r = torch.ones_like(amax)
        for r in ratios:
            s = (base * r).clamp_min(tiny).unsqueeze(1)
            t = torch.div(w, s).round_().clamp_(qn, qp).mul_(s).sub_(w)  # one buffer: big layers
            err = t.square_().sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, r.expand_as(best_r) if r.dim() == 0 else r, best_r)
        return best_r, best_err

    coarse = torch.linspace(lo, 1.0, grid)
    r0, _ = search(coarse)
    step = (1.0 - lo) / (grid - 1)
    fine = r0.unsqueeze(0) + torch.linspace(-step, step, grid).unsqueeze(1)  # (grid, C)
    r1, _ = search(fine.clamp(lo / 2, 1.0))
    return base * r1


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv1d/Conv2d/Linear layers (float or already quantized), in module order."""
    out = []
    for name, m in model.named_modules():
        if type(m) in _FLOAT_TYPES or is_quant_layer(m):
            out.append((name, m))
    return out


def _layer_rule(name: str, index: int, count: int, config: QuantConfig) -> tuple[int, bool]:
    """Bits of one layer under ``config`` and whether an explicit option (a ``layer_bits`` or
    ``skip`` glob, ``first_last_bits``) set them rather than the default ``bits``."""
    bits, explicit = config.bits, False
    if config.first_last_bits is not None and index in (0, count - 1):
        bits, explicit = config.first_last_bits, True
    for glob, b in config.layer_bits.items():
        if fnmatch.fnmatchcase(name, glob):
            bits, explicit = b, True
    if any(fnmatch.fnmatchcase(name, g) for g in config.skip):
        bits, explicit = FLOAT_BITS, True
    return bits, explicit


def plan_bits(model: nn.Module, config: QuantConfig, explicit_only: bool = False) -> dict[str, int]:
    """Bit width per weight layer name (``FLOAT_BITS`` = keep float) under ``config``;
    ``explicit_only``: only the layers an option names (what a mixed-precision plan must not change)."""
    layers = [n for n, _ in weight_layers(model)]
    plan: dict[str, int] = {}
    for i, name in enumerate(layers):
        bits, explicit = _layer_rule(name, i, len(layers), config)
        if explicit or not explicit_only:
            plan[name] = bits
    for glob in [*config.layer_bits, *config.skip]:
        if not any(fnmatch.fnmatchcase(n, glob) for n in layers):
            raise QsdError(f"layer glob {glob!r} matches no conv/linear layer (e.g. {layers[len(layers) // 2]})")
    return plan


def layer_bits(model: nn.Module) -> dict[str, int]:
    """Weight bits per conv/linear module name (32 for float layers)."""
    return {name: (quant_bits(m) if is_quant_layer(m) else FLOAT_BITS) for name, m in weight_layers(model)}

def quantize_(model: nn.Module, config: QuantConfig | None = None,
              steps: Mapping[str, torch.Tensor] | None = None,
              plan: Mapping[str, int] | None = None) -> nn.Module:
    """Swap every float Conv1d/Conv2d/Linear for its Brevitas layer, in place.

    ``plan`` (name -> bits) defaults to :func:`plan_bits`; ``steps`` (name -> per-channel step)
    overrides the scale initialisation. Layers already quantized are left alone.
    """
    config = (config or QuantConfig()).validate()
    plan = dict(plan) if plan is not None else plan_bits(model, config)
    for name, m in weight_layers(model):
        bits = plan.get(name, FLOAT_BITS)
        if is_quant_layer(m) or bits >= FLOAT_BITS:
            continue
        step = steps[name] if steps is not None and name in steps else \
            init_step(m.weight, bits, config.scale_init, config.mse_grid)
        model.set_submodule(name, make_quant_layer(m, bits, step))
    return model



__all__ = ["quantize_", "make_quant_layer", "init_step", "plan_bits", "layer_bits", "weight_layers", "is_quant_layer",
           "quant_bits", "attach_lsq_grad_scale", "scale_param"]
