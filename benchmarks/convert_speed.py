"""Time ``convert`` (W4, mse scale search, IE-LIF on q/k/v, calibration) of a large model on CPU.

    python benchmarks/convert_speed.py [--arch qsd_8_512] [--threads 2] [--batches 1] [--batch-size 2]

Calibration uses synthetic 224 px images (the timing does not depend on their content). Prints one
JSON object with the total and the split: float model build, scale search + module swap,
calibration forward passes.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qsd_8_512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--scale-init", default="mse")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import qsdcompress as q
    from qsdcompress import quant
    from qsdcompress.quant import conversion  # convert calls the stages through this module

    t0 = time.perf_counter()
    model = q.create_model(args.arch).eval()
    t_build = time.perf_counter() - t0
    size = model.pretrained_cfg["input_size"]
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(args.batch_size, *size, generator=g) for _ in range(args.batches)]
    import brevitas.nn  # noqa: F401  (import cost is not conversion cost)

    stamps: dict[str, float] = {}
    orig_quantize, orig_calibrate = conversion.quantize_, conversion.calibrate

    def timed_quantize(*a, **k):
        t = time.perf_counter()
        r = orig_quantize(*a, **k)
        stamps["quantize_s"] = time.perf_counter() - t
        return r

    def timed_calibrate(*a, **k):
        t = time.perf_counter()
        r = orig_calibrate(*a, **k)
        stamps["calibrate_s"] = time.perf_counter() - t
        return r

    conversion.quantize_, conversion.calibrate = timed_quantize, timed_calibrate
    t1, c1 = time.perf_counter(), time.process_time()
    quant.convert(model, quant.QuantConfig(bits=args.bits, scale_init=args.scale_init,
                                           calib_batches=args.batches), calib_loader=calib)
    total = time.perf_counter() - t1
    cpu = time.process_time() - c1
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "arch": args.arch, "params": params, "threads": args.threads, "bits": args.bits,
        "scale_init": args.scale_init, "calib": f"{args.batches}x{args.batch_size}x{size}",
        "build_float_model_s": round(t_build, 2), "convert_total_s": round(total, 2),
        "convert_cpu_s (all threads)": round(cpu, 2),
        **{k: round(v, 2) for k, v in stamps.items()},
        "other_s (copy, channel probe, meta)": round(total - sum(stamps.values()), 2),
        "ie_lif_neurons": len(quant.ie_lif_targets(model, "qkv")),
    }))


if __name__ == "__main__":
    main()
