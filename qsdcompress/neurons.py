"""Spiking neurons in pure PyTorch.

Every neuron derives from :class:`Neuron`, so tools (conversion, reports, spike-mode switches)
find them with ``isinstance`` and swap them by name. A neuron maps a membrane input of shape
``(T, B, ...)`` to spikes of the same shape. Each neuron emits an integer spike count
``S in {0..D}`` per element and step, and its output value is ``S * out_scale``.

Spike modes:

* ``integer``: the neuron returns ``S * out_scale`` (what training uses).
* ``binary``: spike-driven inference. ``S`` is sent as ``D`` binary spikes over ``D`` virtual
  steps (thermometer code ``b_k = 1[S >= k]``), and the next layer runs once per virtual step and
  sums the results (see :func:`spike_layer`). Both modes give the same numbers.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn

SPIKE_MODES = ("integer", "binary")


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """``floor(x + 0.5)``: products of spikes land on .5 exactly, where torch.round would go to even."""
    return torch.floor(x + 0.5)


class _QuantSpike(torch.autograd.Function):
    """``round_half_up(clamp(x, 0, D))`` with a straight-through gradient inside ``0 < x < D``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, levels: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.levels = levels
        return round_half_up(torch.clamp(x, 0, levels))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        mask = (x > 0) & (x < ctx.levels)
        return grad * mask.to(grad.dtype), None


def quant_spike(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer spike count of a pre-scaled membrane potential ``x`` (already multiplied by D)."""
    return _QuantSpike.apply(x, levels)


class Neuron(nn.Module):
    """Base of all neurons.

    Attributes:
        levels: D, the largest spike count one element can emit in one time step.
        out_scale: the value one spike carries in the output (``1/D`` for the reference
            multi-spike neuron, ``2/D`` for its attention variant, 1 for LIF).
        spiking: False for the real-valued activation of the counterpart ANN.
        spike_mode: ``integer`` or ``binary`` (see the module docstring).
    """

    spiking: bool = True

    def __init__(self, levels: int = 4, out_scale: float | None = None):
        super().__init__()
        if levels < 1:
            raise ValueError(f"a neuron needs at least one spike level, got D={levels}")
        self.levels = int(levels)
        self.out_scale = float(out_scale) if out_scale is not None else 1.0 / self.levels
        self.spike_mode = "integer"

    # Subclasses implement the spike count; forward and binary mode follow from it.
    def spike_count(self, x: torch.Tensor) -> torch.Tensor:
        """Integer spike count ``S`` (float dtype, straight-through gradient) for input ``x``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spike_count(x) * self.out_scale

    def binary(self, x: torch.Tensor) -> torch.Tensor:
        """Thermometer code: ``(D, *x.shape)`` binary planes, each scaled by ``out_scale``.

        ``binary(x).sum(0) == forward(x)`` exactly (up to float rounding of the sum).
        """
        with torch.no_grad():
            s = self.spike_count(x)
        ks = torch.arange(1, self.levels + 1, device=x.device, dtype=s.dtype)
        ks = ks.view(-1, *([1] * s.dim()))
        return (s.unsqueeze(0) >= ks).to(x.dtype) * self.out_scale

    def extra_repr(self) -> str:
        return f"levels={self.levels}, out_scale={self.out_scale:g}, spike_mode={self.spike_mode}"


class MultiSpike(Neuron):
    """Integer multi-spike neuron of the QSD reference: ``S = round_half_up(clamp(D*x, 0, D))``.

    With ``out_scale=1/D`` it is the reference ``Multispike``; with ``2/D`` it is ``Multispike_att``.
    Stateless over time: each step fires from its own input (the T=1 setting of QSD).
    """

    def spike_count(self, x: torch.Tensor) -> torch.Tensor:
        return quant_spike(x * self.levels, self.levels)


class ClampAct(Neuron):
    """Real-valued counterpart of :class:`MultiSpike` for the ANN: ``clamp(D*x, 0, D) * out_scale``."""

    spiking = False

    def spike_count(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x * self.levels, 0, self.levels)

    def binary(self, x: torch.Tensor) -> torch.Tensor:  # not a spiking neuron: pass the value
        return self.forward(x).unsqueeze(0)


class _HeavisideSigmoid(torch.autograd.Function):
    """Heaviside step ``x >= 0`` with the sigmoid surrogate gradient (alpha = 4, as spikingjelly)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        sg = torch.sigmoid(ctx.alpha * x)
        return grad * ctx.alpha * sg * (1 - sg), None


class LIF(Neuron):
    """Multi-step leaky integrate-and-fire neuron over the leading time dimension.

    Matches spikingjelly's ``MultiStepLIFNode`` (decay_input=True) used by Spike-driven
    Transformer V1/V2: ``h_t = v_{t-1} + (x_t - (v_{t-1} - v_reset)) / tau``, spike
    ``s_t = 1[h_t >= v_threshold]``, then hard reset ``v_t = h_t (1 - s_t) + v_reset s_t`` or soft
    reset ``v_t = h_t - v_threshold s_t``. ``detach_reset`` stops the gradient through the reset.
    """

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: float = 0.0,
        reset: str = "hard",
        detach_reset: bool = True,
        surrogate_alpha: float = 4.0,
    ):
        super().__init__(levels=1, out_scale=1.0)
        if reset not in ("hard", "soft"):
            raise ValueError(f"reset must be 'hard' or 'soft', got {reset!r}")
        self.tau = float(tau)
        self.v_threshold = float(v_threshold)
        self.v_reset = float(v_reset)
        self.reset = reset
        self.detach_reset = detach_reset
        self.surrogate_alpha = float(surrogate_alpha)

    def spike_count(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.full_like(x[0], self.v_reset)
        out = []
        for x_t in x:
            h = v + (x_t - (v - self.v_reset)) / self.tau
            s = _HeavisideSigmoid.apply(h - self.v_threshold, self.surrogate_alpha)
            s_r = s.detach() if self.detach_reset else s
            if self.reset == "hard":
                v = h * (1 - s_r) + self.v_reset * s_r
            else:
                v = h - self.v_threshold * s_r
            out.append(s)
        return torch.stack(out)

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau:g}, v_threshold={self.v_threshold:g}, v_reset={self.v_reset:g}, "
            f"reset={self.reset}, spike_mode={self.spike_mode}"
        )


def make_neuron(kind: str, levels: int = 4, attention: bool = False, threshold: float = 1.0) -> Neuron:
    """Neuron factory the models use.

    kind: ``multispike`` (integer spikes, QSD), ``lif`` (binary LIF, SDT-V2), ``relu`` (ANN).
    attention: the neuron after the attention product (reference: ``2/D`` output scale for
    multi-spike, threshold 0.5 for LIF).
    """
    if kind == "multispike":
        return MultiSpike(levels, out_scale=(2.0 if attention else 1.0) / levels)
    if kind == "relu":
        return ClampAct(levels, out_scale=(2.0 if attention else 1.0) / levels)
    if kind == "lif":
        return LIF(v_threshold=0.5 if attention else threshold)
    raise ValueError(f"unknown neuron kind {kind!r}; choose multispike, lif or relu")


def iter_neurons(model: nn.Module) -> Iterator[tuple[str, Neuron]]:
    for name, m in model.named_modules():
        if isinstance(m, Neuron):
            yield name, m


def set_spike_mode(model: nn.Module, mode: str) -> nn.Module:
    """Run every neuron as integer spikes or as D binary spikes over D virtual steps."""
    if mode not in SPIKE_MODES:
        raise ValueError(f"spike mode must be one of {SPIKE_MODES}, got {mode!r}")
    for _, n in iter_neurons(model):
        n.spike_mode = mode
    return model


def _bias_of(layer: Callable) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def apply_planes(planes: torch.Tensor, layer: Callable[[torch.Tensor], torch.Tensor],
                 prep: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run an affine ``layer`` once per binary plane and sum: ``sum_k layer(b_k) - (K-1) bias``.

    For a conv or linear layer ``W @ S + bias = sum_k (W @ b_k) + bias``: the passes only add up
    weights selected by binary spikes; the bias is counted once.
    """
    out = None
    for p in planes:
        y = layer(prep(p) if prep is not None else p)
        out = y if out is None else out + y
    assert out is not None
    bias = _bias_of(layer)
    if bias is not None and planes.shape[0] > 1:
        if out.dim() > 2 and not isinstance(layer, nn.Linear):  # conv: channels on dim 1
            shape = [1, -1] + [1] * (out.dim() - 2)
            out = out - (planes.shape[0] - 1) * bias.view(shape)
        else:
            out = out - (planes.shape[0] - 1) * bias
    return out


def spike_layer(neuron: Neuron, x: torch.Tensor, layer: Callable[[torch.Tensor], torch.Tensor],
                merge_time: bool = True) -> torch.Tensor:
    """``layer(neuron(x))``; spike-driven (one pass per binary spike plane) in binary mode.

    x: membrane input ``(T, B, ...)``. With ``merge_time`` the spikes are flattened to
    ``(T*B, ...)`` before the layer, as the models' convolutions expect.
    """
    prep = (lambda t: t.flatten(0, 1)) if merge_time else None
    if neuron.spike_mode == "integer" or not neuron.spiking:
        s = neuron(x)
        return layer(prep(s) if prep else s)
    return apply_planes(neuron.binary(x), layer, prep)


def information_entropy(counts: torch.Tensor) -> float:
    """Shannon entropy in bits of a histogram of spike levels."""
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum()) if p.numel() else 0.0


__all__ = [
    "Neuron", "MultiSpike", "ClampAct", "LIF", "make_neuron", "iter_neurons", "set_spike_mode",
    "spike_layer", "apply_planes", "round_half_up", "quant_spike", "information_entropy",
    "SPIKE_MODES",
]


def _channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-channel vector shaped to broadcast over ``x`` of shape ``(T, B, C, ...)``."""
    return v.view(1, 1, -1, *([1] * (x.dim() - 3)))


class IELIF(Neuron):
    """Information-enhanced integer neuron (IE-LIF, docs/method.md §4).

    Rectifies the membrane potential per channel before firing, so the integer spikes use all
    ``D + 1`` levels instead of piling up at 0 and D::

        u_hat = gamma * (u - mu) / sqrt(var + eps) + beta
        S     = round_half_up(clamp(D * u_hat, 0, D))      (straight-through gradient)

    ``mu``/``var`` are batch statistics in training and running averages in eval, exactly as in
    BatchNorm (``momentum``, ``eps``; ``momentum=None`` is a cumulative average). ``gamma > 0`` is
    kept positive by clamping at ``gamma_min`` in the forward pass (a raw parameter, so it can
    hold the exact ``sqrt(var + eps)`` that makes the neuron an identity). The channel dimension is
    dim 2 of ``(T, B, C, ...)``. Like the multi-spike neuron it replaces, it fires from each time
    step's own input (the T=1 setting of QSD). In eval mode ``u_hat = a * u + c`` is affine and
    :meth:`fold` returns ``(a, c)`` to fold into the preceding BatchNorm.

    ``blend`` (a plain attribute, not state: 1.0 in every saved model) mixes in the plain neuron,
    ``u_hat' = blend * u_hat + (1 - blend) * u``; finetuning ramps it from 0 to 1 over an IE-LIF
    warm-up (docs/method.md §4), so a rectify-initialised neuron starts where the plain one was.
    """

    gamma_min = 1e-4
    blend: float = 1.0

    def __init__(self, num_features: int, levels: int = 4, out_scale: float | None = None,
                 momentum: float | None = 0.1, eps: float = 1e-5, gamma: float = 0.25, beta: float = 0.5):
        super().__init__(levels, out_scale)
        self.num_features = int(num_features)
        self.momentum = momentum
        self.eps = float(eps)
        self.gamma = nn.Parameter(torch.full((self.num_features,), float(gamma)))
        self.beta = nn.Parameter(torch.full((self.num_features,), float(beta)))
        self.register_buffer("running_mean", torch.zeros(self.num_features))
        self.register_buffer("running_var", torch.ones(self.num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def set_identity(self) -> None:
        """gamma = sqrt(running_var + eps), beta = running_mean: in eval ``u_hat == u`` bit for bit."""
        with torch.no_grad():
            self.gamma.copy_(torch.sqrt(self.running_var + self.eps))
            self.beta.copy_(self.running_mean)

    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode affine ``u_hat = a * u + c`` per channel (running statistics)."""
        a = self.gamma.clamp_min(self.gamma_min) / torch.sqrt(self.running_var + self.eps)
        c = self.beta - a * self.running_mean
        if self.blend < 1.0:
            return self.blend * a + (1.0 - self.blend), self.blend * c
        return a, c

    def _batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = [d for d in range(x.dim()) if d != 2]
        n = x.numel() // x.shape[2]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        if self.training and n > 1:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        return mean, var

    def rectify(self, x: torch.Tensor) -> torch.Tensor:
        """``u_hat`` for membrane input ``x`` of shape ``(T, B, C, ...)``."""
        if x.dim() < 3 or x.shape[2] != self.num_features:
            raise ValueError(f"IE-LIF expects (T, B, {self.num_features}, ...), got {tuple(x.shape)}")
        if self.training:
            mean, var = self._batch_stats(x)
            g = self.gamma.clamp_min(self.gamma_min)
            u_hat = (_channel_view(g, x) * (x - _channel_view(mean, x)) / torch.sqrt(_channel_view(var, x) + self.eps)
                     + _channel_view(self.beta, x))
            return u_hat if self.blend >= 1.0 else self.blend * u_hat + (1.0 - self.blend) * x
        a, c = self.fold()
        return x * _channel_view(a, x) + _channel_view(c, x)

    def spike_count(self, x: torch.Tensor) -> torch.Tensor:
        return quant_spike(self.rectify(x) * self.levels, self.levels)

    def extra_repr(self) -> str:
        return f"{self.num_features}, levels={self.levels}, out_scale={self.out_scale:g}, eps={self.eps:g}, " \
               f"momentum={self.momentum}, spike_mode={self.spike_mode}" + \
               (f", blend={self.blend:g}" if self.blend < 1.0 else "")


class AffineMultiSpike(Neuron):
    """Multi-spike neuron with a fixed per-channel affine input ``a * x + c`` (channel dim 2).

    What an eval-mode :class:`IELIF` becomes when no BatchNorm directly precedes it to fold into.
    """

    def __init__(self, num_features: int, levels: int = 4, out_scale: float | None = None):
        super().__init__(levels, out_scale)
        self.num_features = int(num_features)
        self.register_buffer("scale", torch.ones(self.num_features))
        self.register_buffer("shift", torch.zeros(self.num_features))

    def spike_count(self, x: torch.Tensor) -> torch.Tensor:
        u = x * _channel_view(self.scale, x) + _channel_view(self.shift, x)
        return quant_spike(u * self.levels, self.levels)


__all__ += ["IELIF", "AffineMultiSpike"]
