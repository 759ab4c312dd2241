"""The commands on a trained bundled model, as a user runs them (each command its own process):
convert, export in both formats with parity on many test images, eval of the exported file,
report and sensitivity, each timed.

    python benchmarks/trained_model.py --model qsd_8_256_fmnist --parity-samples 1000
    python benchmarks/trained_model.py --model qsd_tiny_fmnist --bits 4 2 --out FILE

Prints (and appends to ``--out``, default ``benchmarks/trained_model_results.jsonl``) one JSON
line per width: wall seconds of each command, convert's top-1 before and after, each export's
parity figures (top-1 agreement of the file with PyTorch on ``--parity-samples`` test images,
spike flips, images differing), the exported file's top-1 on the whole test split, and the
machine. Speed is ``benchmarks/onnx_latency.py``'s.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from user_checkpoint import run  # noqa: E402  (one CLI command in its own process, timed)


def one_width(model: str, bits: int, parity_samples: int, wd: str) -> dict:
    conv, t_conv = run(["convert", model, "--bits", str(bits), "--workdir", wd])
    line: dict = {"model": model, "bits": bits, "convert_wall_s": t_conv, "convert_seconds": conv["convert_seconds"],
                  "top1_before": conv["top1_before"], "top1_after": conv["top1_after"], "data": conv["top1_data"],
                  "size_bytes": conv["size_bytes"], "parameters": conv["parameters"]}
    for fmt in ("int", "qdq"):
        out = str(Path(wd) / f"model_{fmt}.onnx")
        ex, t_ex = run(["export", conv["output"], "--format", fmt, "-o", out, "--parity-samples",
                        str(parity_samples), "--workdir", wd])
        ev, t_ev = run(["eval", out])
        line[fmt] = {"export_wall_s": t_ex, "file_bytes": ex["file_bytes"],
                     "file_vs_weight_bits": ex["file_vs_weight_bits"],
                     **{k: ex.get(k) for k in ("parity_samples", "top1_agreement", "spike_flips",
                                               "images_differing", "max_abs_diff", "layers_checked")},
                     "eval_wall_s": t_ev, "top1": ev["top1"], "eval_samples": ev["samples"]}
    rep, line["report_wall_s"] = run(["report", conv["output"], "--workdir", wd])
    line["energy_mj"] = rep["totals"]["energy_mj"]
    sens, line["sensitivity_wall_s"] = run(["sensitivity", model, "--samples", "128", "--workdir", wd])
    line["sensitivity_seconds"] = sens.get("seconds")
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qsd_8_256_fmnist", help="a bundled model (qsdcompress list) or a .qsd file")
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--parity-samples", type=int, default=1000)
    ap.add_argument("--out", default=str(HERE / "trained_model_results.jsonl"))
    a = ap.parse_args()
    from qsdcompress.provenance import machine_description

    for bits in a.bits:
        with tempfile.TemporaryDirectory() as wd:
            line = {**one_width(a.model, bits, a.parity_samples, wd), "machine": machine_description()}
        print(json.dumps(line), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
