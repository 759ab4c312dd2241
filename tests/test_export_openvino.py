"""OpenVINO as a runtime: the parity contract at f32 (its bf16 default breaks it), the integer
layers it really runs, the requantized conv against a direct integer computation, and eval's
top-1 against onnxruntime within what the precision explains."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

import qsdcompress as q  # noqa: E402
from qsdcompress.errors import QsdError  # noqa: E402
from qsdcompress.onnx_export import (Runtime, check_parity, executed_layers, export, onnx_predictor,  # noqa: E402
                                parity_batch)
from qsdcompress.loading import bundled_model  # noqa: E402
from qsdcompress.quant import QuantConfig, convert  # noqa: E402
from test_export_std import fused, neuron_after_conv, reference_counts  # noqa: E402


@pytest.fixture(scope="module")
def bundled_w4():
    return convert(q.load(), QuantConfig(bits=4, calib_samples=0, scale_init="lsq")).eval()


@pytest.fixture(scope="module")
def std_file(bundled_w4, tmp_path_factory):
    """The bundled W4 model's std-int file, exported with its parity checked under OpenVINO."""
    out = tmp_path_factory.mktemp("ov") / "m.onnx"
    return out, export(bundled_w4, out, parity_samples=32, format="std-int", runtime="openvino")


def test_std_int_keeps_exact_parity_under_openvino_f32(std_file):
    _, r = std_file
    assert r["parity_ok"] and r["parity_runtime"] == "openvino" and r["parity_precision"] == "f32"
    assert r["spike_flips_unexplained"] == 0 and r["images_differing"] == 0 and r["top1_agreement"] == 1.0
    ex = r["integer_layers_executed"]
    assert ex["runtime"] == "openvino" and ex["precision"] == "f32"
    # every dense conv and the linear fed by spikes run as u8 kernels (the depthwise ones too)
    assert ex["integer_layers"] >= 45 and set(ex["integer"]) <= {"Convolution u8", "FullyConnected u8"}


def test_default_precision_is_reported_not_judged(std_file):
    _, r = std_file
    d = r["openvino_default_precision"]
    assert d["precision"] in ("bf16", "f32", "f16")
    assert d["top1_agreement"] >= 0.9 and np.isfinite(d["max_abs_diff"])


def test_bf16_breaks_the_contract_f32_keeps_it(bundled_w4, std_file):
    """Why the check runs at f32: at bf16 the membrane inputs move far beyond float32 rounding."""
    out, _ = std_file
    x = parity_batch(bundled_w4, "digits", 8)
    f32 = check_parity(out, bundled_w4, x, raise_error=False, runtime=Runtime("openvino", "f32"))
    bf16 = check_parity(out, bundled_w4, x, raise_error=False, runtime=Runtime("openvino", "bf16"))
    assert f32["parity_ok"] and f32["spike_flips_unexplained"] == 0
    assert not bf16["parity_ok"] and bf16["spike_flips_unexplained"] > 100 and bf16["parity_precision"] == "bf16"
    with pytest.raises(QsdError, match=r"under openvino \(bf16\)"):
        check_parity(out, bundled_w4, x, runtime=Runtime("openvino", "bf16"))


@pytest.mark.parametrize("k", [1, 3])
def test_requantized_conv_gives_the_neurons_counts_in_openvino(k):
    proto, p = neuron_after_conv(k, seed=k + 10)
    f = fused(proto)
    x = np.random.default_rng(k).integers(0, 5, size=(64, 6, 7, 7)).astype(np.uint8)
    for precision in ("f32", None):   # an integer kernel: the counts do not depend on the float precision
        got = Runtime("openvino", precision).session(f).run(["s"], {"x": x})[0]
        np.testing.assert_array_equal(got, reference_counts(x, p))
    assert executed_layers(f, "openvino")["integer"] == {"Convolution u8": 1}


def test_eval_top1_same_as_onnxruntime_within_what_the_precision_explains(std_file, bundled_w4):
    """On the whole digits test split: OpenVINO at f32 gives onnxruntime's predictions; at its
    default precision an image may change class only where onnxruntime's top-2 margin is within
    the logit change the precision made on that image."""
    out, _ = std_file
    x = parity_batch(bundled_w4, "digits", 360)
    ref = onnx_predictor(out)[0](x).numpy()
    f32 = onnx_predictor(out, runtime="openvino", precision="f32")[0]
    assert f32.runtime == "openvino" and f32.precision == "f32"
    assert (f32(x).numpy().argmax(1) == ref.argmax(1)).all()
    default = onnx_predictor(out, runtime="openvino")[0]
    got = default(x).numpy()
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    moved = np.abs(got - ref).max(1)
    changed = got.argmax(1) != ref.argmax(1)
    assert (margin[changed] <= 2 * moved[changed]).all()


def test_fashion_mnist_model_keeps_parity_under_both_runtimes(tmp_path):
    m = convert(bundled_model(data="fashion-mnist"), QuantConfig(bits=4, calib_samples=0, scale_init="lsq")).eval()
    x = parity_batch(m, "fashion-mnist", 16)
    for runtime in ("onnxruntime", "openvino"):
        r = export(m, tmp_path / f"{runtime}.onnx", parity_samples=16, format="std-int", runtime=runtime,
                   data="fashion-mnist")
        assert r["parity_ok"] and r["spike_flips_unexplained"] == 0 and r["parity_data"] == "fashion-mnist"
    assert check_parity(tmp_path / "onnxruntime.onnx", m, x, runtime="openvino")["parity_ok"]


def test_qdq_file_runs_under_openvino_and_int_is_refused(bundled_w4, tmp_path):
    r = export(bundled_w4, tmp_path / "qdq.onnx", parity_samples=8, format="qdq", runtime="openvino")
    assert r["parity_ok"] and r["integer_layers_executed"]["integer_layers"] == 0
    export(bundled_w4, tmp_path / "int.onnx", parity_samples=4, format="int")
    with pytest.raises(QsdError, match="com.microsoft"):
        onnx_predictor(tmp_path / "int.onnx", runtime="openvino")
    with torch.no_grad():
        ref = bundled_w4(parity_batch(bundled_w4, "digits", 4))
    got = onnx_predictor(tmp_path / "qdq.onnx", runtime="openvino", precision="f32")[0](
        parity_batch(bundled_w4, "digits", 4))
    assert (got - ref).abs().max() <= 1e-4


def test_two_bit_weights_are_stored_as_int4_for_openvino(tmp_path):
    """OpenVINO reads no INT2: exported for it, b <= 2 weights are INT4; an INT2 file is refused
    in one line that says what to do."""
    from test_export_std import _small

    m = _small(2, 4)
    r = export(m, tmp_path / "ov.onnx", parity_samples=8, format="std-int", runtime="openvino")
    assert r["parity_ok"] and set(r["initializers"]) == {"INT4"} and "OpenVINO reads no INT2" in r["int2"]
    export(m, tmp_path / "int2.onnx", parity_samples=4, format="std-int")
    with pytest.raises(QsdError, match="INT2 weights.*--runtime openvino"):
        onnx_predictor(tmp_path / "int2.onnx", runtime="openvino")
