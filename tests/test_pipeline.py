"""`qsdcompress demo --json` from an empty directory: the four rows and the files it leaves."""
import json
import os

import pytest
from click.testing import CliRunner

from qsdcompress.cli import main


@pytest.mark.slow
def test_demo_json_rows(tmp_path):
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = CliRunner().invoke(main, ["demo", "--json", "--epochs", "1"])
    finally:
        os.chdir(old)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    rows = out["rows"]
    assert set(rows) == {"float", "converted", "finetuned", "onnx"}
    for row in rows.values():
        assert 0 <= row["top1"] <= 1 and row["size_bytes"] > 0 and row["energy_mj"] > 0
    assert rows["float"]["top1"] >= 0.97 and rows["finetuned"]["top1"] >= 0.95
    # finetune chooses on validation and is never worse than its input there
    assert rows["finetuned"]["val_top1"] >= rows["converted"]["val_top1"] > 0.9
    # 4-bit weights: several times smaller and cheaper than float32
    assert rows["float"]["size_bytes"] / rows["finetuned"]["size_bytes"] > 5
    assert rows["float"]["energy_mj"] / rows["finetuned"]["energy_mj"] > 3
    assert rows["onnx"]["size_bytes"] == (tmp_path / "qsdcompress-out" / "model.onnx").stat().st_size
    assert abs(rows["onnx"]["top1"] - rows["finetuned"]["top1"]) <= 0.02
    for f in ("converted.qsd", "finetuned.qsd", "model.onnx"):
        assert (tmp_path / "qsdcompress-out" / f).exists()
    # one size formula: demo's rows are what convert and report print for the same files
    from qsdcompress.loading import load
    from qsdcompress.sizing import model_size

    conv = model_size(load(tmp_path / "qsdcompress-out" / "converted.qsd"))
    assert rows["converted"]["size_bytes"] == conv["size_bytes"]
    assert rows["converted"]["size_mb_paper"] == conv["size_mb_paper"]
