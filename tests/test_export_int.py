"""The integer ONNX format (``format="int"``) beside ``qdq``: parity per pattern, packed weights,
integer kernels really used, the failure contract, eval and the CLI."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto

import qsdcompress as q
import qsdcompress.onnx_export.exporter as exporter_mod
from qsdcompress.errors import QsdError
from qsdcompress.models.random_init import randomize_
from qsdcompress.onnx_export import ExportConfig, export, parity_batch
from qsdcompress.onnx_export.integer import MS_DOMAIN, rewrite_integer
from qsdcompress.quant import convert


_CACHE: dict = {}


def _model(bits: int, D: int, ie_lif: str) -> torch.nn.Module:
    """A small random qsd_tiny (2 blocks, attention included) converted to b-bit weights."""
    key = (bits, D, ie_lif)
    if key not in _CACHE:
        torch.manual_seed(bits * 10 + D)
        m = q.create_model("qsd_tiny", D=D, depth=2, embed_dim=(8, 16, 16, 32))
        m = randomize_(m, parity_batch(m, "digits", 32), seed=bits + D)
        c = convert(m, {"bits": bits, "ie_lif": ie_lif, "calib_batches": 2, "scale_init": "lsq"}).eval()
        x = parity_batch(c, "digits", 16)
        with torch.no_grad():
            logits = c(x)
        # a model whose logits do not depend on the image proves nothing
        assert (logits - logits[0]).abs().max() > 1e-3, "constant logits: the parity check would be vacuous"
        _CACHE[key] = c
    return _CACHE[key]


def _ops(path) -> Counter:
    return Counter((n.domain or "", n.op_type) for n in onnx.load(str(path)).graph.node)


def _inits(path) -> Counter:
    """Initializers per type, scalars (zero points, scales) left out."""
    return Counter(TensorProto.DataType.Name(t.data_type) for t in onnx.load(str(path)).graph.initializer
                   if int(np.prod(t.dims)) > 1)


@pytest.mark.parametrize("fmt", ["int", "qdq"])
@pytest.mark.parametrize("ie_lif", ["qkv", "none"])
@pytest.mark.parametrize("D", [2, 4])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_parity_matrix(bits, D, ie_lif, fmt, tmp_path):
    m = _model(bits, D, ie_lif)
    out = tmp_path / "m.onnx"
    r = export(m, out, parity_samples=16, format=fmt)
    assert r["parity_ok"] and r["format"] == fmt and out.exists()
    assert r["images_differing"] <= 1 and r["top1_agreement"] >= 15 / 16
    assert r["max_abs_diff_matching"] <= 1e-5
    ops = _ops(out)
    if fmt == "qdq":
        assert ops[(MS_DOMAIN, "MatMulIntegerToFloat")] == 0 and ops[("", "MatMulInteger")] == 0
        return
    # every spike-fed dense layer is an integer GEMM, the q/k/v projections of the attention block
    # one GEMM together; the two attention products are integer. A GEMM whose neuron could be
    # fused exactly is a QLinearConv writing the uint8 counts (int2/int4 weights always can here)
    gemms = ops[(MS_DOMAIN, "MatMulIntegerToFloat")] + ops[("", "QLinearConv")]
    assert gemms == r["integer_gemms"] == r["integer_layers"] - 2
    assert ops[("", "QLinearConv")] == r["requantized_layers"]
    if bits <= 4:
        assert r["requantized_layers"] >= 4
    assert r["integer_layers"] >= 10
    # only layers fed by real values and depthwise convs stay float: every dense conv fed by spikes,
    # however few its output channels (the MLP's 3x3 back to the stage width), is integer
    assert all(why.startswith(("real-valued input", "depthwise")) for why in r["float_layer_reasons"])
    assert ops[("", "MatMulInteger")] == 1 and r["integer_products"] == 2
    assert r["weight_layers"] == sum(r["initializers"].values())
    # every other spike count is Cast(Clip(D*x + 0.5, 0, D), UINT8): truncation of a value >= 0 is
    # floor, so rounding stays half up
    assert _uint8_casts_after_clip_from_zero(out) + r["requantized_layers"] > 0
    assert ops[("", "QuantizeLinear")] == 0


@pytest.mark.parametrize("exact_limit", [2 ** 24, 0])
def test_attention_second_product_exact_in_float_or_int32(exact_limit, monkeypatch, tmp_path):
    """``q_s @ (k_s^T v_s)``: a float MatMul of the integers while no sum can reach the limit
    (D * D * tokens * D * head width: far below 2**24 here), an int32 MatMul beyond (the limit
    forced to 0); both exact, so no image may differ."""
    import qsdcompress.onnx_export.integer as integer_mod

    monkeypatch.setattr(integer_mod, "FLOAT32_EXACT", exact_limit)
    out = tmp_path / "m.onnx"
    r = export(_model(4, 4, "qkv"), out, parity_samples=16, format="int")
    assert r["parity_ok"] and r["images_differing"] == 0 and r["max_abs_diff_matching"] <= 1e-5
    proto = onnx.load(str(out))
    kinds = {o.name: o.type.tensor_type.elem_type for o in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 1 and r["integer_products"] == 2
    want = TensorProto.FLOAT if exact_limit else TensorProto.INT32
    assert kinds[matmuls[0].input[0]] == kinds[matmuls[0].input[1]] == want


def _uint8_casts_after_clip_from_zero(path) -> int:
    """The number of Cast-to-uint8 nodes; asserts each reads a Clip whose lower bound is 0."""
    proto = onnx.load(str(path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    inits.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                  if n.op_type == "Constant"})
    casts = [n for n in proto.graph.node if n.op_type == "Cast"
             and next(a.i for a in n.attribute if a.name == "to") == TensorProto.UINT8]
    for n in casts:
        clip = producer[n.input[0]]
        assert clip.op_type == "Clip" and float(inits[clip.input[1]]) == 0.0
    return len(casts)


@pytest.mark.parametrize("bits,stored,opset", [(4, "INT4", 21), (2, "INT2", 25), (8, "INT8", 21)])
def test_int_file_stores_packed_weights_widened_by_cast(bits, stored, opset, tmp_path):
    m = _model(bits, 4, "none")
    out = tmp_path / "p.onnx"
    r = export(m, out, parity_samples=8, format="int")
    proto = onnx.load(str(out))
    inits = {t.name: t for t in proto.graph.initializer}
    assert r["opset"] == opset and r["initializers"] == {stored: r["weight_layers"]}
    # one packed initializer per layer, except q/k/v of the attention block: one for the three
    assert _inits(out)[stored] == r["weight_layers"] - 2
    mmitf = [n for n in proto.graph.node if n.op_type == "MatMulIntegerToFloat"]
    producers = {o: n for n in proto.graph.node for o in n.output}
    for n in [n for n in proto.graph.node if n.op_type == "QLinearConv"]:
        # packed initializer -> Cast(INT32) -> Mul(integer factor) -> Cast(INT8), folded at load
        cast8 = producers[n.input[3]]
        mul = producers[cast8.input[0]]
        cast32 = producers[mul.input[0]]
        assert (cast8.op_type, mul.op_type, cast32.op_type) == ("Cast", "Mul", "Cast")
        assert TensorProto.DataType.Name(inits[cast32.input[0]].data_type) == stored
    for n in mmitf:
        w = n.input[1]
        if bits == 8:
            assert inits[w].data_type == TensorProto.INT8
            continue
        cast = producers[w]  # packed INT4/INT2 initializer -> Cast(to=INT8) -> the integer GEMM
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.INT8
        t = inits[cast.input[0]]
        assert TensorProto.DataType.Name(t.data_type) == stored
        assert len(t.raw_data) == -(-int(np.prod(t.dims)) * (4 if bits == 4 else 2) // 8)
    assert {o.domain for o in proto.opset_import} == {"", MS_DOMAIN}


def test_a_wrong_integer_graph_fails_loudly_and_writes_nothing(tmp_path, monkeypatch):
    m = _model(4, 4, "qkv")
    real = rewrite_integer

    def broken(proto, ctx):
        facts = real(proto, ctx)
        g = proto.graph
        node = next(n for n in g.node if n.op_type == "MatMulIntegerToFloat")
        t = next(t for t in g.initializer if t.name == node.input[3])  # per-channel scale
        arr = onnx.numpy_helper.to_array(t) * 1.5
        t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), t.name))
        return facts

    passes = tuple(broken if p is real else p for p in exporter_mod.FORMAT_PASSES["int"])
    assert broken in passes
    monkeypatch.setitem(exporter_mod.FORMAT_PASSES, "int", passes)
    out = tmp_path / "bad.onnx"
    with pytest.raises(QsdError, match="parity failed"):
        export(m, out, parity_samples=16, format="int")
    assert not out.exists()


def test_format_option_validation_and_default():
    assert ExportConfig().format in ("int", "qdq")
    with pytest.raises(QsdError, match="format"):
        export(_model(4, 4, "none"), "x.onnx", format="fp16")


@pytest.mark.slow
def test_bundled_digits_int_and_qdq_same_top1_as_pytorch(tmp_path):
    """The bundled model at W4: onnxruntime agrees with PyTorch on the whole digits test split,
    and ``eval`` of both formats gives the same top-1."""
    from qsdcompress.quant import QuantConfig

    m = convert(q.load(), QuantConfig(bits=4, calib_batches=0, scale_init="lsq")).eval()
    res = {}
    for fmt in ("int", "qdq"):
        r = export(m, tmp_path / f"{fmt}.onnx", parity_samples=360, format=fmt)
        assert r["parity_ok"] and r["images_differing"] <= 4
        res[fmt] = q.eval(str(tmp_path / f"{fmt}.onnx"), batch_size=120)
        assert res[fmt]["runtime"] == "onnxruntime" and res[fmt]["samples"] == 360
    ref = q.eval(m, batch_size=120)
    assert res["int"]["top1"] == res["qdq"]["top1"] == ref["top1"]


def test_cli_export_format_int_and_qdq(tmp_path):
    from qsdcompress.cli import main

    q.save(_model(4, 4, "none"), tmp_path / "converted.qsd")
    for fmt in ("int", "qdq"):
        res = CliRunner().invoke(main, ["export", "--workdir", str(tmp_path), "--parity-samples", "8",
                                        "--format", fmt, "-o", str(tmp_path / f"{fmt}.onnx"), "--json"])
        assert res.exit_code == 0, res.output
        d = json.loads(res.stdout)
        assert d["format"] == fmt and d["parity_ok"]
        for k in ("output", "file_bytes", "weight_bits_bytes", "max_abs_diff", "top1_agreement"):
            assert k in d
        if fmt == "int":
            assert 0 < d["integer_layers"] < d["weight_layers"] and d["float_layer_reasons"]
    bad = CliRunner().invoke(main, ["export", "--workdir", str(tmp_path), "--format", "fp16"])
    assert bad.exit_code == 2
