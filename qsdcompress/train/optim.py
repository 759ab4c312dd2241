"""Parameter groups, optimizer and learning-rate schedule (timm's AdamW and cosine with warmup)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import FinetuneConfig
from ..errors import QsdError
from ..neurons import IELIF

def is_quant_param(name: str) -> bool:
    """Quantizer scales (Brevitas ``scaling_impl``, reference LSQ ``alpha``)."""
    return "scaling_impl" in name or name.endswith(".alpha") or ".alpha." in name


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Weights (decayed), norms/biases/layer scales (no decay), quantizer scales and IE-LIF
    parameters (own learning rate, no decay)."""
    ielif_params = {id(p) for m in model.modules() if isinstance(m, IELIF) for p in m.parameters()}
    decay, no_decay, quant = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_quant_param(name) or id(p) in ielif_params:
            quant.append(p)
        elif p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    scale_lr = cfg.scale_lr if cfg.scale_lr is not None else cfg.lr
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "name": "weights"},
              {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr, "name": "no_decay"},
              {"params": quant, "weight_decay": 0.0, "lr": scale_lr, "name": "quant"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    try:
        return create_optimizer_v2(param_groups(model, cfg), opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    except (AssertionError, ValueError) as e:
        raise QsdError(f"--opt {cfg.opt}: {e}") from None


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, total_steps: int):
    from timm.scheduler import CosineLRScheduler

    warm = max(0, min(cfg.warmup_steps, total_steps - 1))
    return CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=cfg.min_lr, warmup_t=warm,
                             warmup_lr_init=cfg.warmup_lr, warmup_prefix=False, t_in_epochs=False)



__all__ = ["is_quant_param", "param_groups", "build_optimizer", "build_scheduler"]
