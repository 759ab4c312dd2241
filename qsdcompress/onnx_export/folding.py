"""Folding a converted model into the plain network that is traced to ONNX.

1. Copy the model, eval mode, integer spikes; fold IE-LIF into plain neurons.
2. Replace every conv/linear (Brevitas ``Quant*`` or plain torch) by a plain layer and keep its
   weight as *integers x per-output-channel scale*. Fold every BatchNorm into the conv before it
   (the model says which: ``model.structure()``): with per-channel weights a BN only multiplies
   the channel's scale by ``gamma/sqrt(var+eps)``, so the integers never change (a negative BN
   gain gives a negative scale, which ``DequantizeLinear`` accepts; negating the integers instead
   could leave the signed range). A RepConv's BN+pad layer pads with the BN output for a zero
   input; after folding that is a constant border, which equals zero padding plus a per-channel
   bias on the depthwise conv.
3. Integer neurons become plain ops ``Floor(Clip(D*x, 0, D) + 0.5) * out_scale`` (Floor, not
   Round: ONNX ``Round`` rounds half to even and spike products land on .5 exactly).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import QsdError
from ..models import RepConvSite, describe
from ..neurons import ClampAct, MultiSpike, Neuron, set_spike_mode
from ..quant import fold_ie_lif


@dataclass
class QWeight:
    """A layer's weight as integers times a per-output-channel scale (``ints is None``: float)."""

    ints: torch.Tensor | None
    scale: torch.Tensor | None        # (Cout,) float64; sign may be negative after BN folding
    bits: int
    float_weight: torch.Tensor | None = None  # float layers (already folded), float64

    def dequantized(self) -> torch.Tensor:
        if self.ints is None:
            assert self.float_weight is not None
            return self.float_weight
        shape = [-1] + [1] * (self.ints.dim() - 1)
        return self.ints.double() * self.scale.view(shape)

    def mul_channels(self, g: torch.Tensor) -> None:
        if self.ints is None:
            self.float_weight = self.float_weight * g.view([-1] + [1] * (self.float_weight.dim() - 1))
        else:
            self.scale = self.scale * g


def is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))


def quantized_weight(layer: nn.Module) -> QWeight:
    """Integers, per-channel scale and bit width of a Brevitas layer; a float QWeight otherwise."""
    w = layer.weight.detach()
    quant = getattr(layer, "quant_weight", None)
    if quant is not None:
        enabled = getattr(getattr(layer, "weight_quant", None), "is_quant_enabled", True)
        if enabled:
            with torch.no_grad():
                qt = quant()
            scale = getattr(qt, "scale", None)
            if scale is not None and getattr(qt, "bit_width", None) is not None:
                zp = qt.zero_point
                if torch.as_tensor(zp).abs().max() > 0:
                    raise QsdError("layer weight has a non-zero zero point; only symmetric weights export")
                ints = qt.int().detach().to(torch.int32)
                s = scale.detach().double().reshape(-1)
                if s.numel() == 1:
                    s = s.expand(w.shape[0]).clone()
                if s.numel() != w.shape[0]:
                    raise QsdError(f"weight scale of shape {tuple(scale.shape)} is neither per-tensor nor "
                                   f"per-output-channel")
                return QWeight(ints, s, int(round(float(qt.bit_width))))
    return QWeight(None, None, 32, float_weight=w.double().clone())


class ExportNeuron(Neuron):
    """Integer neuron as plain ops: ``floor(clamp(D*x, 0, D) + 0.5) * out_scale`` (no autograd Function).

    ``rounding=False`` is the counterpart ANN's clamp activation.
    """

    def __init__(self, levels: int, out_scale: float, rounding: bool = True):
        super().__init__(levels, out_scale)
        self.rounding = rounding
        self.spiking = rounding

    def spike_count(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.clamp(x * self.levels, 0, self.levels)
        return torch.floor(s + 0.5) if self.rounding else s


class _Linear2D(nn.Linear):
    """Linear over the last dim of a 3-D input, exported as one Gemm (weight kept as stored)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        lead = x.shape[:-1]
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)


@dataclass
class _Slot:
    """A weight layer being folded: its module path, quantized weight and float bias."""

    name: str
    layer: nn.Module
    qw: QWeight
    bias: torch.Tensor | None  # float64 (Cout,)
    padding: Any = None        # override of the conv padding (RepConv depthwise conv)


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = g*x + h`` of an eval-mode BatchNorm, float64."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    w = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    b = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    g = w / torch.sqrt(var + bn.eps)
    return g, b - mean * g


class _Folder:
    """Collects weight layers, folds BatchNorms into them and builds the plain export layers."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.slots: dict[str, _Slot] = {}
        for name, m in model.named_modules():
            if is_weight_layer(m):
                bias = m.bias.detach().double().clone() if m.bias is not None else None
                self.slots[name] = _Slot(name, m, quantized_weight(m), bias)

    def fold_bn(self, conv: str, bn_name: str) -> None:
        slot = self.slots[conv]
        bn = self.model.get_submodule(bn_name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            return
        g, h = _bn_affine(bn)
        slot.qw.mul_channels(g)
        bias = slot.bias if slot.bias is not None else torch.zeros_like(g)
        slot.bias = bias * g + h
        self.model.set_submodule(bn_name, nn.Identity())

    def fold_repconv(self, site: RepConvSite) -> None:
        """A RepConv and the BN after it: fold both BNs of the body and the outer BN; pad -> bias."""
        c1, dw, pw = site.conv1, site.depthwise, site.pointwise
        if not all(n in self.slots for n in (c1, dw, pw)):
            return
        pad_layer = self.model.get_submodule(site.pad_bn)
        p = int(getattr(pad_layer, "pad_pixels", 0))
        self.fold_bn(c1, f"{site.pad_bn}.bn")
        # pad_p(y) then depthwise conv == zero-pad (y - p) then conv + p * sum(w): the 1x1 conv
        # loses its bias and the depthwise conv gains p * sum(w) per channel.
        s1, sdw = self.slots[c1], self.slots[dw]
        pad = s1.bias if s1.bias is not None else torch.zeros(sdw.layer.out_channels, dtype=torch.float64)
        s1.bias = None
        wsum = sdw.qw.dequantized().sum(dim=(1, 2, 3))
        groups = sdw.layer.groups
        if groups != sdw.layer.in_channels or sdw.layer.out_channels != sdw.layer.in_channels:
            raise QsdError(f"{dw}: expected a depthwise conv after the BN+pad layer")
        sdw.bias = (sdw.bias if sdw.bias is not None else 0) + pad * wsum
        if p:
            sdw.padding = tuple(int(a) + p for a in sdw.layer.padding)
        self.model.set_submodule(site.pad_bn, nn.Identity())
        self.fold_bn(pw, site.bn)
        self.fold_bn(pw, site.outer_bn)

    def fold_structure(self) -> None:
        """Every BatchNorm the model says follows a conv, and every RepConv it publishes."""
        structure = describe(self.model)
        for conv, bn in structure.conv_bn:
            if conv in self.slots:
                self.fold_bn(conv, bn)
        for site in structure.repconv:
            self.fold_repconv(site)

    def build(self) -> dict[str, QWeight]:
        """Swap every weight layer for a plain one with the folded float weight; returns the
        registry ``parameter name -> QWeight`` the ONNX packer uses."""
        registry: dict[str, QWeight] = {}
        for name, s in self.slots.items():
            m = s.layer
            w = s.qw.dequantized().float()
            has_bias = s.bias is not None
            if isinstance(m, nn.Linear):
                new: nn.Module = _Linear2D(m.in_features, m.out_features, bias=has_bias)
            else:
                cls = nn.Conv1d if isinstance(m, nn.Conv1d) else nn.Conv2d
                new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                          s.padding if s.padding is not None else m.padding, m.dilation, m.groups,
                          bias=has_bias)
            with torch.no_grad():
                new.weight.copy_(w)
                if has_bias:
                    new.bias.copy_(s.bias.float())
            self.model.set_submodule(name, new.eval())
            registry[f"{name}.weight"] = s.qw
        return registry


def _replace_neurons(model: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        if type(m) in (MultiSpike, ClampAct):
            model.set_submodule(name, ExportNeuron(m.levels, m.out_scale, rounding=type(m) is MultiSpike))


def export_module(model: nn.Module) -> tuple[nn.Module, dict[str, QWeight]]:
    """The folded, plain-op copy of ``model`` that is traced, and its weight registry."""
    m = copy.deepcopy(model).cpu().eval()
    set_spike_mode(m, "integer")
    m = fold_ie_lif(m).eval()
    folder = _Folder(m)
    folder.fold_structure()
    registry = folder.build()
    _replace_neurons(m)
    return m.eval(), registry



class CountingNeuron(Neuron):
    """A spiking neuron whose spike count the exporter must see as an integer tensor (the base of
    each integer format's neuron); ``scale``/``shift`` hold the per-channel input affine of an
    unfolded IE-LIF (channel dim 2)."""

    def __init__(self, levels: int, out_scale: float, scale: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None):
        super().__init__(levels, out_scale)
        self.affine = scale is not None
        if self.affine:
            self.register_buffer("scale", scale.detach().clone())
            self.register_buffer("shift", shift.detach().clone())

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.affine:
            return x
        view = (1, 1, -1) + (1,) * (x.dim() - 3)
        return x * self.scale.view(view) + self.shift.view(view)


def counting_module(model: nn.Module, neuron: type[CountingNeuron]) -> tuple[nn.Module, dict[str, QWeight]]:
    """The folded plain-op module (:func:`export_module`) with every integer neuron (and unfolded
    IE-LIF) replaced by ``neuron``, so that its spike counts trace as integers."""
    from ..neurons import AffineMultiSpike

    m, registry = export_module(model)
    for name, n in list(m.named_modules()):
        if isinstance(n, ExportNeuron) and n.rounding:
            m.set_submodule(name, neuron(n.levels, n.out_scale))
        elif type(n) is AffineMultiSpike:
            m.set_submodule(name, neuron(n.levels, n.out_scale, n.scale, n.shift))
    return m.eval(), registry


__all__ = ["QWeight", "quantized_weight", "is_weight_layer", "export_module", "ExportNeuron", "CountingNeuron",
           "counting_module"]
