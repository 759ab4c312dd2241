"""Side by side in one process, same input, same thread count: PyTorch eager (float and converted
model), the float model exported plainly, today's ``qdq`` export and the ``int`` export.

Models: the bundled digits model (32 px) and ``qsd_8_256`` / ``qsd_8_512`` at 224 px. The 224 px
models have random weights (timing does not depend on the values) with non-trivial BatchNorm
statistics and layer scales near 1, so their spikes are neither all zero nor all saturated.
Every export passes the usual parity check against PyTorch. Median of the repeats after one
warm-up; batch 32 uses a quarter of the repeats (at least one). onnxruntime's thread spinning is
off for every session unless ``--spinning`` (see ``_session``).

    python benchmarks/onnx_latency.py [--threads 2] [--repeats 10] [--big-repeats 3]
        [--models bundled qsd_8_256 qsd_8_512] [--eager-b32 bundled qsd_8_256] [--cpu-time] [--spinning]
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
from qsdcompress.export import parity_batch  # noqa: E402
from qsdcompress.models.random_init import randomize_  # noqa: E402
from qsdcompress.quant import QuantConfig, convert  # noqa: E402

RUNTIMES = ("eager_float", "eager_conv", "onnx_float", "qdq", "int")


CLOCK = time.perf_counter   # --cpu-time: time.process_time (the work done, whatever else runs)
SPINNING = False            # --spinning: onnxruntime's default, for comparison


def _time(fn, x, repeats: int) -> float:
    fn(x)
    ts = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn(x)
        ts.append(CLOCK() - t0)
    return statistics.median(ts)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # no spinning (unless --spinning): the sessions live side by side in one process, and the worker
    # threads of an idle one would spin on the cores the timed one needs (measured: with spinning
    # every format took up to 2x longer at batch 1); in CPU time a spinning thread would count as work
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if SPINNING else "0")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda a: sess.run(None, {"input": a})


def _exports(name: str, fl: torch.nn.Module, conv: torch.nn.Module, out: Path, samples: int) -> dict:
    """The three files. A random 224 px network has millions of neurons per image, so a few
    spikes at a .5 boundary flip between the runtimes in most images (the qdq and plain float
    files too): the parity check runs and is reported, but does not stop the timing."""
    from qsdcompress.export import ExportConfig, build_onnx, check_parity, ort_session
    from qsdcompress.sizing import model_size

    files = {}
    for key, model, fmt in (("onnx_float", fl, "qdq"), ("qdq", conv, "qdq"), ("int", conv, "int")):
        path = out / f"{name}_{key}.onnx"
        x = parity_batch(model, "digits", samples)
        proto, facts = build_onnx(model, name, ExportConfig(format=fmt), x[:2])
        path.write_bytes(proto.SerializeToString())
        par = check_parity(path, model, x, raise_error=False)
        files[key] = {"path": path, "bytes": path.stat().st_size, "weight_bits_bytes": model_size(model)["size_bytes"],
                      "differing": par["images_differing"], "top1": par["top1_agreement"], "n": samples,
                      "integer_layers": facts.get("integer_layers"), "weight_layers": facts.get("weight_layers")}
    return files


def bench(name: str, fl: torch.nn.Module, conv: torch.nn.Module, img: int, repeats: int, threads: int,
          out: Path, samples: int, eager: bool, batches=(1, 32)) -> list[dict]:
    files = _exports(name, fl, conv, out, samples)
    runs = {k: _session(files[k]["path"], threads) for k in ("onnx_float", "qdq", "int")}
    i = files["int"]
    print(f"{name}: int export {i['integer_layers']}/{i['weight_layers']} weight layers integer; bytes "
          f"int {i['bytes']:,} qdq {files['qdq']['bytes']:,} float {files['onnx_float']['bytes']:,}; "
          f"params*bits/8 {i['weight_bits_bytes']:,} ({i['bytes'] / i['weight_bits_bytes']:.3f}x); parity "
          + ", ".join(f"{k} {v['differing']}/{v['n']} images differ, top-1 {v['top1'] * 100:.0f}%" for k, v in files.items()),
          flush=True)
    rows = []
    for b in batches:
        x = torch.randn(b, 3, img, img)
        reps = repeats if b == 1 else max(1, repeats // 4)
        ms = {}
        with torch.no_grad():
            for key, m in (("eager_float", fl), ("eager_conv", conv)):
                ms[key] = _time(m, x, reps) * 1e3 if eager or b == 1 else float("nan")
        for key, fn in runs.items():
            ms[key] = _time(fn, x.numpy(), reps) * 1e3
        row = {"model": name, "img": img, "batch": b, "repeats": reps, **{f"{k}_ms": v for k, v in ms.items()}}
        rows.append(row)
        print(f"| {name} | {img} | {b} | {reps} | " + " | ".join(f"{ms[k]:.1f}" for k in RUNTIMES)
              + f" | {ms['qdq'] / ms['int']:.2f}x | {ms['onnx_float'] / ms['int']:.2f}x |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--big-repeats", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["bundled", "qsd_8_256", "qsd_8_512"])
    ap.add_argument("--eager-b32", nargs="*", default=["bundled", "qsd_8_256"],
                    help="models timed in PyTorch eager at batch 32 too (minutes per run for qsd_8_512)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="process CPU time instead of wall clock: on a shared "
                         "machine the work done, not what the other jobs leave over")
    ap.add_argument("--spinning", action="store_true",
                    help="leave onnxruntime's thread spinning on (its default): the sessions then slow each other")
    a = ap.parse_args()
    global CLOCK, SPINNING
    SPINNING = a.spinning and not a.cpu_time
    if a.cpu_time:
        CLOCK = time.process_time
    torch.set_num_threads(a.threads)
    cfg = QuantConfig(bits=4, calib_batches=0, scale_init="lsq")
    print("| model | px | batch | repeats | eager float ms | eager converted ms | float ONNX ms | qdq ms | int ms "
          "| int vs qdq | int vs float ONNX |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as d:
        for name in a.models:
            if name == "bundled":
                fl = q.load().eval()
                bench("bundled", fl, convert(fl, cfg).eval(), 32, a.repeats, a.threads, Path(d), 360,
                      name in a.eager_b32)
            else:
                fl = q.create_model(name, num_classes=1000)
                fl = randomize_(fl, parity_batch(fl, "digits", 4))
                bench(name, fl, convert(fl, cfg).eval(), 224, a.big_repeats, a.threads, Path(d), 4,
                      name in a.eager_b32)
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, threads {a.threads}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
