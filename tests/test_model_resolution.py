"""The one rule every command finds its MODEL by (loading.locate_model), bundled names as MODEL,
model and data checked against each other before any work, and errors as JSON with --json."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import qsdcompress as q
from qsdcompress import zoo
from qsdcompress.cli import main
from qsdcompress.errors import QsdError, error_and_hint
from qsdcompress.loading import locate_model, model_file


def _save(model, path: Path, kind: str, data: str | None, age_s: float) -> Path:
    if data is not None:
        model.qsd_meta = {**(getattr(model, "qsd_meta", None) or {}), "data": data}
    q.save(model, path, kind=kind)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """A float digits model (oldest), a converted digits model, a converted Fashion-MNIST model (newest)."""
    wd = tmp_path / "wd"
    wd.mkdir()
    _save(q.create_model("qsd_tiny").eval(), wd / "float.qsd", "float", "digits", 30)
    _save(q.create_model("qsd_tiny").eval(), wd / "converted.qsd", "converted", "digits", 20)
    _save(q.create_model("qsd_tiny_fmnist").eval(), wd / "fm.qsd", "converted", "fashion-mnist", 10)
    return wd


def test_the_work_directory_gives_the_newest_model_the_command_takes(workdir):
    assert locate_model(None, workdir, None, "any") == workdir / "fm.qsd"
    assert locate_model(None, workdir, None, "converted") == workdir / "fm.qsd"
    assert locate_model(None, workdir, "digits", "converted") == workdir / "converted.qsd"
    assert locate_model(None, workdir, None, "float") == workdir / "float.qsd"
    # no float model of Fashion-MNIST there: the bundled one
    assert locate_model(None, workdir, "fashion-mnist", "float") == zoo.MODELS["qsd_tiny_fmnist"].path
    assert locate_model("qsd_tiny", workdir) == zoo.MODELS["qsd_tiny_digits"].path  # MODEL wins


def test_finetune_without_a_converted_model_says_to_convert(tmp_path):
    with pytest.raises(QsdError, match=r"no converted model of fashion-mnist in .*qsdcompress convert --data "
                                       r"fashion-mnist"):
        locate_model(None, tmp_path, "fashion-mnist", "converted")


def test_model_names_and_paths():
    assert model_file("qsd_tiny_fmnist_ann") == zoo.MODELS["qsd_tiny_fmnist_ann"].path
    with pytest.raises(QsdError, match="neither a file nor a bundled model; did you mean qsd_tiny_fmnist"):
        model_file("qsd_tiny_fmnst")
    with pytest.raises(QsdError, match="file not found: nowhere/x.qsd"):
        model_file("nowhere/x.qsd")


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_data_of_another_data_set_is_refused_before_any_work_in_one_json_object(tmp_path):
    r = _invoke("eval", "qsd_tiny_digits", "--data", "fashion-mnist", "--json", "--workdir", tmp_path)
    assert r.exit_code == 2
    out = json.loads(r.stdout)
    assert set(out) == {"error", "hint"}
    assert "own data is digits, not fashion-mnist" in out["error"] and "omit --data" in out["hint"]


def test_a_bundled_teacher_of_other_data_is_refused(workdir):
    r = _invoke("finetune", "--teacher", "vit_digits", "--data", "fashion-mnist", "--workdir", workdir, "--json")
    assert r.exit_code == 2
    assert "teacher vit_digits was trained on digits, the data is fashion-mnist" in json.loads(r.stdout)["error"]


def test_usage_errors_are_json_too(tmp_path):
    r = _invoke("eval", "--split", "nope", "--json")
    out = json.loads(r.stdout)
    assert r.exit_code == 2 and "nope" in out["error"] and out["hint"] == "see `qsdcompress eval --help`"
    r = _invoke("convert", "--bits", "9", "--json", "--workdir", tmp_path)
    assert r.exit_code == 2 and "from 1 to 8" in json.loads(r.stdout)["error"]


def test_error_and_hint_split_where_the_advice_starts():
    assert error_and_hint(QsdError("x is missing; pass --data DIR")) == ("x is missing", "pass --data DIR")
    assert error_and_hint(QsdError("file not found: a.qsd")) == ("file not found: a.qsd", None)
    assert error_and_hint(QsdError("no model (run `convert` first)")) == ("no model", "run `convert` first")
    assert error_and_hint(QsdError("bad", hint="do this")) == ("bad", "do this")


def test_list_shows_every_bundled_model_with_its_data():
    r = _invoke("list", "--json")
    rows = {m["name"]: m for m in json.loads(r.stdout)["models"]}
    assert list(rows) == list(zoo.MODELS)
    for name, m in rows.items():
        entry = zoo.MODELS[name]
        assert m["data"] == entry.data and m["installed"] == entry.path.exists()
    assert rows["qsd_tiny_fmnist"]["test_top1"] == zoo.MODELS["qsd_tiny_fmnist"].metadata()["training"]["test_top1"]
