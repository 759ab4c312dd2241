"""The user's own model: a reference-format checkpoint at 224 px through ``convert`` (no ``--data``)
and ``export`` in both formats, timed as a user runs them (each command its own process).

    python benchmarks/user_checkpoint.py [--arch qsd_8_256] [--parity-samples 16] [--out FILE]

The checkpoint is ``{'model': state_dict}`` of the reference topology with its BatchNorm
statistics and affine randomised and layer scales in 0.8-1.2 (``models.random_init.randomize_``
on 8 images): the spikes then vary as in a trained model's. Prints (and appends to ``--out``) one
JSON line: wall seconds of each command, the convert JSON's calibration and top-1 fields, each
export's parity figures, and the machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_checkpoint(arch: str, path: Path) -> None:
    import torch
    import torch.nn.functional as F

    import qsdcompress as q
    from qsdcompress.models.random_init import randomize_

    m = q.create_model(arch)
    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(8, 3, 28, 28, generator=g), size=224, mode="bilinear") * 4 - 2
    randomize_(m, images, seed=0, layer_scale=(0.8, 1.2))
    torch.save({"model": m.state_dict()}, path)


def run(args: list[str]) -> tuple[dict, float]:
    """One CLI command in its own process, as a user runs it: its JSON and wall seconds."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "qsdcompress.cli", *args, "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout), round(seconds, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qsd_8_256")
    ap.add_argument("--parity-samples", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from qsdcompress.provenance import machine_description

    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / f"ref_{a.arch}.pth"
        make_checkpoint(a.arch, ckpt)
        conv, t_conv = run(["convert", str(ckpt), "--bits", "4", "--workdir", d])
        line = {"arch": a.arch, "convert_wall_s": round(t_conv, 1), "convert_seconds": conv["convert_seconds"],
                "top1_before": conv["top1_before"], "top1_note": conv["top1_note"],
                "calibration": conv["calibration"]}
        for fmt in ("int", "qdq"):
            ex, t_ex = run(["export", "--workdir", d, "--format", fmt, "--parity-samples", str(a.parity_samples),
                            "-o", str(Path(d) / f"{fmt}.onnx")])
            line[f"export_{fmt}"] = {"wall_s": round(t_ex, 1), **{k: ex[k] for k in (
                "parity_ok", "parity_samples", "layers_checked", "spike_flips", "spike_flips_unexplained",
                "fragile_spikes", "spikes_checked", "images_differing", "top1_agreement", "file_bytes",
                "file_vs_weight_bits")}}
    line["machine"] = machine_description()
    text = json.dumps(line)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
