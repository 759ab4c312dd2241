"""examples/train_fmnist_8_256.py: a run stopped mid-epoch and across an epoch's end, then resumed,
is the run that was not stopped (the same weights, EMA, optimiser state, curve and result)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

import qsdcompress as q
from qsdcompress.qsdfile import read_checkpoint
from test_data import make_idx_dir

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_fmnist_8_256.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_fmnist_8_256", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if "seconds" not in k and k not in ("images_per_s", "machine")}
            for h in history]


def test_stopped_and_resumed_run_is_the_uninterrupted_run(tmp_path, monkeypatch):
    t = _script()
    # the resume logic does not depend on the model: the 1.7M-parameter tiny one keeps this test fast
    monkeypatch.setattr(t, "build_model", lambda size, ann=False: q.create_model(
        "qsd_tiny_fmnist", img_size=size, **({"neuron": "relu"} if ann else {})))
    make_idx_dir(tmp_path / "f", n_train=120, n_test=10)  # 110 train (4 steps of 25), 10 val, 10 test
    common = ["--data", f"fashion-mnist:{tmp_path / 'f'}", "--img-size", "16", "--batch-size", "25",
              "--epochs", "2", "--ckpt-every", "2", "--log-every", "2", "--threads", "1"]
    ref = t.main([*common, "--out", str(tmp_path / "a")])
    out = tmp_path / "b"
    assert t.main([*common, "--out", str(out), "--stop-after", "3"]) is None  # in epoch 1
    s = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (s["epoch"], s["step"]) == (0, 3) and not (out / "curve.jsonl").exists()
    assert t.main([*common, "--out", str(out), "--resume", "--stop-after", "3"]) is None  # over the epoch's end
    s = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (s["epoch"], s["step"]) == (1, 2) and len((out / "curve.jsonl").read_text().splitlines()) == 1
    got = t.main([*common, "--out", str(out), "--resume"])
    assert got == ref
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (tmp_path / "a", out))
    for k in ("model", "ema", "opt", "sched", "gen", "best"):
        assert _equal(a[k], b[k]), k
    assert _untimed(a["history"]) == _untimed(b["history"])
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [c["epoch"] for c in curve] == [1, 2] and all(c["machine"]["cpu"] for c in curve)
    # stored in float16, and the figures are those of the stored file
    sd, meta = read_checkpoint(out / "qsd_8_256_fmnist.qsd")
    assert sd["head.weight"].dtype == torch.float16 and meta["training"]["stored_dtype"] == "float16"
    loaded = q.load(out / "qsd_8_256_fmnist.qsd")
    assert q.eval(loaded, data=common[1], split="test")["top1"] == got["test_top1"]
    # the counterpart ANN starts from it
    ann = t.main([*common, "--out", str(out), "--ann", "--epochs", "1"])
    _, meta = read_checkpoint(out / "ann" / "qsd_8_256_fmnist_ann.qsd")
    assert meta["model_args"]["neuron"] == "relu" and meta["training"]["init"].startswith("trained SNN")
    assert meta["training"]["test_top1"] == ann["test_top1"]


def test_reference_topology_keeps_a_4x4_token_grid_at_64_px():
    """64 px is the smallest size: the strides downsample 16x before the transformer stages."""
    assert torch.tensor(q.models.model_config("qsd_8_256").strides).prod() == 16
    model, seen = _script().build_model(64).eval(), {}
    model.block3[0].register_forward_hook(lambda m, i, o: seen.update(shape=tuple(i[0].shape)))
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 10)
    assert seen["shape"][-2:] == (4, 4)
