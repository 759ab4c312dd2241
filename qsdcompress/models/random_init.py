"""Random networks whose spikes vary, for parity checks and timings of untrained models.

A freshly created spike-driven Transformer has layer scales of 1e-6 and identity BatchNorms: its
logits are constant, so any comparison on it proves nothing.
"""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def randomize_(model: nn.Module, images: torch.Tensor, seed: int = 0,
               layer_scale: tuple[float, float] = (0.5, 1.0)) -> nn.Module:
    """In place: layer scales uniform in ``layer_scale``, random BatchNorm affine, and BatchNorm
    running statistics measured on ``images`` (real images: every spike level then occurs).
    Returns the model in eval."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name, p in model.named_parameters():
        if "layer_scale" in name:
            lo, hi = layer_scale
            p.copy_(lo + (hi - lo) * torch.rand(p.shape, generator=g))
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative: the statistics of exactly these images
        m.weight.copy_(0.3 + 0.4 * torch.rand(m.num_features, generator=g))
        m.bias.copy_(0.3 * torch.rand(m.num_features, generator=g))
    model.train()
    model(images)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model.eval()


__all__ = ["randomize_"]
