"""Mixed precision vs uniform widths: size against test top-1, after PTQ and after the same short QAT.

    python benchmarks/mixed_precision.py --data fashion-mnist --threads 1 \\
        --json-out mp.json --plot docs/mixed_precision_pareto.png

On ``--model`` (default the bundled ``qsd_tiny_fmnist``; ``qsd_8_256_fmnist`` is the reference topology):

* uniform W1, W2, W3, W4, W8 (``convert --bits B``);
* mixed plans (``convert --target-size-mb``) at the size of uniform W2, of uniform W3 and at
  ``--smaller`` (0.85) times the size of uniform W3, all from one sensitivity table measured on
  ``--samples`` (256) validation images;
* each converted model (PTQ) and each after QAT: ``finetune`` for ``--qat-steps`` optimizer steps
  (``--qat-epoch-steps`` per epoch; the epoch, or the input, kept on validation), teacher the float
  SNN itself (logit KD + FGD), batch 64, one run per seed in ``--seeds``, identical for every variant.

Every choice (sensitivity, plan, kept epoch) uses the validation split; test top-1 is measured once
per model on the whole test split. Prints one JSON line per model, then a markdown table and the
target check: at the size of uniform W3, mixed after QAT at least 0.5 point above uniform W3 after
QAT, or uniform W3's accuracy reached at >= 15% smaller size.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import qsdcompress as q
from qsdcompress.provenance import cpu_name
from qsdcompress.loading import model_file
from qsdcompress.mixed import Budget, convert_to_budget, measure_sensitivity, validation_batches
from qsdcompress.quant import QuantConfig, convert
from qsdcompress.sizing import model_size
from qsdcompress.train import finetune

UNIFORM = (1, 2, 3, 4, 8)


def log(row: dict) -> None:
    print(json.dumps(row), flush=True)


def test_top1(model, data: str) -> float:
    return q.eval(model, data=data, batch_size=256)["top1"]


def qat(model, args, seed: int) -> dict:
    """The fixed QAT budget from ``model`` (left unchanged); test top-1 of the kept model."""
    with tempfile.TemporaryDirectory() as d:
        r = finetune(copy.deepcopy(model), teacher=str(model_file(args.model)), data=args.data, seed=seed,
                     steps=args.qat_steps, limit_train_batches=args.qat_epoch_steps, batch_size=64,
                     eval_max_batches=args.val_batches, eval_batch_size=256, workdir=d, threads=args.threads)
        top1 = test_top1(r["output"], args.data)
    return {"seed": seed, "test_top1": top1, "val_top1": r["val_top1"], "kept_epoch": r["best_epoch"],
            "kept": r["kept"], "input_val_top1": r["input_val_top1"]}


def _wanted(name: str, only: list[str] | None) -> bool:
    return not only or any(name.startswith(p) for p in only)


def variants(float_model, args, table_path: Path):
    """(name, converted model, info) for the uniform widths and the mixed plans, converted one at a
    time as they are wanted (``--only``); the sizes of uniform W2 and W3 set the mixed targets."""
    sizes = {}
    for b in UNIFORM:
        wanted = _wanted(f"uniform W{b}", args.only)
        if not wanted and b not in (2, 3):
            continue
        m = convert(float_model, QuantConfig(bits=b, calib_data=args.data))
        sizes[b] = model_size(m)["size_bytes"]
        if wanted:
            yield f"uniform W{b}", m, {"bits": b}
    targets = [("mixed @ W2 size", sizes[2]), ("mixed @ W3 size", sizes[3]),
               (f"mixed @ {args.smaller:g} x W3 size", int(args.smaller * sizes[3]))]
    for name, size in targets:
        if not _wanted(name, args.only):
            continue
        budget = Budget(target_size_mb=size / 1e6, samples=args.samples, sensitivity=str(table_path))
        m, plan = convert_to_budget(float_model, QuantConfig(calib_data=args.data), budget)
        yield name, m, {"target_bytes": size, "groups": plan["groups"],
                        "predicted_kl": plan["predicted"]["kl"], "measured_kl": plan["measured"]["kl"]}


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        tops = [s["test_top1"] for s in r["qat"]]
        out.append({**r, "qat_mean": statistics.mean(tops) if tops else None,
                    "qat_std": statistics.stdev(tops) if len(tops) > 1 else 0.0})
    return out


def markdown(rows: list[dict], float_top1: float) -> str:
    lines = [f"float test top-1 {float_top1 * 100:.2f}%", "",
             "| model | size (bytes) | size vs W3 | PTQ val top-1 | PTQ test top-1 | QAT test top-1 (mean +- std) | per seed |",
             "|---|---:|---:|---:|---:|---:|---|"]
    w3 = next((r["size_bytes"] for r in rows if r["name"] == "uniform W3"), None)  # absent under --only
    for r in rows:
        seeds = ", ".join(f"{s['test_top1'] * 100:.2f}" for s in r["qat"])
        vs_w3 = f"{r['size_bytes'] / w3:.3f}" if w3 else "-"
        lines.append(f"| {r['name']} | {r['size_bytes']:,} | {vs_w3} | {r['ptq_val_top1'] * 100:.2f}% "
                     f"| {r['ptq_test_top1'] * 100:.2f}% | {r['qat_mean'] * 100:.2f}% +- {r['qat_std'] * 100:.2f} "
                     f"| {seeds} |")
    return "\n".join(lines)


def target_check(rows: list[dict]) -> dict | None:
    """At the size of uniform W3: mixed after QAT >= 0.5 point above uniform W3 after QAT, or a mixed
    plan at <= 0.85 x its size reaching its accuracy (QAT means over the seeds); None without the
    two rows it compares."""
    by = {r["name"]: r for r in rows}
    if "uniform W3" not in by or "mixed @ W3 size" not in by:
        return None
    w3, m3 = by["uniform W3"], by["mixed @ W3 size"]
    gain = (m3["qat_mean"] - w3["qat_mean"]) * 100
    small = [r for r in rows if r["name"].startswith("mixed") and r["size_bytes"] <= 0.85 * w3["size_bytes"]]
    reach = [r for r in small if r["qat_mean"] >= w3["qat_mean"]]
    out = {"mixed_at_w3_minus_w3_points": round(gain, 3), "gain_target_met": gain >= 0.5,
           "smaller_target_met": bool(reach)}
    for r in small:
        out[f"{r['name']}: size / W3"] = round(r["size_bytes"] / w3["size_bytes"], 4)
        out[f"{r['name']}: minus W3 points"] = round((r["qat_mean"] - w3["qat_mean"]) * 100, 3)
    return out


def plot(rows: list[dict], float_top1: float, path: str, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, colour in (("uniform", "tab:blue"), ("mixed", "tab:orange")):
        rs = sorted((r for r in rows if r["name"].startswith(kind)), key=lambda r: r["size_bytes"])
        xs = [r["size_bytes"] / 1e3 for r in rs]
        ax.plot(xs, [r["ptq_test_top1"] * 100 for r in rs], "o--", mfc="none", color=colour, alpha=0.6,
                label=f"{kind}, PTQ")
        ax.errorbar(xs, [r["qat_mean"] * 100 for r in rs], yerr=[r["qat_std"] * 100 for r in rs], fmt="o-",
                    color=colour, capsize=3, label=f"{kind}, QAT (mean +- std, {len(rs[0]['qat'])} seeds)")
        for r, x in zip(rs, xs):
            if kind == "uniform":
                ax.annotate(r["name"].split()[-1], (x, r["qat_mean"] * 100), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
    ax.axhline(float_top1 * 100, color="gray", lw=0.8, ls=":", label="float")
    bottom = min(r["qat_mean"] for r in rows) * 100 - 1.5
    below = [r["name"].split()[-1] for r in rows if r["ptq_test_top1"] * 100 < bottom]
    ax.set_ylim(bottom, float_top1 * 100 + 1)
    if below:
        ax.text(0.98, 0.02 + 0.3, f"below the axis after PTQ: {', '.join(below)}", transform=ax.transAxes,
                ha="right", fontsize=7, color="gray")
    ax.set_xlabel("model size (kB, sizing.model_size)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Fashion-MNIST, {model}: uniform vs mixed precision", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qsd_tiny_fmnist",
                    help="a bundled model (qsdcompress list) or a float .qsd file of the data")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=256, help="validation images of the sensitivity and plans")
    ap.add_argument("--qat-steps", type=int, default=40)
    ap.add_argument("--qat-epoch-steps", type=int, default=20)
    ap.add_argument("--val-batches", type=int, default=4, help="validation batches of 256 per QAT epoch")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--smaller", type=float, default=0.85)
    ap.add_argument("--only", nargs="+", default=None, help="run only these variants (by name prefix)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--from-json", default=None, help="re-render the table and plot of an earlier --json-out")
    args = ap.parse_args()
    if args.from_json:
        d = json.loads(Path(args.from_json).read_text())
        print(markdown(d["rows"], d["float_test_top1"]))
        print(json.dumps(target_check(d["rows"])))
        if args.plot:
            plot(d["rows"], d["float_test_top1"], args.plot, d["args"].get("model", "qsd_tiny_fmnist"))
        return
    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    float_model = q.load(args.model).eval()
    float_top1 = test_top1(float_model, args.data)
    batches = validation_batches(float_model, args.data, args.samples)
    table, _, _ = measure_sensitivity(float_model, batches, data=args.data)
    log({"sensitivity_seconds": table.seconds, "samples": table.samples, "float_test_top1": float_top1})
    rows = []
    with tempfile.TemporaryDirectory() as d:
        table_path = Path(d) / "sensitivity.json"
        table_path.write_text(json.dumps(table.to_dict()))
        for name, m, info in variants(float_model, args, table_path):
            val = q.eval(m, data=args.data, split="val", batch_size=256, max_batches=args.val_batches)["top1"]
            row = {"name": name, "size_bytes": model_size(m)["size_bytes"], "ptq_val_top1": val,
                   "ptq_test_top1": test_top1(m, args.data), **info, "qat": []}
            for seed in args.seeds:
                row["qat"].append(qat(m, args, seed))
                log({"name": name, **row["qat"][-1]})
            log({k: v for k, v in row.items() if k != "qat"})
            rows.append(row)
    rows = summarise(rows)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    meta = {"machine": f"{cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
            "cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1), "args": vars(args)}
    print("\n" + markdown(rows, float_top1))
    meta["target"] = target_check(rows)
    print(json.dumps(meta))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"float_test_top1": float_top1, "rows": rows, **meta}, indent=1))
    if args.plot:
        plot(rows, float_top1, args.plot, args.model)


if __name__ == "__main__":
    main()
