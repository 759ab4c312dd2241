"""IE-LIF in a converted model (docs/method.md §4): which neurons it replaces, calibration of
its statistics, and folding it back into plain neurons for inference."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from ..errors import QsdError
from ..models import describe
from ..neurons import IELIF, LIF, AffineMultiSpike, ClampAct, MultiSpike, Neuron, iter_neurons
from ..ui import progress_bar

def ie_lif_targets(model: nn.Module, mode: str) -> list[str]:
    """Names of the neurons ``--ie-lif MODE`` replaces: the q/k/v neurons the model publishes
    (``qkv``), also its attention neurons (``attention``), or every neuron (``all``)."""
    if mode == "none":
        return []
    if mode == "all":
        wanted = {name for name, _ in iter_neurons(model)}
    else:
        which = ("q", "k", "v", "attn") if mode == "attention" else ("q", "k", "v")
        wanted = set(describe(model).attention_neurons(which))
    names = [name for name, n in iter_neurons(model)
             if name in wanted and not isinstance(n, (IELIF, AffineMultiSpike))]
    for name in names:
        n = model.get_submodule(name)
        if type(n) is not MultiSpike:
            kind = "LIF" if isinstance(n, LIF) else "real-valued (ANN)" if isinstance(n, ClampAct) else type(n).__name__
            raise QsdError(f"IE-LIF replaces integer multi-spike neurons, but {name} is a {kind} neuron; "
                           f"use --ie-lif none for this model")
    return names


@torch.no_grad()
def neuron_channels(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, int]:
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
        model.set_submodule(name, new)
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


def _run_batches(model: nn.Module, batches: list[torch.Tensor], description: str) -> int:
    """Forward every batch (outputs unused) under a progress bar; returns the count."""
    with progress_bar(description, len(batches)) as (bar, task):
        for x in batches:
            model(x)
            bar.update(task, advance=1)
    return len(batches)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], identity: bool = True,
              description: str = "calibrate") -> int:
    """Run calibration batches (no labels) through ``model`` in eval mode; returns the count."""
    batches = list(batches)
    was_training = model.training
    model.eval()
    try:
        with _calibrating_ie_lif(model, identity):
            return _run_batches(model, batches, description)
    finally:
        model.train(was_training)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor],
                        description: str = "re-estimate BatchNorm") -> int:
    """Recompute every BatchNorm's running mean and variance from ``batches`` (labels unused).

    Quantizing the weights shifts the statistics of every conv's output, while the BatchNorms
    still hold the float model's; re-estimating them on calibration images is the standard
    post-training step (docs/method.md §3). Statistics are a plain average over the batches
    (``momentum=None``); affine parameters are untouched. Returns the number of BatchNorms.
    """
    batches = list(batches)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or not batches:
        return 0
    was_training = model.training
    saved = [(bn.momentum, bn.training) for bn in bns]
    model.eval()
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        _run_batches(model, batches, description)
    finally:
        for bn, (momentum, training) in zip(bns, saved):
            bn.momentum = momentum
            bn.train(training)
        model.train(was_training)
    return len(bns)


def preceding_bn(model: nn.Module, neuron_name: str) -> str | None:
    """Name of the BatchNorm whose output is the neuron's whole input, if the model says there is one."""
    return describe(model).neuron_bn.get(neuron_name)


@torch.no_grad()
def fold_ie_lif(model: nn.Module) -> nn.Module:
    """Replace every IE-LIF by an equivalent plain neuron (eval-mode statistics), in place.

    The affine ``u_hat = a*u + c`` goes into the preceding BatchNorm where there is one
    (``weight *= a``, ``bias = a*bias + c``: the neuron becomes a :class:`MultiSpike`), otherwise
    it stays as a per-channel affine inside an :class:`AffineMultiSpike`. Logits are unchanged up
    to float rounding. The model's ``qsd_quant_meta`` is updated so the result saves and loads.
    """
    folded, affine = [], {}
    neuron_bn = describe(model).neuron_bn
    for name, n in list(iter_neurons(model)):
        if not isinstance(n, IELIF):
            continue
        a, c = (t.detach() for t in n.fold())
        bn_name = neuron_bn.get(name)
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
        model.set_submodule(name, new)
    meta = getattr(model, "qsd_quant_meta", None)
    if isinstance(meta, dict):
        neurons = meta.setdefault("neurons", {})
        for name in [*folded, *affine]:
            neurons.get("ie_lif", {}).pop(name, None)
        neurons.setdefault("affine", {}).update(affine)
        neurons["folded"] = sorted({*neurons.get("folded", []), *folded})
    return model



__all__ = ["ie_lif_targets", "neuron_channels", "replace_with_ie_lif", "calibrate", "reestimate_batchnorm",
           "preceding_bn", "fold_ie_lif"]
