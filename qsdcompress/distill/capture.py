"""Capturing q/k/v: the student's spikes and a timm teacher's attention projections, as tokens
on the student's grid (docs/method.md §5)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QsdError
from ..models import describe


def tokens_from_spikes(s: torch.Tensor) -> torch.Tensor:
    """Neuron output ``(T, B, C, H, W)`` -> ``(B, N, C)``: mean over T, tokens in raster order."""
    return s.float().mean(0).flatten(2).transpose(1, 2)


def resize_tokens(x: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a ``(B, N, C)`` token grid ``src_grid`` (h, w) to ``dst_grid``."""
    if tuple(src_grid) == tuple(dst_grid):
        return x
    b, n, c = x.shape
    g = x.transpose(1, 2).reshape(b, c, *src_grid)
    g = F.interpolate(g, size=tuple(dst_grid), mode="bilinear", align_corners=False)
    return g.flatten(2).transpose(1, 2)


def grid_of(n: int) -> tuple[int, int]:
    s = int(round(math.sqrt(n)))
    if s * s != n:
        raise QsdError(f"cannot tell the token grid of {n} tokens (not a square); FGD needs a 2-D grid")
    return s, s


class QKVCapture:
    """Forward hooks collecting q/k/v as ``(B, N, C)`` per attention block, in forward order.

    ``snn`` style: hooks on the q/k/v neurons of each attention block, as the model publishes
    them (spike-driven models and their counterpart ANN; IE-LIF keeps the names). ``timm`` style: hooks on every
    ``qkv`` linear layer; its output is split into q, k, v, prefix tokens are dropped.
    """

    def __init__(self, model: nn.Module, style: str, prefix_tokens: int = 0):
        self.style = style
        self.prefix_tokens = prefix_tokens
        self.handles: list[Any] = []
        self.store: dict[int, dict[str, torch.Tensor]] = {}
        self.grids: dict[int, tuple[int, int]] = {}
        self.enabled = True
        if style == "snn":
            sites = describe(model).attention
            if not sites:
                raise QsdError(f"{type(model).__name__} has no spike-driven attention blocks for FGD")
            for i, site in enumerate(sites):
                for z in ("q", "k", "v"):
                    mod = model.get_submodule(getattr(site, z))
                    self.handles.append(mod.register_forward_hook(self._snn_hook(i, z)))
            self.num_layers = len(sites)
        elif style == "timm":
            layers = [m for n, m in model.named_modules()
                      if n.split(".")[-1] == "qkv" and isinstance(m, nn.Linear)]
            if not layers:
                raise QsdError(f"teacher {type(model).__name__} has no attention 'qkv' projections; "
                               f"use --lambda-fgd 0 (logit KD only) or a ViT/DeiT/CAFormer teacher")
            for i, m in enumerate(layers):
                self.handles.append(m.register_forward_hook(self._timm_hook(i)))
            self.num_layers = len(layers)
        else:
            raise ValueError(f"unknown capture style {style!r}")

    def _snn_hook(self, i: int, z: str) -> Callable:
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            if self.enabled:
                self.store.setdefault(i, {})[z] = tokens_from_spikes(out)
                self.grids[i] = (int(out.shape[-2]), int(out.shape[-1]))
        return hook

    def _timm_hook(self, i: int) -> Callable:
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            if not self.enabled:
                return
            out = out.float()
            if out.dim() == 4:  # MetaFormer attention runs on (B, H, W, 3C)
                grid = (int(out.shape[1]), int(out.shape[2]))
                out = out.flatten(1, 2)
            else:
                out = out[:, self.prefix_tokens:]
                grid = grid_of(out.shape[1])
            q, k, v = out.chunk(3, dim=-1)
            self.store[i] = {"q": q, "k": k, "v": v}
            self.grids[i] = grid
        return hook

    def pop(self) -> list[dict[str, torch.Tensor]]:
        """The captured layers of the last forward, in order; clears the store."""
        out = [self.store[i] for i in sorted(self.store)]
        self.store = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
