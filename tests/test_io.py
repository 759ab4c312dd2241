"""Safe loading of untrusted files and atomic writes."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from qsdcompress.errors import QsdError
from qsdcompress.io import atomic_path, unwrap_state_dict
from qsdcompress.qsdfile import read_checkpoint, save_qsd


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/qsdcompress_pwned_marker",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = "/tmp/qsdcompress_pwned_marker"
    if os.path.exists(marker):
        os.remove(marker)
    p = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil()}, p, pickle_protocol=2)
    with pytest.raises(QsdError, match="refused"):
        read_checkpoint(p)
    assert not os.path.exists(marker)


def test_plain_pickle_file_refused(tmp_path):
    p = tmp_path / "evil2.pt"
    with open(p, "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(QsdError):
        read_checkpoint(p)
    assert not os.path.exists("/tmp/qsdcompress_pwned_marker")


def test_truncated_safetensors(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(100, 100)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(QsdError, match="truncated or corrupt"):
        read_checkpoint(p)


def test_truncated_pth_missing_and_empty(tmp_path):
    p = tmp_path / "w.pth"
    torch.save({"a": torch.randn(100, 100)}, p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(QsdError, match="truncated or corrupt"):
        read_checkpoint(p)
    with pytest.raises(QsdError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "empty.qsd").write_bytes(b"")
    with pytest.raises(QsdError, match="empty"):
        read_checkpoint(tmp_path / "empty.qsd")
    (tmp_path / "garbage.qsd").write_bytes(b"\x00" * 64)
    with pytest.raises(QsdError):
        read_checkpoint(tmp_path / "garbage.qsd")


def test_unsupported_extension(tmp_path):
    p = tmp_path / "w.txt"
    p.write_text("hello")
    with pytest.raises(QsdError, match="unsupported"):
        read_checkpoint(p)


def test_unwrap_prefers_model_and_strips_module_prefix():
    a, b = {"w": torch.ones(1)}, {"w": torch.zeros(1)}
    assert unwrap_state_dict({"model": a, "model_ema": b})["w"].item() == 1
    assert unwrap_state_dict({"model": a, "model_ema": b}, prefer_ema=True)["w"].item() == 0
    assert list(unwrap_state_dict({"state_dict": {"module.x.y": torch.ones(1)}})) == ["x.y"]
    with pytest.raises(QsdError, match="no tensors"):
        unwrap_state_dict({"epoch": 3})


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.qsd"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.qsd"]


def test_save_qsd_round_trip_with_shared_tensors(tmp_path):
    t = torch.randn(3, 4)
    p = save_qsd(tmp_path / "m.qsd", {"a": t, "b": t, "c": t[1]}, {"arch": "x"})
    sd, meta = read_checkpoint(p)
    assert torch.equal(sd["a"], t) and torch.equal(sd["b"], t) and torch.equal(sd["c"], t[1])
    assert meta["arch"] == "x" and "torch" in meta["versions"]
