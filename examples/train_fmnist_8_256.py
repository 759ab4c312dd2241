"""Train the reference topology ``qsd_8_256`` (``spikformer_8_256_CAFormer``) on Fashion-MNIST.

The topology is unchanged; only ``in_chans=1``, ``num_classes=10`` and the image size differ (and
the input normalisation is Fashion-MNIST's, as for ``qsd_tiny_fmnist``). Its strides (2,2,2,2,1)
downsample 16x, so 64 px is the smallest input at which the transformer stages keep a 4x4 token
grid. The 28x28 images are augmented at 28 px as ``examples/train_fmnist.py`` does (random shift of
2 px, horizontal flip), then resized (bilinear) to 64 px; val and test are resized the same way.

    python examples/train_fmnist_8_256.py --out runs/qsd_8_256_fmnist            # start
    python examples/train_fmnist_8_256.py --out runs/qsd_8_256_fmnist --resume   # continue after a kill
    python examples/train_fmnist_8_256.py --out runs/qsd_8_256_fmnist --finish   # save the best epoch so far
    python examples/train_fmnist_8_256.py --out runs/qsd_8_256_fmnist --ann      # then its counterpart ANN
    python examples/train_fmnist_8_256.py --bench 20 --threads 1                 # time 20 steps, estimate

Interruption-safe: ``OUT/checkpoint.pt`` (model, optimiser, scheduler, EMA, RNG states, position in
the epoch) is written atomically every ``--ckpt-every`` steps and at every epoch's end; ``--resume``
continues from the exact step it holds (the batch order of an epoch is seeded by the epoch, so a
resumed run is the run that was not interrupted). ``OUT/curve.jsonl`` holds one line per epoch
(train loss, val top-1 of the weights and of their EMA, seconds, the machine). The kept epoch is the
best on val (5,000 images held out of the 60,000 training images; weights or EMA); test is measured
once, on it, with the attention knock-out of ``train_fmnist.py``; it is saved as
``OUT/qsd_8_256_fmnist.qsd`` in float16 (16 MB; the weights are rounded to float16 before val and
test are measured, so the figures are those of the stored file).

``--ann`` trains the counterpart ANN as ``train_fmnist.py --only ann`` does: the same topology and
parameters with clamped-ReLU activations, initialised from ``OUT/qsd_8_256_fmnist.qsd`` and trained
2 epochs at peak lr 1e-3 (checkpoints and curve in ``OUT/ann/``, saved as
``OUT/ann/qsd_8_256_fmnist_ann.qsd``). Copy both files into ``qsdcompress/zoo/`` to bundle them.

Cost (AMD EPYC, family 25 model 17, one torch thread; ``--bench 20``): 1.65-1.9 s per step of 64
images (34-39 images/s; 1.9 s while other processes shared the two cores), val about 120 images/s:
an epoch (859 steps and val of the weights and their EMA) takes 25-29 minutes, the 16 epochs of the
default recipe and the final knock-out 7-8 hours. Batches of 64 train faster per image than 32 or
128 on this CPU; two threads are slower than one whenever the second core is busy (OpenMP waits).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

import qsdcompress as q
from qsdcompress.data import DataConfig, build_dataset, resize_batch
from qsdcompress.io import atomic_path
from qsdcompress.provenance import machine_description
from qsdcompress.metrics import evaluate
from qsdcompress.models import model_config
from qsdcompress.train import save_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_fmnist as base  # noqa: E402  (augmentation, optimiser, step, candidates, final report)

ARCH = "qsd_8_256"
NAME = "qsd_8_256_fmnist"
SOURCE_SIZE = 28  # Fashion-MNIST's own size: augmentation happens there, as for qsd_tiny_fmnist
# the arguments a checkpoint must be resumed with (the others, e.g. --threads, may change)
RECIPE = ("data", "seed", "epochs", "lr", "wd", "smoothing", "batch_size", "warmup_epochs", "ema",
          "img_size", "subset")
#: the counterpart ANN's recipe where the command line does not say otherwise
ANN_DEFAULTS = {"epochs": 2, "lr": 1e-3, "warmup_epochs": 0.1}


def build_model(img_size: int, ann: bool = False) -> torch.nn.Module:
    """``qsd_8_256`` with one input channel, ten classes, ``img_size`` px and Fashion-MNIST's
    normalisation (that of ``qsd_tiny_fmnist``); channels-last (mkldnn trains faster so).
    ``ann``: clamped-ReLU activations in place of the spiking neurons."""
    fm = model_config("qsd_tiny_fmnist")
    model = q.create_model(ARCH, in_chans=1, num_classes=10, img_size=img_size, mean=fm.mean, std=fm.std,
                           **({"neuron": "relu"} if ann else {}))
    return model.to(memory_format=torch.channels_last)


def snn_file(a: argparse.Namespace) -> Path:
    return Path(a.out) / f"{NAME}.qsd"


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training images' order in ``epoch``: seeded by the epoch alone, so a resumed run draws it again."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class Run:
    """Model, data, optimiser and the state a checkpoint holds."""

    def __init__(self, a: argparse.Namespace):
        torch.manual_seed(a.seed)
        self.a = a
        self.model = build_model(a.img_size, a.ann)
        if a.ann:  # the counterpart ANN starts from the trained SNN's parameters
            if not snn_file(a).is_file():
                raise SystemExit(f"--ann starts from the trained SNN: {snn_file(a)} is missing (train it first)")
            self.model.load_state_dict(q.load(snn_file(a)).state_dict())
        self.cfg = DataConfig.from_model(self.model)
        self.src = dataclasses.replace(self.cfg, input_size=(1, SOURCE_SIZE, SOURCE_SIZE))
        self.x, self.y = build_dataset(a.data, "train", self.src).tensors
        if a.subset:
            self.x, self.y = self.x[: a.subset], self.y[: a.subset]
        self.steps = len(self.y) // a.batch_size  # per epoch; the last partial batch is dropped
        if self.steps < 1:
            raise SystemExit(f"--batch-size {a.batch_size} exceeds the {len(self.y)} training images")
        self.opt, self.sched = base.make_optimizer(self.model, a, a.lr, a.epochs * self.steps,
                                                   max(1, round(a.warmup_epochs * self.steps)))
        self.ema = ModelEmaV3(self.model, decay=a.ema) if a.ema else None
        self.g = torch.Generator().manual_seed(a.seed)  # augmentation
        self.epoch, self.step, self.loss_sum, self.epoch_seconds, self.seconds = 0, 0, 0.0, 0.0, 0.0
        self.best: dict = {"val_top1": -1.0, "epoch": 0, "state": None}
        self.history: list[dict] = []
        self.machine = machine_description()

    def batch(self, order: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = order[i * self.a.batch_size:(i + 1) * self.a.batch_size]
        return resize_batch(base.augment(self.x[idx], self.g), self.src, self.cfg), self.y[idx]

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                **({"ema": self.ema.module.state_dict()} if self.ema is not None else {}),
                "gen": self.g.get_state(), "torch_rng": torch.get_rng_state(), "epoch": self.epoch,
                "step": self.step, "loss_sum": self.loss_sum, "epoch_seconds": self.epoch_seconds,
                "seconds": self.seconds, "best": self.best, "history": self.history,
                "recipe": {k: getattr(self.a, k) for k in RECIPE}}

    def load(self, s: dict) -> None:
        recipe = {k: getattr(self.a, k) for k in RECIPE}
        changed = {k: (v, recipe.get(k)) for k, v in s["recipe"].items() if recipe.get(k) != v}
        if changed:
            raise SystemExit("--resume with another recipe than the checkpoint's: " +
                             ", ".join(f"{k} {old} (now {new})" for k, (old, new) in changed.items()))
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])
        if self.ema is not None:
            self.ema.module.load_state_dict(s["ema"])
        self.g.set_state(s["gen"])
        torch.set_rng_state(s["torch_rng"])
        self.epoch, self.step, self.loss_sum = s["epoch"], s["step"], s["loss_sum"]
        self.epoch_seconds, self.seconds, self.best, self.history = (s["epoch_seconds"], s["seconds"],
                                                                     s["best"], s["history"])


def write_curve(path: Path, history: list[dict], machine: dict) -> None:
    """The per-epoch curve as JSON lines, rewritten whole (atomically) from the checkpoint's history;
    each epoch keeps the machine (and thread count) of the process that ended it."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({"machine": machine, **h}) + "\n" for h in history))


def end_of_epoch(run: Run, loaders: dict[str, DataLoader]) -> None:
    """Val top-1 of the weights (and their EMA) as candidates; the epoch's line of the curve."""
    ep, a = run.epoch + 1, run.a
    t0 = time.time()
    run.best, top1 = base.candidate(run.best, run.model, loaders["val"], f"epoch {ep} val", ep)
    h = {"epoch": ep, "loss": round(run.loss_sum / run.steps, 4), "val_top1": round(top1, 4), "machine": run.machine}
    if run.ema is not None:
        run.best, top1 = base.candidate(run.best, run.ema.module, loaders["val"], f"epoch {ep} EMA val", ep, True)
        h["ema_val_top1"] = round(top1, 4)
    run.seconds += time.time() - t0
    h.update(train_seconds=round(run.epoch_seconds, 1), eval_seconds=round(time.time() - t0, 1),
             seconds=round(run.seconds, 1), images_per_s=round(run.steps * a.batch_size / run.epoch_seconds, 1),
             lr_end=run.sched.get_last_lr()[0])
    run.history.append(h)
    run.epoch, run.step, run.loss_sum, run.epoch_seconds = ep, 0, 0.0, 0.0
    print(f"epoch {ep}/{a.epochs} loss {h['loss']:.4f} val top1 {h['val_top1']:.4f}"
          + (f" EMA {h['ema_val_top1']:.4f}" if "ema_val_top1" in h else "")
          + f" (best {run.best['val_top1']:.4f} @ {run.best['epoch']}) {h['train_seconds']:.0f}s train "
            f"+ {h['eval_seconds']:.0f}s val, {run.seconds / 3600:.2f} h in all", flush=True)


def train(a: argparse.Namespace) -> dict | None:
    """Train (or continue) to the end of the schedule and report the kept epoch; None when
    ``--stop-after`` ended this process first (a checkpoint holds where it stopped)."""
    out = Path(a.out) / "ann" if a.ann else Path(a.out)
    name = f"{NAME}_ann" if a.ann else NAME
    out.mkdir(parents=True, exist_ok=True)
    ckpt, curve = out / "checkpoint.pt", out / "curve.jsonl"
    run = Run(a)
    if ckpt.is_file() and not (a.resume or a.finish):
        raise SystemExit(f"{ckpt} exists: pass --resume to continue it (or another --out)")
    if (a.resume or a.finish) and ckpt.is_file():
        run.load(torch.load(ckpt, map_location="cpu", weights_only=True))
        print(f"resumed {ckpt}: epoch {run.epoch + 1}, step {run.step}/{run.steps}", flush=True)
    elif a.finish:
        raise SystemExit(f"--finish needs a checkpoint: none at {ckpt}")
    loaders = {s: DataLoader(build_dataset(a.data, s, run.cfg), batch_size=100) for s in ("val", "test")}
    n_params = sum(p.numel() for p in run.model.parameters())
    print(f"{ARCH} at {a.img_size} px: {n_params:,} parameters; {len(run.y):,} training images, "
          f"{run.steps} steps of {a.batch_size} per epoch, {a.epochs} epochs; {run.machine}", flush=True)
    done_here = 0
    while run.epoch < a.epochs and not a.finish:
        order = epoch_order(len(run.y), a.seed, run.epoch)
        run.model.train()
        t_win, n_win = time.time(), 0
        while run.step < run.steps:
            t = time.time()
            x, y = run.batch(order, run.step)
            run.loss_sum += base.train_step(run.model, x, y, run.opt, run.sched, run.ema, a.smoothing)
            run.step, done_here, n_win = run.step + 1, done_here + 1, n_win + len(y)
            dt = time.time() - t
            run.epoch_seconds, run.seconds = run.epoch_seconds + dt, run.seconds + dt
            if run.step % a.log_every == 0:
                rate = n_win / (time.time() - t_win)
                print(f"epoch {run.epoch + 1} step {run.step}/{run.steps} loss {run.loss_sum / run.step:.4f} "
                      f"lr {run.sched.get_last_lr()[0]:.2e} {rate:.1f} images/s, epoch eta "
                      f"{(run.steps - run.step) * a.batch_size / rate / 60:.1f} min", flush=True)
                t_win, n_win = time.time(), 0
            stop = a.stop_after and done_here >= a.stop_after
            if run.step < run.steps and (stop or run.step % a.ckpt_every == 0):
                save_checkpoint(ckpt, run.state())
            if stop and run.step < run.steps:
                return None
        end_of_epoch(run, loaders)
        save_checkpoint(ckpt, run.state())
        write_curve(curve, run.history, run.machine)
        if a.stop_after and done_here >= a.stop_after and run.epoch < a.epochs:
            return None
    if run.best["state"] is None:
        raise SystemExit(f"--finish: no epoch of {ckpt} has ended yet")
    run.model.load_state_dict(run.best["state"])
    init = f"trained SNN ({snn_file(a).name})" if a.ann else "random"
    return base.finish(run.model, a, out / f"{name}.qsd", loaders, run.best, run.history, round(run.seconds, 1),
                       name, {"script": "examples/train_fmnist_8_256.py", "arch": ARCH, "img_size": a.img_size,
                              "input": f"{SOURCE_SIZE} px augmented, bilinear to {a.img_size} px",
                              "parameters": n_params, "epochs": a.epochs, "lr": a.lr,
                              "warmup_epochs": a.warmup_epochs, "init": init, "machine": run.machine,
                              "stored_dtype": "float16" if a.half else "float32"}, half=a.half)


def bench(a: argparse.Namespace) -> None:
    """Time ``--bench`` training steps (after two warm-up steps) and 500 val images; estimate an
    epoch and the whole schedule (training, val each epoch, the final knock-out on val and test)."""
    run = Run(a)
    order = epoch_order(len(run.y), a.seed, 0)
    run.model.train()
    times = []
    for i in range(a.bench + 2):
        t = time.perf_counter()
        x, y = run.batch(order, i % run.steps)
        base.train_step(run.model, x, y, run.opt, run.sched, run.ema, a.smoothing)
        times.append(time.perf_counter() - t)
    step = sum(times[2:]) / a.bench
    val = DataLoader(torch.utils.data.Subset(build_dataset(a.data, "val", run.cfg), range(500)), batch_size=100)
    ev = evaluate(run.model, val, description="500 val images")
    per_image_eval = ev["seconds"] / ev["samples"]
    epoch = run.steps * step + (2 if a.ema else 1) * 5000 * per_image_eval
    knockout = (len(run.model.attention_blocks) + 2) * 15000 * per_image_eval
    print(json.dumps({"threads": torch.get_num_threads(), "batch_size": a.batch_size, "img_size": a.img_size,
                      "seconds_per_step": round(step, 3), "images_per_s": round(a.batch_size / step, 1),
                      "eval_images_per_s": ev["images_per_s"], "epoch_minutes": round(epoch / 60, 1),
                      "total_hours": round((a.epochs * epoch + knockout) / 3600, 2), "epochs": a.epochs,
                      "machine": run.machine}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist", help="fashion-mnist or fashion-mnist:DIR")
    ap.add_argument("--out", type=Path, default=Path("runs") / NAME,
                    help="checkpoint, curve and the kept model (default runs/qsd_8_256_fmnist)")
    ap.add_argument("--img-size", type=int, default=64, help="64: the smallest size with a 4x4 token grid")
    ap.add_argument("--ann", action="store_true",
                    help="train the counterpart ANN from OUT/qsd_8_256_fmnist.qsd (2 epochs at lr 1e-3 by default)")
    ap.add_argument("--epochs", type=int, default=None, help="16 (the ANN: 2)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate, 1e-3")
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--smoothing", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup-epochs", type=float, default=None,
                    help="linear warm-up, then cosine to zero: 1 (the ANN: 0.1)")
    ap.add_argument("--ema", type=float, default=0.9995, help="EMA decay of the weights (a second candidate); 0 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=100, help="a progress line every N steps")
    ap.add_argument("--ckpt-every", type=int, default=200, help="also checkpoint every N steps within an epoch")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--finish", action="store_true", help="save the best epoch of the checkpoint; no more training")
    ap.add_argument("--subset", type=int, default=0, help="train on the first N images only, save nothing (pilots)")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="end this process after N steps, checkpoint written (tests; pilots)")
    ap.add_argument("--bench", type=int, default=0, help="time N training steps, print the estimate, exit")
    ap.add_argument("--no-half", dest="half", action="store_false",
                    help="store the kept model in float32 (default: float16, measured as stored)")
    a = ap.parse_args(argv)
    defaults = ANN_DEFAULTS if a.ann else {"epochs": 16, "lr": 1e-3, "warmup_epochs": 1.0}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv: list[str] | None = None) -> dict | None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.bench:
        return bench(a)
    return train(a)


if __name__ == "__main__":
    main()
