"""Datasets by name: ``digits`` (bundled, real), Fashion-MNIST / MNIST IDX files, ImageFolder
directories, local CIFAR, synthetic.

A data spec is a string:

* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to the model's input
  size (32x32 for ``qsd_tiny``), RGB, a fixed seeded 80/20 stratified train/test split.
* ``fashion-mnist``: the Fashion-MNIST IDX files of the Debian package ``dataset-fashion-mnist``
  (in ``/usr/share/datasets/fashion-mnist``); ``fashion-mnist:DIR`` / ``mnist:DIR``: any folder
  holding the four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each gzip-compressed (``.gz``) or raw).
* a directory in ImageNet layout (``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``, or
  ``DIR/<class>/*.jpg`` used for every split); grayscale or odd-sized images are converted.
* ``cifar10:DIR`` / ``cifar100:DIR``: the python-pickle CIFAR batches already in DIR (never
  downloaded).
* ``synthetic`` or ``synthetic:N``: N random images with random labels, for benchmarks.

Every data set has three splits: ``train``, ``val`` and ``test``. ``val`` is a seeded held-out part
of the training data (disjoint from ``train``, the same in every run), so that choices made on it
leave ``test`` untouched:

* Fashion-MNIST / MNIST: 5,000 of the 60,000 training images (1/12 of a smaller file);
* digits: a stratified 20% of its training split (the test split is unchanged);
* ImageFolder: ``DIR/val`` when ``DIR/test`` exists too, else a stratified 10% of the training
  images; CIFAR: a stratified 10% of the training batches;
* synthetic: another seed.
"""
from __future__ import annotations

import functools
import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .errors import QsdError

DIGITS_SEED = 0
VAL_SEED = 20261130  # fixed: the held-out validation parts are the same in every run
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_VAL_SIZE = 5000  # images held out of the 60,000 training images as the val split


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
        from timm.data import resolve_model_data_config

        # timm reads model.pretrained_cfg (or default_cfg) and falls back to ImageNet values
        # (3x224x224, ImageNet mean/std, bicubic, 0.875) for models without one.
        cfg = resolve_model_data_config(model)
        return cls(
            input_size=tuple(cfg["input_size"]),  # type: ignore[arg-type]
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg.get("interpolation") or "bicubic",
            crop_pct=float(cfg.get("crop_pct") or 0.875),
        )


def to_model_input(img: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Grayscale images ``(N, H, W)`` in [0, 1] as normalised ``(N, C, H', W')`` model inputs:
    bilinear resize only when the size differs, the gray channel repeated to C channels."""
    c, h, w = cfg.input_size
    img = img.unsqueeze(1)
    if tuple(img.shape[-2:]) != (h, w):
        img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    img = img.expand(-1, c, -1, -1)
    mean = torch.tensor(_per_channel(cfg.mean, c)).view(1, c, 1, 1)
    std = torch.tensor(_per_channel(cfg.std, c)).view(1, c, 1, 1)
    return ((img - mean) / std).contiguous()


def _per_channel(values: Sequence[float], c: int) -> list[float]:
    values = list(values)
    if len(values) == 1:
        return values * c
    if len(values) < c:
        raise QsdError(f"data config has {len(values)} mean/std values for {c} input channels")
    return values[:c]


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int = VAL_SEED
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(len(labels))`` into sorted (kept, held-out) indices; each class
    gives ``floor(fraction * its count)`` images to the held-out part."""
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        k = int(fraction * len(idx))
        held.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    mask = torch.zeros(len(labels), dtype=torch.bool)
    if held:
        mask[torch.cat(held)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.2, random_state=DIGITS_SEED, stratify=d.target)
    return x, y, torch.as_tensor(tr), torch.as_tensor(te)


class GrayImages(Dataset):
    """Grayscale images ``(N, H, W)`` in [0, 1] kept at their own size, turned into model input
    (:func:`to_model_input`) a batch at a time: made up front, Fashion-MNIST's 55,000 training
    images for a 224 px model would take 11 GB per input channel. ``tensors`` gives the whole
    split as model input at once (images, labels), as a ``TensorDataset`` does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig) -> None:
        self.images, self.labels, self.cfg = images, labels, cfg

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, idx: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A DataLoader's batch in one resize (torch calls this when it exists)."""
        x = to_model_input(self.images[idx], self.cfg)
        return list(zip(x, self.labels[idx]))

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_input(self.images, self.cfg), self.labels


def digits_dataset(split: str, cfg: DataConfig) -> GrayImages:
    """The digits split as normalised images of the model's input size. ``val`` is a stratified
    20% of the training split; ``test`` is the same 360 images as before ``val`` existed."""
    x, y, tr, te = _digits_arrays()
    if split == "test":
        idx = te
    else:
        keep, held = stratified_holdout(y[tr], 0.2)
        idx = tr[held] if split == "val" else tr[keep]
    return GrayImages(x[idx], y[idx], cfg)


# --- IDX files (Fashion-MNIST, MNIST) --------------------------------------------------------------

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip-compressed when its name ends in ``.gz``) as a numpy array; a clear
    :class:`QsdError` for a corrupt or truncated file. Cached per path and modification time."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise QsdError(f"cannot read IDX file {p}: {e.strerror or e}") from None
    return _read_idx_cached(str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise QsdError(f"cannot read IDX file {path}: corrupt or truncated ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise QsdError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise QsdError(f"IDX file {path} is truncated: the header is cut off")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims, dtype=np.int64))
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise QsdError(f"IDX file {path} is {what}: {len(raw)} bytes, expected {expected} "
                       f"for shape {dims}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    arr.flags.writeable = False
    return arr


def _find_idx(root: Path, name: str) -> Path | None:
    for cand in (root / (name + ".gz"), root / name):
        if cand.is_file():
            return cand
    return None


def idx_arrays(root: Path, split: str, kind: str = "fashion-mnist") -> tuple[np.ndarray, np.ndarray]:
    """(images ``(N, 28, 28)`` uint8, labels ``(N,)``) of the IDX ``train`` or ``test`` files."""
    files = {s: [_find_idx(root, n) for n in names] for s, names in IDX_FILES.items()}
    missing = [n for s, names in IDX_FILES.items() for n, f in zip(names, files[s]) if f is None]
    if missing:
        hint = ("install them with `apt-get install dataset-fashion-mnist`, or pass "
                "fashion-mnist:DIR with a folder holding the four IDX files"
                if kind == "fashion-mnist" else f"pass {kind}:DIR with a folder holding the four IDX files")
        raise QsdError(f"{kind} IDX files not found in {root} (missing {', '.join(n + '[.gz]' for n in missing)}): "
                       f"{hint}")
    img_path, lbl_path = files[split]
    images, labels = read_idx(img_path), read_idx(lbl_path)  # type: ignore[arg-type]
    if images.ndim != 3 or labels.ndim != 1:
        raise QsdError(f"{img_path} / {lbl_path}: expected images (N, H, W) and labels (N,), "
                       f"got shapes {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise QsdError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    return images, labels


def idx_split_indices(n: int, split: str) -> torch.Tensor:
    """Indices of the training file's ``train`` or ``val`` part: ``val`` is a fixed seeded
    5,000 of 60,000 (1/12 of a smaller file), ``train`` the rest."""
    n_val = min(IDX_VAL_SIZE, n // 12)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))
    part = perm[:n_val] if split == "val" else perm[n_val:]
    return part.sort().values


def idx_dataset(root: Path, split: str, cfg: DataConfig, kind: str = "fashion-mnist") -> GrayImages:
    """Fashion-MNIST / MNIST in memory at 28 px, as normalised images of the model's input size."""
    images, labels = idx_arrays(root, "test" if split == "test" else "train", kind)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    if split != "test":
        idx = idx_split_indices(len(y), split)
        x, y = x[idx], y[idx]
    return GrayImages(x, y, cfg)


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


def _first_dir(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _check_folder(root: Path) -> None:
    """A folder spec names an existing folder (one line otherwise)."""
    if not root.exists():
        raise QsdError(f"data folder not found: {root}")
    if not root.is_dir():
        raise QsdError(f"--data must be 'digits', 'fashion-mnist[:DIR]', 'mnist:DIR', 'synthetic[:N]', "
                       f"'cifar10:DIR' or a folder; {root} is a file")


def image_folder(root: Path, split: str, cfg: DataConfig, train_aug: bool = False) -> Dataset:
    from torchvision.datasets import ImageFolder

    _check_folder(root)
    val_dir = _first_dir(root, ("val", "validation"))
    test_dir = _first_dir(root, ("test",))
    train_dir = _first_dir(root, ("train",)) or root
    if split == "test":
        sub = test_dir or val_dir or root
    elif split == "val" and val_dir is not None and test_dir is not None:
        sub = val_dir
    else:  # train, or val held out of train
        sub = train_dir
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
    if sub is train_dir and split in ("train", "val") and not (val_dir and test_dir):
        return _held_out_part(ds, torch.tensor(ds.targets), split, 0.1, str(sub))
    return ds


def _held_out_part(ds: Dataset, targets: torch.Tensor, split: str, fraction: float, where: str) -> Dataset:
    keep, held = stratified_holdout(targets, fraction)
    if split == "val" and len(held) == 0:
        raise QsdError(f"{where}: too few images to hold out a validation part "
                       f"({fraction:.0%} of each class rounds down to none)")
    sub = Subset(ds, (held if split == "val" else keep).tolist())
    sub.classes = getattr(ds, "classes", None)  # type: ignore[attr-defined]
    return sub


def cifar(kind: str, root: Path, split: str, cfg: DataConfig, train_aug: bool = False) -> Dataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if kind == "cifar10" else CIFAR100
    try:
        ds = cls(str(root), train=split != "test", download=False, transform=_transform(cfg, train_aug))
    except RuntimeError as e:
        raise QsdError(f"{kind} not found under {root} (it is never downloaded; place the extracted "
                       f"python batches there): {e}") from None
    if split == "test":
        return ds
    return _held_out_part(ds, torch.tensor(ds.targets), split, 0.1, f"{kind}:{root}")


# data specs of the form KIND:ARG (a folder, or a count for synthetic)
SPEC_KINDS = ("fashion-mnist", "mnist", "synthetic", "cifar10", "cifar100")


def data_name(spec: str) -> str:
    """The data set a spec names: ``fashion-mnist`` for ``fashion-mnist:DIR``, ``synthetic`` for
    ``synthetic:N``; a folder's spec (which may itself hold a colon) is returned as it is."""
    kind, sep, _ = str(spec).partition(":")
    return kind if sep and kind in SPEC_KINDS else str(spec)


def build_dataset(spec: str, split: str = "test", cfg: DataConfig | None = None, num_classes: int = 10,
                  train_aug: bool = False) -> Dataset:
    """Dataset for a data spec (see the module docstring)."""
    cfg = cfg or DataConfig()
    if split not in ("train", "test", "val"):
        raise QsdError(f"unknown split {split!r}")
    spec = str(spec)
    if spec == "digits":
        return digits_dataset(split, cfg)
    if spec == "fashion-mnist":
        return idx_dataset(FASHION_MNIST_DIR, split, cfg, "fashion-mnist")
    for kind in ("fashion-mnist", "mnist"):
        if spec.startswith(kind + ":"):
            return idx_dataset(Path(spec.split(":", 1)[1]), split, cfg, kind)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n = 256
        if ":" in spec:
            try:
                n = int(spec.split(":", 1)[1])
            except ValueError:
                raise QsdError(f"bad data spec {spec!r}: use synthetic:N with an integer N") from None
        if n <= 0:
            raise QsdError(f"bad data spec {spec!r}: N must be positive")
        return synthetic_dataset(n, cfg, num_classes, seed={"train": 0, "test": 1, "val": 2}[split])
    for kind in ("cifar10", "cifar100"):
        if spec.startswith(kind + ":"):
            return cifar(kind, Path(spec.split(":", 1)[1]), split, cfg, train_aug)
    return image_folder(Path(spec), split, cfg, train_aug)


def model_data(model: Any) -> str | None:
    """The data spec a model records as its own: the ``data`` of its ``.qsd`` metadata, else what
    it was finetuned, calibrated or trained on (bundled models and every ``.qsd`` written by a
    command carry one). None for a reference checkpoint or a fresh model: statistics that depend
    on data then need ``--data`` (docs/method.md §3)."""
    return metadata_data(getattr(model, "qsd_meta", None) or {}, getattr(model, "qsd_quant_meta", None) or {})


def metadata_data(meta: dict, quant: dict | None = None) -> str | None:
    """:func:`model_data` read from a ``.qsd`` file's metadata (and a converted model's
    ``qsd_quant_meta``), so that a file can be chosen by its data without loading it."""
    quant = quant or {}
    finetune = (meta.get("finetune") or {}).get("config") if isinstance(meta.get("finetune"), dict) else None
    for spec in (meta.get("data"), (finetune or {}).get("data"),
                 (quant.get("calibration") or meta.get("calibration") or {}).get("data"),
                 (meta.get("training") or {}).get("data") if isinstance(meta.get("training"), dict) else None):
        if isinstance(spec, str) and spec and data_name(spec) != "synthetic":
            return spec
    return None


def same_data(a: str, b: str) -> bool:
    """Whether two data specs name the same data set (``fashion-mnist`` and ``fashion-mnist:DIR``
    do; two folders do when they are the same folder)."""
    na, nb = data_name(a), data_name(b)
    if na in SPEC_KINDS or nb in SPEC_KINDS or "digits" in (na, nb):
        return na == nb
    return Path(na).expanduser().resolve() == Path(nb).expanduser().resolve()


def data_conflict(model: Any, data: str | None) -> str | None:
    """``"<model's data>, not <data>"`` when the model records data of its own and ``data`` is
    another data set, else None: figures measured on another data set would describe nothing."""
    own = model_data(model)
    if data is None or own is None or same_data(own, data):
        return None
    return f"the model's own data is {own}, not {data}"


def data_for(model: Any, data: str | None, name: str = "the model") -> str:
    """The data a command measures ``model`` on: ``data``, else the model's own, else digits.
    Data of another data set than the model's own is refused before any work, in one line."""
    if data is not None and data_name(data) not in (*SPEC_KINDS, "digits"):
        _check_folder(Path(data))
    conflict = data_conflict(model, data)
    if conflict:
        raise QsdError(f"{name}: {conflict}; omit --data to use the model's own data, or pass another MODEL")
    return data or model_data(model) or "digits"


def class_mismatch(num_classes: int | None, data: str, dataset: Dataset | None) -> str | None:
    """``"<data> has k classes, the model predicts n"`` when a labelled data set's class count is
    not the model's, else None."""
    classes = num_classes_of(dataset) if dataset is not None else None
    if classes is not None and num_classes is not None and classes != num_classes:
        return f"{data} has {classes} classes, the model predicts {num_classes}"
    return None


def foreign_data_reason(model: Any, data: str, loader: Any) -> str | None:
    """Why ``data`` is not of the model's kind (synthetic noise, another class count), or None."""
    if data_name(data) == "synthetic":
        return f"{data} is random noise"
    conflict = data_conflict(model, data)
    if conflict:
        return conflict
    return class_mismatch(getattr(model, "num_classes", None), data, getattr(loader, "dataset", None))


def num_classes_of(ds: Dataset) -> int | None:
    if getattr(ds, "classes", None) is not None:
        return len(ds.classes)  # type: ignore[attr-defined]
    if isinstance(ds, GrayImages):
        return int(ds.labels.max()) + 1
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


def first_samples(loader: Iterable, n: int) -> list:
    """The batches of ``loader`` that hold its first ``n`` samples, the last one cut to fit; each
    batch as the loader gives it (a tensor, or a tuple/list whose tensors are all cut)."""
    out: list = []
    seen = 0
    if n <= 0:
        return out
    for batch in loader:
        keep = n - seen
        batch = type(batch)(t[:keep] for t in batch) if isinstance(batch, (list, tuple)) else batch[:keep]
        out.append(batch)
        seen += len(batch[0] if isinstance(batch, (list, tuple)) else batch)
        if seen >= n:
            break
    return out


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


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (in place; returns ``x``): with
    :func:`random_shift`, the augmentation the bundled Fashion-MNIST models were trained with."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


__all__: Sequence[str] = [
    "DataConfig", "build_dataset", "build_loader", "digits_dataset", "synthetic_dataset",
    "resize_batch", "num_classes_of", "model_data", "metadata_data", "foreign_data_reason", "class_mismatch", "random_shift", "random_hflip",
    "read_idx", "idx_dataset", "stratified_holdout",
    "to_model_input", "first_samples",
]
