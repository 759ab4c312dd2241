"""The parity contract (docs/method.md §7): each layer of the file, fed PyTorch's spikes, gives
PyTorch's spikes except where float rounding can reach; the bundled models keep exact parity; an
export error is named by its layer, however little it moves the logits."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

import qsdcompress as q
from qsdcompress.errors import QsdError
from qsdcompress.onnx_export import ExportConfig, build_onnx, check_parity, export, onnx_metadata, parity_batch
from qsdcompress.onnx_export.parity import FRAGILE_REL, _reference_pass, spike_tensors
from qsdcompress.neurons import MultiSpike, iter_neurons
from qsdcompress.quant import QuantConfig, convert


@pytest.fixture(scope="module")
def bundled_w4():
    return convert(q.load(), QuantConfig(bits=4, calib_samples=0, scale_init="lsq")).eval()


@pytest.mark.parametrize("fmt", ["int", "qdq"])
def test_bundled_model_keeps_exact_parity(bundled_w4, fmt, tmp_path):
    r = export(bundled_w4, tmp_path / "m.onnx", parity_samples=64, format=fmt)
    neurons = [n for _, n in iter_neurons(bundled_w4) if n.spiking]
    assert r["parity_ok"] and r["parity"] == "checked" and r["parity_data"] == "digits"
    assert r["layers_checked"] == len(neurons) and not r["layers_unmatched"]
    assert r["images_differing"] == 0 and r["spike_flips"] == 0 and r["top1_agreement"] == 1.0
    assert r["max_abs_diff"] <= 1e-5 and r["logits_from_same_spikes_max_diff"] <= 1e-5


def _scale_one_channel(proto, fmt: str, factor: float) -> None:
    """Multiply one output channel's scale of one mid-network weight layer by ``factor``."""
    op, idx = ("MatMulIntegerToFloat", 3) if fmt == "int" else ("DequantizeLinear", 1)
    nodes = [n for n in proto.graph.node if n.op_type == op]
    name = nodes[len(nodes) // 2].input[idx]
    init = next(t for t in proto.graph.initializer if t.name == name)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] *= factor
    init.CopyFrom(numpy_helper.from_array(arr, name))


@pytest.mark.parametrize("fmt", ["int", "qdq"])
def test_one_wrong_channel_is_caught_and_its_layer_named(bundled_w4, fmt):
    """A scale off by 30% in one channel of one layer moves the logits of at most one image of 16
    beyond 1e-4 (an end-to-end rule would pass it); fed the same spikes, the layer after it
    shows hundreds of spikes no float rounding explains."""
    x = parity_batch(bundled_w4, "digits", 16)
    proto, _ = build_onnx(bundled_w4, "test", ExportConfig(format=fmt), x[:2])
    _scale_one_channel(proto, fmt, 1.3)
    res = check_parity(proto, bundled_w4, x, raise_error=False)
    assert not res["parity_ok"] and res["images_differing"] <= 1
    bad = res["first_divergent_layer"]
    assert bad["neuron"] in dict(iter_neurons(bundled_w4)) and bad["flips"] >= 100
    with pytest.raises(QsdError, match=rf"layer {bad['neuron']} diverges: .* {bad['flips']} of its"):
        check_parity(proto, bundled_w4, x)


def test_fragile_spikes_are_those_a_rounding_can_reach():
    """A neuron whose input sits within FRAGILE_REL of a rounding boundary: those positions, and
    only those, are fragile (against a direct computation)."""
    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lif = MultiSpike(levels=4)

        def forward(self, x):
            return self.lif(x)

    x = torch.tensor([0.125, 0.125 + 1e-7, 0.3, 0.875 - 2e-6, 0.6, 0.0]).view(1, 1, 6, 1)  # D*x = k + 0.5 at 0.125, 0.875
    _, recs = _reference_pass(One().eval(), x)
    fragile = recs[0].fragile.reshape(-1).tolist()
    eps = FRAGILE_REL * 1.0
    expect = [abs(4 * v - round(4 * v - 0.5) - 0.5) <= 4 * eps for v in x.reshape(-1).tolist()]
    assert fragile == expect == [True, True, False, True, False, False]


def test_spike_tensors_of_the_int_graph_are_one_per_neuron_at_least(bundled_w4):
    x = parity_batch(bundled_w4, "digits", 2)
    proto, _ = build_onnx(bundled_w4, "test", ExportConfig(format="int"), x)
    neurons = [n for _, n in iter_neurons(bundled_w4) if n.spiking]
    assert len(spike_tensors(proto)) >= len(neurons)


def test_a_model_that_is_not_the_file_is_refused(bundled_w4, tmp_path):
    out = tmp_path / "m.onnx"
    export(bundled_w4, out, parity_samples=8, format="int")
    other = convert(q.load(), QuantConfig(bits=3, calib_samples=0, ie_lif="none")).eval()
    with pytest.raises(QsdError, match="parity failed"):
        check_parity(out, other, parity_batch(other, "digits", 8))


def test_unchecked_export_is_marked_in_the_file_and_the_json(bundled_w4, tmp_path):
    from qsdcompress.cli import main

    q.save(bundled_w4, tmp_path / "converted.qsd")
    r = CliRunner().invoke(main, ["export", "--workdir", str(tmp_path), "--unchecked", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["parity"] == "unchecked" and d["parity_ok"] is None
    assert onnx_metadata(tmp_path / "model.onnx")["parity"] == "unchecked"
    checked = export(bundled_w4, tmp_path / "c.onnx", parity_samples=4)
    assert "parity" not in onnx_metadata(tmp_path / "c.onnx") and checked["parity"] == "checked"


def test_float64_comparison_on_request(bundled_w4):
    x = parity_batch(bundled_w4, "digits", 8)
    proto, _ = build_onnx(bundled_w4, "test", ExportConfig(format="int"), x[:2])
    res = check_parity(proto, bundled_w4, x, float64_samples=4)["float64"]
    assert res["samples"] == 4
    assert res["file_images_beyond_tolerance"] == res["pytorch_float32_images_beyond_tolerance"] == 0
    assert res["file_top1_agreement"] == res["pytorch_float32_top1_agreement"] == 1.0


def test_the_plain_api_path_on_a_fresh_reference_topology(tmp_path):
    """A fresh ``qsd_8_256`` (constant logits), converted without calibration, exports in the int
    format (a bias that is a graph constant, not an initializer, once raised KeyError)."""
    m = q.convert(q.create_model("qsd_8_256", img_size=64).eval(), bits=4, calib_batches=0)
    r = q.export(m, tmp_path / "m.onnx", format="int", parity_samples=2)
    assert r["parity_ok"] and (tmp_path / "m.onnx").exists()
    assert onnx.load(str(tmp_path / "m.onnx")).graph.node


def test_parity_images_default_to_the_models_own_data(tmp_path):
    m = q.load()
    m.qsd_meta = {**m.qsd_meta, "data": "synthetic:16"}
    r = export(m, tmp_path / "m.onnx", parity_samples=4, check=True)
    assert r["parity_data"] == "digits"  # synthetic noise is never taken for the model's own data
    assert np.isfinite(r["max_abs_diff"])


def test_a_neurons_layout_comes_from_its_tensors_shape():
    """A mostly saturated neuron matches its own tensor read transposed almost as well as read
    right; the tensor's shape decides (channels then positions, or positions then channels)."""
    import torch

    from qsdcompress.onnx_export.parity import _layouts

    counts = torch.zeros(2, 640, 196)          # (T*B, C, S)
    assert _layouts((1, 2, 640, 14, 14), counts) == ("cf",)
    assert _layouts((2, 640, 196), counts) == ("cf",)
    assert _layouts((2, 196, 640), counts) == ("cl",)
    assert _layouts((392, 640), counts) == ("cl",)
    square = torch.zeros(2, 196, 196)           # C == S: the shape cannot tell
    assert set(_layouts((2, 196, 196), square)) == {"cf", "cl"}
    assert set(_layouts((7, 8), counts)) == {"cf", "cl"}   # no reading fits: both are tried
