"""config: FinetuneConfig round trips, recipe reading and one clear error per bad option."""
from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest
import yaml

from qsdcompress.config import DEFAULT_WORKDIR, FinetuneConfig, normalise_keys, read_recipe
from qsdcompress.errors import QsdError


def _changed() -> FinetuneConfig:
    return FinetuneConfig(model="m.qsd", teacher="vit_digits", lambda_kd=0.5, fgd_layers=[0, 2], steps=7,
                          clip_grad=None, scale_lr=None, resume="auto", ema=True, threads=2)


def test_defaults_match_the_documented_ones():
    c = FinetuneConfig()
    assert c.workdir == DEFAULT_WORKDIR == "qsdcompress-out"
    assert (c.teacher, c.data, c.epochs, c.lr, c.tau, c.device) == ("ann", None, 3, 5e-4, 1.0, "auto")
    assert c.validate() is c


@pytest.mark.parametrize("fmt", ["yaml", "json", "dict"])
def test_round_trip_keeps_every_field(fmt):
    c = _changed()
    back = {"yaml": lambda: FinetuneConfig.from_yaml(c.to_yaml()),
            "json": lambda: FinetuneConfig.from_json(c.to_json()),
            "dict": lambda: FinetuneConfig.from_dict(c.to_dict())}[fmt]()
    assert back == c
    assert [f.name for f in fields(back)] == list(c.to_dict())


def test_written_forms_are_plain_yaml_and_json():
    c = _changed()
    assert yaml.safe_load(c.to_yaml())["fgd_layers"] == [0, 2]
    assert json.loads(c.to_json())["clip_grad"] is None


def test_hyphenated_keys_and_the_old_empty_extra_field():
    c = FinetuneConfig.from_dict({"lambda-fgd": 0.25, "batch-size": 8, "extra": {}})
    assert (c.lambda_fgd, c.batch_size) == (0.25, 8)
    assert normalise_keys({"a-b-c": 1, "d_e": 2}) == {"a_b_c": 1, "d_e": 2}


def test_unknown_options_are_named():
    with pytest.raises(QsdError, match="unknown finetune option.*: bogus, lamda_kd"):
        FinetuneConfig.from_dict({"lamda_kd": 1, "bogus": 2})
    with pytest.raises(QsdError, match="unknown finetune option"):
        FinetuneConfig.from_dict({"extra": {"x": 1}})  # a non-empty extra is not dropped silently
    with pytest.raises(QsdError, match="must be a mapping"):
        normalise_keys(["lr", 1])  # type: ignore[arg-type]


@pytest.mark.parametrize("change,message", [
    ({"lambda_kd": -1.0}, "--lambda-kd must be a finite non-negative number"),
    ({"lambda_fgd": math.inf}, "--lambda-fgd must be a finite non-negative number"),
    ({"tau": 0.0}, "--tau must be a finite positive number"),
    ({"lr": math.nan}, "--lr must be a finite positive number"),
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"ie_lif_warmup": -3}, "--ie-lif-warmup must be 0 or more"),
    ({"resume": "run/finetuned.qsd"}, "that is a model file"),
])
def test_validate_names_the_bad_option(change, message):
    with pytest.raises(QsdError, match=message):
        FinetuneConfig(**change).validate()


def test_validate_accepts_the_edges():
    FinetuneConfig(lambda_kd=0.0, lambda_fgd=0.0, epochs=0, steps=5, ie_lif_warmup=0,
                   resume="run/checkpoint.pt").validate()


def test_read_recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("lambda-fgd: 0.5\nepochs: 2\n")
    assert read_recipe(p) == {"lambda_fgd": 0.5, "epochs": 2}
    (tmp_path / "empty.yaml").write_text("")
    assert read_recipe(tmp_path / "empty.yaml") == {}
    (tmp_path / "r.json").write_text('{"lr": 0.001}')  # JSON is YAML
    assert read_recipe(tmp_path / "r.json") == {"lr": 0.001}


@pytest.mark.parametrize("text,message", [
    ("epochs: [1, 2\n", "is not valid YAML"),
    ("- lr\n- 1\n", "must be a mapping"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(QsdError, match=message) as e:
        read_recipe(p)
    assert "\n" not in str(e.value)


def test_missing_recipe(tmp_path):
    with pytest.raises(QsdError, match="recipe not found"):
        read_recipe(tmp_path / "nope.yaml")
    with pytest.raises(QsdError, match="recipe not found"):
        read_recipe(tmp_path)  # a directory is not a recipe
