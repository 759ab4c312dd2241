"""Bundled weights: ``qsd_tiny`` trained on the digits data set, and its counterpart ANN.

Produced by ``examples/train_bundled.py`` (fixed seed, CPU); the command and the accuracy are in
README.md. Stored as ``.qsd`` files (safetensors + JSON metadata).
"""
from __future__ import annotations

from pathlib import Path

import torch

ZOO_DIR = Path(__file__).resolve().parent
BUNDLED_SNN = ZOO_DIR / "qsd_tiny_digits.qsd"
BUNDLED_ANN = ZOO_DIR / "qsd_tiny_digits_ann.qsd"
# qsd_tiny_fmnist trained on Fashion-MNIST and its counterpart ANN (examples/train_fmnist.py)
FMNIST_SNN = ZOO_DIR / "qsd_tiny_fmnist.qsd"
FMNIST_ANN = ZOO_DIR / "qsd_tiny_fmnist_ann.qsd"


def bundled_path(ann: bool = False) -> Path:
    return BUNDLED_ANN if ann else BUNDLED_SNN


def load_bundled_weights(model: torch.nn.Module, ann: bool = False) -> None:
    from ..errors import QsdError
    from ..io import load_state_dict_checked, read_checkpoint

    path = bundled_path(ann)
    if not path.exists():
        raise QsdError(f"bundled weights missing: {path} (run examples/train_bundled.py)")
    sd, _ = read_checkpoint(path)
    load_state_dict_checked(model, sd, source=str(path))
