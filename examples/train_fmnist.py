"""Train the bundled Fashion-MNIST models: ``qsd_tiny_fmnist`` (integer spikes, D=4, T=1, 7x7 token
grid, layer scale 0.1) and its counterpart ANN (same topology, clamped-ReLU activations).

    python examples/train_fmnist.py --only snn   # writes qsdcompress/zoo/qsd_tiny_fmnist.qsd
    python examples/train_fmnist.py --only ann   # writes qsdcompress/zoo/qsd_tiny_fmnist_ann.qsd

Fixed seed, CPU. The epoch kept is the one with the best top-1 on the ``val`` split (5,000 images
held out of the 60,000 training images); ``test`` is measured once, on that epoch. A checkpoint is
written after every epoch (``--resume`` continues from it; ``--finish`` saves its best epoch
without training further). The ANN starts from the trained SNN (the same parameters, clamped-ReLU
activations instead of spikes) and trains for a few epochs at a lower rate (``--ann-epochs``,
``--ann-lr``; ``--ann-init scratch`` for a full schedule). ``--restart`` continues the bundled SNN
with another cosine cycle (a warm restart: ``--epochs`` more at peak ``--lr``); its starting
point counts as epoch 0, so the result is never worse on ``val`` than the model it started from.
``--ema DECAY`` also keeps an exponential moving average of the weights, a second candidate each
epoch. The bundled SNN is made by four cycles (``--out`` writes elsewhere than the zoo, to
decide on val before replacing the bundled file):

    python examples/train_fmnist.py --only snn
    python examples/train_fmnist.py --only snn --restart --epochs 10 --lr 1e-3
    python examples/train_fmnist.py --only snn --restart --epochs 10 --lr 5e-4 --ema 0.999
    python examples/train_fmnist.py --only snn --restart --epochs 10 --lr 3e-4 --ema 0.9995

At the end the script prints the attention ablation: the accuracy with every block's attention
branch removed, and with one block's removed at a time, on val and test.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

import qsdcompress as q
from qsdcompress.data import DataConfig, build_dataset, random_hflip, random_shift
from qsdcompress.metrics import evaluate
from qsdcompress.train import save_checkpoint
from qsdcompress.zoo import MODELS

FMNIST_SNN, FMNIST_ANN = MODELS["qsd_tiny_fmnist"].path, MODELS["qsd_tiny_fmnist_ann"].path

ARCH = "qsd_tiny_fmnist"


@contextlib.contextmanager
def attention_removed(model: torch.nn.Module, blocks: list[int]):
    """Zero the attention branch (its output, before the layer scale) of the given blocks."""
    handles = [model.attention_blocks[i].attn.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
               for i in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ablation(model: torch.nn.Module, loaders: dict[str, DataLoader]) -> dict:
    n = len(model.attention_blocks)
    cases = {"none removed": [], "all removed": list(range(n)), **{f"block {i} removed": [i] for i in range(n)}}
    out: dict = {}
    for name, blocks in cases.items():
        with attention_removed(model, blocks):
            out[name] = {s: round(evaluate(model, ld, description=f"{name} ({s})")["top1"], 4)
                         for s, ld in loaders.items()}
    return out


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return random_hflip(random_shift(x, g, max_shift=2), g)


def make_optimizer(model: torch.nn.Module, a: argparse.Namespace, lr: float, steps: int, warm: int):
    """AdamW without weight decay on biases and norms; linear warm-up over ``warm`` steps, then cosine."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt, sched, ema,
               smoothing: float) -> float:
    """One optimiser step on an (augmented) batch: clipped gradients, scheduler and EMA updated; its loss."""
    loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y, label_smoothing=smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    sched.step()
    if ema is not None:
        ema.update(model)
    return loss.item()


def train_epoch(model: torch.nn.Module, loader: DataLoader, opt, sched, ema, g: torch.Generator,
                smoothing: float) -> float:
    """One pass over ``loader``; the mean training loss."""
    model.train()
    tl, nb = 0.0, 0
    for x, y in loader:
        tl, nb = tl + train_step(model, augment(x, g), y, opt, sched, ema, smoothing), nb + 1
    return tl / max(nb, 1)


def candidate(best: dict, model: torch.nn.Module, loader: DataLoader, label: str, epoch: int,
              is_ema: bool = False) -> tuple[dict, float]:
    """Evaluate ``model`` on val; it becomes the best when it beats ``best`` (ties keep the earlier)."""
    top1 = evaluate(model, loader, description=label)["top1"]
    if top1 > best["val_top1"]:
        best = {"val_top1": top1, "epoch": epoch, **({"ema": True} if is_ema else {}),
                "state": copy.deepcopy(model.state_dict())}
    return best, top1


def train(ann: bool, a: argparse.Namespace, out: Path) -> dict:
    tag = "ann" if ann else "snn"
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    overrides = {k: v for k, v in (("layer_scale", a.layer_scale), ("strides", a.strides),
                                   ("embed_dim", a.embed_dim), ("attn_scale", a.attn_scale)) if v is not None}
    # channels-last: the same results, and mkldnn's convolutions train about 1.4x faster on CPU
    model = q.create_model(ARCH, ann=ann, **overrides).to(memory_format=torch.channels_last)
    restart = not ann and a.restart
    from_snn = (ann and a.ann_init == "snn") or restart
    epochs, lr = (a.ann_epochs, a.ann_lr) if ann and from_snn else (a.epochs, a.lr)
    previous = None
    if from_snn:
        # the counterpart ANN has the SNN's parameters: start from the trained SNN, a few epochs
        # instead of a full schedule; an SNN restart is a second cosine cycle from it
        snn = q.load(FMNIST_SNN)
        model.load_state_dict(snn.state_dict())
        # a restart records the stage it continues (from the same read), so the whole recipe stays in the file
        previous = snn.qsd_meta.get("training") if restart else None
        print(f"{tag}: initialised from {FMNIST_SNN.name}; {epochs} epochs at lr {lr:g}", flush=True)
    cfg = DataConfig.from_model(model)
    train_ds = build_dataset(a.data, "train", cfg)
    if a.subset:
        train_ds = torch.utils.data.TensorDataset(*(t[: a.subset] for t in train_ds.tensors))
    loaders = {s: DataLoader(build_dataset(a.data, s, cfg), batch_size=500) for s in ("val", "test")}
    train_loader = DataLoader(train_ds, batch_size=a.batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(a.seed))
    opt, sched = make_optimizer(model, a, lr, epochs * len(train_loader), len(train_loader))
    ckpt = Path(a.ckpt_dir) / f"{ARCH}_{tag}.pt"
    start, best, history, seconds = 0, {"val_top1": -1.0, "epoch": 0, "state": None}, [], 0.0
    # an exponential moving average of the weights (and BatchNorm statistics): a second candidate each epoch
    ema = ModelEmaV3(model, decay=a.ema) if a.ema else None
    if (a.resume or a.finish) and ckpt.is_file():
        s = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        sched.load_state_dict(s["sched"])
        g.set_state(s["gen"])
        train_loader.generator.set_state(s["loader_gen"])
        torch.set_rng_state(s["torch_rng"])
        start, best, history, seconds = s["epoch"], s["best"], s["history"], s["seconds"]
        if ema is not None:
            ema.module.load_state_dict(s["ema"])
        print(f"{tag}: resumed after epoch {start} from {ckpt}", flush=True)
    if a.finish and not start:
        raise SystemExit(f"--finish needs a checkpoint: none at {ckpt}")
    if restart and not start:  # the starting point is epoch 0: never worse than the input on val
        best, _ = candidate(best, model, loaders["val"], f"{tag} epoch 0 val", 0)
    t0 = time.time() - seconds
    for ep in range(start, start if a.finish else epochs):
        loss = train_epoch(model, train_loader, opt, sched, ema, g, a.smoothing)
        best, top1 = candidate(best, model, loaders["val"], f"{tag} epoch {ep + 1} val", ep + 1)
        history.append({"epoch": ep + 1, "loss": round(loss, 4), "val_top1": round(top1, 4),
                        "seconds": round(time.time() - t0, 1)})
        if ema is not None:
            best, top1 = candidate(best, ema.module, loaders["val"], f"{tag} epoch {ep + 1} EMA val", ep + 1, True)
            history[-1]["ema_val_top1"] = round(top1, 4)
            print(f"{tag} epoch {ep + 1} EMA val top1 {top1:.4f}", flush=True)
        print(f"{tag} epoch {ep + 1}/{epochs} loss {loss:.4f} val top1 {history[-1]['val_top1']:.4f} "
              f"(best {best['val_top1']:.4f} @ {best['epoch']}) {time.time() - t0:.0f}s", flush=True)
        save_checkpoint(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                               "gen": g.get_state(), "loader_gen": train_loader.generator.get_state(),
                               "torch_rng": torch.get_rng_state(), "epoch": ep + 1, "best": best,
                               "history": history, "seconds": time.time() - t0,
                               **({"ema": ema.module.state_dict()} if ema is not None else {})})
    model.load_state_dict(best["state"])
    return finish(model, a, out, loaders, best, history, round(time.time() - t0, 1), tag, {
        "epochs": epochs, "lr": lr, "overrides": overrides, "previous_stage": previous,
        "init": f"trained SNN ({FMNIST_SNN.name})" if from_snn else "random"})


def finish(model: torch.nn.Module, a: argparse.Namespace, out: Path, loaders: dict[str, DataLoader], best: dict,
           history: list[dict], seconds: float, tag: str, stage: dict, half: bool = False) -> dict:
    """Measure the kept epoch (val, test, the attention ablation) and save it with its whole recipe
    (``stage``: the metadata fields that depend on the stage, stored as they are). ``half``: the
    weights are rounded to float16 first, so what is measured is what the float16 file holds."""
    if half:
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.dtype == torch.float32:
                    t.copy_(t.half().float())
    abl = ablation(model, loaders)
    val, test = abl["none removed"]["val"], abl["none removed"]["test"]
    print(f"{tag}: best epoch {best['epoch']}: val top1 {val:.4f}, test top1 {test:.4f}, {seconds:.0f}s training")
    print(f"{tag} attention ablation (top-1):")
    print(f"  {'case':<18} {'val':>7} {'test':>7}")
    for name, r in abl.items():
        print(f"  {name:<18} {r['val']:>7.4f} {r['test']:>7.4f}")
    if not a.subset:
        q.save(model, out, kind="float", half=half, training={
            "script": "examples/train_fmnist.py", "data": a.data, "seed": a.seed, **stage,
            "epochs_done": len(history), "best_epoch": best["epoch"], "best_is_ema": bool(best.get("ema")),
            "ema_decay": a.ema, "batch_size": a.batch_size, "weight_decay": a.wd,
            "label_smoothing": a.smoothing, "augment": "random shift 2 px + horizontal flip",
            "val_top1": val, "test_top1": test, "seconds": seconds, "threads": a.threads,
            "attention_ablation": abl, "history": history})
        print(f"wrote {out}")
    return {"val_top1": val, "test_top1": test, "ablation": abl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["snn", "ann"], default=None)
    ap.add_argument("--data", default="fashion-mnist", help="fashion-mnist or fashion-mnist:DIR")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.02)
    ap.add_argument("--smoothing", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--layer-scale", type=float, default=None, help="override the architecture's (pilots)")
    ap.add_argument("--attn-scale", type=float, default=None, help="override the architecture's attention scale")
    ap.add_argument("--strides", type=int, nargs=5, default=None, help="override the architecture's strides")
    ap.add_argument("--embed-dim", type=int, nargs=4, default=None, help="override the architecture's widths")
    ap.add_argument("--subset", type=int, default=0, help="train on the first N images only, save nothing (pilots)")
    ap.add_argument("--ckpt-dir", default="runs/fmnist", help="per-epoch checkpoints")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --ckpt-dir")
    ap.add_argument("--finish", action="store_true",
                    help="stop early: save the best epoch of the checkpoint in --ckpt-dir (no more training)")
    ap.add_argument("--restart", action="store_true",
                    help="SNN: continue the bundled SNN with a second cosine cycle (--epochs at peak --lr)")
    ap.add_argument("--ann-init", choices=["snn", "scratch"], default="snn",
                    help="the counterpart ANN starts from the trained SNN (default) or from scratch")
    ap.add_argument("--ann-epochs", type=int, default=2, help="ANN epochs when it starts from the SNN")
    ap.add_argument("--ann-lr", type=float, default=1e-3, help="ANN learning rate when it starts from the SNN")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ema", type=float, default=0.0,
                    help="also keep an exponential moving average of the weights (decay, e.g. 0.999): "
                         "each epoch it is a second candidate on val; 0 = off")
    ap.add_argument("--out", type=Path, default=None,
                    help="SNN: write here instead of the bundled file (decide on val before replacing it)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.only in (None, "snn"):
        train(False, a, a.out or FMNIST_SNN)
    if a.only in (None, "ann"):
        train(True, a, FMNIST_ANN)


if __name__ == "__main__":
    main()
