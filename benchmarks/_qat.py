"""What the finetuning benchmarks share: the ablation's configurations, one convert + finetune
run measured in wall and process-CPU seconds, and the q/k/v spike diagnosis of a model."""
from __future__ import annotations

import tempfile
import time

import torch
import torch.nn as nn

import qsdcompress as q
from qsdcompress.data import DataConfig, build_loader, data_name, first_samples
from qsdcompress.distill import BUNDLED_VITS
from qsdcompress.loading import model_file
from qsdcompress.quant import QuantConfig, convert
from qsdcompress.reporting.accounting import SpikeRecorder, qkv_neurons, spike_statistics
from qsdcompress.train import finetune
from qsdcompress.zoo import bundled_path

# name -> (convert options, finetune options); every run starts from the same float model
ABLATION = {
    "baseline": (dict(ie_lif="none"), dict(lambda_kd=0.0, lambda_fgd=0.0)),
    "+ie_lif": (dict(ie_lif="qkv"), dict(lambda_kd=0.0, lambda_fgd=0.0)),
    "+ie_lif(rectify)": (dict(ie_lif="qkv", ie_lif_init="rectify"), dict(lambda_kd=0.0, lambda_fgd=0.0)),
    # rectify init faded in from the plain neuron over the first validation interval (100 steps)
    "+ie_lif(rectify, warm-up)": (dict(ie_lif="qkv", ie_lif_init="rectify"),
                                  dict(lambda_kd=0.0, lambda_fgd=0.0, ie_lif_warmup=100)),
    "+fgd": (dict(ie_lif="none"), dict(lambda_kd=0.0, lambda_fgd=1.0)),
    "+both": (dict(ie_lif="qkv"), dict(lambda_kd=0.0, lambda_fgd=1.0)),
    "kd": (dict(ie_lif="none"), dict(lambda_kd=1.0, lambda_fgd=0.0)),
    "full": (dict(ie_lif="qkv"), dict(lambda_kd=1.0, lambda_fgd=1.0)),
    "full(rectify)": (dict(ie_lif="qkv", ie_lif_init="rectify"), dict(lambda_kd=1.0, lambda_fgd=1.0)),
    "full(ie_lif attention)": (dict(ie_lif="attention"), dict(lambda_kd=1.0, lambda_fgd=1.0)),
    # the teacher is the float SNN itself (the bundled one of the data): for when the counterpart
    # ANN is weaker than the student
    "full(teacher float snn)": (dict(ie_lif="qkv"), dict(lambda_kd=1.0, lambda_fgd=1.0, teacher="float")),
    "baseline+kd(teacher float snn)": (dict(ie_lif="none"), dict(lambda_kd=1.0, lambda_fgd=0.0, teacher="float")),
    # the cross-architecture teacher: the bundled small ViT of the data (vit_digits, vit_fmnist)
    "full(teacher vit)": (dict(ie_lif="qkv"), dict(lambda_kd=1.0, lambda_fgd=1.0, teacher="vit")),
}


def resolve_teacher(teacher: str, data: str, float_model_file: str | None = None) -> str:
    """``float``: the float SNN (``float_model_file``, a file or bundled name; default the bundled
    SNN of ``data``); ``vit``: the bundled ViT of ``data``; else as given."""
    if teacher == "float":
        return str(model_file(float_model_file)) if float_model_file else str(bundled_path(data=data))
    if teacher == "vit":
        name = next((name for name, vit in BUNDLED_VITS.items() if vit.data == data_name(data)), None)
        if name is None:
            raise ValueError(f"no bundled ViT teacher for data {data!r} (bundled: "
                             f"{', '.join(f'{n} ({v.data})' for n, v in BUNDLED_VITS.items())})")
        return name
    return teacher


@torch.no_grad()
def spike_diagnosis(model: nn.Module, data: str, images: int = 1000) -> dict:
    """Entropy (bits) of the q/k/v spikes per block, their mean, and the summed level histogram of
    q/k/v, on the first ``images`` validation images."""
    loader = build_loader(data, "val", DataConfig.from_model(model), batch_size=250)
    model.eval()
    with SpikeRecorder(model, histograms=qkv_neurons(model)) as rec:
        for x, _ in first_samples(loader, images):
            model(x)
    stats = spike_statistics(model, rec)
    hist = sum(rec.hist[n] for n in rec.hist)
    return {"entropy": {k[len("entropy."):]: round(v, 4) for k, v in stats.items() if k.startswith("entropy.")},
            "entropy_qkv": round(stats.get("entropy_qkv", float("nan")), 4),
            "qkv_histogram": [int(c) for c in hist]}


def one_run(float_model: nn.Module, data: str, bits: int, convert_opts: dict, seed: int = 0,
            diagnose: bool = False, float_model_file: str | None = None, **ft) -> dict:
    """convert (calibrated on ``data``) then finetune with ``ft``; the kept model's test top-1.
    ``float_model_file`` names ``float_model``'s file (the ``float`` teacher)."""
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    model = convert(float_model, QuantConfig(bits=bits, calib_data=data, **convert_opts))
    teacher = resolve_teacher(ft.pop("teacher", "ann"), data, float_model_file)
    with tempfile.TemporaryDirectory() as d:
        r = finetune(model, teacher=teacher, data=data, workdir=d, seed=seed, **ft)
        out = {"bits": bits, **convert_opts, "seed": seed, **ft, "teacher": teacher,
               "input_val_top1": r["input_val_top1"],
               "val_top1": r["val_top1"], "top1": r["top1"], "kept": r["kept"], "best_epoch": r["best_epoch"],
               "steps": r["steps"]}
        if diagnose:
            out["spikes_after"] = spike_diagnosis(q.load(r["output"]), data)
    out.update(wall_s=round(time.perf_counter() - t0, 1), cpu_s=round(time.process_time() - c0, 1))
    return out
