"""Side by side in one process, same input, same thread count: PyTorch eager (float and converted
model), every export format under onnxruntime, the float model exported plainly
(``torch.onnx.export``) under onnxruntime and OpenVINO (its default precision and f32), and every
format OpenVINO can read under OpenVINO (default precision and f32).

Models: the bundled digits model (32 px), ``qsd_8_256`` / ``qsd_8_512`` at 224 px, W4, and trained
models of the zoo (``qsd_8_256_fmnist`` at its own 64 px, ``qsd_8_256_fmnist@224``: the same weights
at 224 px), calibrated and parity-checked on their own data. The random 224 px
models have random weights (timing does not depend on the values) with non-trivial BatchNorm
statistics and layer scales near 1, so their spikes are neither all zero nor all saturated. Every
file is parity-checked (onnxruntime; ``std-int`` and ``qdq`` under OpenVINO f32 too) and what each
runtime executed as integer layers is read from its executed graph; both are reported, neither
stops the timing. The paths run round-robin, one call each per round, so a load change on a
shared machine hits them all alike (PyTorch eager is timed first, before any session exists);
medians after one warm-up. onnxruntime's thread spinning is
off (sessions side by side would spin on each other's cores). The fastest path at the largest
batch gets a per-op-type time profile (onnxruntime ``enable_profiling``, OpenVINO ``PERF_COUNT``).

    python benchmarks/onnx_latency.py [--threads 2] [--repeats 10] [--big-repeats 3]
        [--models bundled qsd_8_256 [qsd_8_512] [qsd_8_256_fmnist qsd_8_256_fmnist@224]] [--batches 1 16] [--torch-threads N] [--cpu-time] [--json PATH]
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

os.environ.setdefault("QSDCOMPRESS_QUIET", "1")

import qsdcompress as q  # noqa: E402
from qsdcompress.onnx_export import (ExportConfig, Runtime, build_onnx, check_parity, executed_layers,  # noqa: E402
                                parity_batch)
from qsdcompress.provenance import machine_description, package_versions  # noqa: E402
from qsdcompress.data import model_data  # noqa: E402
from qsdcompress.loading import build_from_meta  # noqa: E402
from qsdcompress.models.random_init import randomize_  # noqa: E402
from qsdcompress.quant import QuantConfig, convert  # noqa: E402

FORMATS = ("qdq", "int", "std-int")
OPENVINO_READS = ("float", "qdq", "std-int")   # the int format holds com.microsoft ops
CLOCK = time.perf_counter                       # --cpu-time: time.process_time
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
         "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> list[str]:
    """The CPU flags that decide integer and bf16 kernels (/proc/cpuinfo)."""
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(line.split(":", 1)[1].split())
    return [f for f in FLAGS if f in have]


def plain_float_export(model: torch.nn.Module, sample: torch.Tensor, path: Path) -> None:
    """The float model as a user would export it: ``torch.onnx.export``, opset 17, dynamic batch."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (sample,), buf, opset_version=17, dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    path.write_bytes(buf.getvalue())


@dataclass
class Case:
    """One model timed: its float and converted W4 forms, input shape, and the images its parity
    check runs on (its own data where it has any; digits for random weights)."""
    name: str
    fl: torch.nn.Module
    conv: torch.nn.Module
    img: int
    chans: int
    samples: int
    data: str = "digits"

    def inputs(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, self.chans, self.img, self.img)


def build_files(case: Case, out: Path) -> dict:
    """The plain float export and every format's file, each with its parity figures."""
    name, fl, conv = case.name, case.fl, case.conv
    x = parity_batch(conv, case.data, case.samples)
    files = {"float": {"path": out / f"{name}_float.onnx"}}
    plain_float_export(fl, x[:2], files["float"]["path"])
    for fmt in FORMATS:
        path = out / f"{name}_{fmt}.onnx"
        proto, facts = build_onnx(conv, name, ExportConfig(format=fmt), x[:2])
        path.write_bytes(proto.SerializeToString())
        files[fmt] = {"path": path, "bytes": path.stat().st_size, "requantized_layers": facts.get("requantized_layers"),
                      "parity": {rt: _parity(path, conv, x, rt) for rt in ("onnxruntime", "openvino")
                                 if rt == "onnxruntime" or fmt in OPENVINO_READS}}
    files["float"]["bytes"] = files["float"]["path"].stat().st_size
    return files


def _parity(path: Path, model: torch.nn.Module, x: torch.Tensor, runtime: str) -> dict:
    r = check_parity(path, model, x, raise_error=False, runtime=runtime)
    return {k: r[k] for k in ("parity_ok", "parity_precision", "spike_flips", "spike_flips_unexplained",
                              "images_differing", "top1_agreement", "parity_samples")}


def paths(files: dict, threads: int) -> dict[str, tuple[Path, Runtime]]:
    """Every (file, runtime, precision) timed: key -> (file, runtime)."""
    ort_opts = {"session.intra_op.allow_spinning": "0"}
    out = {f"ort {k}": (files[k]["path"], Runtime("onnxruntime", threads=threads, options=ort_opts))
           for k in ("float", *FORMATS)}
    for k in OPENVINO_READS:
        out[f"ov default {k}"] = (files[k]["path"], Runtime("openvino", threads=threads))
        out[f"ov f32 {k}"] = (files[k]["path"], Runtime("openvino", "f32", threads=threads))
    return out


def time_round_robin(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each call, the calls interleaved: one of each per round."""
    for fn in fns.values():
        fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = CLOCK()
            fn()
            ts[k].append((CLOCK() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in ts.items()}


def gmacs(case: Case) -> float:
    """Multiply-accumulates of one image through the conv and linear layers (attention products
    left out), in billions."""
    total = [0]

    def hook(m: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
        w = m.weight
        per_out = w[0].numel()   # in_channels / groups x kernel
        total[0] += out.numel() * per_out

    hs = [m.register_forward_hook(hook) for m in case.fl.modules()
          if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        case.fl(torch.zeros_like(case.inputs(1)))
    for h in hs:
        h.remove()
    return total[0] / 1e9


def profile(path: Path, rt: Runtime, x: np.ndarray, runs: int = 3) -> dict[str, float]:
    """Milliseconds per op type per run of ``path`` under ``rt`` (largest first)."""
    agg: dict[str, float] = {}
    if rt.name == "onnxruntime":
        sess = _ort_profiled(path, rt)
        for _ in range(runs + 1):
            sess.run(None, {"input": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
        kernel = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        for e in kernel[len(kernel) // (runs + 1):]:   # the first run warms up
            op = e["args"].get("op_name", "?")
            agg[op] = agg.get(op, 0.0) + e["dur"] / 1e3 / runs
    else:
        sess = Runtime("openvino", rt.precision, rt.threads, {**rt.options, "PERF_COUNT": True}).session(path)
        sess(x)
        req = sess.compile({"input": x.shape}).create_infer_request()
        for _ in range(runs):
            req.infer({"input": x})
            for p in req.get_profiling_info():
                key = f"{p.node_type} ({p.exec_type})"
                agg[key] = agg.get(key, 0.0) + p.real_time.total_seconds() * 1e3 / runs
    return {k: round(v, 3) for k, v in sorted(agg.items(), key=lambda kv: -kv[1])}


def _ort_profiled(path: Path, rt: Runtime):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "qsd_ort_profile")
    so.intra_op_num_threads = rt.threads or 0
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    for k, v in {"session.qdq_matmulnbits_accuracy_level": "0", **rt.options}.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_eager(case: Case, batches: list[int], repeats: int) -> dict:
    """PyTorch eager, timed before any runtime session exists (measured: run round-robin beside
    OpenVINO's and onnxruntime's thread pools, a 77 ms eager pass took 10 s)."""
    out = {}
    for b in batches:
        x = case.inputs(b)
        with torch.no_grad():
            out[b] = time_round_robin({"eager float": lambda: case.fl(x), "eager converted": lambda: case.conv(x)},
                                      repeats if b == 1 else max(2, repeats // 3))
    return out


def bench(case: Case, repeats: int, threads: int, out: Path, batches: list[int]) -> dict:
    name, img = case.name, case.img
    files = build_files(case, out)
    eager = time_eager(case, batches, repeats)
    runs = paths(files, threads)
    sessions = {k: rt.session(p) for k, (p, rt) in runs.items()}
    executed = {k: executed_layers(p, rt) for k, (p, rt) in runs.items() if not k.endswith("float")}
    rows = []
    for b in batches:
        xn = case.inputs(b).numpy()
        fns: dict[str, Callable[[], Any]] = {k: (lambda s=s: s(xn)) for k, s in sessions.items()}
        reps = repeats if b == 1 else max(3, repeats // 2)
        ms = {**eager[b], **time_round_robin(fns, reps)}
        rows.append({"model": name, "img": img, "batch": b, "repeats": reps,
                     "ms": {k: round(v, 2) for k, v in ms.items()}})
        print(f"{name} batch {b}: " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()), flush=True)
    last = rows[-1]["ms"]
    fastest = min((k for k in last if not k.startswith("eager")), key=last.get)
    prof = profile(runs[fastest][0], runs[fastest][1], case.inputs(batches[-1]).numpy())
    return {"model": name, "img": img, "parity_data": case.data, "gmacs_per_image": round(gmacs(case), 3), "rows": rows,
            "files": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in files.items()},
            "executed_layers": executed, "fastest": fastest, "fastest_batch": batches[-1], "profile": prof}


def models(names: list[str]):
    """A :class:`Case` per name: ``bundled`` (digits, 32 px), ``qsd_8_256``/``qsd_8_512`` (random
    weights, 224 px), or a trained model of the zoo or a float ``.qsd`` at its own size, calibrated
    and parity-checked on its own data; ``NAME@224``: the same weights at 224 px."""
    cfg = QuantConfig(bits=4, calib_batches=0, scale_init="lsq")
    for name in names:
        base, _, size = name.partition("@")
        if name == "bundled":
            fl = q.load().eval()
            yield Case(name, fl, convert(fl, cfg).eval(), 32, 3, 64)
        elif base in ("qsd_8_256", "qsd_8_512"):
            fl = q.create_model(name, num_classes=1000)
            fl = randomize_(fl, parity_batch(fl, "digits", 4))
            yield Case(name, fl, convert(fl, cfg).eval(), 224, 3, 4)
        else:
            fl = q.load(base).eval()
            if size:
                fl = at_size(fl, int(size))
            data = model_data(fl)
            conv = convert(fl, QuantConfig(bits=4, calib_data=data)).eval()
            chans, img, _ = fl.pretrained_cfg["input_size"]
            yield Case(name, fl, conv, img, chans, 64 if img <= 64 else 16, data)


def at_size(model: torch.nn.Module, img: int) -> torch.nn.Module:
    """``model``'s weights in its topology built for ``img`` px: a topology without position
    embeddings (Meta-SpikeFormer's) takes any size whose token grid stays whole."""
    meta = {**model.qsd_meta, "model_args": {**model.qsd_meta.get("model_args", {}), "img_size": img}}
    out = build_from_meta(meta)
    out.load_state_dict(model.state_dict())
    out.qsd_meta = meta
    return out.eval()


def environment(a: argparse.Namespace) -> dict:
    import openvino
    import onnxruntime

    core = openvino.Core()
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": {**machine_description(), "cpu_flags": cpu_flags()},
            "load_average_start": os.getloadavg(), "threads": a.threads, "torch_threads": a.torch_threads or a.threads,
            "clock": "process CPU time" if a.cpu_time else "wall clock",
            "versions": {**package_versions(), "onnxruntime": onnxruntime.__version__,
                         "openvino": openvino.__version__},
            "openvino_default_precision": core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10, help="rounds at batch 1, bundled model")
    ap.add_argument("--big-repeats", type=int, default=3, help="rounds at batch 1, 224 px models")
    ap.add_argument("--models", nargs="+", default=["bundled", "qsd_8_256"],
                    help="bundled, qsd_8_256, qsd_8_512 (slow: minutes), a zoo model or float .qsd, NAME@224")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="PyTorch's threads (eager timing and the parity check's reference); default "
                         "--threads. On a machine where another job holds a core, 2 OpenMP threads made a "
                         "77 ms eager pass take 9 s")
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall clock")
    ap.add_argument("--json", default=str(Path(__file__).with_name("onnx_latency_results.json")))
    a = ap.parse_args()
    global CLOCK
    if a.cpu_time:
        CLOCK = time.process_time
    torch.set_num_threads(a.torch_threads or a.threads)
    res = {**environment(a), "results": []}
    with tempfile.TemporaryDirectory() as d:
        for case in models(a.models):
            reps = a.repeats if case.img <= 64 else a.big_repeats
            res["results"].append(bench(case, reps, a.threads, Path(d), a.batches))
    res["load_average_end"] = os.getloadavg()
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
