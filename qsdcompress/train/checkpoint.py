"""Checkpoints that make a killed run resumable bit for bit, without pickle.

The data order is a pure function of (seed, epoch), and every state that changes during training
(weights, optimizer, scheduler, scaler, EMA, RNG, position, running sums, best model) is saved.
A finetune checkpoint is two files in the run directory:

* ``checkpoint.json``: everything that is not a tensor (step, epoch, configuration, optimizer
  hyper-parameters and the structure of its state, scheduler, scaler, history, best epoch), with
  each tensor replaced by ``{"$tensor": NAME}``; tuples, non-string keys and non-finite floats are
  spelled ``{"$tuple": [...]}``, ``{"$items": [[key, value], ...]}`` and ``{"$float": "nan"}``;
* ``checkpoint.a.safetensors`` or ``checkpoint.b.safetensors``: the tensors (model, optimizer
  moments, EMA, best weights, RNG states), the one the JSON names.

Reading them needs ``json`` and ``safetensors`` only; no code can run. Writes alternate between the
two tensor files and replace the JSON last, atomically and fsynced, so a kill at any moment leaves
a complete checkpoint (the previous one or the new one). A ``.pt`` path is the example scripts'
torch format (plain tensors, read with ``torch.load(weights_only=True)``), also how finetune
checkpoints of earlier versions are read.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import QsdError, one_line
from ..io import atomic_path

CHECKPOINT_NAME = "checkpoint.json"
LEGACY_NAME = "checkpoint.pt"
FORMAT = "qsdcompress-finetune-checkpoint"
FORMAT_VERSION = 1
TORCH_SUFFIXES = (".pt", ".pth")


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and integers (torch's own state is a uint8 tensor)."""
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


# --- state <-> JSON + tensors --------------------------------------------------------------------

def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON, its tensors moved into ``tensors`` under their path (``optimizer/state/3/exp_avg``)."""
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        while key in tensors:
            key += "'"
        tensors[key] = obj
        return {"$tensor": key}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"$tuple": items}
    if isinstance(obj, dict):
        sub = (lambda k: f"{path}/{k}" if path else str(k))
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, sub(k), tensors) for k, v in obj.items()}
        return {"$items": [[_encode(k, "", {}), _encode(v, sub(k), tensors)] for k, v in obj.items()]}
    raise QsdError(f"a checkpoint cannot hold {type(obj).__name__} (at {path or 'the top'})")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (k, v), = obj.items()
        if k == "$tensor":
            return tensors[v]
        if k == "$float":
            return float(v)
        if k == "$tuple":
            return tuple(_decode(x, tensors) for x in v)
        if k == "$items":
            return {_decode(a, tensors): _decode(b, tensors) for a, b in v}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors accepts: contiguous, each owning its memory (a view or a second
    name of the same storage is copied)."""
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if t.numel() and (ptr in seen or not whole):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out[k] = t
    return out


# --- files ---------------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _document(path: Path) -> dict[str, Any]:
    """The JSON half of a checkpoint, checked to be one."""
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    if int(doc.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"written by a newer qsdcompress (format version {doc['version']})")
    return doc


def _current_tensor_file(path: Path) -> str | None:
    try:
        return str(_document(path)["tensors"])
    except (OSError, ValueError, KeyError):
        return None


def _save_torch(path: Path, state: dict[str, Any]) -> None:
    """Atomic ``torch.save`` of plain tensors and containers (the example scripts' format)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getbuffer())
        _fsync(tmp)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as ``path`` (JSON) plus a safetensors file beside it; a kill at any moment
    leaves the previous checkpoint or this one, whole. A ``.pt``/``.pth`` path is written with
    ``torch.save`` instead (plain tensors only)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix in TORCH_SUFFIXES:
        return _save_torch(path, state)
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "state": _encode(state, "", tensors)}
    old = _current_tensor_file(path)
    name = f"{path.stem}.{'b' if old == f'{path.stem}.a.safetensors' else 'a'}.safetensors"
    doc.update(tensors=name, token=secrets.token_hex(8))
    with atomic_path(path.parent / name) as tmp:
        save_file(_storable(tensors), str(tmp), metadata={"checkpoint": doc["token"]})
        _fsync(tmp)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
        _fsync(tmp)
    for slot in "ab":  # the previous tensors, or those of a write a kill interrupted
        if f"{path.stem}.{slot}.safetensors" != name:
            (path.parent / f"{path.stem}.{slot}.safetensors").unlink(missing_ok=True)


def _load_tensors(path: Path, doc: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path.parent / doc["tensors"]), framework="pt") as f:
        if (f.metadata() or {}).get("checkpoint") != doc["token"]:
            raise ValueError(f"{doc['tensors']} belongs to another checkpoint")
        return {k: f.get_tensor(k) for k in f.keys()}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state :func:`save_checkpoint` wrote (tensors on the CPU); ``.pt``/``.pth`` files with
    ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise QsdError(f"no checkpoint to resume from: {path} (start without --resume)")
    try:
        if path.suffix in TORCH_SUFFIXES:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        doc = _document(path)
        return _decode(doc["state"], _load_tensors(path, doc))
    except Exception as e:
        raise QsdError(f"cannot resume from {path}: not a readable finetune checkpoint ({one_line(e, 160)})") from None


def checkpoint_path(resume: str, workdir: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint ``--resume`` means: ``auto`` is ``<run_dir or workdir/finetune>/checkpoint.json``
    (or an earlier version's ``checkpoint.pt`` there), a directory its ``checkpoint.json``."""
    if resume != "auto":
        p = Path(resume)
        return p / CHECKPOINT_NAME if p.is_dir() else p
    run = Path(run_dir) if run_dir else Path(workdir) / "finetune"
    new, old = run / CHECKPOINT_NAME, run / LEGACY_NAME
    return old if old.is_file() and not new.is_file() else new


def checkpoint_options(path: Path) -> dict[str, Any]:
    """The options of the run that wrote a checkpoint, so ``--resume`` alone continues that run
    (read from the JSON alone: the tensors are not needed)."""
    path = Path(path)
    try:
        state = (load_checkpoint(path) if path.suffix in TORCH_SUFFIXES or not path.is_file()
                 else _document(path)["state"])
        cfg = state["config"]
        return json.loads(cfg) if isinstance(cfg, str) else dict(_decode(cfg, {}))
    except (KeyError, TypeError, ValueError):
        raise QsdError(f"{path} has no run configuration; is it a finetune checkpoint?") from None


__all__ = ["CHECKPOINT_NAME", "rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint", "checkpoint_path",
           "checkpoint_options"]
