"""zoo: which bundled file a data spec selects, that each file holds what its name says, that
loading copies its tensors exactly, and that every bundled file is shipped in the wheel."""
from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import pytest
import torch

import qsdcompress as q
from qsdcompress import zoo
from qsdcompress.errors import QsdError
from qsdcompress.io import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data,snn,ann,script", [
    ("digits", "qsd_tiny_digits.qsd", "qsd_tiny_digits_ann.qsd", "examples/train_bundled.py"),
    ("fashion-mnist", "qsd_tiny_fmnist.qsd", "qsd_tiny_fmnist_ann.qsd", "examples/train_fmnist.py"),
    ("fashion-mnist:/data/fm", "qsd_tiny_fmnist.qsd", "qsd_tiny_fmnist_ann.qsd", "examples/train_fmnist.py"),
    ("mnist:/data/mnist", "qsd_tiny_digits.qsd", "qsd_tiny_digits_ann.qsd", "examples/train_bundled.py"),
    ("/data/fashion-mnist", "qsd_tiny_digits.qsd", "qsd_tiny_digits_ann.qsd", "examples/train_bundled.py"),
])
def test_bundled_path_per_data_spec(data, snn, ann, script):
    assert zoo.bundled_path(data=data) == zoo.ZOO_DIR / snn
    assert zoo.bundled_path(ann=True, data=data) == zoo.ZOO_DIR / ann
    assert zoo.training_script(data) == script
    assert (ROOT / script).exists()


@pytest.mark.parametrize("path,arch,neuron", [
    (zoo.BUNDLED_SNN, "qsd_tiny", "multispike"), (zoo.BUNDLED_ANN, "qsd_tiny", "relu"),
    (zoo.FMNIST_SNN, "qsd_tiny_fmnist", "multispike"), (zoo.FMNIST_ANN, "qsd_tiny_fmnist", "relu"),
])
def test_each_file_holds_the_model_its_name_says(path, arch, neuron):
    _, meta = read_checkpoint(path)
    assert meta["arch"] == arch and meta["model_args"]["neuron"] == neuron


@pytest.mark.parametrize("data,ann", [("digits", False), ("digits", True), ("fashion-mnist", False)])
def test_load_bundled_weights_copies_every_tensor(data, ann):
    arch = "qsd_tiny_fmnist" if data == "fashion-mnist" else "qsd_tiny"
    model = q.create_model(arch, neuron="relu" if ann else "multispike")
    zoo.load_bundled_weights(model, ann=ann, data=data)
    sd, _ = read_checkpoint(zoo.bundled_path(ann, data))
    own = model.state_dict()
    assert set(own) == set(sd)
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


def test_a_missing_file_names_the_script_that_trains_it(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "FMNIST_SNN", tmp_path / "gone.qsd")
    with pytest.raises(QsdError, match=r"bundled weights missing: .*gone\.qsd \(run examples/train_fmnist\.py\)"):
        zoo.load_bundled_weights(q.create_model("qsd_tiny_fmnist"), data="fashion-mnist")


def test_weights_of_another_model_are_refused():
    with pytest.raises(QsdError, match="does not fit"):
        zoo.load_bundled_weights(q.create_model("qsd_tiny_fmnist"), data="digits")


def test_every_bundled_file_is_package_data():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib")
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["qsdcompress"]
    shipped = [p.name for p in zoo.ZOO_DIR.iterdir() if p.is_file() and p.suffix != ".py"]
    assert shipped and all(any(fnmatch.fnmatch(f"zoo/{n}", pat) for pat in patterns) for n in shipped), shipped
