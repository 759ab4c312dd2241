"""The GPU checks, prepared to run unattended within ten minutes on one GPU (CI never runs them).

    python benchmarks/gpu_check.py amp   --steps 300     # qsd_8_256 W4 finetune, bf16 AMP, synthetic data
    python benchmarks/gpu_check.py ratio --steps 20      # float vs W4 training-step time on the GPU

``amp`` converts a randomly initialised ``qsd_8_256`` (224 px, non-trivial BatchNorm statistics and
layer scales near 1, so spikes flow) to 4-bit weights + IE-LIF, then finetunes it with
``run_finetune`` (CE only: there is no trained teacher for random weights) on a fixed synthetic set
it can fit, with bf16 autocast. It prints images/s, the loss of the first and last 20 steps
(finite and falling is the check), and peak GPU memory. ``benchmarks/gpu_check.sh`` runs both
parts and the same finetune through ``torchrun --nproc-per-node 1`` (nccl).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import qsdcompress as q
from qsdcompress.config import FinetuneConfig
from qsdcompress.loading import save
from qsdcompress.models.random_init import randomize_
from qsdcompress.quant import QuantConfig, convert
from qsdcompress.train import run_finetune


def random_model(arch: str = "qsd_8_256", seed: int = 0) -> torch.nn.Module:
    """Random weights with BatchNorm statistics and layer scales that let spikes through."""
    torch.manual_seed(seed)
    m = q.create_model(arch, num_classes=10)
    images = torch.randn(8, *m.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(seed))
    return randomize_(m, images, seed)


def prepare(workdir: Path) -> Path:
    path = workdir / "converted.qsd"
    if not path.exists():
        conv = convert(random_model(), QuantConfig(bits=4, calib_samples=32, calib_data="synthetic:64"))
        save(conv, path, kind="converted", keep_float=True)
    return path


def amp(args: argparse.Namespace) -> dict:
    wd = Path(args.workdir)
    model_path = prepare(wd)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses: list[float] = []
    cfg = FinetuneConfig(model=str(model_path), workdir=str(wd), run_dir=str(wd / "amp"), output=str(wd / "amp.qsd"),
                         data=f"synthetic:{args.images}", steps=args.steps, batch_size=args.batch_size, lr=1e-3,
                         lambda_kd=0.0, lambda_fgd=0.0, amp="bf16", device=args.device, eval_max_batches=2,
                         warmup_steps=10)
    t0 = time.perf_counter()
    _, r = run_finetune(cfg, on_step=lambda step, parts: losses.append(parts["loss"]))
    seconds = time.perf_counter() - t0
    k = min(20, max(1, len(losses) // 2))
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    out = {"check": "amp", "arch": "qsd_8_256", "bits": 4, "amp": "bf16", "steps": len(losses),
           "batch_size": args.batch_size, "images_per_s": r["history"][-1]["images_per_s"],
           "seconds": round(seconds, 1), "loss_first20": round(first, 4), "loss_last20": round(last, 4),
           "finite": all(math.isfinite(v) for v in losses), "falling": last < first,
           "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
           "device": torch.cuda.get_device_name() if cuda else args.device}
    print(json.dumps(out), flush=True)
    return out


def ratio(args: argparse.Namespace) -> dict:
    """Median training-step time of the W4 model over the float model (same batch, alternating)."""
    dev = torch.device("cuda")
    f = random_model().to(dev).train()
    w4 = convert(random_model(), QuantConfig(bits=4, calib_samples=0, ie_lif="none")).to(dev).train()
    x = torch.randn(args.batch_size, 3, 224, 224, device=dev)
    y = torch.randint(0, 10, (args.batch_size,), device=dev)

    def stepper(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            torch.cuda.synchronize()
        return step

    a, b = stepper(f), stepper(w4)
    for _ in range(3):
        a(), b()
    ta, tb = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter(); a(); ta.append(time.perf_counter() - t0)  # noqa: E702
        t0 = time.perf_counter(); b(); tb.append(time.perf_counter() - t0)  # noqa: E702
    out = {"check": "ratio", "batch_size": args.batch_size, "float_step_s": round(statistics.median(ta), 4),
           "w4_step_s": round(statistics.median(tb), 4),
           "w4_over_float": round(statistics.median(tb) / statistics.median(ta), 3), "gpu": torch.cuda.get_device_name()}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["prepare", "amp", "ratio"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=512, help="size of the fixed synthetic training set")
    ap.add_argument("--workdir", default="gpu-check-out")
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test the script itself")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: the GPU checks need one")
    if args.part == "prepare":
        print(prepare(Path(args.workdir)))
    else:
        {"amp": amp, "ratio": ratio}[args.part](args)


if __name__ == "__main__":
    main()
