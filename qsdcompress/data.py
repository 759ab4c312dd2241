"""Datasets by name: ``digits`` (bundled, real), ImageFolder directories, local CIFAR, synthetic.

A data spec is a string:

* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to the model's input
  size (32x32 for ``qsd_tiny``), RGB, a fixed seeded 80/20 stratified train/test split.
* a directory in ImageNet layout (``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``, or
  ``DIR/<class>/*.jpg`` used for every split); grayscale or odd-sized images are converted.
* ``cifar10:DIR`` / ``cifar100:DIR``: the python-pickle CIFAR batches already in DIR (never
  downloaded).
* ``synthetic`` or ``synthetic:N``: N random images with random labels, for benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import QsdError

DIGITS_SEED = 0
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DataConfig:
    """How a model wants its input: size and normalisation (timm's data config)."""

    input_size: tuple[int, int, int] = (3, 32, 32)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "DataConfig":
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        return cls(
            input_size=tuple(cfg.get("input_size", (3, 224, 224))),  # type: ignore[arg-type]
            mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            interpolation=cfg.get("interpolation", "bicubic") or "bicubic",
            crop_pct=float(cfg.get("crop_pct", 0.875) or 0.875),
        )


def _digits_arrays():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.2, random_state=DIGITS_SEED, stratify=d.target)
    return x, y, torch.as_tensor(tr), torch.as_tensor(te)


def digits_dataset(split: str, cfg: DataConfig) -> TensorDataset:
    """The digits split as normalised RGB tensors of the model's input size."""
    x, y, tr, te = _digits_arrays()
    idx = tr if split == "train" else te
    c, h, w = cfg.input_size
    img = x[idx].unsqueeze(1)
    img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    img = img.expand(-1, c, -1, -1)
    mean = torch.tensor(cfg.mean[:c]).view(1, c, 1, 1)
    std = torch.tensor(cfg.std[:c]).view(1, c, 1, 1)
    return TensorDataset(((img - mean) / std).contiguous(), y[idx])


def synthetic_dataset(n: int, cfg: DataConfig, num_classes: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *cfg.input_size), generator=g)
    y = torch.randint(0, max(num_classes, 1), (n,), generator=g)
    return TensorDataset(x, y)


def _transform(cfg: DataConfig, train: bool):
    from timm.data import create_transform

    return create_transform(
        input_size=cfg.input_size, is_training=train, mean=cfg.mean, std=cfg.std,
        interpolation=cfg.interpolation, crop_pct=cfg.crop_pct,
    )


def _rgb_loader(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise QsdError(f"cannot read image {path}: {e}") from None


def image_folder(root: Path, split: str, cfg: DataConfig, train_aug: bool = False) -> Dataset:
    from torchvision.datasets import ImageFolder

    if not root.exists():
        raise QsdError(f"data folder not found: {root}")
    if not root.is_dir():
        raise QsdError(f"--data must be 'digits', 'synthetic[:N]', 'cifar10:DIR' or a folder; {root} is a file")
    names = {"train": ("train",), "val": ("val", "validation", "test"), "test": ("test", "val", "validation")}
    sub = next((root / n for n in names.get(split, (split,)) if (root / n).is_dir()), root)
    classes = [d for d in sub.iterdir() if d.is_dir()]
    if not classes:
        raise QsdError(f"data folder {sub} has no class subfolders (expected {sub}/<class>/<image>)")
    try:
        ds = ImageFolder(str(sub), transform=_transform(cfg, train_aug), loader=_rgb_loader,
                         is_valid_file=lambda p: p.lower().endswith(IMG_EXTENSIONS))
    except (FileNotFoundError, RuntimeError) as e:
        raise QsdError(f"data folder {sub}: {e}") from None
    if len(ds) == 0:
        raise QsdError(f"data folder {sub} contains no images ({', '.join(IMG_EXTENSIONS)})")
    return ds


def cifar(kind: str, root: Path, split: str, cfg: DataConfig, train_aug: bool = False) -> Dataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if kind == "cifar10" else CIFAR100
    try:
        return cls(str(root), train=split == "train", download=False, transform=_transform(cfg, train_aug))
    except RuntimeError as e:
        raise QsdError(f"{kind} not found under {root} (it is never downloaded; place the extracted "
                       f"python batches there): {e}") from None


def build_dataset(spec: str, split: str = "test", cfg: DataConfig | None = None, num_classes: int = 10,
                  train_aug: bool = False) -> Dataset:
    """Dataset for a data spec (see the module docstring)."""
    cfg = cfg or DataConfig()
    if split not in ("train", "test", "val"):
        raise QsdError(f"unknown split {split!r}")
    spec = str(spec)
    if spec == "digits":
        return digits_dataset(split, cfg)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n = 256
        if ":" in spec:
            try:
                n = int(spec.split(":", 1)[1])
            except ValueError:
                raise QsdError(f"bad data spec {spec!r}: use synthetic:N with an integer N") from None
        if n <= 0:
            raise QsdError(f"bad data spec {spec!r}: N must be positive")
        return synthetic_dataset(n, cfg, num_classes, seed=0 if split == "train" else 1)
    for kind in ("cifar10", "cifar100"):
        if spec.startswith(kind + ":"):
            return cifar(kind, Path(spec.split(":", 1)[1]), split, cfg, train_aug)
    return image_folder(Path(spec), split, cfg, train_aug)


def num_classes_of(ds: Dataset) -> int | None:
    if hasattr(ds, "classes"):
        return len(ds.classes)  # type: ignore[attr-defined]
    if isinstance(ds, TensorDataset) and len(ds.tensors) > 1:
        return int(ds.tensors[1].max()) + 1
    return None


def build_loader(spec: str, split: str = "test", cfg: DataConfig | None = None, batch_size: int = 64,
                 shuffle: bool | None = None, num_workers: int = 0, num_classes: int = 10,
                 train_aug: bool = False, sampler=None, drop_last: bool = False, seed: int = 0) -> DataLoader:
    ds = build_dataset(spec, split, cfg, num_classes=num_classes, train_aug=train_aug)
    if batch_size < 1:
        raise QsdError(f"--batch-size must be at least 1, got {batch_size}")
    shuffle = (split == "train") if shuffle is None else shuffle
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, drop_last=drop_last, generator=g)


def calibration_batches(loader: DataLoader, n: int) -> list[torch.Tensor]:
    """The first ``n`` input batches of a loader (labels dropped)."""
    out = []
    for i, batch in enumerate(loader):
        if i >= n:
            break
        out.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
    return out


def resize_batch(x: torch.Tensor, src: DataConfig, dst: DataConfig) -> torch.Tensor:
    """Re-size and re-normalise a batch prepared for ``src`` into the input ``dst`` expects
    (used to feed a student's batch to a teacher with another input size or normalisation)."""
    c_s, c_d = x.shape[1], dst.input_size[0]
    dev = x.device
    m_s = torch.tensor(src.mean[:c_s], device=dev).view(1, -1, 1, 1)
    s_s = torch.tensor(src.std[:c_s], device=dev).view(1, -1, 1, 1)
    raw = x * s_s + m_s
    if raw.shape[-2:] != tuple(dst.input_size[1:]):
        raw = F.interpolate(raw, size=tuple(dst.input_size[1:]), mode="bilinear", align_corners=False)
    if c_s != c_d:
        raw = raw.mean(1, keepdim=True).expand(-1, c_d, -1, -1) if c_d != 1 else raw.mean(1, keepdim=True)
    m_d = torch.tensor(dst.mean[:c_d], device=dev).view(1, -1, 1, 1)
    s_d = torch.tensor(dst.std[:c_d], device=dev).view(1, -1, 1, 1)
    return (raw - m_d) / s_d


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation of each image by up to ``max_shift`` pixels (replicate padding): the
    augmentation the bundled digits models were trained with."""
    pad = F.pad(x, [max_shift] * 4, mode="replicate")
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(x.shape[0]):
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
        out[i] = pad[i, :, dy:dy + h, dx:dx + w]
    return out


__all__: Sequence[str] = [
    "DataConfig", "build_dataset", "build_loader", "digits_dataset", "synthetic_dataset",
    "calibration_batches", "resize_batch", "num_classes_of", "random_shift",
]
