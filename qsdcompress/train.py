"""Quantization-aware finetuning with distillation: the training loop behind ``qsdcompress finetune``.

``L = CE + lambda_kd * tau^2 * KL(teacher || student) + lambda_fgd * FGD`` (method.md section 5)
with timm's AdamW and cosine schedule (warmup), its own learning rate for quantizer scales and
IE-LIF parameters, gradient clipping, AMP on CUDA, optional EMA, evaluation each epoch keeping
the best model, a metrics CSV, and checkpoints that make a killed run resumable bit for bit:
the data order is a pure function of (seed, epoch), and every state that changes during
training (weights, optimizer, scheduler, scaler, EMA, RNG, position, running sums) is saved with
plain tensors and containers so ``torch.load(weights_only=True)`` reads it back.

Under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set) the same code runs DDP: gloo on CPU, nccl
on CUDA, each rank a disjoint shard of every epoch; only rank 0 writes files and prints.
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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from .config import FinetuneConfig
from .data import DataConfig, build_dataset, build_loader
from .distill import QKVCapture, Teacher, fgd_loss, kd_loss, layer_map, load_teacher
from .errors import QsdError
from .io import atomic_path, atomic_write_text, package_versions
from .metrics import evaluate
from .ui import console, progress_bar

CHECKPOINT_NAME = "checkpoint.pt"
LOSS_PARTS = ("loss", "ce", "kd", "fgd")


# --- distributed ---------------------------------------------------------------------------------

class DistInfo:
    """Rank, world size and device of this process (world 1 without torchrun)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, device: torch.device | None = None,
                 owns_group: bool = False):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = device or torch.device("cpu")
        self.owns_group = owns_group

    @property
    def main(self) -> bool:
        return self.rank == 0


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QsdError(f"--device {device}: CUDA is not available on this machine")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise QsdError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when its environment is set (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world <= 1:
        return DistInfo(0, 1, 0, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def sync_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm/IE-LIF running statistics) over the ranks and take
    rank 0's integer buffers: DDP keeps parameters in sync, but each rank updates its running
    statistics from its own shard."""
    world = dist.get_world_size()
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(world)
        else:
            dist.broadcast(b, src=0)


# --- parameters, optimizer, schedule -------------------------------------------------------------

def is_quant_param(name: str) -> bool:
    """Quantizer scales (Brevitas ``scaling_impl``, reference LSQ ``alpha``)."""
    return "scaling_impl" in name or name.endswith(".alpha") or ".alpha." in name


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Weights (decayed), norms/biases/layer scales (no decay), quantizer scales and IE-LIF
    parameters (own learning rate, no decay)."""
    ielif_params: set[int] = set()
    try:
        from .neurons import IELIF  # type: ignore[attr-defined]
    except ImportError:
        IELIF = None  # noqa: N806
    if IELIF is not None:
        for m in model.modules():
            if isinstance(m, IELIF):
                ielif_params.update(id(p) for p in m.parameters())
    decay, no_decay, quant = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_quant_param(name) or id(p) in ielif_params:
            quant.append(p)
        elif p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    scale_lr = cfg.scale_lr if cfg.scale_lr is not None else cfg.lr
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "name": "weights"},
              {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr, "name": "no_decay"},
              {"params": quant, "weight_decay": 0.0, "lr": scale_lr, "name": "quant"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    try:
        return create_optimizer_v2(param_groups(model, cfg), opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    except (AssertionError, ValueError) as e:
        raise QsdError(f"--opt {cfg.opt}: {e}") from None


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, total_steps: int):
    from timm.scheduler import CosineLRScheduler

    warm = max(0, min(cfg.warmup_steps, total_steps - 1))
    return CosineLRScheduler(optimizer, t_initial=max(total_steps, 1), lr_min=cfg.min_lr, warmup_t=warm,
                             warmup_lr_init=cfg.warmup_lr, warmup_prefix=False, t_in_epochs=False)


# --- RNG and checkpoints -------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """All RNG states as tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": torch.tensor([int(np_state[2]), int(np_state[3])], dtype=torch.int64),
        "numpy_gauss": torch.tensor([float(np_state[4])], dtype=torch.float64),
        "python": torch.tensor(list(py_state[1]), dtype=torch.int64),
        "python_version": int(py_state[0]),
        "python_gauss": torch.tensor([float("nan") if py_state[2] is None else py_state[2]], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy_key"].numpy().astype(np.uint32), int(s["numpy_pos"][0]),
                         int(s["numpy_pos"][1]), float(s["numpy_gauss"][0])))
    g = float(s["python_gauss"][0])
    random.setstate((s["python_version"], tuple(int(v) for v in s["python"].tolist()),
                     None if math.isnan(g) else g))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic ``torch.save``: a kill during the write leaves the previous checkpoint intact."""
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise QsdError(f"no checkpoint to resume from: {path} (start without --resume)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise QsdError(f"cannot resume from {path}: not a readable finetune checkpoint "
                       f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})") from None


# --- the run -------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _amp_setup(cfg: FinetuneConfig, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """Autocast dtype (None: fp32) and GradScaler (fp16 only). AMP runs only on CUDA."""
    if device.type != "cuda" or cfg.amp == "off":
        return None, None
    if cfg.amp not in ("auto", "bf16", "fp16"):
        raise QsdError(f"--amp {cfg.amp}: use auto, bf16, fp16 or off")
    if cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def _epoch_batches(sampler: DistributedSampler, epoch: int, batch_size: int, limit: int | None) -> list[list[int]]:
    """This rank's batches of one epoch: a pure function of (seed, epoch, rank)."""
    sampler.set_epoch(epoch)
    idx = list(sampler)
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches = batches[:-1]  # BatchNorm dislikes a tiny last batch
    return batches[:limit] if limit else batches


def resolve_input(cfg: FinetuneConfig) -> Path:
    path = Path(cfg.model) if cfg.model else Path(cfg.workdir) / "converted.qsd"
    if not path.exists():
        if cfg.model:
            raise QsdError(f"model not found: {path}")
        raise QsdError(f"{path} not found: run `qsdcompress convert` first (or pass MODEL)")
    return path


def _write_csv(path: Path, rows: list[dict]) -> None:
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


def compute_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig,
                   teacher: Teacher | None = None, capture: QKVCapture | None = None,
                   mapping: list[int] | None = None, student_cfg: DataConfig | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, ce, kd, fgd)`` of one batch: ``CE + lambda_kd * KD + lambda_fgd * FGD``."""
    logits = model(x)
    ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    kd = fgd = ce.new_zeros(())
    if teacher is not None:
        t_logits, t_layers, t_grids = teacher(x, student_cfg or DataConfig.from_model(_unwrap(model)))
        if cfg.lambda_kd > 0:
            kd = kd_loss(logits, t_logits, cfg.tau)
        if capture is not None:
            s_layers = capture.pop()
            grid = next(iter(capture.grids.values()))
            fgd = fgd_loss(s_layers, t_layers, mapping or [], grid, t_grids)
    return ce + cfg.lambda_kd * kd + cfg.lambda_fgd * fgd, ce, kd, fgd


def run_finetune(cfg: FinetuneConfig, model: nn.Module | None = None,
                 on_step: Callable[[int, dict], None] | None = None,
                 on_checkpoint: Callable[[int, Path], None] | None = None) -> tuple[nn.Module, dict]:
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
        return _run(cfg, model, di, on_step, on_checkpoint, t_start)
    finally:
        if di.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: FinetuneConfig, model: nn.Module | None, di: DistInfo, on_step: Callable | None,
         on_checkpoint: Callable | None, t_start: float) -> tuple[nn.Module, dict]:
    from .api import load, save

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))
    random.seed(cfg.seed)
    for name in ("lambda_kd", "lambda_fgd", "tau", "lr"):
        v = getattr(cfg, name)
        if not math.isfinite(v) or v < 0 or (name in ("tau", "lr") and v == 0):
            raise QsdError(f"--{name.replace('_', '-')} must be a finite {'positive' if name in ('tau', 'lr') else 'non-negative'} number, got {v}")
    if cfg.epochs < 1 and not cfg.steps:
        raise QsdError("--epochs must be at least 1 (or give --steps)")
    if cfg.batch_size < 1:
        raise QsdError(f"--batch-size must be at least 1, got {cfg.batch_size}")

    workdir = Path(cfg.workdir)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else workdir / "finetune"
    output = Path(cfg.output) if cfg.output else workdir / "finetuned.qsd"
    ckpt_path = run_dir / CHECKPOINT_NAME
    ckpt: dict[str, Any] | None = None
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path if cfg.resume == "auto" else Path(cfg.resume))
    source = "model"
    if model is None:
        src = resolve_input(cfg)
        source = str(src)
        model = load(src)
    student = model.to(di.device)
    sdc = DataConfig.from_model(student)
    num_classes = int(getattr(student, "num_classes", 0) or 0)

    # teacher
    need_teacher = cfg.lambda_kd > 0 or cfg.lambda_fgd > 0
    teacher: Teacher | None = None
    if need_teacher:
        teacher = load_teacher(cfg.teacher, student, cfg.teacher_checkpoint, capture=cfg.lambda_fgd > 0)
        teacher.to(di.device)
        if cfg.lambda_kd > 0 and teacher.num_classes != num_classes:
            raise QsdError(f"teacher {cfg.teacher} predicts {teacher.num_classes} classes, the student "
                           f"{num_classes}: use --lambda-kd 0 (FGD only) or a teacher of the same classes")

    # data: the epoch order is a function of (seed, epoch) only
    train_ds = build_dataset(cfg.data, "train", sdc, num_classes=num_classes, train_aug=True)
    sampler = DistributedSampler(train_ds, num_replicas=di.world, rank=di.rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = len(_epoch_batches(sampler, 0, cfg.batch_size, cfg.limit_train_batches))
    if steps_per_epoch == 0:
        raise QsdError(f"data {cfg.data!r} has no training batches")
    total_steps = int(cfg.steps) if cfg.steps else cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    test_loader = build_loader(cfg.data, "test", sdc, batch_size=cfg.eval_batch_size, num_classes=num_classes,
                               num_workers=cfg.num_workers)

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
    from .quant import attach_lsq_grad_scale

    attach_lsq_grad_scale(student)  # after loading: load_state_dict replaces the scale Parameters
    optimizer = build_optimizer(student, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    amp_dtype, scaler = _amp_setup(cfg, di.device)

    step, start_epoch, start_batch = 0, 0, 0
    history: list[dict] = []
    acc = {k: 0.0 for k in (*LOSS_PARTS, "n", "seconds", "images")}
    best: dict[str, Any] = {"top1": -1.0, "epoch": -1, "source": "model", "top5": 0.0, "loss": float("nan")}
    best_state: dict[str, torch.Tensor] | None = None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, start_epoch, start_batch = (int(ckpt["progress"][k]) for k in ("step", "epoch", "batch"))
        history = list(ckpt["history"])
        acc = dict(ckpt["acc"])
        best = dict(ckpt["best"])
        best_state = ckpt.get("best_state") or None
        set_rng_state(ckpt["rng"])
        if di.main:
            console.print(f"resuming {ckpt_path if cfg.resume == 'auto' else cfg.resume} at step {step} "
                          f"(epoch {start_epoch + 1}, batch {start_batch})")
    scheduler.step_update(step)

    if di.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {**cfg.to_dict(), "resolved": {
            "input": source, "output": str(output), "run_dir": str(run_dir), "teacher": teacher.name if teacher else None,
            "total_steps": total_steps, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
            "world_size": di.world, "device": str(di.device), "amp": str(amp_dtype) if amp_dtype else "off",
            "fgd_layer_map": mapping}, "versions": package_versions()}
        import yaml

        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_text(run_dir / "config.json", json.dumps(resolved, indent=2))

    def checkpoint(epoch: int, batch: int) -> None:
        if di.main:
            save_checkpoint(ckpt_path, {
                "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                "ema": ema.state_dict() if ema is not None else {}, "rng": rng_state(),
                "progress": {"step": step, "epoch": epoch, "batch": batch}, "acc": dict(acc),
                "history": history, "best": best, "best_state": best_state or {}, "config": cfg.to_json()})
        if di.world > 1:
            dist.barrier()
        if on_checkpoint is not None:
            on_checkpoint(step, ckpt_path)

    def evaluate_all(epoch: int) -> dict:
        if capture is not None:
            capture.enabled = False
        r = evaluate(student, test_loader, di.device, description=f"eval epoch {epoch + 1}",
                     max_batches=cfg.eval_max_batches)
        out = {"top1": r["top1"], "top5": r["top5"], "loss": r["loss"], "source": "model"}
        if ema is not None:
            re = evaluate(ema.module, test_loader, di.device, description=f"eval EMA epoch {epoch + 1}",
                          max_batches=cfg.eval_max_batches)
            out["ema_top1"] = re["top1"]
            if re["top1"] > r["top1"]:
                out.update(top1=re["top1"], top5=re["top5"], loss=re["loss"], source="ema")
        if capture is not None:
            capture.enabled = True
            capture.pop()
        return out

    for epoch in range(start_epoch, epochs):
        batches = _epoch_batches(sampler, epoch, cfg.batch_size, cfg.limit_train_batches)
        first = start_batch if epoch == start_epoch else 0
        todo = batches[first:]
        remaining = total_steps - step
        todo = todo[:remaining]
        loader = DataLoader(train_ds, batch_sampler=todo, num_workers=cfg.num_workers)
        student.train()
        with progress_bar(f"finetune epoch {epoch + 1}/{epochs}", len(batches)) as (bar, task):
            bar.update(task, completed=first)
            for i, (x, y) in enumerate(loader):
                t0 = time.perf_counter()
                x, y = x.to(di.device, non_blocking=True), y.to(di.device, non_blocking=True)
                autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
                with autocast:
                    loss, ce, kd, fgd = compute_losses(ddp_model, x, y, cfg, teacher, capture, mapping, sdc)
                bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=di.device)
                if di.world > 1:
                    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                if bad.item() > 0:
                    kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else \
                        "no checkpoint was written yet"
                    raise QsdError(f"non-finite loss at step {step + 1} (ce={ce.item():.4g}, kd={kd.item():.4g}, "
                                   f"fgd={fgd.item():.4g}); stopped, {kept}; try a lower --lr or --amp off")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                step += 1
                scheduler.step_update(step)
                if ema is not None:
                    ema.update(student, step=step)
                parts = {"loss": loss.item(), "ce": ce.item(), "kd": kd.item(), "fgd": fgd.item()}
                for k, v in parts.items():
                    acc[k] += v
                acc["n"] += 1
                dt = time.perf_counter() - t0
                acc["seconds"] += dt
                acc["images"] += len(y) * di.world
                ips = acc["images"] / max(acc["seconds"], 1e-9)
                bar.update(task, advance=1, info=" ".join(f"{k} {v:.3f}" for k, v in parts.items())
                           + f" | {ips:.0f} img/s")
                if on_step is not None:
                    on_step(step, parts)
                batch_pos = first + i + 1
                if cfg.save_every and step % cfg.save_every == 0 and batch_pos < len(batches) and step < total_steps:
                    checkpoint(epoch, batch_pos)
        # end of epoch: same buffers on every rank, evaluate, keep the best, log, checkpoint
        if di.world > 1:
            sync_buffers(student)
            if ema is not None:
                sync_buffers(ema.module)
        ev = evaluate_all(epoch)
        n = max(acc["n"], 1)
        row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
               **{k: acc[k] / n for k in LOSS_PARTS}, "val_top1": ev["top1"], "val_top5": ev["top5"],
               "val_loss": ev["loss"], "kept_from": ev["source"],
               "images_per_s": round(acc["images"] / max(acc["seconds"], 1e-9), 1)}
        if "ema_top1" in ev:
            row["ema_top1"] = ev["ema_top1"]
        history.append(row)
        if ev["top1"] > best["top1"]:
            best = {"top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"], "epoch": epoch + 1,
                    "source": ev["source"]}
            src_model = ema.module if ev["source"] == "ema" and ema is not None else student
            best_state = {k: v.detach().clone().cpu() for k, v in src_model.state_dict().items()}
        acc = {k: 0.0 for k in (*LOSS_PARTS, "n", "seconds", "images")}
        if di.main:
            _write_csv(run_dir / "metrics.csv", history)
            console.print(f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f} (ce {row['ce']:.4f} kd {row['kd']:.4f} "
                          f"fgd {row['fgd']:.4f}) val top1 {ev['top1'] * 100:.2f}% [{ev['source']}]")
        checkpoint(epoch + 1, 0)
        if step >= total_steps:
            break

    if capture is not None:
        capture.remove()
    if teacher is not None and teacher.capture is not None:
        teacher.capture.remove()
    if best_state:
        student.load_state_dict(best_state)
    student.eval()
    seconds = round(time.perf_counter() - t_start, 1)
    result = {
        "output": str(output), "top1": best["top1"], "top5": best["top5"], "loss": best["loss"],
        "best_epoch": best["epoch"], "kept": best["source"], "epochs": len(history), "steps": step,
        "losses": {k: history[-1][k] for k in LOSS_PARTS} if history else {},
        "history": history, "teacher": teacher.name if teacher else None, "input": source,
        "run_dir": str(run_dir), "metrics_csv": str(run_dir / "metrics.csv"), "world_size": di.world,
        "seconds": seconds,
    }
    if di.main:
        save(student, output, kind="finetuned",
             finetune={"config": cfg.to_dict(), "top1": best["top1"], "best_epoch": best["epoch"],
                       "epochs": len(history), "steps": step, "teacher": result["teacher"], "input": source})
    if di.world > 1:
        dist.barrier()
    return student, result


def checkpoint_path(resume: str, workdir: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint ``--resume`` means: ``auto`` is ``<run_dir or workdir/finetune>/checkpoint.pt``."""
    if resume != "auto":
        return Path(resume)
    return (Path(run_dir) if run_dir else Path(workdir) / "finetune") / CHECKPOINT_NAME


def checkpoint_options(path: Path) -> dict[str, Any]:
    """The options of the run that wrote a checkpoint, so ``--resume`` alone continues that run."""
    ckpt = load_checkpoint(path)
    try:
        return json.loads(ckpt["config"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise QsdError(f"{path} has no run configuration; is it a finetune checkpoint?") from None


def finetune(model_or_path: nn.Module | str | os.PathLike | None = None, teacher: str | None = None,
             config: FinetuneConfig | None = None, **options: Any) -> dict:
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


__all__ = ["finetune", "run_finetune", "compute_losses", "FinetuneConfig", "init_distributed", "param_groups", "build_optimizer",
           "build_scheduler", "save_checkpoint", "load_checkpoint", "checkpoint_path", "checkpoint_options", "rng_state", "set_rng_state", "is_quant_param"]
