"""The ``std-int`` format: standard ops only, spikes as uint8 QDQ pairs, packed weights, the
parity contract under onnxruntime, the requantized conv against a direct integer computation,
and what onnxruntime really executes as integers."""
from __future__ import annotations

from collections import Counter

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qsdcompress as q
from qsdcompress.errors import QsdError
from qsdcompress.onnx_export import FORMATS, RUNTIMES, Runtime, executed_layers, export, onnx_predictor, parity_batch
from qsdcompress.onnx_export.graph import constant_values
from qsdcompress.onnx_export.passes import PassContext
from qsdcompress.onnx_export.standard import requantize_neurons
from qsdcompress.models.random_init import randomize_
from qsdcompress.neurons import iter_neurons
from qsdcompress.quant import QuantConfig, convert


@pytest.fixture(scope="module")
def bundled_std(tmp_path_factory):
    """The bundled digits model at W4 and its std-int export (checked under onnxruntime)."""
    m = convert(q.load(), QuantConfig(bits=4, calib_samples=0, scale_init="lsq")).eval()
    out = tmp_path_factory.mktemp("std") / "m.onnx"
    return m, out, export(m, out, parity_samples=32, format="std-int")


def test_names_of_formats_and_runtimes():
    assert FORMATS == ("int", "qdq", "std-int") and RUNTIMES == ("onnxruntime", "openvino")
    with pytest.raises(QsdError, match="com.microsoft"):
        export(q.load(), "x.onnx", format="int", runtime="openvino")
    with pytest.raises(QsdError, match="unknown runtime"):
        export(q.load(), "x.onnx", format="std-int", runtime="tvm")


def test_bundled_model_keeps_exact_parity_under_onnxruntime(bundled_std):
    m, _, r = bundled_std
    neurons = [n for _, n in iter_neurons(m) if n.spiking]
    assert r["parity_ok"] and r["parity_runtime"] == "onnxruntime" and r["parity_precision"] == "f32"
    assert r["layers_checked"] == len(neurons) and not r["layers_unmatched"]
    assert r["spike_flips_unexplained"] == 0 and r["images_differing"] == 0 and r["top1_agreement"] == 1.0
    assert r["logits_from_same_spikes_max_diff"] <= 1e-5


def test_only_standard_ops_and_uint8_spikes(bundled_std):
    _, out, _ = bundled_std
    proto = onnx.load(str(out))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert [o.domain for o in proto.opset_import] == [""]
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] >= 49 and ops["MatMulIntegerToFloat"] == ops["QLinearConv"] == 0
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    values.update(constant_values(proto.graph))
    for n in proto.graph.node:   # every QuantizeLinear writes uint8 counts of scale 1
        if n.op_type == "QuantizeLinear":
            assert values[n.input[2]].dtype == np.uint8 and values[n.input[1]] == 1.0


def test_weights_stay_packed_and_the_file_follows_the_bits(bundled_std):
    m, out, r = bundled_std
    proto = onnx.load(str(out))
    big = Counter(TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer if np.prod(t.dims) > 1
                  and t.data_type in (TensorProto.INT4, TensorProto.INT8, TensorProto.INT2))
    assert r["initializers"] == {"INT4": 82} and big == {"INT4": 82}
    assert r["file_bytes"] <= 1.05 * r["weight_bits_bytes"]
    # the head's stored integers are Brevitas' own (its Gemm reads Cast(INT8) -> DequantizeLinear)
    inits = {t.name: t for t in proto.graph.initializer}
    prod = {o: n for n in proto.graph.node for o in n.output}
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    w = prod[prod[gemm.input[1]].input[0]].input[0]
    np.testing.assert_array_equal(numpy_helper.to_array(inits[w]).astype(np.int64),
                                  m.head.quant_weight().int().numpy().astype(np.int64))


def test_onnxruntime_runs_the_requantized_convs_as_qlinearconv(bundled_std):
    _, out, r = bundled_std
    ex = r["integer_layers_executed"]
    assert ex == executed_layers(out, "onnxruntime")
    assert r["requantized_layers"] >= 12 and ex["integer"]["QLinearConv"] == r["requantized_layers"]
    assert ex["compute_layers"] >= 82


def test_predictor_says_which_runtime_ran(bundled_std):
    m, out, _ = bundled_std
    predict, cfg, ncls = onnx_predictor(out)
    assert predict.runtime == "onnxruntime" and predict.precision == "f32" and ncls == 10
    x = parity_batch(m, "digits", 20)[13:20]
    with torch.no_grad():
        ref = m(x)
    assert (predict(x) - ref).abs().max() <= 1e-4


_SMALL: dict = {}


def _small(bits: int, D: int) -> torch.nn.Module:
    """A random 2-block qsd_tiny (attention included) at b-bit weights, D spike levels."""
    if (bits, D) not in _SMALL:
        torch.manual_seed(bits * 10 + D)
        m = q.create_model("qsd_tiny", D=D, depth=2, embed_dim=(8, 16, 16, 32))
        m = randomize_(m, parity_batch(m, "digits", 32), seed=bits + D)
        _SMALL[bits, D] = convert(m, {"bits": bits, "ie_lif": "qkv", "calib_batches": 2, "scale_init": "lsq"}).eval()
    return _SMALL[bits, D]


@pytest.mark.parametrize("bits,D,stored", [(2, 4, "INT2"), (4, 2, "INT4"), (8, 4, "INT8")])
def test_widths_and_levels_keep_the_contract(bits, D, stored, tmp_path):
    r = export(_small(bits, D), tmp_path / "m.onnx", parity_samples=16, format="std-int")
    assert r["parity_ok"] and r["spike_flips_unexplained"] == 0 and not r["layers_unmatched"]
    assert set(r["initializers"]) == {stored} and r["opset"] == (25 if stored == "INT2" else 21)


# -- the requantized conv against a direct integer computation ------------------------------------

def neuron_after_conv(k: int, cin: int = 6, cout: int = 5, D: int = 4, seed: int = 0) -> tuple:
    """A graph ``DequantizeLinear(spikes) -> Conv(packed int4 weights) -> neuron`` as the tracer
    writes it (the neuron: ``QuantizeLinear(Floor(Clip(D*v, 0, D) + 0.5), 1, 0)``) and what it
    computes: integer weights, scales, bias, spike value."""
    rng = np.random.default_rng(seed)
    ints = rng.integers(-8, 8, size=(cout, cin, k, k))
    # float32 values, as the graph stores them (the reference computes with exactly these)
    sw = (rng.uniform(0.02, 0.2, cout) * np.where(rng.random(cout) < 0.3, -1, 1)).astype(np.float32).astype(float)
    bias = rng.uniform(-0.3, 0.5, cout).astype(np.float32).astype(float)
    os_, pad = 0.25, k // 2

    def init(arr, name, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(arr).astype(dtype), name)

    inits = [init(ints, "w", ml_dtypes.int4), init(sw, "sw"), init(bias, "b"), init(os_, "os"), init(1.0, "one"),
             init(0, "z", np.uint8), init(float(D), "D"), init(0.0, "zero"), init(0.5, "half")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "os", "z"], ["xd"]),
             helper.make_node("Cast", ["w"], ["w8"], to=TensorProto.INT8),
             helper.make_node("DequantizeLinear", ["w8", "sw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["y"], pads=[pad] * 4),
             helper.make_node("Mul", ["y", "D"], ["u"]), helper.make_node("Clip", ["u", "zero", "D"], ["c"]),
             helper.make_node("Add", ["c", "half"], ["h"]), helper.make_node("Floor", ["h"], ["f"]),
             helper.make_node("QuantizeLinear", ["f", "one", "z"], ["s"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, cin, 7, 7])],
                          [helper.make_tensor_value_info("s", TensorProto.UINT8, [None, cout, 7, 7])], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return proto, dict(ints=ints, sw=sw, bias=bias, os=os_, D=D, pad=pad)


def reference_counts(x: np.ndarray, p: dict) -> np.ndarray:
    """The neuron's counts in float64 from the int64 accumulator of the integer conv."""
    acc = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.int64)).double(),
                                     torch.from_numpy(p["ints"]).double(), padding=p["pad"]).numpy()
    pre = p["os"] * p["sw"][None, :, None, None] * acc + p["bias"][None, :, None, None]
    return np.clip(np.floor(p["D"] * pre + 0.5), 0, p["D"])


def fused(proto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    facts = requantize_neurons(out, PassContext({}, True, 21))
    assert facts == {"requantized_layers": 1}
    onnx.checker.check_model(out)
    return out


@pytest.mark.parametrize("k", [1, 3])
def test_requantized_conv_gives_the_neurons_counts(k):
    """Fused into ``Conv -> QuantizeLinear -> Min``, the pair gives the neuron's counts for every
    spike input drawn (onnxruntime runs it as QLinearConv), against int64 accumulators."""
    proto, p = neuron_after_conv(k)
    f = fused(proto)
    assert {n.op_type for n in f.graph.node} >= {"Conv", "QuantizeLinear", "Min"}
    assert "Floor" not in {n.op_type for n in f.graph.node}
    rng = np.random.default_rng(k)
    x = rng.integers(0, 5, size=(64, 6, 7, 7)).astype(np.uint8)
    sess = Runtime("onnxruntime").session(f)
    np.testing.assert_array_equal(sess.run(["s"], {"x": x})[0], reference_counts(x, p))
    assert executed_layers(f, "onnxruntime")["integer"] == {"QLinearConv": 1}
