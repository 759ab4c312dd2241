"""Accuracy and loss of a model on a data loader (shared by eval, convert, finetune and demo)."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .ui import progress_bar


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor], loader: Iterable,
             device: str | torch.device = "cpu", description: str = "eval",
             max_batches: int | None = None) -> dict:
    """Top-1, top-5 (fractions), mean cross-entropy loss and sample count over a loader."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    n = c1 = c5 = 0
    loss = 0.0
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    t0 = time.perf_counter()
    with progress_bar(description, total) as (bar, task):
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            logits = model(x)
            if not isinstance(logits, torch.Tensor):
                logits = torch.as_tensor(logits)
            logits = logits.float()
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            a, b = topk_correct(logits, y)
            c1, c5, n = c1 + a, c5 + b, n + len(y)
            bar.update(task, advance=1, info=f"top1 {c1 / max(n, 1):.4f}")
    dt = time.perf_counter() - t0
    return {"top1": c1 / max(n, 1), "top5": c5 / max(n, 1), "loss": loss / max(n, 1), "samples": n,
            "seconds": round(dt, 3), "images_per_s": round(n / dt, 1) if dt > 0 else None}
