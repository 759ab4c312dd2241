"""Datasets: digits split, ImageFolder handling (grayscale, odd sizes), errors."""
import pytest
import torch

from qsdcompress.data import DataConfig, build_dataset, build_loader, resize_batch
from qsdcompress.errors import QsdError


def test_digits_split_is_fixed_and_disjoint():
    cfg = DataConfig()
    tr, te = build_dataset("digits", "train", cfg), build_dataset("digits", "test", cfg)
    assert len(tr) + len(te) == 1797 and len(te) == 360
    x, y = te[0]
    assert x.shape == (3, 32, 32) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    te2 = build_dataset("digits", "test", cfg)
    assert torch.equal(te.tensors[0], te2.tensors[0])
    assert torch.bincount(te.tensors[1]).min() >= 35  # stratified


def test_digits_follow_model_input_size():
    ds = build_dataset("digits", "test", DataConfig(input_size=(1, 48, 48), mean=(0.1,), std=(0.2,)))
    assert ds[0][0].shape == (1, 48, 48)


def test_image_folder_grayscale_and_odd_sizes(tmp_path):
    from PIL import Image

    for cls, mode, size in [("a", "L", (17, 23)), ("b", "RGB", (40, 31)), ("b", "RGBA", (9, 9))]:
        d = tmp_path / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, color=128 if mode == "L" else (10, 20, 30, 255)[: len(mode)]).save(
            d / f"{mode}.png")
    loader = build_loader(str(tmp_path), "train", DataConfig(input_size=(3, 32, 32)), batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (3, 3, 32, 32) and sorted(y.tolist()) == [0, 1, 1]


def test_bad_data_specs(tmp_path):
    with pytest.raises(QsdError, match="not found"):
        build_dataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(QsdError, match="no class subfolders"):
        build_dataset(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(QsdError):
        build_dataset(str(tmp_path / "noimg"))
    with pytest.raises(QsdError, match="never downloaded"):
        build_dataset(f"cifar10:{tmp_path}")
    with pytest.raises(QsdError, match="synthetic:N"):
        build_dataset("synthetic:abc")


def test_synthetic_and_resize_batch():
    ds = build_dataset("synthetic:10", "test", DataConfig(input_size=(3, 16, 16)), num_classes=3)
    assert len(ds) == 10 and int(ds.tensors[1].max()) < 3
    src = DataConfig(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    dst = DataConfig(input_size=(3, 64, 64), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = torch.full((2, 3, 32, 32), 0.2)  # raw pixel value 0.6
    y = resize_batch(x, src, dst)
    expect = (0.6 - torch.tensor(dst.mean)) / torch.tensor(dst.std)
    assert y.shape == (2, 3, 64, 64)
    assert torch.allclose(y[0, :, 5, 5], expect, atol=1e-6)
