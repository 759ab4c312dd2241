"""Every kind of model the toolkit accepts exports in every format and passes the parity contract:
fresh (constant logits), randomised, reference-LSQ-imported and trained models, W1-W8, mixed
widths, D = 2/4/8, Meta-SpikeFormer (LIF neurons, T = 4); small configurations."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qsdcompress as q
from qsdcompress.onnx_export import export, parity_batch
from qsdcompress.models.random_init import randomize_
from qsdcompress.quant import QuantConfig, convert

FIX = Path(__file__).parent / "fixtures"
SMALL = dict(depth=2, embed_dim=(8, 16, 16, 32))


def _randomised(arch: str, seed: int, **kw) -> torch.nn.Module:
    m = q.create_model(arch, **kw)
    return randomize_(m, parity_batch(m, "digits", 16), seed=seed)


def _lsq_reference() -> torch.nn.Module:
    """The reference QSD-Transformer 4-bit LSQ test checkpoint, imported (integers and steps kept)."""
    t = load_file(str(FIX / "ref_qsd_lsq4.safetensors"))
    sd = {k[3:]: v.float() if v.is_floating_point() else v for k, v in t.items() if k.startswith("sd.")}
    from qsdcompress.quant import import_reference_lsq

    m = q.create_model("qsd_8_256", embed_dim=(16, 32, 64, 96), depth=4, num_heads=4, num_classes=10, img_size=64)
    return import_reference_lsq(m, sd).eval()


MIXED = {"head": 8, "block3.*.attn.*": 2, "block3.*.mlp.*": 3, "downsample1_1.*": 8, "ConvBlock2_*": 1}
CASES = {
    "fresh qsd_tiny W4": lambda: convert(q.create_model("qsd_tiny", **SMALL), QuantConfig(bits=4)),
    "randomised W1": lambda: convert(_randomised("qsd_tiny", 1, **SMALL), QuantConfig(bits=1)),
    "randomised W3": lambda: convert(_randomised("qsd_tiny", 3, **SMALL), QuantConfig(bits=3)),
    "randomised D8 W4": lambda: convert(_randomised("qsd_tiny", 8, D=8, **SMALL), QuantConfig(bits=4)),
    "randomised W8 IE-LIF everywhere": lambda: convert(_randomised("qsd_tiny", 5, **SMALL),
                                                      QuantConfig(bits=8, ie_lif="all")),
    "reference LSQ import": _lsq_reference,
    "trained, mixed widths 1-8": lambda: convert(q.load(), QuantConfig(bits=4, layer_bits=MIXED, calib_samples=32)),
    "metaspikformer LIF T=4 W4": lambda: convert(_randomised("metaspikformer_8_512", 4, T=4, img_size=32, **SMALL),
                                                 QuantConfig(bits=4, ie_lif="none")),
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int", "qdq", "std-int"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_kind_of_model_exports_and_passes_the_contract(case, fmt, tmp_path):
    torch.manual_seed(0)
    m = CASES[case]().eval()
    out = tmp_path / "m.onnx"
    r = export(m, out, parity_samples=8, format=fmt)
    assert out.exists() and r["parity_ok"], r
    assert r["layers_checked"] >= 10 and not r["layers_unmatched"]
    assert r["spike_flips_unexplained"] == 0
