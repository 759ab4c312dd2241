"""Top-1 of the bundled digits model after ``convert`` (no finetuning), per weight bit width.

    python benchmarks/convert_accuracy.py [--bits 8 4 3 2] [--scale-init mse lsq absmax]
                                          [--bn float re-estimated] [--ie-lif qkv] [--threads 2] [--markdown]

Targets (issue): W8 within 0.5 point of float top-1, W4 within 3 points. Calibration: 8 batches
of 32 digits training images (labels unused); evaluation: the 360-image digits test split, in
integer spike mode (binary mode gives the same logits).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    ap.add_argument("--scale-init", nargs="+", default=["mse", "lsq", "absmax"])
    ap.add_argument("--ie-lif", default="qkv")
    ap.add_argument("--ie-lif-init", default="identity")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--bn", nargs="+", choices=["float", "re-estimated"], default=["re-estimated"],
                    help="BatchNorm statistics after quantizing: the float model's, or re-estimated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import qsdcompress as q
    from qsdcompress.data import DataConfig, build_loader
    from qsdcompress.metrics import evaluate
    from qsdcompress.quant import QuantConfig, convert

    model = q.load().eval()
    test = build_loader("digits", "test", DataConfig.from_model(model), batch_size=120)
    float_top1 = evaluate(model, test, description="float")["top1"]
    rows = []
    for bits in args.bits:
        for init, bn in ((i, b) for i in args.scale_init for b in args.bn):
            t = time.perf_counter()
            cfg = QuantConfig(bits=bits, scale_init=init, ie_lif=args.ie_lif, ie_lif_init=args.ie_lif_init,
                              calib_batches=args.calib_batches, reestimate_bn=bn == "re-estimated")
            conv = convert(model, cfg)
            top1 = evaluate(conv, test, description=f"W{bits} {init}")["top1"]
            rows.append({"bits": bits, "scale_init": init, "bn": bn, "ie_lif": args.ie_lif,
                         "ie_lif_init": args.ie_lif_init,
                         "float_top1": float_top1, "top1": top1, "drop_points": round((float_top1 - top1) * 100, 2),
                         "seconds": round(time.perf_counter() - t, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if args.markdown:
        print("| bits | scale init | BatchNorm | IE-LIF | float top-1 | converted top-1 | drop (points) |")
        print("|---:|---|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['bits']} | {r['scale_init']} | {r['bn']} | {r['ie_lif']}/{r['ie_lif_init']} "
                  f"| {r['float_top1'] * 100:.2f} "
                  f"| {r['top1'] * 100:.2f} | {r['drop_points']:.2f} |")


if __name__ == "__main__":
    main()
