"""Finetune targets and ablation on the bundled digits model (CPU).

    python benchmarks/finetune_digits.py targets [--threads 2]
    python benchmarks/finetune_digits.py ablation [--bits 4 2] [--seeds 0 1 2] [--epochs 2]

``targets``: the default pipeline (``convert --bits B`` then ``finetune --teacher ann`` with the
default options) at W4 and W2; prints float, converted and finetuned top-1, wall and process CPU
seconds. Targets: W4 >= float - 0.5 point, W2 >= float - 2 points, each within 5 min of 2-core
CPU time.

``ablation``: at each bit width and seed, from the same float model:
  baseline  no IE-LIF, CE only          +ie_lif   IE-LIF on q/k/v, CE only
  +fgd      no IE-LIF, CE + FGD         +both     IE-LIF, CE + FGD
  kd        no IE-LIF, CE + logit KD    full      IE-LIF, CE + KD + FGD (the default)
prints mean and spread (sample std) of the finetuned top-1 over seeds, as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qsdcompress as q  # noqa: E402
from _qat import ABLATION  # noqa: E402
from _qat import one_run as _one_run  # noqa: E402

DIGITS_ABLATION = ["baseline", "+ie_lif", "+fgd", "+both", "kd", "full"]


def one_run(bits: int, config: str = "full", seed: int = 0, **ft) -> dict:
    conv, losses = ABLATION[config]
    return _one_run(q.load(), "digits", bits, conv, seed=seed, **{**losses, **ft})


def targets(args) -> None:
    float_top1 = q.eval(q.load())["top1"]
    print(json.dumps({"float_top1": float_top1}), flush=True)
    for bits, allowed in ((4, 0.005), (2, 0.02)):
        r = one_run(bits, **({"epochs": args.epochs} if args.epochs else {}))
        r["converted_top1"] = r.pop("input_val_top1")  # measured on validation by finetune
        r.update(float_top1=float_top1, drop_points=round((float_top1 - r["top1"]) * 100, 2),
                 target_met=bool(r["top1"] >= float_top1 - allowed - 1e-9 and r["cpu_s"] <= 300))
        print(json.dumps(r), flush=True)


def ablation(args) -> None:
    float_top1 = q.eval(q.load())["top1"]
    rows = []
    for bits in args.bits:
        for name in args.configs:
            tops = []
            for seed in args.seeds:
                r = one_run(bits, name, seed, epochs=args.epochs)
                print(json.dumps({"config": name, **r}), flush=True)
                tops.append(r["top1"])
            rows.append((bits, name, statistics.mean(tops), statistics.stdev(tops) if len(tops) > 1 else 0.0, tops))
    print(f"\nfloat top-1 {float_top1 * 100:.2f}%; {len(args.seeds)} seeds, {args.epochs} epoch(s) each\n")
    print("| bits | config | top-1 mean | spread (std) | per seed |")
    print("|---|---|---|---|---|")
    for bits, name, m, s, tops in rows:
        print(f"| W{bits} | {name} | {m * 100:.2f}% | {s * 100:.2f} | {', '.join(f'{t * 100:.2f}' for t in tops)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["targets", "ablation"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="default: finetune's default (targets), 2 (ablation)")
    ap.add_argument("--configs", nargs="+", default=DIGITS_ABLATION, choices=list(ABLATION))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.what == "targets":
        targets(a)
    else:
        a.epochs = a.epochs or 2
        ablation(a)


if __name__ == "__main__":
    main()
