"""Packed ``.qsd`` files: bit-packed integer weights, bit-identical round trip, size that follows the bits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qsdcompress as q
from qsdcompress.errors import QsdError
from qsdcompress.qsdfile import pack_ints, read_checkpoint, unpack_ints
from qsdcompress.loading import load, save
from qsdcompress.quant import is_quant_layer
from qsdcompress.sizing import model_size
from qsdcompress.zoo import MODELS

BUNDLED_SNN = MODELS["qsd_tiny_digits"].path


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_ints_is_a_dense_bit_stream(bits):
    rng = np.random.default_rng(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    v = rng.choice([-1, 1], size=37) if bits == 1 else rng.integers(lo, hi + 1, size=37)
    data = pack_ints(v, bits)
    assert len(data) == -(-37 * bits // 8)
    np.testing.assert_array_equal(unpack_ints(data, 37, bits), v)
    # by hand: the first value's bits are the low bits of byte 0 (two's complement; 1 bit: the sign)
    first = (1 if v[0] > 0 else 0) if bits == 1 else int(v[0]) & ((1 << bits) - 1)
    assert data[0] & ((1 << min(bits, 8)) - 1) == first


def test_pack_ints_refuses_out_of_range_and_wrong_length():
    with pytest.raises(QsdError, match="signed 3-bit range"):
        pack_ints(np.array([4]), 3)
    with pytest.raises(QsdError, match="expected 2"):
        unpack_ints(b"\x00", 4, 4)


def _outputs(m, x):
    with torch.no_grad():
        return m.eval()(x)


@pytest.fixture(scope="module")
def converted_models():
    base = q.load()
    return {b: q.convert(base, bits=b, calib_batches=1) for b in (1, 3, 4)}


@pytest.mark.parametrize("bits", [1, 3, 4])
def test_packed_qsd_round_trip_is_bit_identical(tmp_path, converted_models, bits):
    m = converted_models[bits]
    path = save(m, tmp_path / "m.qsd")
    back = load(path)
    x = torch.randn(6, 3, 32, 32)
    assert torch.equal(_outputs(m, x), _outputs(back, x))
    for (name, a), (_, b) in zip(m.named_modules(), back.named_modules()):
        if is_quant_layer(a):
            assert torch.equal(a.quant_weight().int(), b.quant_weight().int()), name
            assert torch.equal(a.quant_weight().value, b.quant_weight().value), name
    # the file follows the bits: within 1.1x of params*bits/8 + the float rest (buffers included)
    buffers = sum(t.numel() * t.element_size() for t in m.buffers())
    assert path.stat().st_size <= 1.1 * (model_size(m)["size_bytes"] + buffers)
    sd, meta = read_checkpoint(path)
    assert meta["packed_weights"] is True and meta["format_version"] == 2
    assert sd["head.weight"].dtype == torch.uint8


def test_keep_float_keeps_the_latent_weights(tmp_path, converted_models):
    m = converted_models[4]
    packed = save(m, tmp_path / "p.qsd")
    full = save(m, tmp_path / "f.qsd", keep_float=True)
    assert full.stat().st_size > 4 * packed.stat().st_size
    back = load(full)
    assert torch.equal(back.head.weight, m.head.weight)  # the float latent weight itself
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(_outputs(m, x), _outputs(back, x))


def test_old_format_files_still_load():
    _, meta = read_checkpoint(BUNDLED_SNN)
    assert meta["format_version"] == 1  # written before packing existed
    assert load(BUNDLED_SNN).num_classes == 10


def test_float_model_round_trip(tmp_path):
    m = q.load()
    back = load(save(m, tmp_path / "float.qsd"))
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(_outputs(m, x), _outputs(back, x))
