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


def _demo_result():
    from qsdcompress.results import DemoResult

    row = dict(val_top1=0.9172, top1=0.9146, size_bytes=954_056, size_x=7.006, sops=41_378_912.0,
               energy_mj=0.006312345, energy_x=6.12, what="W4 after convert")
    return DemoResult(data="fashion-mnist", bits=4, seconds=41.0, workdir="qsdcompress-out", teacher="ann",
                      rows={"float": {**row, "val_top1": None, "size_x": 1.0}, "converted": row, "finetuned": row,
                            "onnx": row}, stages={"images": {"val": 5000, "test": 10000}})


@pytest.mark.parametrize("width", [120, 60])
def test_demo_table_never_cuts_a_number(monkeypatch, width):
    """rich shortens cells with an ellipsis when a table is wider than the console; the demo's
    columns fold instead, so every figure is printed whole (at 60 columns, across lines)."""
    import io

    from rich.console import Console

    import qsdcompress.results as results

    buf = io.StringIO()
    monkeypatch.setattr(results, "console", Console(file=buf, width=width, highlight=False))
    _demo_result().render()
    text = buf.getvalue()
    assert "…" not in text
    # each column's cells read top to bottom: a folded figure continues on the next line
    cells = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    columns = ["".join(row[i].strip() for row in cells) for i in range(len(cells[0]))]
    for figure in ("finetuned", "91.72%", "91.46%", "954.1kB", "7.0x", "4.14e+07", "0.006312", "6.1x"):
        assert any(figure in col.replace(" ", "") for col in columns), figure
    flat = " ".join(text.split())
    assert "the 5000 held-out training images" in flat and "the 10000 test images" in flat


def test_console_is_wide_when_not_a_terminal(monkeypatch):
    from qsdcompress.ui import console_width

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert console_width() == 120
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert console_width() is None
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    monkeypatch.setenv("COLUMNS", "100")
    assert console_width() is None
    monkeypatch.delenv("COLUMNS")
    monkeypatch.setattr("sys.stderr", None)
    assert console_width() == 120
