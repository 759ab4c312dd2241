"""Checkpoints that make a killed run resumable bit for bit.

The data order is a pure function of (seed, epoch), and every state that changes during training
(weights, optimizer, scheduler, scaler, EMA, RNG, position, running sums, best model) is saved with
plain tensors and containers, so ``torch.load(weights_only=True)`` reads it back: no pickle of
code, unlike library savers. Writes are atomic and fsynced.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import QsdError, one_line
from ..io import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"


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
        raise QsdError(f"cannot resume from {path}: not a readable finetune checkpoint ({one_line(e, 160)})") from None



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


__all__ = ["CHECKPOINT_NAME", "rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint", "checkpoint_path",
           "checkpoint_options"]
