"""The user's own model: a reference-format ``qsd_8_256`` checkpoint (``{'model': state_dict}``,
BatchNorm statistics and affine randomised, layer scales 0.8-1.2) at 224 px, through ``convert``
without ``--data`` and ``export`` in both formats under the parity contract."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import qsdcompress as q
from qsdcompress.cli import main
from qsdcompress.models.random_init import randomize_


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    m = q.create_model("qsd_8_256")
    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(8, 3, 28, 28, generator=g), size=224, mode="bilinear") * 4 - 2
    randomize_(m, images, seed=0, layer_scale=(0.8, 1.2))
    path = tmp_path_factory.mktemp("ref") / "ref_8_256.pth"
    torch.save({"model": m.state_dict()}, path)
    return path, m


@pytest.mark.slow
def test_convert_without_data_is_weight_only_and_reports_no_accuracy(reference_checkpoint, tmp_path):
    path, float_model = reference_checkpoint
    r = CliRunner().invoke(main, ["convert", str(path), "--bits", "4", "--json", "--workdir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["top1_before"] is None and d["top1_after"] is None and "--data" in d["top1_note"]
    cal = d["calibration"]
    assert cal["samples"] == 0 and cal["batchnorm_reestimated"] is False and "--data" in cal["note"]
    assert d["arch"] == "qsd_8_256" and d["layers_per_bits"]["4"]["layers"] > 100
    converted = q.load(tmp_path / "converted.qsd")
    bns = [(n, b) for n, b in float_model.named_modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert bns
    for name, bn in bns:  # the checkpoint's own statistics, untouched
        mine = converted.get_submodule(name)
        assert torch.equal(mine.running_mean, bn.running_mean) and torch.equal(mine.running_var, bn.running_var)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int", "qdq"])
def test_export_of_the_reference_checkpoint_holds_the_contract(reference_checkpoint, fmt, tmp_path):
    path, _ = reference_checkpoint
    m = q.convert(q.load(path), bits=4)
    r = q.export(m, tmp_path / "m.onnx", format=fmt, parity_samples=4)
    assert r["parity_ok"] and r["spike_flips_unexplained"] == 0 and not r["layers_unmatched"]
    assert r["layers_checked"] == 77
