"""Datasets: digits split, IDX files (Fashion-MNIST / MNIST), train/val/test splits, ImageFolder
handling (grayscale, odd sizes), errors."""
import gzip

import numpy as np
import pytest
import torch

from qsdcompress.data import DataConfig, build_dataset, build_loader, data_name, read_idx, resize_batch
from qsdcompress.errors import QsdError


def _rows(t: torch.Tensor) -> set:
    return {tuple(r) for r in t.flatten(1).tolist()}


def test_digits_split_is_fixed_and_disjoint():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    cfg = DataConfig()
    tr, va, te = (build_dataset("digits", s, cfg) for s in ("train", "val", "test"))
    assert len(tr) + len(va) + len(te) == 1797 and len(te) == 360
    assert 270 <= len(va) <= 290  # a stratified 20% of the 1,437 training images
    assert not _rows(tr.tensors[0]) & _rows(va.tensors[0])
    assert torch.bincount(va.tensors[1]).min() >= 25
    # the test split is the one the bundled digits numbers were measured on
    d = load_digits()
    _, te_idx = train_test_split(np.arange(1797), test_size=0.2, random_state=0, stratify=d.target)
    assert torch.equal(te.tensors[1], torch.as_tensor(d.target[te_idx]))
    va2 = build_dataset("digits", "val", cfg)
    assert torch.equal(va.tensors[0], va2.tensors[0])
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


def test_data_name_of_a_spec():
    cases = {"digits": "digits", "fashion-mnist": "fashion-mnist", "fashion-mnist:/d/x": "fashion-mnist",
             "mnist:rel/dir": "mnist", "synthetic:10": "synthetic", "cifar100:/c": "cifar100",
             "/data/imagenet": "/data/imagenet", "C:/images": "C:/images", "my:folder": "my:folder"}
    assert {spec: data_name(spec) for spec in cases} == cases


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


# --- IDX files ------------------------------------------------------------------------------------

NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    head = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return head + arr.tobytes()


def write_idx(path, arr: np.ndarray, gz: bool) -> None:
    data = idx_bytes(arr)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_idx_dir(root, gz=True, n_train=120, n_test=30, size=28):
    """Four IDX files; image i of the training file has i in its first pixel (identifiable)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        x[:, 0, 0] = np.arange(n) % 256
        y = (np.arange(n) % 10).astype(np.uint8)
        for name, arr in zip(NAMES[split], (x, y)):
            write_idx(root / name, arr, gz if isinstance(gz, bool) else gz[name])
        arrays[split] = (x, y)
    return arrays


GRAY28 = DataConfig(input_size=(1, 28, 28), mean=(0.0,), std=(1.0,))


@pytest.mark.parametrize("gz", [True, False, "mixed"])
def test_idx_files_parse_to_the_arrays_written(tmp_path, gz):
    if gz == "mixed":
        gz = {n: i % 2 == 0 for i, n in enumerate(NAMES["train"] + NAMES["test"])}
    arrays = make_idx_dir(tmp_path / "f", gz=gz)
    suffix = ".gz" if gz is True else ""
    if isinstance(gz, bool):
        x = read_idx(tmp_path / "f" / (NAMES["train"][0] + suffix))
        assert x.dtype == np.uint8 and np.array_equal(x, arrays["train"][0])
    for kind in ("fashion-mnist", "mnist"):
        te = build_dataset(f"{kind}:{tmp_path / 'f'}", "test", GRAY28)
        assert te.tensors[0].shape == (30, 1, 28, 28)
        assert torch.equal(te.tensors[0][:, 0], torch.from_numpy(arrays["test"][0]).float() / 255)
        assert torch.equal(te.tensors[1], torch.from_numpy(arrays["test"][1]).long())


def test_other_idx_types_and_caching(tmp_path):
    arr = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    got = read_idx(tmp_path / "a")
    assert np.array_equal(got, arr) and got.shape == (2, 3, 4)
    assert read_idx(tmp_path / "a") is got  # parsed once per process


def test_corrupt_idx_files_give_clear_errors(tmp_path):
    make_idx_dir(tmp_path / "f", gz=False)
    good = (tmp_path / "f" / NAMES["test"][0]).read_bytes()
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x08\x03\x00\x00" + good[4:])
    with pytest.raises(QsdError, match="not an IDX file .*bad magic"):
        read_idx(bad)
    bad.write_bytes(b"")
    with pytest.raises(QsdError, match="bad magic"):
        read_idx(bad)
    cut = tmp_path / "cut"
    cut.write_bytes(good[:-5])
    with pytest.raises(QsdError, match="truncated: .* expected"):
        read_idx(cut)
    cut.write_bytes(good[:10])
    with pytest.raises(QsdError, match="truncated"):
        read_idx(cut)
    gz = tmp_path / "cut.gz"
    gz.write_bytes(gzip.compress(good)[:200])
    with pytest.raises(QsdError, match="corrupt or truncated"):
        read_idx(gz)
    (tmp_path / "f" / NAMES["test"][0]).write_bytes(good[:-1])
    with pytest.raises(QsdError, match="truncated"):
        build_dataset(f"fashion-mnist:{tmp_path / 'f'}", "test", GRAY28)
    labels = np.zeros(7, dtype=np.uint8)
    (tmp_path / "f" / NAMES["test"][0]).write_bytes(good)
    (tmp_path / "f" / NAMES["test"][1]).write_bytes(idx_bytes(labels))
    with pytest.raises(QsdError, match="30 images but .* 7 labels"):
        build_dataset(f"fashion-mnist:{tmp_path / 'f'}", "test", GRAY28)


def test_missing_idx_files_name_the_package_and_the_dir_form(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QsdError) as e:
        build_dataset(f"fashion-mnist:{tmp_path / 'empty'}", "train", GRAY28)
    msg = str(e.value)
    assert "\n" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "fashion-mnist:DIR" in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    make_idx_dir(tmp_path / "three")
    (tmp_path / "three" / (NAMES["test"][1] + ".gz")).unlink()
    with pytest.raises(QsdError, match="missing t10k-labels-idx1-ubyte") as e:
        build_dataset(f"mnist:{tmp_path / 'three'}", "train", GRAY28)
    assert "mnist:DIR" in str(e.value)


def test_idx_splits_disjoint_seeded_stable(tmp_path):
    arrays = make_idx_dir(tmp_path / "f", n_train=240)
    spec = f"fashion-mnist:{tmp_path / 'f'}"
    tr, va = build_dataset(spec, "train", GRAY28), build_dataset(spec, "val", GRAY28)
    assert (len(tr), len(va)) == (220, 20)  # 1/12 held out (5,000 of 60,000)
    ids = lambda ds: (ds.tensors[0][:, 0, 0, 0] * 255).round().long()  # noqa: E731
    tr_ids, va_ids = ids(tr).tolist(), ids(va).tolist()
    assert not set(tr_ids) & set(va_ids) and sorted(tr_ids + va_ids) == list(range(240))
    assert va_ids != list(range(220, 240))  # held out at random, not the tail
    assert torch.equal(va.tensors[1], torch.from_numpy(arrays["train"][1][va_ids]).long())
    again = build_dataset(spec, "val", GRAY28)
    assert torch.equal(again.tensors[0], va.tensors[0])
    # a copy elsewhere (fresh parse) holds out the same images
    make_idx_dir(tmp_path / "g", n_train=240, gz=False)
    assert ids(build_dataset(f"mnist:{tmp_path / 'g'}", "val", GRAY28)).tolist() == va_ids


def test_idx_to_model_input_channels_size_normalisation(tmp_path):
    arrays = make_idx_dir(tmp_path / "f")
    spec = f"fashion-mnist:{tmp_path / 'f'}"
    raw = torch.from_numpy(arrays["test"][0]).float() / 255
    cfg = DataConfig(input_size=(1, 28, 28), mean=(0.286,), std=(0.353,))
    x = build_dataset(spec, "test", cfg).tensors[0]
    assert torch.allclose(x[:, 0], (raw - 0.286) / 0.353, atol=1e-6)
    rgb = DataConfig(input_size=(3, 32, 32), mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.25))
    x3 = build_dataset(spec, "test", rgb).tensors[0]
    assert x3.shape == (30, 3, 32, 32)
    back = x3 * torch.tensor(rgb.std).view(1, 3, 1, 1) + torch.tensor(rgb.mean).view(1, 3, 1, 1)
    assert torch.allclose(back[:, 0], back[:, 1], atol=1e-6) and torch.allclose(back[:, 0], back[:, 2], atol=1e-6)
    assert float(back.min()) >= -1e-6 and float(back.max()) <= 1 + 1e-6
    up = torch.nn.functional.interpolate(raw.unsqueeze(1), size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(back[:, :1], up.clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("spec", ["digits", "fashion-mnist:IDX"])
def test_loader_batches_are_the_whole_split_converted_at_once(tmp_path, spec):
    """Images become model input a batch at a time; every batch equals those rows of the whole
    split converted in one call (a reference: ``to_model_input`` on all images)."""
    from qsdcompress.data import build_loader, to_model_input

    if spec.endswith("IDX"):
        make_idx_dir(tmp_path / "f", n_test=37)
        spec = f"fashion-mnist:{tmp_path / 'f'}"
    cfg = DataConfig(input_size=(3, 40, 40), mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.25))
    loader = build_loader(spec, "test", cfg, batch_size=16)
    ds = loader.dataset
    whole = to_model_input(ds.images, cfg)
    got = torch.cat([x for x, _ in loader])
    assert torch.equal(got, whole) and torch.equal(torch.cat([y for _, y in loader]), ds.labels)
    assert torch.equal(ds[5][0], whole[5])


def test_a_224_px_split_is_not_made_up_front(tmp_path):
    """55,000 Fashion-MNIST images as 224 px input would take 11 GB per channel; the dataset keeps
    the 28 px images and converts a batch when it is read."""
    from qsdcompress.data import build_loader

    make_idx_dir(tmp_path / "f", n_train=1200)
    cfg = DataConfig(input_size=(3, 224, 224), mean=(0.5,), std=(0.5,))
    loader = build_loader(f"fashion-mnist:{tmp_path / 'f'}", "train", cfg, batch_size=8)
    assert loader.dataset.images.shape == (1100, 28, 28)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 224, 224) and y.shape == (8,)


def test_default_fashion_mnist_dir_and_data_config(monkeypatch, tmp_path):
    import qsdcompress as q
    from qsdcompress import data

    make_idx_dir(tmp_path / "f")
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "f")
    model = q.create_model("qsd_tiny_fmnist")
    cfg = DataConfig.from_model(model)
    assert cfg.input_size == (1, 28, 28) and cfg.mean == (0.286,) and cfg.std == (0.353,)
    ds = build_dataset("fashion-mnist", "test", cfg)
    assert len(ds) == 30 and model.eval()(ds.tensors[0][:4]).shape == (4, 10)
    plain = DataConfig.from_model(torch.nn.Linear(2, 2))  # no pretrained_cfg: ImageNet defaults
    assert plain.input_size == (3, 224, 224) and plain.mean == (0.485, 0.456, 0.406)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(QsdError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion-mnist", "test", cfg)


# --- val splits of the other data sets ------------------------------------------------------------

def _folder(root, n_per_class=10):
    from PIL import Image

    for cls in ("a", "b"):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.new("L", (8, 8), color=i * 10 + (cls == "b")).save(d / f"{i}.png")


def test_image_folder_val_split(tmp_path):
    cfg = DataConfig(input_size=(3, 8, 8))
    _folder(tmp_path / "tv" / "train")
    _folder(tmp_path / "tv" / "val", 3)
    tr, va, te = (build_dataset(str(tmp_path / "tv"), s, cfg) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (18, 2, 6)  # val: 10% of each training class
    assert not set(tr.indices) & set(va.indices)
    assert sorted(va.dataset.targets[i] for i in va.indices) == [0, 1]
    assert build_dataset(str(tmp_path / "tv"), "val", cfg).indices == va.indices
    assert len(build_loader(str(tmp_path / "tv"), "val", cfg, batch_size=4).dataset) == 2
    _folder(tmp_path / "tvt" / "train")
    _folder(tmp_path / "tvt" / "val", 2)
    _folder(tmp_path / "tvt" / "test", 3)
    tr, va, te = (build_dataset(str(tmp_path / "tvt"), s, cfg) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (20, 4, 6)  # the folder's own val/ and test/
    _folder(tmp_path / "tiny", 3)
    with pytest.raises(QsdError, match="too few images"):
        build_dataset(str(tmp_path / "tiny"), "val", cfg)


def test_synthetic_val_is_its_own_draw():
    cfg = DataConfig(input_size=(3, 4, 4))
    tr, va, te = (build_dataset("synthetic:8", s, cfg) for s in ("train", "val", "test"))
    assert not torch.equal(va.tensors[0], tr.tensors[0]) and not torch.equal(va.tensors[0], te.tensors[0])
    assert torch.equal(va.tensors[0], build_dataset("synthetic:8", "val", cfg).tensors[0])


def test_first_samples_cuts_the_last_batch_and_keeps_the_batch_form():
    from torch.utils.data import DataLoader, TensorDataset

    from qsdcompress.data import first_samples

    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    got = first_samples(DataLoader(TensorDataset(x, y), batch_size=4), 6)
    assert [len(b[0]) for b in got] == [4, 2] and all(isinstance(b, list) and len(b) == 2 for b in got)
    assert torch.equal(torch.cat([b[1] for b in got]), y[:6])
    plain = first_samples([x[:4], x[4:8], x[8:]], 9)
    assert [len(b) for b in plain] == [4, 4, 1] and torch.equal(torch.cat(plain), x[:9])
    assert first_samples([x], 0) == [] and len(first_samples([x], 50)) == 1


def test_random_hflip_mirrors_the_images_its_draws_pick():
    from qsdcompress.data import random_hflip

    x = torch.arange(4 * 1 * 2 * 3, dtype=torch.float32).reshape(4, 1, 2, 3)
    pick = torch.rand(4, generator=torch.Generator().manual_seed(5)) < 0.5
    out = random_hflip(x.clone(), torch.Generator().manual_seed(5))
    for i in range(4):   # reference: reverse the columns of the picked images by index
        expect = x[i][..., [2, 1, 0]] if pick[i] else x[i]
        assert torch.equal(out[i], expect)
    assert 0 < int(pick.sum()) < 4   # the seed exercises both cases
