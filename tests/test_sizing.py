"""sizing: the one size formula, against numbers worked out by hand for small models.

The model below: Conv2d(3, 4, 3) has 108 weights + 4 biases, BatchNorm2d(4) 8 parameters,
Linear(4, 2) 8 weights + 2 biases: 130 parameters, 116 of them conv/linear weights.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from qsdcompress.sizing import layer_widths, model_size, parameter_count


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


class _TensorQuant(nn.Module):
    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.scaling_impl = nn.Parameter(torch.ones(2, 1))  # a quantizer's step: bytes, not a parameter

    def bit_width(self) -> torch.Tensor:
        return torch.tensor(float(self.bits))


class _WeightQuant(nn.Module):
    def __init__(self, bits: int):
        super().__init__()
        self.tensor_quant = _TensorQuant(bits)


class _FakeQuantLinear(nn.Linear):
    """Looks like a Brevitas layer to the package (``quant_weight`` and ``weight_quant``)."""

    def __init__(self, i: int, o: int, bits: int):
        super().__init__(i, o)
        self.weight_quant = _WeightQuant(bits)

    def quant_weight(self):  # pragma: no cover - presence is what counts
        return self.weight


def test_float_model_is_4_bytes_per_parameter():
    s = model_size(_model())
    assert s["params"] == parameter_count(_model()) == 130
    assert s["weight_params"] == 116 and s["quantized_params"] == 0
    assert s["size_bytes"] == s["float_size_bytes"] == 520 and s["compression"] == 1.0
    assert s["mean_weight_bits"] == 32 and s["layers_per_bits"] == {"32": {"layers": 2, "params": 116}}


def test_every_layer_at_4_bits_by_hand():
    s = model_size(_model(), bits=4)
    # weights at 4 bits; biases, BatchNorm and one float32 scale per output channel (4 + 2) at 32
    size_bits = 116 * 4 + 32 * (130 - 116 + 4 + 2)
    assert s["size_bits"] == size_bits == 1104
    assert s["size_bytes"] == 138 and s["quantized_weight_bytes"] == 58
    assert s["compression"] == round(520 / 138, 3)
    assert s["layers_per_bits"] == {"4": {"layers": 2, "params": 116}}


def test_mixed_widths_by_layer_name_round_up_to_whole_bytes():
    m = _model()
    assert layer_widths(m, {"0": 3}) == {"0": 3, "3": 32}
    s = model_size(m, {"0": 3})
    size_bits = 108 * 3 + 32 * (130 - 108 + 4)  # only the conv is quantized: its 4 scales
    assert s["size_bits"] == size_bits == 1156
    assert s["size_bytes"] == math.ceil(1156 / 8) == 145
    assert s["quantized_weight_bytes"] == math.ceil(108 * 3 / 8) == 41
    assert s["mean_weight_bits"] == round((108 * 3 + 8 * 32) / 116, 4)
    assert list(s["layers_per_bits"]) == ["3", "32"]  # sorted by width, not as text


def test_paper_convention_is_params_times_mean_bits_over_32():
    m = nn.Linear(1000, 100)  # 100,000 weights + 100 biases
    s = model_size(m, bits=2)
    assert s["float_size_mb_paper"] == 0.1001
    assert s["size_mb_paper"] == round(0.1001 * 2 / 32, 4) == 0.0063


def test_a_quantized_layer_reports_its_own_width_and_its_scales_are_not_parameters():
    m = nn.Sequential(_FakeQuantLinear(4, 2, bits=2), nn.Linear(2, 3))
    assert layer_widths(m) == {"0": 2, "1": 32}
    assert parameter_count(m) == 8 + 2 + 6 + 3  # the quantizer's 2 steps are left out
    s = model_size(m)
    assert s["size_bits"] == 8 * 2 + 32 * (19 - 8 + 2)
    assert model_size(m, bits={"0": 8})["size_bits"] == 8 * 8 + 32 * (19 - 8 + 2)  # the override wins


def test_works_on_a_meta_device_model():
    with torch.device("meta"):
        m = _model()
    assert model_size(m, bits=4)["size_bytes"] == 138


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_size_shrinks_with_width(bits):
    assert model_size(_model(), bits=bits)["size_bits"] == 116 * bits + 32 * 20
