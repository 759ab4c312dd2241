"""Neurons fused into ``QLinearConv`` (export/requant.py): the requantized count equals the
neuron's floor for every reachable accumulator, checked against real arithmetic and against
onnxruntime's own kernel, ties included."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsdcompress.onnx_export.requant import requant_params, spike_thresholds


def _reference(acc: np.ndarray, A: np.ndarray, B: np.ndarray, levels: int) -> np.ndarray:
    """The neuron on the integer layer's output, in exact (float64) arithmetic."""
    return np.clip(np.floor(acc * A.astype(np.float64) + B.astype(np.float64)), 0, levels)


def _random_layer(rng, bits: int, cout: int = 48):
    k = int(rng.integers(8, 300))
    w = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (cout, k))
    A = (rng.normal(0, 1, cout) * rng.choice([1e-4, 1e-3, 1e-2, 0.1, 1.0], cout)).astype(np.float32)
    B = rng.normal(0.5, 2, cout).astype(np.float32)
    return w, A, B


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("levels", [2, 4])
def test_requantized_counts_equal_the_neuron_on_every_reachable_accumulator(bits, levels):
    rng = np.random.default_rng(bits * 7 + levels)
    for _ in range(10):
        w, A, B = _random_layer(rng, bits)
        r = requant_params(w, A, B, levels, in_max=4)
        assert r is not None, "int2/int4 weights leave room for an exact bias"
        s = rng.integers(0, 5, (2000, w.shape[1]))
        acc = s @ w.T
        # plus every accumulator next to a threshold, where a rounding error would show
        sign, c = spike_thresholds(A, B, levels)
        near = np.concatenate([c - 1, c, c + 1], 1) * np.where(sign == 0, 1, sign)[:, None]
        acc = np.concatenate([acc, np.nan_to_num(near, posinf=0, neginf=0).T.astype(np.int64)])
        got = np.minimum(np.clip(np.rint((acc * r.factor + r.bias).astype(np.float32) * r.scale), 0, 255), levels)
        lo, hi = 4 * np.minimum(w, 0).sum(1), 4 * np.maximum(w, 0).sum(1)
        inside = (acc >= lo) & (acc <= hi)
        assert (got == _reference(acc, A, B, levels))[inside].all()


def test_a_threshold_that_is_an_exact_integer_counts_half_up():
    # A*acc + B hits 1.0, 2.0, ... exactly: floor counts the level at acc itself
    w = np.array([[1, 2, -1, 3] * 4])
    A, B = np.array([0.25], np.float32), np.array([0.5], np.float32)
    r = requant_params(w, A, B, 4, in_max=4)
    acc = np.arange(-16, 97)
    got = np.minimum(np.clip(np.rint((acc * r.factor + r.bias).astype(np.float32) * r.scale), 0, 255), 4)
    assert (got == _reference(acc, A, B, 4)).all()
    assert got[acc == 2][0] == 1 and got[acc == 1][0] == 0


def test_constant_and_negative_scale_channels():
    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, (4, 50))
    A = np.array([0.0, -0.01, 1e-9, 0.02], np.float32)    # constant, decreasing, effectively constant, increasing
    B = np.array([2.7, 1.0, 9.0, -3.0], np.float32)
    r = requant_params(w, A, B, 4, in_max=4)
    acc = rng.integers(0, 5, (2000, 50)) @ w.T
    got = np.minimum(np.clip(np.rint((acc * r.factor + r.bias).astype(np.float32) * r.scale), 0, 255), 4)
    assert (got == _reference(acc, A, B, 4)).all()
    assert r.factor[0] == 0 and r.bias[0] == 2 and r.factor[1] < 0 < r.factor[3]


def test_eight_bit_weights_leave_no_room_and_are_refused():
    rng = np.random.default_rng(1)
    refused = sum(requant_params(*_random_layer(rng, 8), 4, in_max=4) is None for _ in range(10))
    assert refused >= 8


def test_onnxruntime_qlinearconv_gives_the_same_counts():
    """The parameters run in onnxruntime's kernel (its float32 multiply and half-even rounding),
    3x3 conv, padding 1, exactly equal to the neuron on the exact accumulator."""
    rng = np.random.default_rng(3)
    cin, cout, hw, levels = 6, 40, 9, 4
    w = rng.integers(-8, 8, (cout, cin, 3, 3))
    A = (rng.normal(0, 1, cout) * 0.05).astype(np.float32)
    B = rng.normal(0.5, 1.5, cout).astype(np.float32)
    r = requant_params(w.reshape(cout, -1), A, B, levels, in_max=levels)
    assert r is not None
    x = rng.integers(0, levels + 1, (8, cin, hw, hw)).astype(np.uint8)
    inits = [numpy_helper.from_array((w * r.factor.reshape(-1, 1, 1, 1)).astype(np.int8), "w"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0, np.uint8), "z"),
             numpy_helper.from_array(r.scale, "ws"), numpy_helper.from_array(np.zeros(cout, np.int8), "wz"),
             numpy_helper.from_array(r.bias, "b"), numpy_helper.from_array(np.array(levels, np.uint8), "d")]
    nodes = [helper.make_node("QLinearConv", ["x", "one", "z", "w", "ws", "wz", "one", "z", "b"], ["q"],
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Min", ["q", "d"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, [8, cout, hw, hw])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    acc = np.zeros((8, cout, hw, hw), np.int64)
    for i in range(3):
        for j in range(3):
            acc += np.einsum("nchw,oc->nohw", xp[:, :, i:i + hw, j:j + hw], w[:, :, i, j])
    ref = _reference(acc, A.reshape(1, -1, 1, 1), B.reshape(1, -1, 1, 1), levels)
    assert (got == ref).all()
