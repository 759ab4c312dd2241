"""onnxruntime vs PyTorch eager: latency (batch 1) and throughput (batch 32) on CPU.

Models: the bundled digits model converted to 4-bit weights (32 px) and ``qsd_8_256`` at 224 px
(random weights converted to 4 bits: speed does not depend on the values). Each model is
exported with the project's exporter (packed INT4 + parity check), then both runtimes run the
same input with the same thread count.

    python benchmarks/onnx_latency.py [--threads 2] [--repeats 20] [--big-repeats 3] [--skip-big]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("QSDCOMPRESS_QUIET", "1")

import qsdcompress as q  # noqa: E402
from qsdcompress.export import export, ort_session as _ort_session  # noqa: E402
from qsdcompress.quant import QuantConfig, convert  # noqa: E402


def _time(fn, x, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn(x)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench(name: str, model: torch.nn.Module, img: int, repeats: int, batches=(1, 32), parity_samples: int = 8,
          threads: int = 2, out_dir: Path = Path("."), float_model: torch.nn.Module | None = None) -> list[dict]:
    """``model``: the converted (Brevitas) model; ``float_model``: the same network with plain
    float layers, a second eager baseline without the quantizer overhead."""
    path = out_dir / f"{name}.onnx"
    r = export(model, path, parity_samples=parity_samples)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rows = []
    model.eval()
    for b in batches:
        x = torch.randn(b, 3, img, img)
        reps = repeats if b == 1 else max(1, repeats // 4)
        with torch.no_grad():
            t_pt = _time(model, x, reps)
            t_fl = _time(float_model.eval(), x, reps) if float_model is not None else float("nan")
        xn = x.numpy()
        t_ort = _time(lambda a: sess.run(None, {"input": a}), xn, reps)
        rows.append({"model": name, "img": img, "batch": b, "repeats": reps, "eager_ms": t_pt * 1e3,
                     "ort_ms": t_ort * 1e3, "eager_float_ms": t_fl * 1e3, "speedup": t_pt / t_ort, "eager_img_s": b / t_pt, "ort_img_s": b / t_ort,
                     "onnx_bytes": r["file_bytes"], "max_abs_diff": r["max_abs_diff"]})
        print(f"{name:>16} {img:>4}px batch {b:>3}: eager {t_pt * 1e3:9.2f} ms  onnxruntime {t_ort * 1e3:9.2f} ms  "
              f"speedup {t_pt / t_ort:5.2f}x  ({b / t_pt:7.1f} vs {b / t_ort:7.1f} img/s); float eager "
              f"{t_fl * 1e3:9.2f} ms ({t_fl / t_ort:5.2f}x)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--big-repeats", type=int, default=3)
    ap.add_argument("--skip-big", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = QuantConfig(bits=4, calib_batches=0, scale_init="lsq")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        small = q.load()
        bench("bundled_w4", convert(small, cfg).eval(), 32, a.repeats, threads=a.threads, out_dir=out,
              float_model=small)
        if not a.skip_big:
            big = q.create_model("qsd_8_256", num_classes=1000).eval()
            bench("qsd_8_256_w4", convert(big, cfg).eval(), 224, a.big_repeats, parity_samples=2,
                  threads=a.threads, out_dir=out, float_model=big)
    print(f"torch {torch.__version__}, threads {a.threads}, cpus {os.cpu_count()}")


if __name__ == "__main__":
    main()
