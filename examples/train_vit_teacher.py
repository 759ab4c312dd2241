"""Train the bundled cross-architecture teacher: a small timm VisionTransformer on digits.

    python examples/train_vit_teacher.py        # writes qsdcompress/zoo/vit_digits.safetensors

Patch 4 on 32x32 inputs gives the same 8x8 token grid as the bundled ``qsd_tiny`` student, plus
a class token. Fixed seed, CPU, a few minutes. ``qsdcompress finetune --teacher vit_digits``
then distils from it offline. The file is safetensors with the timm constructor arguments in its
metadata, so loading it never runs code.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qsdcompress.data import DataConfig, build_loader, random_shift
from qsdcompress.distill import VIT_DIGITS_ARGS, VIT_DIGITS_PATH, build_vit_digits
from qsdcompress.io import atomic_path, package_versions
from qsdcompress.metrics import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=VIT_DIGITS_PATH)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    model = build_vit_digits()
    cfg = DataConfig.from_model(model)
    train_loader = build_loader("digits", "train", cfg, batch_size=64, seed=a.seed)
    test_loader = build_loader("digits", "test", cfg, batch_size=256)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
    steps = a.epochs * len(train_loader)
    warm = 3 * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    for ep in range(a.epochs):
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(random_shift(x, g)), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
        if ep % 10 == 9 or ep == a.epochs - 1:
            r = evaluate(model, test_loader, description=f"epoch {ep + 1}")
            print(f"epoch {ep + 1}/{a.epochs} loss {loss.item():.3f} test top1 {r['top1']:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    r = evaluate(model, test_loader, description="final")
    from safetensors.torch import save_file

    meta = {"kind": "timm_teacher", "timm_model": "vit_digits", "model_args": VIT_DIGITS_ARGS,
            "versions": package_versions(),
            "training": {"script": "examples/train_vit_teacher.py", "seed": a.seed, "epochs": a.epochs,
                         "lr": a.lr, "data": "digits", "test_top1": r["top1"],
                         "seconds": round(time.time() - t0, 1)}}
    with atomic_path(a.out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"qsdcompress": json.dumps(meta)})
    print(f"wrote {a.out}: digits test top1 {r['top1']:.4f}")


if __name__ == "__main__":
    main()
