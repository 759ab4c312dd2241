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
from qsdcompress.qsdfile import read_checkpoint, read_header_metadata

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
    assert script in zoo.default_for(data).trained_by


def test_names_aliases_and_files_find_their_entry():
    assert zoo.lookup("qsd_tiny") is zoo.MODELS["qsd_tiny_digits"]
    assert zoo.lookup("qsd_8_256_fmnist").ann == "qsd_8_256_fmnist_ann"
    assert zoo.lookup("qsd_8_256") is None  # an architecture, not a bundled model
    assert zoo.of_file("/elsewhere/qsd_tiny_fmnist_ann.qsd") is zoo.MODELS["qsd_tiny_fmnist_ann"]
    assert "qsd_tiny_fmnist" in zoo.unknown_name_hint("qsd_tiny_fmnst")
    for m in zoo.MODELS.values():
        assert (ROOT / m.trained_by.split()[1]).exists(), m.trained_by
        assert m.ann is None or zoo.MODELS[m.ann].kind == "ann" and zoo.MODELS[m.ann].data == m.data


INSTALLED = [m for m in zoo.MODELS.values() if m.installed and m.kind != "vit"]


@pytest.mark.parametrize("entry", INSTALLED, ids=[m.name for m in INSTALLED])
def test_each_file_holds_the_model_its_entry_says(entry):
    _, meta = read_checkpoint(entry.path)
    assert meta["model_args"]["neuron"] == ("relu" if entry.kind == "ann" else "multispike")
    assert meta["training"]["data"] == entry.data
    assert read_header_metadata(entry.path) == meta  # the header alone gives the same metadata


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


def test_a_missing_file_names_the_command_that_trains_it(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    with pytest.raises(QsdError, match=r"qsd_tiny_fmnist is not in this installation .*examples/train_fmnist\.py"):
        zoo.load_bundled_weights(q.create_model("qsd_tiny_fmnist"), data="fashion-mnist")
    with pytest.raises(QsdError, match=r"examples/train_fmnist_8_256\.py"):
        q.load("qsd_8_256_fmnist")


def test_weights_of_another_model_are_refused():
    with pytest.raises(QsdError, match="does not fit"):
        zoo.load_bundled_weights(q.create_model("qsd_tiny_fmnist"), data="digits")


def test_bundled_names_load_as_models():
    a = q.load("qsd_tiny_fmnist_ann")
    assert a.arch == "qsd_tiny_fmnist" and a.cfg.neuron == "relu"
    vit = q.load("vit_digits")
    sd, _ = read_checkpoint(zoo.MODELS["vit_digits"].path)
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in sd.items())


def test_every_bundled_file_is_package_data():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib")
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["qsdcompress"]
    shipped = [p.name for p in zoo.ZOO_DIR.iterdir() if p.is_file() and p.suffix != ".py"]
    assert shipped and all(any(fnmatch.fnmatch(f"zoo/{n}", pat) for pat in patterns) for n in shipped), shipped
