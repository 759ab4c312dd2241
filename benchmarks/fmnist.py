"""The method on Fashion-MNIST: post-training quantization, QAT, the ablation and the q/k/v
spike diagnosis, on a bundled Fashion-MNIST model (``--model``: ``qsd_tiny_fmnist`` by default, or
``qsd_8_256_fmnist``, the reference topology; data: ``apt-get install dataset-fashion-mnist``, or
``--data fashion-mnist:DIR``).

    python benchmarks/fmnist.py ptq       [--bits 8 4 3 2 1]
    python benchmarks/fmnist.py qat       [--bits 4 3 2 1] [--steps 300]
    python benchmarks/fmnist.py ablation  [--bits 2 4] [--seeds 0 1 2] [--configs ...] [--steps 300]
    python benchmarks/fmnist.py diagnosis [--bits 4 2]
    python benchmarks/fmnist.py table     [--per-seed]  # markdown tables of everything in --out
    python benchmarks/fmnist.py plot      # q/k/v level histograms -> benchmarks/fmnist_qkv_histograms.png

Every result is one JSON line appended to ``--out`` (default ``benchmarks/fmnist_results.jsonl``,
``benchmarks/fmnist_results_MODEL.jsonl`` for another ``--model``)
as soon as it is measured, so an interrupted sweep loses only the run in progress; `ptq`, `qat`
and `ablation` skip what is already in ``--out`` (``--again`` reruns it). Validation (5,000 images held out
of the training set) chooses; test (10,000 images) is what the tables report. QAT budget: the
same ``--steps`` optimizer steps at batch 64 for every configuration, validated every
``--val-every`` steps; the kept model is the best on validation (the converted input included).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qsdcompress as q  # noqa: E402
from _qat import ABLATION, one_run, spike_diagnosis  # noqa: E402
from qsdcompress.provenance import machine_description  # noqa: E402
from qsdcompress.quant import QuantConfig, convert  # noqa: E402

PTQ_IE_LIF = {"none": dict(ie_lif="none"), "identity": dict(ie_lif="qkv", ie_lif_init="identity"),
              "rectify": dict(ie_lif="qkv", ie_lif_init="rectify")}


def emit(args, row: dict) -> None:
    row = {"section": args.what, "model": args.model, "data": args.data, "threads": args.threads, **row,
           "machine": machine_description()}
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


def top1(model, args, split: str) -> float:
    return q.eval(model, data=args.data, split=split, batch_size=500)["top1"]


def ptq(args, fm) -> None:
    done = _done(args, ("ptq",), ("bits", "config"))
    if (32, "float") not in done:
        emit(args, {"config": "float", "bits": 32, "val_top1": top1(fm, args, "val"), "top1": top1(fm, args, "test")})
    for bits in args.bits:
        for ie in args.ie_lif:
            opts = PTQ_IE_LIF[ie]
            for bn_name in args.bn:
                bn, config = bn_name == "re-estimated", f"ie_lif={ie} bn={bn_name}"
                if (bits, config) in done:
                    _skipped(args, f"W{bits} {config}")
                    continue
                t0 = time.process_time()
                m = convert(fm, QuantConfig(bits=bits, calib_data=args.data, reestimate_bn=bn, **opts))
                cpu_s = round(time.process_time() - t0, 1)
                emit(args, {"config": config, "bits": bits, "ie_lif": ie, "reestimate_bn": bn,
                            "val_top1": top1(m, args, "val"), "top1": top1(m, args, "test"), "convert_cpu_s": cpu_s,
                            "convert_cpu_s_is": "convert alone"})


def qat_options(args) -> dict:
    return dict(steps=args.steps, limit_train_batches=args.val_every, batch_size=64)


def _done(args, sections: tuple[str, ...], fields: tuple[str, ...]) -> set[tuple]:
    """``fields`` of the rows of ``sections`` already in ``--out`` for this model (QAT runs: of this
    ``--steps`` too; a run killed midway left nothing): skipped unless ``--again``, so an
    interrupted sweep resumes where it stopped."""
    if args.again:
        return set()
    return {tuple(r[f] for f in fields) for r in _rows(Path(args.out))
            if r["section"] in sections and r.get("model", "qsd_tiny_fmnist") == args.model
            and (r["section"] == "ptq" or r.get("steps") == args.steps)}


def _skipped(args, what: str) -> None:
    print(f"skipped: {what} is in {args.out} (--again reruns it)", flush=True)


def qat(args, fm) -> None:
    conv, ft = ABLATION["full"]
    done = _done(args, ("qat", "ablation"), ("bits", "config", "seed"))
    for bits in args.bits:
        if (bits, "full", 0) in done:
            _skipped(args, f"W{bits} full seed 0")
            continue
        emit(args, {"config": "full", **one_run(fm, args.data, bits, conv, seed=0, float_model_file=args.model,
                                                **ft, **qat_options(args))})


def ablation(args, fm) -> None:
    done = _done(args, ("qat", "ablation"), ("bits", "config", "seed"))
    for bits in args.bits:
        for name in args.configs:
            conv, ft = ABLATION[name]
            for seed in args.seeds:
                if (bits, name, seed) in done:
                    _skipped(args, f"W{bits} {name} seed {seed}")
                    continue
                emit(args, {"config": name, **one_run(fm, args.data, bits, conv, seed=seed, diagnose=True,
                                                      float_model_file=args.model, **ft, **qat_options(args))})


def diagnosis(args, fm) -> None:
    if "float" in args.models:
        emit(args, {"config": "float", "bits": 32, **spike_diagnosis(fm, args.data)})
    for bits in args.bits:
        for ie in ("none", "identity", "rectify"):
            for bn in args.bn:
                m = convert(fm, QuantConfig(bits=bits, calib_data=args.data, reestimate_bn=bn == "re-estimated",
                                            **PTQ_IE_LIF[ie]))
                emit(args, {"config": f"ptq ie_lif={ie} bn={bn}", "bits": bits, **spike_diagnosis(m, args.data)})


def plot(args, _fm) -> None:
    """q/k/v spike-level histograms (all blocks summed), float vs PTQ vs after QAT, to --figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(Path(args.out))
    cases = [(f"{r['config']} W{r['bits']}" if r["bits"] < 32 else "float", r["qkv_histogram"], r["entropy_qkv"])
             for r in rows if r["section"] == "diagnosis"]
    cases += [(f"QAT {r['config']} W{r['bits']} seed {r['seed']}", r["spikes_after"]["qkv_histogram"],
               r["spikes_after"]["entropy_qkv"]) for r in rows if "spikes_after" in r and r["seed"] == 0]
    cols = 4
    fig, axes = plt.subplots((len(cases) + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.4 * ((len(cases) + 3) // 4)),
                             squeeze=False, sharey=True)
    for ax, (name, hist, ent) in zip(axes.flat, cases):
        total = sum(hist)
        ax.bar(range(len(hist)), [h / total for h in hist], color="tab:blue")
        ax.set_title(f"{name}\nH = {ent:.2f} bits", fontsize=8)
        ax.set_xticks(range(len(hist)))
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.supxlabel("q/k/v spike count S (0..D)")
    fig.supylabel("fraction")
    fig.tight_layout()
    fig.savefig(args.figure, dpi=110)
    print(f"wrote {args.figure}")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def table(args, _fm) -> None:
    rows = _rows(Path(args.out))
    ptq_rows = [r for r in rows if r["section"] == "ptq"]
    floats = [r for r in ptq_rows if r["config"] == "float"]
    # each ptq invocation measures the float model again: show it once
    ptq_rows = [r for r in ptq_rows if r["config"] != "float" or r is floats[0]]
    if ptq_rows:
        print("| bits | IE-LIF | BatchNorm | val top-1 | test top-1 |\n|---:|---|---|---:|---:|")
        for r in ptq_rows:
            ie, bn = r.get("ie_lif", "-"), {True: "re-estimated", False: "float"}.get(r.get("reestimate_bn"), "-")
            print(f"| {r['bits']} | {ie} | {bn} | {r['val_top1'] * 100:.2f} | {r['top1'] * 100:.2f} |")
    # `qat` and `ablation` runs are the same protocol (one_run): grouped by width and configuration;
    # a (width, configuration, seed) measured twice counts once, the later line
    runs: dict[tuple, dict] = {}
    for r in rows:
        if r["section"] in ("qat", "ablation"):
            runs[(r["bits"], r["config"], r["seed"])] = r
    groups: dict[tuple, list[dict]] = {}
    for (bits, name, _seed), r in sorted(runs.items(), key=lambda kv: kv[0]):
        groups.setdefault((bits, name), []).append(r)
    if groups:
        print("\n| bits | config | seeds | val top-1 mean | test top-1 mean | spread (std) | min - max | q/k/v entropy "
              "| CPU s/run |\n|---:|---|---:|---:|---:|---:|---|---:|---:|")
        for (bits, name), rs in groups.items():
            tops = [r["top1"] * 100 for r in rs]
            ent = [r["spikes_after"]["entropy_qkv"] for r in rs if "spikes_after" in r]
            print(f"| W{bits} | {name} | {len(rs)} | {statistics.mean(r['val_top1'] * 100 for r in rs):.2f} "
                  f"| {statistics.mean(tops):.2f} | {f'{statistics.stdev(tops):.2f}' if len(tops) > 1 else '-'} "
                  f"| {min(tops):.2f} - {max(tops):.2f} | {f'{statistics.mean(ent):.3f}' if ent else '-'} "
                  f"| {statistics.mean(r['cpu_s'] for r in rs):.0f} |")
        print("\nCPU s/run measured on: " + _machines([r for rs in groups.values() for r in rs]))
    if args.per_seed:
        _per_seed(groups)
    _paired(groups)
    diag = [r for r in rows if r["section"] == "diagnosis"]
    if diag:
        print("\n| model | bits | q/k/v entropy (bits, mean) | per block |\n|---|---:|---:|---|")
        for r in diag:
            per = ", ".join(f"{k} {v:.2f}" for k, v in r["entropy"].items())
            print(f"| {r['config']} | {r['bits']} | {r['entropy_qkv']:.3f} | {per} |")


def _machines(rows: list[dict]) -> str:
    """Which CPUs the runs were timed on (rows written before the machine was recorded: unrecorded)."""
    counts = Counter(f"{m['cpu']} ({m.get('cpu_id') or 'model unknown'}), {m['torch_threads']} thread(s)"
                     if (m := r.get("machine")) else "unrecorded" for r in rows)
    return "; ".join(f"{name} ({n} runs)" for name, n in counts.items())


def _kept(r: dict) -> str:
    """What a run kept, chosen on validation: the converted input, or the model after some step."""
    return f"step {r['best_epoch'] * r['limit_train_batches']}" if r["kept"] == "model" else r["kept"]


def _per_seed(groups: dict[tuple, list[dict]]) -> None:
    """One line per run: the numbers behind each mean, for tables that list the seeds."""
    print("\n| bits | config | seed | input val top-1 | val top-1 | test top-1 | kept | q/k/v entropy | CPU s |"
          "\n|---:|---|---:|---:|---:|---:|---|---:|---:|")
    for (bits, name), rs in groups.items():
        for r in rs:
            ent = r["spikes_after"]["entropy_qkv"] if "spikes_after" in r else None
            print(f"| W{bits} | {name} | {r['seed']} | {r['input_val_top1'] * 100:.2f} "
                  f"| {r['val_top1'] * 100:.2f} | {r['top1'] * 100:.2f} | {_kept(r)} "
                  f"| {f'{ent:.3f}' if ent is not None else '-'} | {r['cpu_s']:.0f} |")


def _paired(groups: dict[tuple, list[dict]]) -> None:
    """Each configuration minus the baseline of the same width, seed by seed (same seed, same data
    order): the differences a mean over a few seeds can hide."""
    lines = []
    for (bits, name), rs in groups.items():
        base = {r["seed"]: r for r in groups.get((bits, "baseline"), [])}
        pairs = [(r, base[r["seed"]]) for r in rs if name != "baseline" and r["seed"] in base]
        if pairs:
            test = [(r["top1"] - b["top1"]) * 100 for r, b in pairs]
            val = [(r["val_top1"] - b["val_top1"]) * 100 for r, b in pairs]
            lines.append(f"| W{bits} | {name} | {', '.join(str(r['seed']) for r, _ in pairs)} "
                         f"| {' / '.join(f'{d:+.2f}' for d in test)} ({statistics.mean(test):+.2f}) "
                         f"| {' / '.join(f'{d:+.2f}' for d in val)} ({statistics.mean(val):+.2f}) |")
    if lines:
        print("\n| bits | config minus baseline | seeds | test, per seed (mean) | val, per seed (mean) |"
              "\n|---:|---|---|---|---|\n" + "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["ptq", "qat", "ablation", "diagnosis", "table", "plot"])
    ap.add_argument("--model", default="qsd_tiny_fmnist",
                    help="a bundled model (qsdcompress list) or a float .qsd file of the data")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--bits", type=int, nargs="+", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=list(ABLATION), choices=list(ABLATION))
    ap.add_argument("--steps", type=int, default=300, help="QAT optimizer steps per run (batch 64)")
    ap.add_argument("--val-every", type=int, default=100, help="validate every this many steps")
    ap.add_argument("--bn", nargs="+", choices=["float", "re-estimated"], default=["float", "re-estimated"],
                    help="ptq and diagnosis: BatchNorm statistics after quantizing")
    ap.add_argument("--ie-lif", nargs="+", choices=list(PTQ_IE_LIF), default=list(PTQ_IE_LIF),
                    help="ptq: the IE-LIF variants converted")
    ap.add_argument("--models", nargs="+", default=["float", "ptq"], help="diagnosis: include the float model")
    ap.add_argument("--figure", default=str(Path(__file__).resolve().parent / "fmnist_qkv_histograms.png"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-seed", action="store_true", help="table: also list every run, seed by seed")
    ap.add_argument("--again", action="store_true", help="ptq/qat/ablation: rerun what is already in --out")
    ap.add_argument("--out", default=None, help="default: benchmarks/fmnist_results[_MODEL].jsonl")
    a = ap.parse_args()
    suffix = "" if a.model == "qsd_tiny_fmnist" else f"_{Path(a.model).stem}"
    a.out = a.out or str(Path(__file__).resolve().parent / f"fmnist_results{suffix}.jsonl")
    a.bits = a.bits or {"ptq": [8, 4, 3, 2, 1], "qat": [4, 3, 2, 1], "ablation": [2, 4],
                        "diagnosis": [4, 2]}.get(a.what, [])
    torch.set_num_threads(a.threads)
    fm = None if a.what in ("table", "plot") else q.load(a.model).eval()
    {"ptq": ptq, "qat": qat, "ablation": ablation, "diagnosis": diagnosis, "table": table, "plot": plot}[a.what](a, fm)


if __name__ == "__main__":
    main()
