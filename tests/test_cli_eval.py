"""`qsdcompress eval` as a user runs it, and the bundled default models."""
import json

import pytest
from click.testing import CliRunner

import qsdcompress as q
from qsdcompress.cli import main
from qsdcompress.zoo import MODELS

BUNDLED_SNN, BUNDLED_ANN = MODELS["qsd_tiny_digits"].path, MODELS["qsd_tiny_digits_ann"].path


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
    """One batch of 16 test images: the table's figures are those of the bundled model on exactly
    those images, computed here with plain torch (argmax, top-5, mean cross-entropy)."""
    import torch
    import torch.nn.functional as F

    from qsdcompress.data import DataConfig, build_loader

    r = run("eval", "--max-batches", "1", "--batch-size", "16")
    assert r.exit_code == 0, r.output
    m = q.bundled_model().eval()
    x, y = next(iter(build_loader("digits", "test", DataConfig.from_model(m), batch_size=16, shuffle=False)))
    with torch.no_grad():
        logits = m(x).float()
    top1 = (logits.argmax(1) == y).float().mean().item()
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    loss = F.cross_entropy(logits, y).item()
    row = next(line for line in r.output.splitlines() if "%" in line)
    cells = [c.strip() for c in row.strip("│| ").split("│")]
    assert cells[:4] == [f"{top1 * 100:.2f}%", f"{top5 * 100:.2f}%", f"{loss:.4f}", "16"], row
    assert float(cells[4]) > 0  # images/s


def test_no_model_means_the_bundled_model_of_the_data(tmp_path, monkeypatch):
    """``--data fashion-mnist[:DIR]`` with no MODEL uses the bundled Fashion-MNIST model (here a
    stand-in file at its zoo path, on a small IDX folder); missing, one clear line says so."""
    import qsdcompress.zoo as zoo
    from qsdcompress.loading import save

    from test_data import make_idx_dir

    data = tmp_path / "fm"
    make_idx_dir(data, n_train=40, n_test=20)
    spec = f"fashion-mnist:{data}"
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    r = CliRunner().invoke(main, ["eval", "--data", spec, "--json", "--workdir", str(tmp_path / "wd")])
    assert r.exit_code == 2 and "qsd_tiny_fmnist is not in this installation" in json.loads(r.stdout)["error"]
    assert "train_fmnist.py" in r.stdout
    save(q.create_model("qsd_tiny_fmnist").eval(), tmp_path / "qsd_tiny_fmnist.qsd")
    r = CliRunner().invoke(main, ["eval", "--data", spec, "--json", "--workdir", str(tmp_path / "wd")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["samples"] == 20 and out["model"] == str(tmp_path / "qsd_tiny_fmnist.qsd")
