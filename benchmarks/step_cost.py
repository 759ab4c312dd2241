"""Training-step cost of distillation and of quantized weights (CPU wall clock, median of a few steps).

    python benchmarks/step_cost.py [--threads 2] [--steps 5]

1. qsd_tiny (bundled topology, 4-bit weights + IE-LIF, batch 64, 32 px): a step with the ANN
   teacher attached (teacher forward + KD + FGD) vs the student alone (CE). Target <= 1.6x.
2. qsd_8_256 (batch 8, 224 px): a student step with 4-bit Brevitas weights vs float weights.
   Target <= 1.2x.
Steps of the two variants alternate so machine noise hits both alike. Weights are random: the
cost does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import qsdcompress as q
from qsdcompress.config import FinetuneConfig
from qsdcompress.data import DataConfig
from qsdcompress.distill import QKVCapture, Teacher, layer_map
from qsdcompress.quant import QuantConfig, convert
from qsdcompress.train import build_optimizer, compute_losses


def make_step(model, cfg, teacher=None):
    capture = QKVCapture(model, "snn") if teacher is not None and cfg.lambda_fgd > 0 else None
    mapping = layer_map(capture.num_layers, teacher.num_layers) if capture is not None else None
    opt = build_optimizer(model, cfg)
    sdc = DataConfig.from_model(model)
    model.train()

    def step(x, y):
        loss, *_ = compute_losses(model, x, y, cfg, teacher, capture, mapping, sdc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    return step


def compare(name, a, b, x, y, steps):
    a(x, y), b(x, y)  # warm up
    ta, tb = [], []
    for _ in range(steps):
        t0 = time.perf_counter(); a(x, y); ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); b(x, y); tb.append(time.perf_counter() - t0)
    ma, mb = statistics.median(ta), statistics.median(tb)
    r = {"case": name, "baseline_s": round(ma, 4), "variant_s": round(mb, 4), "ratio": round(mb / ma, 3)}
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-large", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = []

    # 1. teacher attached vs student alone (converted qsd_tiny)
    base = q.create_model("qsd_tiny")
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    qcfg = QuantConfig(bits=4, calib_batches=0)
    s_alone = convert(base, qcfg)
    s_dist = convert(base, qcfg)
    ann = q.create_model("qsd_tiny", ann=True)
    teacher = Teacher(ann, "ann", "snn", DataConfig.from_model(ann))
    alone = make_step(s_alone, FinetuneConfig(lambda_kd=0, lambda_fgd=0))
    dist = make_step(s_dist, FinetuneConfig(), teacher)
    out.append(compare("qsd_tiny W4 b64: +ANN teacher (KD+FGD) vs student alone", alone, dist, x, y, a.steps))

    # 2. quantized vs float weights, qsd_8_256 at 224 px
    if not a.skip_large:
        f = q.create_model("qsd_8_256")
        qm = convert(f, QuantConfig(bits=4, calib_batches=0, ie_lif="none"))
        x = torch.randn(8, 3, 224, 224)
        y = torch.randint(0, 1000, (8,))
        cfg = FinetuneConfig(lambda_kd=0, lambda_fgd=0)
        out.append(compare("qsd_8_256 b8 224px: W4 Brevitas vs float weights", make_step(f, cfg),
                           make_step(qm, cfg), x, y, a.steps))
    print(json.dumps({"threads": a.threads, "steps": a.steps, "results": out}))


if __name__ == "__main__":
    main()
