"""Packed low-bit ONNX export: weights, folding, parity with PyTorch, metadata, CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qsdcompress as q
from qsdcompress.errors import QsdError
from qsdcompress.onnx_export import (ExportConfig, check_parity, export, export_module, onnx_metadata, onnx_predictor,
                                packed_tensor, parity_batch)
from qsdcompress.neurons import iter_neurons
from qsdcompress.quant import QuantConfig, convert


def _converted(bits: int = 4, **kw) -> torch.nn.Module:
    """The bundled digits model with b-bit weights and IE-LIF on q/k/v (no calibration: fast)."""
    kw.setdefault("scale_init", "lsq")
    m = convert(q.load(), QuantConfig(bits=bits, calib_batches=0, **kw))
    m.eval()
    return m


def _perturb_ie_lif(m: torch.nn.Module) -> None:
    """Non-trivial IE-LIF affine so folding it is really exercised."""
    g = torch.Generator().manual_seed(1)
    for _, n in iter_neurons(m):
        if type(n).__name__ == "IELIF":
            c = n.num_features
            with torch.no_grad():
                n.gamma.copy_(0.1 + 0.3 * torch.rand(c, generator=g))
                n.beta.copy_(0.2 + 0.6 * torch.rand(c, generator=g))
                n.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                n.running_var.copy_(0.5 + torch.rand(c, generator=g))


def _int_inits(path) -> dict[str, int]:
    proto = onnx.load(str(path))
    out: dict[str, int] = {}
    for t in proto.graph.initializer:
        name = TensorProto.DataType.Name(t.data_type)
        out[name] = out.get(name, 0) + 1
    return out


@pytest.mark.parametrize("bits,dtype", [(4, TensorProto.INT4), (2, TensorProto.INT2), (8, TensorProto.INT8)])
def test_packed_tensor_is_really_packed_and_unpacks_to_the_integers(bits, dtype):
    rng = np.random.default_rng(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    vals = rng.integers(lo, hi + 1, size=(5, 3, 3)).astype(np.int64)  # odd count: padding nibble/crumb
    t = packed_tensor("w", vals, bits)
    assert t.data_type == dtype
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int64), vals)
    assert len(t.raw_data) == -(-vals.size * bits // 8)
    # the ONNX layout by hand: element 0 in the low bits of byte 0, two's complement
    first = np.array([1, -1, -2, 0][: 8 // bits if bits < 8 else 1])
    byte = sum((int(v) & ((1 << bits) - 1)) << (i * bits) for i, v in enumerate(first))
    assert packed_tensor("x", first, bits).raw_data[0] == byte


def test_packed_tensor_refuses_integers_out_of_range():
    with pytest.raises(QsdError, match="outside the 4-bit range"):
        packed_tensor("w", np.array([8]), 4)


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    """A 4-bit IE-LIF model and its qdq export (the structure checked below: Gemm fed by
    DequantizeLinear), shared by the tests that only read them."""
    m = _converted(4)
    _perturb_ie_lif(m)
    out = tmp_path_factory.mktemp("w4") / "m.onnx"
    return m, out, export(m, out, parity_samples=32, format="qdq")


def test_export_w4_ielif_parity_size_and_weights(w4):
    m, out, r = w4
    assert out.exists() and r["output"] == str(out)
    assert r["parity_ok"] and r["top1_agreement"] >= 31 / 32
    assert r["max_abs_diff_matching"] <= 1e-5            # bit-near-exact where no spike flipped
    assert r["images_differing"] <= 1
    assert r["initializers"] == {"INT4": 82} and r["opset"] == 21
    # the file follows the bits: quantized weights at 4 bits + float32 rest, within 10%
    assert r["file_bytes"] <= 1.10 * r["weight_bits_bytes"]
    # the head has no BN after it: its stored integers and scale are Brevitas' own
    proto = onnx.load(str(out))
    inits = {t.name: t for t in proto.graph.initializer}
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == gemm.input[1])
    qt = m.head.quant_weight()
    np.testing.assert_array_equal(numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64),
                                  qt.int().numpy().astype(np.int64))
    np.testing.assert_allclose(numpy_helper.to_array(inits[dq.input[1]]), qt.scale.detach().reshape(-1).numpy(),
                               rtol=1e-6)
    # dynamic batch: another batch size than the one traced, against an independent PyTorch run
    x = parity_batch(m, "digits", 40)[33:40]
    predict, cfg, ncls = onnx_predictor(out)
    with torch.no_grad():
        ref = m(x)
    y = predict(x)
    assert y.shape == (7, 10) and ncls == 10 and tuple(cfg.input_size) == (3, 32, 32)
    assert (y.argmax(1) == ref.argmax(1)).float().mean() >= 6 / 7


@pytest.mark.slow
def test_export_w2_uses_int2_and_no_int2_falls_back(tmp_path):
    m = _converted(2, ie_lif="none")
    r = export(m, tmp_path / "a.onnx", parity_samples=16)
    assert r["initializers"] == {"INT2": 82} and r["opset"] == 25 and r["parity_ok"]
    r4 = export(m, tmp_path / "b.onnx", parity_samples=16, int2=False)
    assert r4["initializers"] == {"INT4": 82} and r4["opset"] == 21
    assert r["file_bytes"] < 0.8 * r4["file_bytes"]
    # the int format stores each block's q/k/v weights as one initializer (one GEMM for the three)
    fused = r["integer_layers"] - r["integer_gemms"]
    assert fused == 2 * len(m.attention_blocks)
    assert _int_inits(tmp_path / "a.onnx")["INT2"] == 82 - fused
    # INT2 exists from IR 13 on; INT4 from IR 10
    assert onnx.load(str(tmp_path / "a.onnx")).ir_version == 13
    assert onnx.load(str(tmp_path / "b.onnx")).ir_version == 10


@pytest.mark.slow
def test_negative_bn_gain_and_float_layers_export_exactly(tmp_path):
    """Negative BatchNorm gains give negative DequantizeLinear scales; skipped layers stay float."""
    m = _converted(4, ie_lif="none", skip=["head", "downsample1_1.encode_conv"])
    g = torch.Generator().manual_seed(3)
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                sign = torch.where(torch.rand(mod.num_features, generator=g) < 0.3, -1.0, 1.0)
                mod.weight.mul_(sign)
    mod_, reg = export_module(m)
    x = parity_batch(m, "digits", 8)
    with torch.no_grad():  # the folded PyTorch module itself is equivalent (float rounding only)
        assert (mod_(x) - m(x)).abs().max() < 1e-3
    assert any(qw.ints is not None and (qw.scale < 0).any() for qw in reg.values())
    r = export(m, tmp_path / "n.onnx", parity_samples=16)
    assert r["parity_ok"] and r["initializers"] == {"INT4": 80, "FLOAT": 2}


def test_parity_check_catches_a_wrong_graph(w4):
    m, out, _ = w4
    other = _converted(3, ie_lif="none")  # different weights: every image differs
    x = parity_batch(m, "digits", 8)
    with pytest.raises(QsdError, match="parity failed"):
        check_parity(out, other, x)
    res = check_parity(out, other, x, raise_error=False)
    assert not res["parity_ok"] and res["images_differing"] >= 6


def test_metadata_eval_and_errors(w4, tmp_path):
    m, out, _ = w4
    meta = onnx_metadata(out)
    assert meta["num_classes"] == 10 and meta["data_config"]["input_size"] == [3, 32, 32]
    assert set(meta["weight_bits"].values()) == {4}
    r = q.eval(str(out), max_batches=1, batch_size=32)
    assert r["runtime"] == "onnxruntime" and r["samples"] == 32
    with pytest.raises(QsdError, match=".onnx"):
        export(m, tmp_path / "m.txt")
    bare = tmp_path / "bare.onnx"
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [])), str(bare))
    with pytest.raises(QsdError, match="not exported by qsdcompress"):
        onnx_predictor(bare)
    with pytest.raises(QsdError):
        export(m, tmp_path / "x.onnx", bogus=1)
    assert ExportConfig().to_dict()["int2"] is True


def test_cli_export_json_from_workdir(tmp_path):
    from qsdcompress.cli import main

    q.save(_converted(4, ie_lif="none"), tmp_path / "converted.qsd")
    res = CliRunner().invoke(main, ["export", "--workdir", str(tmp_path), "--parity-samples", "8", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    for k in ("output", "file_bytes", "weight_bits_bytes", "max_abs_diff", "top1_agreement"):
        assert k in d
    assert d["output"] == str(tmp_path / "model.onnx") and d["source"].endswith("converted.qsd")
    bad = CliRunner().invoke(main, ["export", str(tmp_path / "missing.qsd")])
    assert bad.exit_code == 2 and "not found" in bad.output
