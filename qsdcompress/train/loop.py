"""Quantization-aware finetuning with distillation: the training loop behind ``qsdcompress finetune``.

``L = CE + lambda_kd * tau^2 * KL(teacher || student) + lambda_fgd * FGD`` (docs/method.md §5)
with timm's AdamW and cosine schedule (warmup), its own learning rate for quantizer scales and
IE-LIF parameters, gradient clipping, AMP on CUDA, optional EMA, evaluation each epoch keeping
the best model, a metrics CSV, and bit-exact resumable checkpoints (``checkpoint.py``).

It reads like timm's ``train.py``: :func:`setup` builds a :class:`Run` (model, teacher, data,
optimizer, progress), :func:`train_one_epoch` steps through one epoch, :func:`validate`
evaluates, :func:`finish` keeps the best model and writes it.

The protocol is honest: epochs are compared on the validation split (a held-out part of the
training data) only; the input model is measured there first, and if no epoch beats it the
output is the input (``kept: "input"``). An epoch beats the best so far with a higher val top-1,
or the same top-1 and a lower val loss (on a small validation split many epochs tie on top-1,
and the loss still tells them apart). The test split is measured once, on the kept model.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..config import FinetuneConfig
from ..data import DataConfig, build_dataset, build_loader, data_for, same_data
from ..distill import QKVCapture, Teacher, fgd_loss, kd_loss, layer_map, load_teacher
from ..errors import QsdError
from ..io import atomic_write_text, ensure_writable_dir
from ..provenance import machine_description, package_versions
from ..loading import load, locate_model, save
from ..metrics import evaluate
from ..neurons import IELIF, iter_neurons
from ..quant import attach_lsq_grad_scale
from ..reporting.accounting import SpikeRecorder, qkv_neurons, spike_statistics
from ..results import FinetuneResult
from ..ui import console, progress_bar
from ..zoo import lookup
from .checkpoint import (CHECKPOINT_NAME, checkpoint_options, checkpoint_path, load_checkpoint, rng_state,
                         save_checkpoint, set_rng_state)
from .distributed import DistInfo, init_distributed, sync_running_stats, unwrap
from .optim import build_optimizer, build_scheduler

LOSS_PARTS = ("loss", "ce", "kd", "fgd")


def _zero_sums() -> dict[str, float]:
    """Running sums of one epoch: the loss parts, steps, seconds and images."""
    return {k: 0.0 for k in (*LOSS_PARTS, "n", "seconds", "images")}


@dataclass
class Run:
    """Everything one finetune run holds; the ``progress`` fields are what a checkpoint restores."""

    cfg: FinetuneConfig
    dist: DistInfo
    student: nn.Module
    model: nn.Module                  # the student, DDP-wrapped when world > 1
    data_config: DataConfig
    teacher: Teacher | None
    capture: QKVCapture | None
    mapping: list[int]
    train_ds: Dataset
    sampler: DistributedSampler
    steps_per_epoch: int
    total_steps: int
    epochs: int
    val_loader: DataLoader
    test_loader: DataLoader
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    amp_dtype: torch.dtype | None
    scaler: Any
    run_dir: Path
    output: Path
    source: str
    # progress
    step: int = 0
    start_epoch: int = 0
    start_batch: int = 0
    history: list[dict] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=_zero_sums)
    best: dict[str, Any] = field(default_factory=lambda: {"top1": -1.0, "epoch": -1, "source": "model",
                                                           "top5": 0.0, "loss": float("nan")})
    best_state: dict[str, torch.Tensor] | None = None

    @property
    def checkpoint_file(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME


# --- pieces of the setup -------------------------------------------------------------------------

def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights, the candidate kept as the best model."""
    return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


def ie_lif_blend(step: int, warmup: int) -> float:
    """IE-LIF's share after ``step`` optimizer steps of a ``warmup``-step fade-in (docs/method.md §4)."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


def ie_lif_neurons(model: nn.Module) -> list[IELIF]:
    return [n for _, n in iter_neurons(model) if isinstance(n, IELIF)]


def set_ie_lif_blend(model: nn.Module, blend: float) -> None:
    """Set every IE-LIF's ``blend``."""
    for n in ie_lif_neurons(model):
        n.blend = float(blend)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)


def resolve_input(cfg: FinetuneConfig) -> Path:
    """The converted model to finetune (the one rule of :func:`locate_model`)."""
    return locate_model(cfg.model, cfg.workdir, cfg.data, "converted")


def _amp_setup(cfg: FinetuneConfig, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """Autocast dtype (None: fp32) and GradScaler (fp16 only). AMP runs only on CUDA."""
    if device.type != "cuda" or cfg.amp == "off":
        return None, None
    if cfg.amp not in ("auto", "bf16", "fp16"):
        raise QsdError(f"--amp {cfg.amp}: use auto, bf16, fp16 or off")
    if cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def epoch_batches(sampler: DistributedSampler, epoch: int, batch_size: int, limit: int | None) -> list[list[int]]:
    """This rank's batches of one epoch: a pure function of (seed, epoch, rank)."""
    sampler.set_epoch(epoch)
    idx = list(sampler)
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches = batches[:-1]  # BatchNorm dislikes a tiny last batch
    return batches[:limit] if limit else batches


def _teacher(cfg: FinetuneConfig, student: nn.Module, di: DistInfo) -> Teacher | None:
    if cfg.lambda_kd <= 0 and cfg.lambda_fgd <= 0:
        return None
    bundled = lookup(cfg.teacher)
    if bundled is not None and cfg.data and not same_data(bundled.data, cfg.data):
        raise QsdError(f"teacher {cfg.teacher} was trained on {bundled.data}, the data is {cfg.data}: "
                       f"use a teacher of {cfg.data} (`qsdcompress list`) or --teacher ann")
    teacher = load_teacher(cfg.teacher, student, cfg.teacher_checkpoint, capture=cfg.lambda_fgd > 0,
                           img_size=cfg.teacher_img_size)
    teacher.to(di.device)
    num_classes = int(getattr(student, "num_classes", 0) or 0)
    if cfg.lambda_kd > 0 and teacher.num_classes != num_classes:
        raise QsdError(f"teacher {cfg.teacher} predicts {teacher.num_classes} classes, the student "
                       f"{num_classes}: use --lambda-kd 0 (FGD only) or a teacher of the same classes")
    return teacher


def _data(cfg: FinetuneConfig, student: nn.Module, sdc: DataConfig, di: DistInfo) -> dict[str, Any]:
    """Training set and sampler (the epoch order is a function of (seed, epoch) only), step counts,
    and the evaluation loader."""
    num_classes = int(getattr(student, "num_classes", 0) or 0)
    train_ds = build_dataset(cfg.data, "train", sdc, num_classes=num_classes, train_aug=True)
    sampler = DistributedSampler(train_ds, num_replicas=di.world, rank=di.rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = len(epoch_batches(sampler, 0, cfg.batch_size, cfg.limit_train_batches))
    if steps_per_epoch == 0:
        raise QsdError(f"data {cfg.data!r} has no training batches")
    total_steps = int(cfg.steps) if cfg.steps else cfg.epochs * steps_per_epoch
    loaders = {f"{split}_loader": build_loader(cfg.data, split, sdc, batch_size=cfg.eval_batch_size,
                                               num_classes=num_classes, num_workers=cfg.num_workers)
               for split in ("val", "test")}
    return {"train_ds": train_ds, "sampler": sampler, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "epochs": math.ceil(total_steps / steps_per_epoch), **loaders}


def setup(cfg: FinetuneConfig, model: nn.Module | None, di: DistInfo) -> Run:
    """Build the run; restore it from the checkpoint when resuming."""
    seed_everything(cfg.seed)
    cfg.validate()
    workdir = Path(cfg.workdir)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else workdir / "finetune"
    output = Path(cfg.output) if cfg.output else workdir / "finetuned.qsd"
    if di.main:
        ensure_writable_dir(run_dir, "run directory")
        ensure_writable_dir(output.parent)
    ckpt = load_checkpoint(checkpoint_path(cfg.resume, workdir, run_dir)) if cfg.resume else None
    source = "model"
    if model is None:
        src = resolve_input(cfg)
        source, model = str(src), load(src)
    cfg.data = data_for(model, cfg.data, source)
    student = model.to(di.device)
    if cfg.ie_lif_warmup and not ie_lif_neurons(student):
        raise QsdError(f"--ie-lif-warmup {cfg.ie_lif_warmup}: the model has no IE-LIF neurons "
                       f"(convert with --ie-lif qkv, or drop the option)")
    sdc = DataConfig.from_model(student)
    teacher = _teacher(cfg, student, di)
    data = _data(cfg, student, sdc, di)
    if ckpt is not None:  # weights before the optimizer (Brevitas replaces scale Parameters on load)
        student.load_state_dict(ckpt["model"])
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(student, decay=cfg.ema_decay)
        if ckpt is not None and ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
    capture = QKVCapture(student, "snn") if cfg.lambda_fgd > 0 else None
    mapping = layer_map(capture.num_layers, teacher.num_layers, cfg.fgd_layers) \
        if capture is not None and teacher is not None else []
    ddp_model: nn.Module = student
    if di.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            student, device_ids=[di.device.index] if di.device.type == "cuda" else None)
    attach_lsq_grad_scale(student)  # after loading: load_state_dict replaces the scale Parameters
    optimizer = build_optimizer(student, cfg)
    amp_dtype, scaler = _amp_setup(cfg, di.device)
    run = Run(cfg=cfg, dist=di, student=student, model=ddp_model, data_config=sdc, teacher=teacher,
              capture=capture, mapping=mapping, ema=ema, optimizer=optimizer,
              scheduler=build_scheduler(optimizer, cfg, data["total_steps"]), amp_dtype=amp_dtype, scaler=scaler,
              run_dir=run_dir, output=output, source=source, **data)
    if ckpt is not None:
        _restore(run, ckpt)
    else:  # the bar every epoch must clear: the input model on validation
        r = evaluate(student, run.val_loader, di.device, description="eval input", max_batches=cfg.eval_max_batches)
        run.best = {"top1": r["top1"], "top5": r["top5"], "loss": r["loss"], "epoch": 0, "source": "input",
                    "input_top1": r["top1"], "input_loss": r["loss"]}
        run.best_state = snapshot(student)
    run.scheduler.step_update(run.step)
    return run


def _restore(run: Run, ckpt: dict[str, Any]) -> None:
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.step, run.start_epoch, run.start_batch = (int(ckpt["progress"][k]) for k in ("step", "epoch", "batch"))
    run.history = list(ckpt["history"])
    run.sums = dict(ckpt["acc"])
    run.best = dict(ckpt["best"])
    run.best_state = ckpt.get("best_state") or None
    set_rng_state(ckpt["rng"])
    if run.dist.main:
        console.print(f"resuming {run.checkpoint_file if run.cfg.resume == 'auto' else run.cfg.resume} at step "
                      f"{run.step} (epoch {run.start_epoch + 1}, batch {run.start_batch})")


def write_run_config(run: Run) -> None:
    """The full resolved configuration, package versions and machine, next to the outputs."""
    import yaml

    resolved = {**run.cfg.to_dict(), "resolved": {
        "input": run.source, "output": str(run.output), "run_dir": str(run.run_dir),
        "teacher": run.teacher.name if run.teacher else None, "total_steps": run.total_steps,
        "epochs": run.epochs, "steps_per_epoch": run.steps_per_epoch, "world_size": run.dist.world,
        "device": str(run.dist.device), "amp": str(run.amp_dtype) if run.amp_dtype else "off",
        "fgd_layer_map": run.mapping}, "versions": package_versions(), "machine": machine_description()}
    atomic_write_text(run.run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    atomic_write_text(run.run_dir / "config.json", json.dumps(resolved, indent=2))


# --- checkpoints and metrics ---------------------------------------------------------------------

def save_run(run: Run, epoch: int, batch: int, on_checkpoint: Callable | None = None) -> None:
    """Checkpoint the run at (epoch, batch) on rank 0; every rank waits for it."""
    if run.dist.main:
        save_checkpoint(run.checkpoint_file, {
            "model": run.student.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict() if run.scaler else {},
            "ema": run.ema.state_dict() if run.ema is not None else {}, "rng": rng_state(),
            "progress": {"step": run.step, "epoch": epoch, "batch": batch}, "acc": dict(run.sums),
            "history": run.history, "best": run.best, "best_state": run.best_state or {},
            "config": run.cfg.to_dict()})
    if run.dist.world > 1:
        dist.barrier()
    if on_checkpoint is not None:
        on_checkpoint(run.step, run.checkpoint_file)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# --- training ------------------------------------------------------------------------------------

def compute_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig,
                   teacher: Teacher | None = None, capture: QKVCapture | None = None,
                   mapping: list[int] | None = None, student_cfg: DataConfig | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, ce, kd, fgd)`` of one batch: ``CE + lambda_kd * KD + lambda_fgd * FGD``."""
    logits = model(x)
    ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    kd = fgd = ce.new_zeros(())
    if teacher is not None:
        t_logits, t_layers, t_grids = teacher(x, student_cfg or DataConfig.from_model(unwrap(model)))
        if cfg.lambda_kd > 0:
            kd = kd_loss(logits, t_logits, cfg.tau)
        if capture is not None:
            s_layers = capture.pop()
            grid = next(iter(capture.grids.values()))
            fgd = fgd_loss(s_layers, t_layers, mapping or [], grid, t_grids)
    return ce + cfg.lambda_kd * kd + cfg.lambda_fgd * fgd, ce, kd, fgd


def _check_finite(run: Run, loss: torch.Tensor, ce: torch.Tensor, kd: torch.Tensor, fgd: torch.Tensor) -> None:
    """Stop every rank on a non-finite loss, naming the parts and the last good checkpoint."""
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=run.dist.device)
    if run.dist.world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        kept = f"the last good checkpoint is {run.checkpoint_file}" if run.checkpoint_file.exists() else \
            "no checkpoint was written yet"
        raise QsdError(f"non-finite loss at step {run.step + 1} (ce={ce.item():.4g}, kd={kd.item():.4g}, "
                       f"fgd={fgd.item():.4g}); stopped, {kept}; try a lower --lr or --amp off")


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """One optimizer step; returns the loss parts."""
    cfg = run.cfg
    x, y = x.to(run.dist.device, non_blocking=True), y.to(run.dist.device, non_blocking=True)
    autocast = torch.autocast("cuda", dtype=run.amp_dtype) if run.amp_dtype else nullcontext()
    if run.step < cfg.ie_lif_warmup:  # after it every blend stays 1 (validate sets 1 from then on)
        set_ie_lif_blend(run.student, ie_lif_blend(run.step + 1, cfg.ie_lif_warmup))
    with autocast:
        loss, ce, kd, fgd = compute_losses(run.model, x, y, cfg, run.teacher, run.capture, run.mapping,
                                           run.data_config)
    _check_finite(run, loss, ce, kd, fgd)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.student.parameters(), cfg.clip_grad)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.step += 1
    run.scheduler.step_update(run.step)
    if run.ema is not None:
        run.ema.update(run.student, step=run.step)
    return {"loss": loss.item(), "ce": ce.item(), "kd": kd.item(), "fgd": fgd.item()}


def train_one_epoch(run: Run, epoch: int, on_step: Callable | None = None,
                    on_checkpoint: Callable | None = None) -> None:
    """The steps of one epoch (from the resume position), with progress and mid-epoch checkpoints."""
    cfg = run.cfg
    batches = epoch_batches(run.sampler, epoch, cfg.batch_size, cfg.limit_train_batches)
    first = run.start_batch if epoch == run.start_epoch else 0
    todo = batches[first:][:run.total_steps - run.step]
    loader = DataLoader(run.train_ds, batch_sampler=todo, num_workers=cfg.num_workers)
    run.student.train()
    with progress_bar(f"finetune epoch {epoch + 1}/{run.epochs}", len(batches)) as (bar, task):
        bar.update(task, completed=first)
        for i, (x, y) in enumerate(loader):
            t0 = time.perf_counter()
            parts = train_step(run, x, y)
            for k, v in parts.items():
                run.sums[k] += v
            run.sums["n"] += 1
            run.sums["seconds"] += time.perf_counter() - t0
            run.sums["images"] += len(y) * run.dist.world
            ips = run.sums["images"] / max(run.sums["seconds"], 1e-9)
            bar.update(task, advance=1, info=" ".join(f"{k} {v:.3f}" for k, v in parts.items()) + f" | {ips:.0f} img/s")
            if on_step is not None:
                on_step(run.step, parts)
            position = first + i + 1
            if cfg.save_every and run.step % cfg.save_every == 0 and position < len(batches) \
                    and run.step < run.total_steps:
                save_run(run, epoch, position, on_checkpoint)


def validate(run: Run, epoch: int) -> dict:
    """Top-1/top-5/loss of the student (and its EMA, which wins when better) on the validation
    split, with the student's spike statistics on the same batches (firing rate per stage,
    entropy of the q/k/v spikes per block). During an IE-LIF warm-up the model is not yet the one
    a checkpoint holds (``blend`` is not state), so it is measured but cannot be kept."""
    cfg = run.cfg
    blend = ie_lif_blend(run.step, cfg.ie_lif_warmup)
    if cfg.ie_lif_warmup:
        for m in (run.student, run.ema.module if run.ema is not None else None):
            if m is not None:
                set_ie_lif_blend(m, blend)
    if run.capture is not None:
        run.capture.enabled = False
    with SpikeRecorder(run.student, histograms=qkv_neurons(run.student)) as rec:
        r = evaluate(run.student, run.val_loader, run.dist.device, description=f"eval epoch {epoch + 1}",
                     max_batches=cfg.eval_max_batches)
    out = {"top1": r["top1"], "top5": r["top5"], "loss": r["loss"], "samples": r["samples"], "source": "model",
           "spikes": spike_statistics(run.student, rec), "ie_lif_blend": blend}
    if run.ema is not None:
        re = evaluate(run.ema.module, run.val_loader, run.dist.device, description=f"eval EMA epoch {epoch + 1}",
                      max_batches=cfg.eval_max_batches)
        out["ema_top1"] = re["top1"]
        if re["top1"] > r["top1"]:
            out.update(top1=re["top1"], top5=re["top5"], loss=re["loss"], source="ema")
    if run.capture is not None:
        run.capture.enabled = True
        run.capture.pop()
    return out


def beats(ev: dict, best: dict) -> bool:
    """A higher val top-1, or the same and a lower val loss."""
    return (ev["top1"], -ev["loss"]) > (best["top1"], -best["loss"])


def end_epoch(run: Run, epoch: int, ev: dict) -> None:
    """Record the epoch's metrics, keep the best model, write the CSV."""
    n = max(run.sums["n"], 1)
    row = {"epoch": epoch + 1, "step": run.step, "lr": run.optimizer.param_groups[0]["lr"],
           **{k: run.sums[k] / n for k in LOSS_PARTS}, "val_top1": ev["top1"], "val_top5": ev["top5"],
           "val_loss": ev["loss"], "kept_from": ev["source"],
           "images_per_s": round(run.sums["images"] / max(run.sums["seconds"], 1e-9), 1)}
    if "ema_top1" in ev:
        row["ema_top1"] = ev["ema_top1"]
    if run.cfg.ie_lif_warmup:
        row["ie_lif_blend"] = ev["ie_lif_blend"]
    row.update(ev["spikes"])
    run.history.append(row)
    if beats(ev, run.best) and ev.get("ie_lif_blend", 1.0) >= 1.0:
        run.best = {"top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"], "epoch": epoch + 1,
                    "source": ev["source"], "input_top1": run.best.get("input_top1"),
                    "input_loss": run.best.get("input_loss")}
        src = run.ema.module if ev["source"] == "ema" and run.ema is not None else run.student
        run.best_state = snapshot(src)
    run.sums = _zero_sums()
    if run.dist.main:
        write_csv(run.run_dir / "metrics.csv", run.history)
        entropy = f", q/k/v entropy {row['entropy_qkv']:.2f} bits" if "entropy_qkv" in row else ""
        console.print(f"epoch {epoch + 1}/{run.epochs}: loss {row['loss']:.4f} (ce {row['ce']:.4f} kd {row['kd']:.4f} "
                      f"fgd {row['fgd']:.4f}) val top1 {ev['top1'] * 100:.2f}% ({ev['source']}){entropy}")


def finish(run: Run, seconds: float) -> FinetuneResult:
    """Keep the best model, write it (rank 0) and return the result."""
    if run.capture is not None:
        run.capture.remove()
    if run.teacher is not None and run.teacher.capture is not None:
        run.teacher.capture.remove()
    if run.best_state:
        run.student.load_state_dict(run.best_state)
    set_ie_lif_blend(run.student, 1.0)  # the kept model is whole IE-LIF (the input or a post-warm-up epoch)
    run.student.eval()
    best, history = run.best, run.history
    test = evaluate(run.student, run.test_loader, run.dist.device, description="test (kept model)",
                    max_batches=run.cfg.eval_max_batches)
    result = FinetuneResult(
        output=str(run.output), top1=test["top1"], top5=test["top5"], loss=test["loss"],
        val_top1=best["top1"], val_top5=best["top5"], val_loss=best["loss"],
        val_images=best.get("samples"), test_images=test["samples"],
        input_val_top1=best.get("input_top1"), input_val_loss=best.get("input_loss"),
        best_epoch=best["epoch"], kept=best["source"], epochs=len(history), steps=run.step,
        losses={k: history[-1][k] for k in LOSS_PARTS} if history else {},
        history=history, teacher=run.teacher.name if run.teacher else None, input=run.source,
        run_dir=str(run.run_dir), metrics_csv=str(run.run_dir / "metrics.csv"), world_size=run.dist.world,
        seconds=round(seconds, 1))
    if run.dist.main:
        save(run.student, run.output, kind="finetuned", keep_float=run.cfg.keep_float,
             finetune={"config": run.cfg.to_dict(), "top1": test["top1"], "val_top1": best["top1"],
                       "kept": best["source"], "best_epoch": best["epoch"],
                       "epochs": len(history), "steps": run.step, "teacher": result.teacher, "input": run.source})
    if run.dist.world > 1:
        dist.barrier()
    return result


def run_finetune(cfg: FinetuneConfig, model: nn.Module | None = None,
                 on_step: Callable[[int, dict], None] | None = None,
                 on_checkpoint: Callable[[int, Path], None] | None = None) -> tuple[nn.Module, FinetuneResult]:
    """Run one finetune; returns the kept (best) model and the result dict.

    ``on_step(step, losses)`` and ``on_checkpoint(step, path)`` are called on every rank after
    each optimizer step / each checkpoint write (hooks for monitoring and tests).
    """
    t_start = time.perf_counter()
    di = init_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not di.main:
        os.environ["QSDCOMPRESS_QUIET"] = "1"
    try:
        run = setup(cfg, model, di)
        if di.main:
            write_run_config(run)
        for epoch in range(run.start_epoch, run.epochs):
            train_one_epoch(run, epoch, on_step, on_checkpoint)
            if di.world > 1:  # the same running statistics on every rank before evaluating
                sync_running_stats(run.student)
                if run.ema is not None:
                    sync_running_stats(run.ema.module)
            end_epoch(run, epoch, validate(run, epoch))
            save_run(run, epoch + 1, 0, on_checkpoint)
            if run.step >= run.total_steps:
                break
        return run.student, finish(run, time.perf_counter() - t_start)
    finally:
        if di.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def finetune(model_or_path: nn.Module | str | os.PathLike | None = None, teacher: str | None = None,
             config: FinetuneConfig | None = None, **options: Any) -> FinetuneResult:
    """Distillation-based QAT of a converted model; writes ``finetuned.qsd`` and returns a summary.

    ``model_or_path``: a model, a ``.qsd`` path, or None for ``<workdir>/converted.qsd``.
    ``options``: any :class:`~qsdcompress.config.FinetuneConfig` field (``epochs=2``,
    ``lambda_fgd=0``, ``workdir=...``).
    """
    base = (config or FinetuneConfig()).to_dict()
    resume = options.get("resume") or base.get("resume")
    if resume and config is None:  # continue the interrupted run with its own options
        base = checkpoint_options(checkpoint_path(resume, options.get("workdir", base["workdir"]),
                                                  options.get("run_dir", base["run_dir"])))
    if teacher is not None:
        options["teacher"] = teacher
    cfg = FinetuneConfig.from_dict({**base, **options})
    model = None
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
    elif model_or_path is not None:
        cfg.model = str(model_or_path)
    _, result = run_finetune(cfg, model)
    return result


__all__ = ["Run", "setup", "train_one_epoch", "train_step", "validate", "end_epoch", "finish", "run_finetune",
           "finetune", "compute_losses", "epoch_batches", "resolve_input", "LOSS_PARTS"]
