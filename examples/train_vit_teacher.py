"""Train a bundled cross-architecture teacher: a small timm VisionTransformer.

    python examples/train_vit_teacher.py                        # qsdcompress/zoo/vit_digits.safetensors
    python examples/train_vit_teacher.py --data fashion-mnist   # qsdcompress/zoo/vit_fmnist.safetensors

Digits: patch 4 on 32x32 inputs gives the same 8x8 token grid as the bundled ``qsd_tiny`` student,
plus a class token. Fashion-MNIST: patch 4 on 28x28 grayscale gives ``qsd_tiny_fmnist``'s 7x7 grid.
Fixed seed, CPU, a cosine schedule to zero; the last epoch is kept (nothing is chosen on any
split), validation is printed along the way and test measured once at the end.
``qsdcompress finetune --teacher vit_digits`` (or ``vit_fmnist``) then distils from it offline.
The file is safetensors with the timm constructor arguments in its metadata, so loading it never
runs code.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from qsdcompress.data import DataConfig, build_loader, random_hflip, random_shift
from qsdcompress.distill import BUNDLED_VITS
from qsdcompress.io import atomic_path
from qsdcompress.provenance import package_versions
from qsdcompress.metrics import evaluate


class Recipe(NamedTuple):
    teacher: str
    epochs: int
    warmup_epochs: int
    batch_size: int
    label_smoothing: float
    flips: bool          # random horizontal flips beside the random shifts


RECIPES = {"digits": Recipe("vit_digits", 60, 3, 64, 0.05, False),
           "fashion-mnist": Recipe("vit_fmnist", 15, 1, 128, 0.1, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=sorted(RECIPES), default="digits")
    ap.add_argument("--epochs", type=int, default=None, help="default: 60 (digits), 15 (fashion-mnist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="default: the bundled teacher's file")
    a = ap.parse_args()
    rec = RECIPES[a.data]
    epochs = a.epochs or rec.epochs
    vit = BUNDLED_VITS[rec.teacher]
    out = a.out or vit.path
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    model = vit.build()
    cfg = DataConfig.from_model(model)
    train_loader = build_loader(a.data, "train", cfg, batch_size=rec.batch_size, seed=a.seed)
    val_loader, test_loader = (build_loader(a.data, s, cfg, batch_size=500) for s in ("val", "test"))
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
    steps = epochs * len(train_loader)
    warm = min(rec.warmup_epochs, epochs) * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    every = 10 if epochs > 20 else 1
    for ep in range(epochs):
        model.train()
        for x, y in train_loader:
            x = random_shift(x, g)
            if rec.flips:
                x = random_hflip(x, g)
            loss = F.cross_entropy(model(x), y, label_smoothing=rec.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
        if ep % every == every - 1 or ep == epochs - 1:
            r = evaluate(model, val_loader, description=f"epoch {ep + 1} val")
            print(f"epoch {ep + 1}/{epochs} loss {loss.item():.3f} val top1 {r['top1']:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    val = evaluate(model, val_loader, description="val")["top1"]
    test = evaluate(model, test_loader, description="test")["top1"]
    from safetensors.torch import save_file

    meta = {"kind": "timm_teacher", "timm_model": rec.teacher, "model_args": vit.args,
            "versions": package_versions(),
            "training": {"script": "examples/train_vit_teacher.py", "seed": a.seed, "epochs": epochs,
                         "warmup_epochs": rec.warmup_epochs, "lr": a.lr, "batch_size": rec.batch_size,
                         "label_smoothing": rec.label_smoothing, "data": a.data,
                         "augment": "random shift 2 px" + (" + horizontal flip" if rec.flips else ""),
                         "val_top1": val, "test_top1": test, "threads": a.threads,
                         "seconds": round(time.time() - t0, 1)}}
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"qsdcompress": json.dumps(meta)})
    print(f"wrote {out}: {a.data} val top1 {val:.4f}, test top1 {test:.4f}")


if __name__ == "__main__":
    main()
