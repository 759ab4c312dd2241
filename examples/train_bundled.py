"""Train the bundled default models: ``qsd_tiny`` (integer spikes, D=4, T=1) on digits, and its
counterpart ANN (same topology, clamped-ReLU activations). Fixed seed, CPU, a few minutes.

    python examples/train_bundled.py            # writes qsdcompress/zoo/qsd_tiny_digits{,_ann}.qsd

The weights are float; the model is then the input of ``qsdcompress convert``.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qsdcompress as q
from qsdcompress.data import DataConfig, build_loader, random_shift
from qsdcompress.metrics import evaluate
from qsdcompress.zoo import MODELS

BUNDLED_SNN, BUNDLED_ANN = MODELS["qsd_tiny_digits"].path, MODELS["qsd_tiny_digits_ann"].path


def train(ann: bool, epochs: int, seed: int, lr: float, out: Path) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = q.create_model("qsd_tiny", ann=ann)
    cfg = DataConfig.from_model(model)
    train_loader = build_loader("digits", "train", cfg, batch_size=64, seed=seed)
    test_loader = build_loader("digits", "test", cfg, batch_size=256)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.02},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps = epochs * len(train_loader)
    warm = len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        for x, y in train_loader:
            x = random_shift(x, g)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
        if ep % 5 == 4 or ep == epochs - 1:
            r = evaluate(model, test_loader, description=f"epoch {ep + 1}")
            print(f"{'ann' if ann else 'snn'} epoch {ep + 1}/{epochs} loss {loss.item():.3f} "
                  f"test top1 {r['top1']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    r = evaluate(model, test_loader, description="final")
    q.save(model, out, kind="float", training={
        "script": "examples/train_bundled.py", "seed": seed, "epochs": epochs, "lr": lr,
        "data": "digits", "test_top1": r["top1"], "seconds": round(time.time() - t0, 1)})
    print(f"wrote {out}: digits test top1 {r['top1']:.4f}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--only", choices=["snn", "ann"], default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.only in (None, "snn"):
        train(False, a.epochs, a.seed, a.lr, BUNDLED_SNN)
    if a.only in (None, "ann"):
        train(True, a.epochs, a.seed, a.lr, BUNDLED_ANN)


if __name__ == "__main__":
    main()
