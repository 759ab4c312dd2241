"""Cost of the per-epoch spike statistics finetuning records (firing rate per stage, q/k/v entropy
per block): evaluation of the validation batches with and without the spike recorder, alternating,
median of repeats; and that extra time as a share of one finetuning epoch (measured once).

    python benchmarks/spike_stats_cost.py [--threads 2] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import qsdcompress as q
from qsdcompress.config import FinetuneConfig
from qsdcompress.data import DataConfig, build_loader
from qsdcompress.metrics import evaluate
from qsdcompress.reporting.accounting import SpikeRecorder, qkv_neurons, spike_statistics
from qsdcompress.train import run_finetune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = q.convert(q.load(), bits=4, calib_samples=64)
    loader = build_loader("digits", "test", DataConfig.from_model(model), batch_size=256)
    plain, recorded = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        evaluate(model, loader)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with SpikeRecorder(model, histograms=qkv_neurons(model)) as rec:
            evaluate(model, loader)
        spike_statistics(model, rec)
        recorded.append(time.perf_counter() - t0)
    p, r = statistics.median(plain), statistics.median(recorded)
    with tempfile.TemporaryDirectory() as wd:
        _, res = run_finetune(FinetuneConfig(workdir=wd, epochs=1, lambda_kd=0, lambda_fgd=0), model)
    epoch = res["seconds"]
    print(json.dumps({"model": "bundled qsd_tiny W4", "images": len(loader.dataset), "threads": a.threads,
                      "eval_s": round(p, 4), "eval_with_spike_stats_s": round(r, 4),
                      "overhead_percent_of_eval": round(100 * (r / p - 1), 1),
                      "finetune_epoch_s": epoch, "overhead_percent_of_epoch": round(100 * (r - p) / epoch, 2)}))


if __name__ == "__main__":
    main()
