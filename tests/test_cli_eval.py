"""`qsdcompress eval` as a user runs it, and the bundled default models."""
import json

import pytest
from click.testing import CliRunner

import qsdcompress as q
from qsdcompress.cli import main
from qsdcompress.zoo import BUNDLED_ANN, BUNDLED_SNN


def run(*args):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r


def test_bundled_files_are_small_safetensors():
    for p in (BUNDLED_SNN, BUNDLED_ANN):
        assert p.exists() and p.stat().st_size < 2 * 1024 * 1024


def test_eval_json_bundled_model_reaches_target():
    r = run("eval", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["samples"] == 360
    assert 0 <= out["top5"] <= 1 and out["top1"] >= 0.97


def test_bundled_ann_reaches_target():
    assert q.eval(q.bundled_model(ann=True))["top1"] >= 0.97


@pytest.mark.parametrize("args,msg", [
    (["eval", "missing.qsd"], "file not found"),
    (["eval", "--arch", "qsd_8_51"], "did you mean"),
    (["eval", "--data", "/nonexistent/folder"], "not found"),
    (["eval", "--device", "cuda:7"], "CUDA is not available"),
])
def test_eval_user_mistakes_are_one_line_errors(args, msg):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    assert msg in r.output and "Traceback" not in r.output


def test_eval_max_batches_and_table():
    r = run("eval", "--max-batches", "1", "--batch-size", "16")
    assert r.exit_code == 0
    assert "top1" in r.output
