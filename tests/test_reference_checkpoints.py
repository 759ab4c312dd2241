"""Checkpoints written by the reference implementations load strictly and reproduce their logits.

The fixtures (tests/fixtures/README.md) hold a state_dict, an input and the eval-mode logits that
the reference code computed.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qsdcompress as q
from qsdcompress.errors import QsdError
from qsdcompress.io import strip_quant_extras
from qsdcompress.qsdfile import read_checkpoint

FIX = Path(__file__).parent / "fixtures"
QSD_ARGS = dict(embed_dim=(16, 32, 64, 96), depth=4, num_heads=4, num_classes=10)
SDT_ARGS = dict(embed_dim=(16, 32, 64, 96), num_heads=4, num_classes=10)


def fixture(name):
    t = load_file(str(FIX / name))
    sd = {k[3:]: v.float() if v.is_floating_point() else v for k, v in t.items() if k.startswith("sd.")}
    return sd, t["input"], t["logits"]


def test_qsd_float_reference_strict_and_logits():
    sd, x, ref = fixture("ref_qsd_float.safetensors")
    m = q.create_model("spikformer_8_256_CAFormer", **QSD_ARGS).eval()
    m.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = m(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


@pytest.mark.parametrize("name,T", [("ref_sdtv2_t1.safetensors", 1), ("ref_sdtv2_t4.safetensors", 4)])
def test_sdtv2_reference_strict_and_logits(name, T):
    sd, x, ref = fixture(name)
    m = q.create_model("metaspikformer_8_512", T=T, **SDT_ARGS).eval()
    m.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = m(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


def test_lsq_checkpoint_keys_are_only_quantizer_extras():
    sd, _, _ = fixture("ref_qsd_lsq4.safetensors")
    clean, dropped = strip_quant_extras(sd)
    assert dropped and all(k.endswith((".alpha", ".init_state")) or ".act." in k for k in dropped)
    m = q.create_model("qsd_8_256", **QSD_ARGS)
    m.load_state_dict(clean, strict=True)


def _containers(sd):
    yield "bare", sd
    yield "model", {"model": sd, "epoch": 3}
    yield "state_dict", {"state_dict": sd}
    yield "model_ema", {"model_ema": sd, "epoch": 1}
    yield "state_dict_ema", {"state_dict_ema": sd}
    yield "module.", {"model": {"module." + k: v for k, v in sd.items()}}


@pytest.mark.parametrize("kind", ["bare", "model", "state_dict", "model_ema", "state_dict_ema", "module."])
@pytest.mark.parametrize("ext", [".pth", ".pt"])
def test_checkpoint_containers(tmp_path, kind, ext):
    sd, x, ref = fixture("ref_qsd_float.safetensors")
    obj = dict(_containers(sd))[kind]
    p = tmp_path / f"ckpt{ext}"
    torch.save(obj, p)
    m = q.load(p, arch="spikformer_8_256_CAFormer", embed_dim=(16, 32, 64, 96), depth=4, num_heads=4)
    with torch.no_grad():
        assert torch.allclose(m(x), ref, atol=1e-5, rtol=0)


def test_safetensors_checkpoint_and_arch_inference(tmp_path):
    sd, x, ref = fixture("ref_qsd_float.safetensors")
    p = tmp_path / "w.safetensors"
    save_file(sd, str(p))
    m = q.load(p, arch="qsd_8_256", embed_dim=(16, 32, 64, 96), depth=4, num_heads=4)
    with torch.no_grad():
        assert torch.allclose(m(x), ref, atol=1e-5, rtol=0)


def test_arch_inferred_for_full_size_reference_layout(tmp_path):
    with torch.device("meta"):
        ref = q.create_model("qsd_8_256", num_classes=100)
    sd = {k: torch.zeros(v.shape) for k, v in ref.state_dict().items()}
    p = tmp_path / "full.pth"
    torch.save({"model": sd}, p)
    m = q.load(p)
    assert m.arch == "qsd_8_256" and m.num_classes == 100


def test_wrong_architecture_names_first_mismatched_keys(tmp_path):
    sd, _, _ = fixture("ref_sdtv2_t1.safetensors")
    p = tmp_path / "v2.pth"
    torch.save(sd, p)
    with pytest.raises(QsdError, match="missing .*layer_scale"):
        q.load(p, arch="qsd_8_256", embed_dim=(16, 32, 64, 96), depth=8, num_heads=4)


def test_strict_round_trip_through_qsd(tmp_path):
    m = q.create_model("qsd_tiny").eval()
    for mod in m.modules():  # non-trivial BN statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
    p = q.save(m, tmp_path / "m.qsd")
    m2 = q.load(p)
    sd, meta = read_checkpoint(p)
    assert meta["arch"] == "qsd_tiny" and meta["model_args"]["D"] == 4
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
