"""The bundled models: one registry (:data:`MODELS`) of every model qsdcompress ships, by name.

Each entry says what the model is, the data it was trained on, its counterpart ANN and the
example that trains it (docs/models.md tells how each was trained). Files are ``.qsd``
(safetensors + JSON metadata) or, for the ViT teachers, safetensors built from the timm
arguments kept here, so loading never runs code. Any command's MODEL may be one of these names;
commands given no MODEL (and no model in their work directory) use the default model of
their ``--data`` (:data:`DEFAULT_FOR_DATA`).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data import data_name
from ..errors import QsdError
from ..qsdfile import read_header_metadata
from ..results import ModelList

ZOO_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class BundledViT:
    """The timm ``VisionTransformer`` shape of a bundled ViT teacher (its weights are safetensors)."""

    args: dict[str, Any]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def build(self) -> nn.Module:
        """An untrained model of this teacher's shape."""
        from timm.models.vision_transformer import VisionTransformer

        m = VisionTransformer(**self.args)
        m.pretrained_cfg = {"input_size": self.input_size, "mean": self.mean, "std": self.std,
                            "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": self.args["num_classes"]}
        return m


@dataclass(frozen=True)
class ZooModel:
    """One bundled model: its name, file, data and how it was made."""

    name: str
    file: str
    data: str
    kind: str  # "snn", "ann" (the counterpart of an SNN) or "vit" (a cross-architecture teacher)
    description: str
    trained_by: str
    ann: str | None = None  # an SNN's counterpart ANN (``finetune --teacher ann``)
    aliases: tuple[str, ...] = ()
    vit: BundledViT | None = field(default=None, compare=False)

    @property
    def path(self) -> Path:
        return ZOO_DIR / self.file

    @property
    def installed(self) -> bool:
        return self.path.exists()

    def require(self) -> Path:
        """The file, or a one-line error naming the command that trains it."""
        if not self.installed:
            raise QsdError(f"bundled model {self.name} is not in this installation ({self.path}); "
                           f"train it with `{self.trained_by}`")
        return self.path

    @property
    def args(self) -> dict[str, Any]:
        """A ViT teacher's timm arguments."""
        return self.vit.args if self.vit is not None else {}

    def build(self) -> nn.Module:
        """An untrained ViT teacher of this entry's shape."""
        if self.vit is None:
            raise QsdError(f"{self.name} is a .qsd model: load it with qsdcompress.load({self.name!r})")
        return self.vit.build()

    def metadata(self) -> dict:
        """The ``.qsd`` metadata (read from the file's header only), or {} when absent."""
        return read_header_metadata(self.path) if self.installed else {}


_TINY_FMNIST = ("python examples/train_fmnist.py --only snn (then three --restart cycles, "
                "docs/models.md)")
_8_256_FMNIST = "python examples/train_fmnist_8_256.py --out runs/qsd_8_256_fmnist"

#: every bundled model by name
MODELS: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("qsd_tiny_digits", "qsd_tiny_digits.qsd", "digits", "snn",
             "qsd_tiny: integer spikes D=4, 3x32x32, 8x8 tokens", "python examples/train_bundled.py --only snn",
             ann="qsd_tiny_digits_ann", aliases=("qsd_tiny",)),
    ZooModel("qsd_tiny_digits_ann", "qsd_tiny_digits_ann.qsd", "digits", "ann",
             "qsd_tiny with clamped-ReLU activations", "python examples/train_bundled.py --only ann"),
    ZooModel("qsd_tiny_fmnist", "qsd_tiny_fmnist.qsd", "fashion-mnist", "snn",
             "integer spikes D=4, 1x28x28, 7x7 tokens, 1.67M params", _TINY_FMNIST, ann="qsd_tiny_fmnist_ann"),
    ZooModel("qsd_tiny_fmnist_ann", "qsd_tiny_fmnist_ann.qsd", "fashion-mnist", "ann",
             "qsd_tiny_fmnist with clamped-ReLU activations", "python examples/train_fmnist.py --only ann"),
    ZooModel("qsd_8_256_fmnist", "qsd_8_256_fmnist.qsd", "fashion-mnist", "snn",
             "qsd_8_256 (reference topology), 1x64x64, 4x4 tokens, 8.08M params", _8_256_FMNIST,
             ann="qsd_8_256_fmnist_ann"),
    ZooModel("qsd_8_256_fmnist_ann", "qsd_8_256_fmnist_ann.qsd", "fashion-mnist", "ann",
             "qsd_8_256_fmnist with clamped-ReLU activations", _8_256_FMNIST + " --ann"),
    # patch 4 on 32x32 gives qsd_tiny's 8x8 token grid (plus a class token)
    ZooModel("vit_digits", "vit_digits.safetensors", "digits", "vit", "timm ViT teacher, width 64, depth 4",
             "python examples/train_vit_teacher.py",
             vit=BundledViT(dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                                 num_classes=10, global_pool="token"), (3, 32, 32), (0.5,) * 3, (0.5,) * 3)),
    # patch 4 on 28x28 grayscale gives qsd_tiny_fmnist's 7x7 grid
    ZooModel("vit_fmnist", "vit_fmnist.safetensors", "fashion-mnist", "vit", "timm ViT teacher, width 96, depth 4",
             "python examples/train_vit_teacher.py --data fashion-mnist",
             vit=BundledViT(dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=4,
                                 mlp_ratio=2.0, num_classes=10, global_pool="token"), (1, 28, 28), (0.286,),
                            (0.353,))),
)}

#: the model a command uses for a data set when given no MODEL
DEFAULT_FOR_DATA = {"digits": "qsd_tiny_digits", "fashion-mnist": "qsd_tiny_fmnist"}


def lookup(name: str) -> ZooModel | None:
    """The bundled model a name or alias names, else None."""
    if name in MODELS:
        return MODELS[name]
    return next((m for m in MODELS.values() if name in m.aliases), None)


def unknown_name_hint(name: str) -> str:
    """``did you mean ...`` for a name that is neither a file nor a bundled model."""
    names = [*MODELS, *(a for m in MODELS.values() for a in m.aliases)]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return (f"did you mean {', '.join(close)}? " if close else "") + "`qsdcompress list` shows the bundled models"


def default_for(data: str = "digits", ann: bool = False) -> ZooModel:
    """The default bundled model of a data spec (``fashion-mnist[:DIR]``; anything else: digits')."""
    snn = MODELS[DEFAULT_FOR_DATA.get(data_name(data), "qsd_tiny_digits")]
    return MODELS[snn.ann] if ann and snn.ann else snn


def of_file(path: str | Path) -> ZooModel | None:
    """The bundled model stored under this file name (wherever the file now lies)."""
    name = Path(path).name
    return next((m for m in MODELS.values() if m.file == name), None)


def catalogue() -> ModelList:
    """Every bundled model with its data, test top-1 and how it was trained (``qsdcompress list``)."""
    rows = []
    for m in MODELS.values():
        training = m.metadata().get("training") or {}
        rows.append({"name": m.name, "aliases": list(m.aliases), "kind": m.kind, "data": m.data,
                     "description": m.description, "installed": m.installed, "file": str(m.path),
                     "counterpart_ann": m.ann, "test_top1": training.get("test_top1"),
                     "trained_by": m.trained_by})
    return ModelList(models=rows)


def bundled_path(ann: bool = False, data: str = "digits") -> Path:
    """The file of the default bundled model of a data spec."""
    return default_for(data, ann).path


def load_bundled_weights(model: torch.nn.Module, ann: bool = False, data: str = "digits") -> None:
    from ..io import load_state_dict_checked
    from ..qsdfile import read_checkpoint

    entry = default_for(data, ann)
    sd, _ = read_checkpoint(entry.require())
    load_state_dict_checked(model, sd, source=str(entry.path))


__all__ = ["MODELS", "catalogue", "ZooModel", "BundledViT", "DEFAULT_FOR_DATA", "ZOO_DIR", "lookup", "default_for", "of_file",
           "bundled_path", "load_bundled_weights", "unknown_name_hint"]
