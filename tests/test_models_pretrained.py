"""timm conventions for pretrained weights: ``pretrained_cfg_overlay=dict(file=...)``, timm tags with
``hf_hub_id``/``hf_hub_filename``, ``hf-hub:`` names; all resolved from a local Hugging Face cache in
offline mode (never the network), and read exactly as ``qsdcompress.load`` reads a file."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import qsdcompress as q
from qsdcompress.errors import QsdError

FIX = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
QSD_ARGS = dict(embed_dim=(16, 32, 64, 96), depth=4, num_heads=4)
SDT_ARGS = dict(embed_dim=(16, 32, 64, 96), num_heads=4, T=4)
REPO = "Xuerui123/QSD_Transformer"


def _reference_file(tmp_path: Path, fixture: str, name: str) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A fixture's reference state_dict as a plain weights file (as the authors publish them)."""
    t = load_file(str(FIX / fixture))
    sd = {k[3:]: v for k, v in t.items() if k.startswith("sd.")}
    path = tmp_path / name
    if path.suffix == ".pth":
        torch.save({"model": sd}, path)
    else:
        save_file(sd, str(path))
    return path, t["input"], t["logits"]


def _hub_cache(root: Path, repo: str, files: dict[str, Path | str], rev: str = "a" * 40) -> None:
    """huggingface_hub's cache layout: models--OWNER--NAME/snapshots/<rev>/FILE and refs/main."""
    d = root / f"models--{repo.replace('/', '--')}"
    snap = d / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        if isinstance(src, Path):
            shutil.copy(src, snap / name)
        else:
            (snap / name).write_text(src)
    (d / "refs").mkdir(exist_ok=True)
    (d / "refs" / "main").write_text(rev)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline. huggingface_hub reads its environment once, at
    import, so its constants are set too (a subprocess test below checks the environment alone)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _same(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    assert torch.equal(ya, yb)
    return ya


CASES = [("ref_qsd_float.safetensors", "qsd_8_256", QSD_ARGS, ".pth"),
         ("ref_qsd_lsq4.safetensors", "spikformer_8_512_CAFormer", QSD_ARGS, ".safetensors"),
         ("ref_sdtv2_t4.safetensors", "metaspikformer_8_512", SDT_ARGS, ".pth")]


@pytest.mark.parametrize("fixture,arch,args,ext,factory", [(*c, "timm") for c in CASES] + [(*CASES[1], "qsdcompress")])
def test_pretrained_cfg_overlay_file_loads_like_load(tmp_path, fixture, arch, args, ext, factory):
    path, x, ref = _reference_file(tmp_path, fixture, "ckpt" + ext)
    create = timm.create_model if factory == "timm" else q.create_model
    m = create(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **args)
    expect = q.load(path, arch=arch, **args)
    y = _same(m, expect, x)
    quantized = "lsq4" in fixture
    assert bool(getattr(m, "qsd_quant_meta", None)) == quantized  # an LSQ checkpoint comes back quantized
    assert m.pretrained_cfg["file"] == str(path)
    if not quantized:  # and the reference logits
        assert torch.allclose(y, ref, atol=1e-5, rtol=0)


def test_hub_tag_resolves_from_the_offline_cache(tmp_path, offline_hub):
    path, x, _ = _reference_file(tmp_path, "ref_qsd_lsq4.safetensors", "qsd_55m_w4.safetensors")
    _hub_cache(offline_hub, REPO, {"qsd_55m_w4.safetensors": path})
    cfg = timm.models.get_pretrained_cfg("qsd_8_512.w4_in1k")
    assert cfg.hf_hub_id == REPO and "qsd_8_512.w4_in1k" in timm.list_pretrained("qsd_*")
    overlay = dict(hf_hub_filename="qsd_55m_w4.safetensors")
    m = timm.create_model("qsd_8_512.w4_in1k", pretrained=True, pretrained_cfg_overlay=overlay, **QSD_ARGS)
    m2 = q.create_model("qsd_8_512.w4_in1k", pretrained=True, pretrained_cfg_overlay=overlay, **QSD_ARGS)
    expect = q.load(path, arch="qsd_8_512", **QSD_ARGS)
    _same(m, expect, x)
    _same(m2, expect, x)
    assert m.qsd_quant_meta and m.pretrained_cfg["hf_hub_id"] == REPO


def test_hub_default_file_names_and_default_tag(tmp_path, offline_hub):
    path, x, _ = _reference_file(tmp_path, "ref_qsd_lsq4.safetensors", "w.safetensors")
    _hub_cache(offline_hub, REPO, {"model.safetensors": path})
    m = timm.create_model("qsd_8_512", pretrained=True, **QSD_ARGS)  # the default tag: w4_in1k
    _same(m, q.load(path, arch="qsd_8_512", **QSD_ARGS), x)


def test_hf_hub_name_with_timm_config(tmp_path, offline_hub):
    path, x, ref = _reference_file(tmp_path, "ref_qsd_float.safetensors", "w.safetensors")
    config = {"architecture": "qsd_8_256", "num_classes": 10, "model_args": {**QSD_ARGS, "embed_dim": [16, 32, 64, 96]},
              "pretrained_cfg": {"input_size": [3, 224, 224], "classifier": "head"}}
    _hub_cache(offline_hub, "acme/qsd-small", {"config.json": json.dumps(config), "model.safetensors": path})
    for create in (timm.create_model, q.create_model):
        m = create("hf-hub:acme/qsd-small", pretrained=True)
        with torch.no_grad():
            assert torch.allclose(m.eval()(x), ref, atol=1e-5, rtol=0)
        assert m.arch == "qsd_8_256" and m.pretrained_cfg["hf_hub_id"] == "acme/qsd-small"


def test_offline_and_missing_is_one_line_naming_file_and_argument(offline_hub):
    with pytest.raises(QsdError) as e:
        timm.create_model("qsd_8_15m", pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and "offline" in msg
    assert "https://huggingface.co/Xuerui123/QSD_Transformer" in msg and "15M" in msg
    assert "pretrained_cfg_overlay=dict(file=PATH)" in msg and "--arch qsd_8_15m" in msg
    with pytest.raises(QsdError, match=r"^qsd_8_512\.w4_in1k: missing\.pth of hf-hub:Xuerui123"):
        q.create_model("qsd_8_512.w4_in1k", pretrained=True, pretrained_cfg_overlay=dict(hf_hub_filename="missing.pth"))


def test_pretrained_without_source_is_an_error_never_the_digits_weights(tmp_path):
    for name in ("qsd_8_256", "metaspikformer_8_384", "qsd_12_512"):
        with pytest.raises(QsdError, match="no source is given; pass pretrained_cfg_overlay=dict"):
            timm.create_model(name, pretrained=True)
    bundled = q.create_model("qsd_tiny", pretrained=True)
    assert torch.equal(bundled.head.weight, q.load().head.weight)
    # a file for qsd_tiny wins over the bundled weights
    other = q.create_model("qsd_tiny")
    p = q.save(other, tmp_path / "other.qsd")
    got = timm.create_model("qsd_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(p)))
    assert torch.equal(got.head.weight, other.head.weight)
    with pytest.raises(QsdError, match="holds a qsd_tiny model, not qsd_8_256"):
        timm.create_model("qsd_8_256", pretrained=True, pretrained_cfg_overlay=dict(file=str(p)))


_ENV_ONLY = """
import sys, timm, torch, qsdcompress as q
m = timm.create_model("qsd_8_512.w4_in1k", pretrained=True, embed_dim=(16, 32, 64, 96), depth=4, num_heads=4,
                      pretrained_cfg_overlay=dict(hf_hub_filename="w4.safetensors"))
e = q.load(sys.argv[1], arch="qsd_8_512", embed_dim=(16, 32, 64, 96), depth=4, num_heads=4)
x = torch.randn(1, 3, 64, 64)
with torch.no_grad():
    assert torch.equal(m.eval()(x), e(x))
print("ok", bool(m.qsd_quant_meta))
"""


def test_environment_alone_selects_the_offline_cache(tmp_path):
    """HF_HUB_OFFLINE=1 and HF_HOME in a fresh interpreter: no patched constants."""
    path, _, _ = _reference_file(tmp_path, "ref_qsd_lsq4.safetensors", "w4.safetensors")
    _hub_cache(tmp_path / "home" / "hub", REPO, {"w4.safetensors": path})
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _ENV_ONLY, str(path)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok True"


def test_hf_hub_name_without_timm_config_is_one_line(offline_hub):
    with pytest.raises(QsdError) as e:
        q.create_model("hf-hub:Xuerui123/QSD_Transformer", pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and "qsd_8_512.w4_in1k" in msg and "pretrained_cfg_overlay=dict(file=PATH)" in msg
