"""Conversion to a QSD-Transformer: low-bit Brevitas weights, IE-LIF neurons, calibration.

* Weights (method.md section 3): every ``Conv1d``/``Conv2d``/``Linear`` becomes the Brevitas layer
  of the same kind at the same module name, with a weight-only, per-output-channel, signed,
  full-range quantizer with a learned scale: ``w_q = s * clamp(round(w / s), -2^(b-1), 2^(b-1)-1)``.
  Brevitas' learned parameter is a threshold ``s * 2^(b-1)``; 1 bit is a true binary
  ``{-s, +s}`` quantizer (``s * sign(w)``, sign(0) = +1), its parameter is ``s`` itself. Inputs,
  outputs and biases are not quantized (inputs are spikes); BatchNorm stays float.
* Scale initialisation: ``mse`` (per-channel search of the step minimising ``||w - w_q||^2``),
  ``lsq`` (``2 mean|w| / sqrt(Qp)``) or ``absmax`` (``max|w| / Qp``, no clipping).
* IE-LIF (method.md section 4) replaces the chosen multi-spike neurons under the same attribute
  names; calibration sets its running statistics (and, for the ``identity`` init, gamma/beta so
  that the eval-mode neuron reproduces the neuron it replaced exactly).
* ``restore_quantized`` rebuilds the structure from ``.qsd`` metadata, ``import_reference_lsq``
  turns a reference QSD-Transformer LSQ checkpoint into the same structure.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from .errors import QsdError
from .neurons import IELIF, LIF, AffineMultiSpike, ClampAct, MultiSpike, Neuron, iter_neurons

SCALE_INITS = ("mse", "lsq", "absmax")
IE_LIF_MODES = ("qkv", "attention", "all", "none")
IE_LIF_INITS = ("identity", "rectify")
FLOAT_BITS = 32
_FLOAT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
REFERENCE_LSQ_BITS = 4  # reference QSD-Transformer: Qn = -8, Qp = 7


def parse_bits(value: Any, what: str = "--bits") -> int:
    """A weight bit width in 1..8, or a one-line error naming the option."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        bits = int(str(value).strip()) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        raise QsdError(f"{what}: bit width must be an integer from 1 to 8, got {value!r}") from None
    if not 1 <= bits <= 8:
        raise QsdError(f"{what}: bit width must be from 1 to 8, got {bits}")
    return bits


def parse_layer_bits(items: Iterable[str]) -> dict[str, int]:
    """``['GLOB=BITS', ...]`` (CLI ``--layer-bits``) -> ordered ``{glob: bits}``."""
    out: dict[str, int] = {}
    for item in items:
        glob, sep, bits = str(item).rpartition("=")
        if not sep or not glob.strip():
            raise QsdError(f"--layer-bits {item!r}: expected GLOB=BITS, e.g. 'block3.*.attn.*=2'")
        out[glob.strip()] = parse_bits(bits, f"--layer-bits {item!r}")
    return out


@dataclass
class QuantConfig:
    """What ``convert`` does; serialised to JSON in every converted ``.qsd`` file.

    Bit width of a layer: ``skip`` globs keep it float, else the last matching ``layer_bits``
    glob, else ``first_last_bits`` for the first and last quantizable layers (stem conv and
    head), else ``bits``. Globs match module names (``fnmatch``), e.g. ``block3.*.attn.*``.
    """

    bits: int = 4
    layer_bits: dict[str, int] = field(default_factory=dict)
    first_last_bits: int | None = None
    skip: list[str] = field(default_factory=list)
    scale_init: str = "mse"
    ie_lif: str = "qkv"
    ie_lif_init: str = "identity"
    ie_lif_momentum: float = 0.1
    ie_lif_eps: float = 1e-5
    calib_data: str = "digits"
    calib_batches: int = 8
    calib_batch_size: int = 32
    mse_grid: int = 16          # coarse candidates of the mse search (then as many refined ones)

    def validate(self) -> "QuantConfig":
        self.bits = parse_bits(self.bits)
        self.layer_bits = {str(k): parse_bits(v, f"--layer-bits {k}") for k, v in dict(self.layer_bits).items()}
        if self.first_last_bits is not None:
            self.first_last_bits = parse_bits(self.first_last_bits, "--first-last-bits")
        self.skip = [str(s) for s in self.skip]
        for name, value, allowed in (("--scale-init", self.scale_init, SCALE_INITS),
                                     ("--ie-lif", self.ie_lif, IE_LIF_MODES),
                                     ("--ie-lif-init", self.ie_lif_init, IE_LIF_INITS)):
            if value not in allowed:
                raise QsdError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.calib_batches < 0:
            raise QsdError(f"--calib-batches must be >= 0, got {self.calib_batches}")
        if self.calib_batch_size < 1:
            raise QsdError(f"calibration batch size must be >= 1, got {self.calib_batch_size}")
        if self.mse_grid < 2:
            raise QsdError(f"mse_grid must be >= 2, got {self.mse_grid}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QsdError(f"unknown quantization option(s) {', '.join(unknown)}")
        return cls(**{k: copy.deepcopy(v) for k, v in d.items()})


# ----------------------------------------------------------------------------- Brevitas quantizers


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


def _scale_param(m: nn.Module) -> nn.Parameter:
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
            handles.append(_scale_param(m).register_hook(lambda grad, g=g: grad * g))
    return handles


def layer_step(m: nn.Module) -> torch.Tensor:
    """Per-channel step ``s`` (shape ``(C_out,)``) of a quantized layer."""
    return m.quant_weight().scale.detach().reshape(-1)


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
    _scale_param(q).data = _scale_param(q).data.to(device=m.weight.device, dtype=m.weight.dtype)
    q.train(m.training)
    return q


# ----------------------------------------------------------------------------- scale initialisation


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


# ----------------------------------------------------------------------------- module helpers


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, attr = _parent(model, name)
    setattr(parent, attr, new)


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv1d/Conv2d/Linear layers (float or already quantized), in module order."""
    out = []
    for name, m in model.named_modules():
        if type(m) in _FLOAT_TYPES or is_quant_layer(m):
            out.append((name, m))
    return out


def plan_bits(model: nn.Module, config: QuantConfig) -> dict[str, int]:
    """Bit width per weight layer name (``FLOAT_BITS`` = keep float) under ``config``."""
    layers = [n for n, _ in _weight_layers(model)]
    plan: dict[str, int] = {}
    for i, name in enumerate(layers):
        bits = config.bits
        if config.first_last_bits is not None and i in (0, len(layers) - 1):
            bits = config.first_last_bits
        for glob, b in config.layer_bits.items():
            if fnmatch.fnmatchcase(name, glob):
                bits = b
        if any(fnmatch.fnmatchcase(name, g) for g in config.skip):
            bits = FLOAT_BITS
        plan[name] = bits
    for glob in [*config.layer_bits, *config.skip]:
        if not any(fnmatch.fnmatchcase(n, glob) for n in layers):
            raise QsdError(f"layer glob {glob!r} matches no conv/linear layer (e.g. {layers[len(layers) // 2]})")
    return plan


def layer_bits(model: nn.Module) -> dict[str, int]:
    """Weight bits per conv/linear module name (32 for float layers)."""
    return {name: (quant_bits(m) if is_quant_layer(m) else FLOAT_BITS) for name, m in _weight_layers(model)}


def quantize_(model: nn.Module, config: QuantConfig | None = None,
              steps: Mapping[str, torch.Tensor] | None = None,
              plan: Mapping[str, int] | None = None) -> nn.Module:
    """Swap every float Conv1d/Conv2d/Linear for its Brevitas layer, in place.

    ``plan`` (name -> bits) defaults to :func:`plan_bits`; ``steps`` (name -> per-channel step)
    overrides the scale initialisation. Layers already quantized are left alone.
    """
    config = (config or QuantConfig()).validate()
    plan = dict(plan) if plan is not None else plan_bits(model, config)
    for name, m in _weight_layers(model):
        bits = plan.get(name, FLOAT_BITS)
        if is_quant_layer(m) or bits >= FLOAT_BITS:
            continue
        step = steps[name] if steps is not None and name in steps else \
            init_step(m.weight, bits, config.scale_init, config.mse_grid)
        _set_module(model, name, make_quant_layer(m, bits, step))
    return model


# ----------------------------------------------------------------------------- IE-LIF


def _ie_lif_targets(model: nn.Module, mode: str) -> list[str]:
    names = []
    for name, n in iter_neurons(model):
        if isinstance(n, (IELIF, AffineMultiSpike)):
            continue
        attr = name.rpartition(".")[2]
        in_attn = name.rpartition(".")[0].endswith("attn")
        if mode == "all" or (in_attn and (attr in ("q_lif", "k_lif", "v_lif")
                                          or (mode == "attention" and attr == "attn_lif"))):
            names.append(name)
    if mode == "none":
        return []
    for name in names:
        n = model.get_submodule(name)
        if type(n) is not MultiSpike:
            kind = "LIF" if isinstance(n, LIF) else "real-valued (ANN)" if isinstance(n, ClampAct) else type(n).__name__
            raise QsdError(f"IE-LIF replaces integer multi-spike neurons, but {name} is a {kind} neuron; "
                           f"use --ie-lif none for this model")
    return names


@torch.no_grad()
def _neuron_channels(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, int]:
    """Channel count (dim 2) of each named neuron's input, from one forward pass."""
    found: dict[str, int] = {}
    hooks = []
    for name in names:
        def hook(_m, args, _name=name):
            found[_name] = int(args[0].shape[2])
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return found


def replace_with_ie_lif(model: nn.Module, channels: Mapping[str, int], init: str = "identity",
                        momentum: float | None = 0.1, eps: float = 1e-5) -> list[str]:
    """Replace the named neurons by :class:`IELIF` (same levels and out_scale), in place."""
    done = []
    for name, c in channels.items():
        old = model.get_submodule(name)
        new = IELIF(c, levels=old.levels, out_scale=old.out_scale, momentum=momentum, eps=eps)
        ref = next((p for p in model.parameters()), None)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        if init == "identity":
            new.set_identity()
        new.spike_mode = old.spike_mode
        new.train(old.training)
        _set_module(model, name, new)
        done.append(name)
    return done


@contextmanager
def _calibrating_ie_lif(model: nn.Module, identity: bool) -> Iterator[None]:
    """While active, every IE-LIF accumulates exact per-channel statistics of its input (all
    calibration batches so far) into its running statistics before firing (in eval mode);
    with ``identity`` it also keeps gamma/beta at the values that make it an identity."""
    acc: dict[str, list] = {}
    hooks = []
    for name, n in iter_neurons(model):
        if not isinstance(n, IELIF):
            continue

        def hook(m: IELIF, args, _name=name):
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != 2]
            x64 = x.double()
            s, ss, cnt = acc.get(_name, (0.0, 0.0, 0))
            s = s + x64.sum(dims)
            ss = ss + x64.square().sum(dims)
            cnt = cnt + x.numel() // x.shape[2]
            acc[_name] = [s, ss, cnt]
            mean = s / cnt
            var = (ss / cnt - mean.square()).clamp_min(0)
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
            m.num_batches_tracked.fill_(0)
            if identity:
                m.set_identity()
        hooks.append(n.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], identity: bool = True,
              description: str = "calibrate") -> int:
    """Run calibration batches (no labels) through ``model`` in eval mode; returns the count."""
    from .ui import progress_bar

    batches = list(batches)
    was_training = model.training
    model.eval()
    n = 0
    try:
        with _calibrating_ie_lif(model, identity), progress_bar(description, len(batches)) as (bar, task):
            for x in batches:
                model(x)
                n += 1
                bar.update(task, advance=1)
    finally:
        model.train(was_training)
    return n


# Neurons whose input is the output of a BatchNorm, relative to their parent module:
# (parent class name, neuron attribute) -> BatchNorm attribute path.
_BN_BEFORE = {
    ("MS_Attention_RepConv_qkv_id", "q_lif"): "q_conv.1",
    ("MS_Attention_RepConv_qkv_id", "k_lif"): "k_conv.1",
    ("MS_Attention_RepConv_qkv_id", "v_lif"): "v_conv.1",
    ("MS_MLP", "fc2_lif"): "fc1_bn",
    ("MS_ConvBlock", "lif2"): "bn1",
    ("SepConv", "lif2"): "bn1",
}


def preceding_bn(model: nn.Module, neuron_name: str) -> str | None:
    """Name of the BatchNorm whose output is the neuron's whole input, if there is one."""
    parent_name, _, attr = neuron_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    rel = _BN_BEFORE.get((type(parent).__name__, attr))
    if rel is None:
        return None
    return f"{parent_name}.{rel}" if parent_name else rel


@torch.no_grad()
def fold_ie_lif(model: nn.Module) -> nn.Module:
    """Replace every IE-LIF by an equivalent plain neuron (eval-mode statistics), in place.

    The affine ``u_hat = a*u + c`` goes into the preceding BatchNorm where there is one
    (``weight *= a``, ``bias = a*bias + c``: the neuron becomes a :class:`MultiSpike`), otherwise
    it stays as a per-channel affine inside an :class:`AffineMultiSpike`. Logits are unchanged up
    to float rounding. The model's ``qsd_quant_meta`` is updated so the result saves and loads.
    """
    folded, affine = [], {}
    for name, n in list(iter_neurons(model)):
        if not isinstance(n, IELIF):
            continue
        a, c = (t.detach() for t in n.fold())
        bn_name = preceding_bn(model, name)
        if bn_name is not None:
            bn = model.get_submodule(bn_name)
            bn.weight.mul_(a)
            bn.bias.mul_(a).add_(c)
            new: Neuron = MultiSpike(n.levels, out_scale=n.out_scale)
            folded.append(name)
        else:
            new = AffineMultiSpike(n.num_features, n.levels, out_scale=n.out_scale).to(a)
            new.scale.copy_(a)
            new.shift.copy_(c)
            affine[name] = {"channels": n.num_features, "levels": n.levels, "out_scale": n.out_scale}
        new.spike_mode = n.spike_mode
        new.train(n.training)
        _set_module(model, name, new)
    meta = getattr(model, "qsd_quant_meta", None)
    if isinstance(meta, dict):
        neurons = meta.setdefault("neurons", {})
        for name in [*folded, *affine]:
            neurons.get("ie_lif", {}).pop(name, None)
        neurons.setdefault("affine", {}).update(affine)
        neurons["folded"] = sorted({*neurons.get("folded", []), *folded})
    return model


# ----------------------------------------------------------------------------- meta and restore


def _neuron_meta(model: nn.Module) -> dict:
    ie = {name: {"channels": n.num_features, "levels": n.levels, "out_scale": n.out_scale,
                 "eps": n.eps, "momentum": n.momentum}
          for name, n in iter_neurons(model) if isinstance(n, IELIF)}
    aff = {name: {"channels": n.num_features, "levels": n.levels, "out_scale": n.out_scale}
           for name, n in iter_neurons(model) if isinstance(n, AffineMultiSpike)}
    out: dict[str, Any] = {"ie_lif": ie}
    if aff:
        out["affine"] = aff
    return out


def quant_meta(model: nn.Module, config: QuantConfig, source: dict | None = None) -> dict:
    """The ``.qsd`` metadata entries of a converted model (merged by ``qsdcompress.save``)."""
    bits = layer_bits(model)
    return {"quant": {**config.to_dict(), "layers": {k: v for k, v in bits.items() if v < FLOAT_BITS},
                      "float_layers": [k for k, v in bits.items() if v >= FLOAT_BITS],
                      "quantizer": "brevitas int per-output-channel signed full-range, learned scale"},
            "neurons": _neuron_meta(model), "source": source or {}}


def restore_quantized(model: nn.Module, meta: Mapping[str, Any]) -> nn.Module:
    """Rebuild the quantized layers and IE-LIF neurons that ``meta`` describes (placeholder
    scales and statistics: load the state_dict next, strictly)."""
    q = dict(meta.get("quant") or {})
    layers = {str(k): int(v) for k, v in (q.get("layers") or {}).items()}
    own = dict(_weight_layers(model))
    unknown = sorted(set(layers) - set(own))
    if unknown:
        raise QsdError(f"quantized layer(s) {', '.join(unknown[:3])} do not exist in {getattr(model, 'arch', 'model')}")
    quantize_(model, QuantConfig(), plan=layers, steps={k: torch.ones(own[k].weight.shape[0]) for k in layers})
    neurons = meta.get("neurons") or {}
    for name, spec in (neurons.get("ie_lif") or {}).items():
        old = model.get_submodule(name)
        new = IELIF(int(spec["channels"]), levels=int(spec.get("levels", old.levels)),
                    out_scale=float(spec.get("out_scale", old.out_scale)),
                    momentum=spec.get("momentum", 0.1), eps=float(spec.get("eps", 1e-5)))
        _set_module(model, name, new)
    for name, spec in (neurons.get("affine") or {}).items():
        old = model.get_submodule(name)
        _set_module(model, name, AffineMultiSpike(int(spec["channels"]), levels=int(spec.get("levels", old.levels)),
                                                  out_scale=float(spec.get("out_scale", old.out_scale))))
    model.qsd_quant_meta = {k: copy.deepcopy(meta[k]) for k in ("quant", "neurons", "source") if k in meta}
    return model


def import_reference_lsq(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a reference QSD-Transformer LSQ checkpoint (``<layer>.alpha`` per-channel steps, 4-bit,
    ``Qn=-8, Qp=7``) as our Brevitas model with the same integer weights and steps.

    Layers with ``alpha`` become 4-bit quantized layers with step ``alpha``; ``init_state`` and the
    (identity) activation quantizers ``<layer>.act.*`` are dropped; other layers stay float.
    """
    from .io import load_state_dict_checked, strip_quant_extras

    clean, _ = strip_quant_extras(sd)
    load_state_dict_checked(model, clean, source="reference LSQ checkpoint")
    own = dict(_weight_layers(model))
    steps: dict[str, torch.Tensor] = {}
    for key, alpha in sd.items():
        if not key.endswith(".alpha") or ".act." in key:
            continue
        name = key[: -len(".alpha")]
        if name not in own:
            raise QsdError(f"reference checkpoint has a step for {name}, which is not a conv/linear layer here")
        alpha = alpha.detach().float().reshape(-1)
        cout = own[name].weight.shape[0]
        if alpha.numel() == 1:
            alpha = alpha.expand(cout).clone()
        if alpha.numel() != cout or not bool((alpha > 0).all()):
            raise QsdError(f"{key}: expected {cout} positive per-channel steps, got shape {tuple(alpha.shape)}")
        steps[name] = alpha
    plan = {name: REFERENCE_LSQ_BITS for name in steps}
    cfg = QuantConfig(bits=REFERENCE_LSQ_BITS, scale_init="lsq", ie_lif="none")
    quantize_(model, cfg, steps=steps, plan=plan)
    model.qsd_quant_meta = quant_meta(model, cfg, source={"format": "reference LSQ (alpha per channel)"})
    return model


# ----------------------------------------------------------------------------- convert


def calib_loader_for(model: nn.Module, config: QuantConfig):
    """The loader of calibration images (train split of ``config.calib_data``; labels unused)."""
    from .data import DataConfig, build_loader

    return build_loader(config.calib_data, "train", DataConfig.from_model(model), batch_size=config.calib_batch_size,
                        shuffle=True, num_classes=getattr(model, "num_classes", 10), seed=0)


def _first_batches(loader: Iterable | None, n: int) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    if loader is None or n <= 0:
        return out
    for batch in loader:
        out.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
        if len(out) >= n:
            break
    return out


def convert(model: nn.Module, config: QuantConfig | Mapping[str, Any] | None = None,
            calib_loader: Iterable | None = None, inplace: bool = False) -> nn.Module:
    """Quantize weights, put in IE-LIF neurons and calibrate; returns the converted model.

    The float model survives unless ``inplace``. ``calib_loader`` yields image batches (or
    ``(images, labels)``); ``None`` builds one from ``config.calib_data`` when
    ``config.calib_batches > 0``. Sets ``model.qsd_quant_meta`` for ``qsdcompress.save``.
    """
    if config is None:
        config = QuantConfig()
    elif isinstance(config, Mapping):
        config = QuantConfig.from_dict(config)
    config.validate()
    targets = _ie_lif_targets(model, config.ie_lif)  # errors before any work
    if calib_loader is None and config.calib_batches > 0:
        calib_loader = calib_loader_for(model, config)
    batches = _first_batches(calib_loader, config.calib_batches)
    m = model if inplace else copy.deepcopy(model)
    was_training = m.training
    m.eval()
    if targets:
        ref = next(m.parameters())
        example = batches[0][:1] if batches else torch.zeros(1, *_input_size(m), dtype=ref.dtype)
        channels = _neuron_channels(m, targets, example.to(device=ref.device, dtype=ref.dtype))
    quantize_(m, config)
    if targets:
        replace_with_ie_lif(m, channels, config.ie_lif_init, config.ie_lif_momentum, config.ie_lif_eps)
    if batches:
        ref = next(m.parameters())
        calibrate(m, [b.to(device=ref.device, dtype=ref.dtype) for b in batches],
                  identity=config.ie_lif_init == "identity")
    m.train(was_training)
    source = dict((getattr(model, "qsd_meta", None) or {}).get("source") or {})
    m.qsd_quant_meta = quant_meta(m, config, source)
    return m


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- summary


def summarize(model: nn.Module) -> dict:
    """Layers and parameters per bit width, IE-LIF neurons, theoretical size vs float32
    (method.md section 6: quantized weights at ``bits/8`` bytes each, everything else float32)."""
    bits = layer_bits(model)
    per_bits: dict[str, dict[str, int]] = {}
    qparams = 0
    qbytes = 0.0
    for name, b in bits.items():
        n = model.get_submodule(name).weight.numel()
        e = per_bits.setdefault(str(b), {"layers": 0, "params": 0})
        e["layers"] += 1
        e["params"] += n
        if b < FLOAT_BITS:
            qparams += n
            qbytes += n * b / 8
    quant_weight_ids = {id(model.get_submodule(k).weight) for k, b in bits.items() if b < FLOAT_BITS}
    scale_ids = {id(_scale_param(model.get_submodule(k))) for k, b in bits.items() if b < FLOAT_BITS}
    total = other = 0
    for p in model.parameters():
        if id(p) in scale_ids:
            other += p.numel()
            continue
        total += p.numel()
        if id(p) not in quant_weight_ids:
            other += p.numel()
    size = qbytes + 4 * other
    float_size = 4 * total
    ie = [name for name, n in iter_neurons(model) if isinstance(n, IELIF)]
    return {"layers_per_bits": dict(sorted(per_bits.items(), key=lambda kv: int(kv[0]))),
            "neurons_replaced": len(ie), "ie_lif_neurons": ie, "parameters": total,
            "quantized_parameters": qparams, "size_bytes": int(round(size)), "float_size_bytes": float_size,
            "compression": round(float_size / size, 3) if size else None,
            # the paper's convention: params(M) * bits / 32 "MB"
            "size_mb_paper": round((qbytes * 8 + other * 32) / 32 / 1e6, 4),
            "float_size_mb_paper": round(total / 1e6, 4)}


def run_convert(model: str | os.PathLike | nn.Module | None = None, config: QuantConfig | None = None,
                arch: str | None = None, workdir: str | os.PathLike = "qsdcompress-out",
                output: str | os.PathLike | None = None, evaluate_top1: bool = True) -> dict:
    """What ``qsdcompress convert`` does: load, convert, evaluate before/after, save; a summary dict."""
    from . import api
    from .data import DataConfig, build_loader, num_classes_of
    from .io import sha256_file
    from .metrics import evaluate

    config = (config or QuantConfig()).validate()
    t0 = time.perf_counter()
    source: dict[str, Any] = {}
    if isinstance(model, nn.Module):
        float_model = model
    else:
        if model is None and arch is not None:
            api.resolve_model(None, arch)  # explains that weights are needed
        from .zoo import bundled_path

        path = Path(model) if model is not None else bundled_path()
        float_model = api.load(path, arch=arch)
        source = {"path": str(path), "sha256": sha256_file(path)}
    float_model.eval()
    if source:
        float_model.qsd_meta = {**(getattr(float_model, "qsd_meta", None) or {}), "source": source}
    converted = convert(float_model, config)
    seconds = time.perf_counter() - t0
    out_path = Path(output) if output is not None else Path(workdir) / "converted.qsd"
    api.save(converted, out_path, kind="converted")

    top1_before = top1_after = None
    if evaluate_top1:
        try:
            loader = build_loader(config.calib_data, "test", DataConfig.from_model(converted),
                                  batch_size=128, num_classes=converted.num_classes)
            labelled = num_classes_of(loader.dataset)
            if labelled is not None and labelled <= converted.num_classes:
                top1_before = evaluate(float_model, loader, description="eval float")["top1"]
                top1_after = evaluate(converted, loader, description="eval converted")["top1"]
        except QsdError:
            pass
    return {"output": str(out_path), "top1_before": top1_before, "top1_after": top1_after,
            "top1_data": config.calib_data if top1_before is not None else None,
            "arch": getattr(converted, "arch", None), "config": config.to_dict(),
            **summarize(converted), "source": converted.qsd_quant_meta.get("source", {}),
            "convert_seconds": round(seconds, 2)}


__all__ = [
    "QuantConfig", "quantize_", "convert", "layer_bits", "plan_bits", "restore_quantized", "import_reference_lsq",
    "fold_ie_lif", "attach_lsq_grad_scale", "calibrate", "init_step", "make_quant_layer", "is_quant_layer", "quant_bits", "layer_step",
    "replace_with_ie_lif", "preceding_bn", "summarize", "run_convert", "parse_bits", "parse_layer_bits",
    "SCALE_INITS", "IE_LIF_MODES", "IE_LIF_INITS", "FLOAT_BITS",
]
