"""Bundled weights: ``qsd_tiny`` trained on the digits data set and its counterpart ANN
(``examples/train_bundled.py``), and ``qsd_tiny_fmnist`` trained on Fashion-MNIST with its
counterpart ANN (``examples/train_fmnist.py``); fixed seeds, CPU; commands and accuracy in
README.md. Stored as ``.qsd`` files (safetensors + JSON metadata). Commands given no MODEL use the
bundled model of their ``--data``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data import data_name

ZOO_DIR = Path(__file__).resolve().parent
BUNDLED_SNN = ZOO_DIR / "qsd_tiny_digits.qsd"
BUNDLED_ANN = ZOO_DIR / "qsd_tiny_digits_ann.qsd"
# qsd_tiny_fmnist trained on Fashion-MNIST and its counterpart ANN (examples/train_fmnist.py)
FMNIST_SNN = ZOO_DIR / "qsd_tiny_fmnist.qsd"
FMNIST_ANN = ZOO_DIR / "qsd_tiny_fmnist_ann.qsd"


def _fashion_mnist(data: str) -> bool:
    return data_name(data) == "fashion-mnist"


def bundled_path(ann: bool = False, data: str = "digits") -> Path:
    """The bundled model for a data spec: Fashion-MNIST's for ``fashion-mnist[:DIR]``, else digits'."""
    if _fashion_mnist(data):
        return FMNIST_ANN if ann else FMNIST_SNN
    return BUNDLED_ANN if ann else BUNDLED_SNN


def training_script(data: str = "digits") -> str:
    """The example that trains the bundled models of a data spec."""
    return "examples/train_fmnist.py" if _fashion_mnist(data) else "examples/train_bundled.py"


def load_bundled_weights(model: torch.nn.Module, ann: bool = False, data: str = "digits") -> None:
    from ..errors import QsdError
    from ..io import load_state_dict_checked, read_checkpoint

    path = bundled_path(ann, data)
    if not path.exists():
        raise QsdError(f"bundled weights missing: {path} (run {training_script(data)})")
    sd, _ = read_checkpoint(path)
    load_state_dict_checked(model, sd, source=str(path))
