"""Weight quantization, IE-LIF conversion, reference-LSQ import, spike-mode parity, .qsd round trip,
the ``convert`` command. Numbers are checked against direct computations written here."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from safetensors.torch import load_file

from qsdcompress.cli import main

import qsdcompress as q
from qsdcompress.data import DataConfig, build_loader
from qsdcompress.errors import QsdError
from qsdcompress.neurons import IELIF, AffineMultiSpike, MultiSpike, iter_neurons, set_spike_mode
from qsdcompress.quant import (FLOAT_BITS, QuantConfig, convert, fold_ie_lif, import_reference_lsq, init_step,
                               is_quant_layer, layer_bits, parse_bits, plan_bits, quantize_, restore_quantized)

FIXTURES = Path(__file__).parent / "fixtures"


def lsq_reference(w, step, bits):
    """Independent fake quantization: w_q = s * clamp(round(w / s), -2^(b-1), 2^(b-1)-1)."""
    s = step.view(-1, *([1] * (w.dim() - 1)))
    if bits == 1:
        return torch.where(w >= 0, 1.0, -1.0) * s
    return torch.clamp(torch.round(w / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s


def randomise(model, seed=0, batch=None):
    """Random BatchNorm affine and layer scales; running statistics from one batch (forward order),
    so every neuron sees inputs that spread over its firing range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 1.0
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.2)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.5)
        model.train()
        model(batch)
        model.eval()
    return model


def logits_both_modes(model, x):
    with torch.no_grad():
        set_spike_mode(model, "integer")
        a = model(x)
        set_spike_mode(model, "binary")
        b = model(x)
        set_spike_mode(model, "integer")
    return a, b


# ----------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "linear"])
def test_quant_layer_matches_reference_fake_quant(bits, kind):
    layer = {"conv2d": nn.Conv2d(6, 5, 3, padding=1), "conv1d": nn.Conv1d(6, 5, 1),
             "linear": nn.Linear(6, 5)}[kind]
    model = nn.Sequential(layer)
    w = layer.weight.detach().clone()
    quantize_(model, QuantConfig(bits=bits, scale_init="absmax"))
    ql = model[0]
    assert is_quant_layer(ql) and isinstance(ql, type(layer))
    qt = ql.quant_weight()
    step = qt.scale.detach().reshape(-1)
    amax = w.reshape(5, -1).abs().amax(1)
    expect_step = amax if bits == 1 else amax / (2 ** (bits - 1) - 1)
    assert torch.allclose(step, expect_step, rtol=1e-6)
    assert torch.allclose(qt.value, lsq_reference(w, step, bits), atol=1e-7)
    ints = qt.int().float()
    if bits == 1:
        assert set(ints.unique().tolist()) <= {-1.0, 1.0}  # true binary, never 0
    else:
        assert ints.min() >= -(2 ** (bits - 1)) and ints.max() <= 2 ** (bits - 1) - 1
    assert int(qt.bit_width) == bits
    x = torch.randn(2, 6, 7, 7) if kind == "conv2d" else torch.randn(2, 6, 7) if kind == "conv1d" else torch.randn(3, 6)
    ref = layer._conv_forward(x, qt.value, layer.bias) if kind != "linear" else \
        torch.nn.functional.linear(x, qt.value, layer.bias)
    assert torch.allclose(model(x), ref, atol=1e-6)
    assert layer_bits(model) == {"0": bits}


def test_full_range_not_narrow_at_two_bits():
    model = nn.Sequential(nn.Linear(64, 4))
    quantize_(model, QuantConfig(bits=2), steps={"0": torch.full((4,), 0.02)})
    assert set(model[0].quant_weight().int().unique().tolist()) == {-2, -1, 0, 1}
    assert torch.allclose(model[0].quant_weight().scale.reshape(-1), torch.full((4,), 0.02))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_init_beats_absmax_and_lsq_and_is_near_exhaustive_optimum(bits):
    torch.manual_seed(bits)
    w = torch.randn(8, 200) * torch.rand(8, 1)
    w[:, 0] *= 6  # outliers make absmax clip badly
    err = {m: (lsq_reference(w, init_step(w, bits, m), bits) - w).square().sum(1) for m in ("mse", "lsq", "absmax")}
    assert (err["mse"] <= err["absmax"] + 1e-7).all() and (err["mse"] <= err["lsq"] + 1e-7).all()
    # exhaustive per-channel search on a fine grid
    qp = 2 ** (bits - 1) - 1
    best = torch.full((8,), float("inf"))
    for r in torch.linspace(0.01, 1.0, 2000):
        s = w.abs().amax(1) / qp * r
        best = torch.minimum(best, (lsq_reference(w, s, bits) - w).square().sum(1))
    assert (err["mse"] <= best * 1.05 + 1e-9).all()


def test_one_bit_mse_is_mean_abs():
    w = torch.randn(3, 50)
    assert torch.allclose(init_step(w, 1, "mse"), w.abs().mean(1))


def test_bit_plan_overrides_and_skip(tiny_model):
    cfg = QuantConfig(bits=4, first_last_bits=8, layer_bits={"block3.*.attn.*": 2, "head": 3},
                      skip=["block3.0.mlp.fc2_conv"]).validate()
    plan = plan_bits(tiny_model, cfg)
    assert plan["downsample1_1.encode_conv"] == 8
    assert plan["head"] == 3  # a layer glob wins over first/last
    assert plan["block3.1.attn.q_conv.0.body.0"] == 2
    assert plan["block3.0.mlp.fc2_conv"] == FLOAT_BITS
    assert plan["block3.0.mlp.fc1_conv"] == 4
    m = quantize_(tiny_model, cfg)
    bits = layer_bits(m)
    assert bits == plan
    assert not is_quant_layer(m.get_submodule("block3.0.mlp.fc2_conv"))
    # BatchNorm stays float, biases stay float tensors
    assert all(type(b) is nn.BatchNorm2d for b in [m.get_submodule("block3.0.attn.q_conv.1")])
    with pytest.raises(QsdError, match="matches no"):
        plan_bits(tiny_model, QuantConfig(skip=["nothing.*"]))


@pytest.mark.parametrize("bad", [0, 9, "x", "4.5", -1])
def test_bad_bits_are_one_line_errors(bad):
    with pytest.raises(QsdError) as e:
        parse_bits(bad)
    assert "\n" not in str(e.value)


def test_float_model_survives_convert(tiny_model):
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    convert(tiny_model, QuantConfig(bits=2, calib_batches=0))
    assert all(type(m) is not type(None) and not is_quant_layer(m) for m in tiny_model.modules())
    assert all(torch.equal(sd[k], v) for k, v in tiny_model.state_dict().items())
    assert not any(isinstance(n, IELIF) for _, n in iter_neurons(tiny_model))


# ----------------------------------------------------------------------------- IE-LIF in models


def test_ie_lif_modes_replace_the_right_neurons(tiny_model):
    x = [torch.randn(4, 3, 32, 32)]
    names = {mode: sorted(n for n, m in iter_neurons(convert(tiny_model, QuantConfig(ie_lif=mode), x))
                          if isinstance(m, IELIF)) for mode in ("qkv", "attention", "all", "none")}
    blocks = [f"block{s}.{i}" for s, i in (("3", 0), ("3", 1), ("3", 2), ("4", 0))]
    assert names["qkv"] == sorted(f"{b}.attn.{z}_lif" for b in blocks for z in "qkv")
    assert names["attention"] == sorted(names["qkv"] + [f"{b}.attn.attn_lif" for b in blocks])
    assert len(names["all"]) == sum(1 for _ in iter_neurons(tiny_model))
    assert names["none"] == []
    conv = convert(tiny_model, QuantConfig(ie_lif="attention"), x)
    att = conv.get_submodule("block3.0.attn.attn_lif")
    assert att.out_scale == 2 / 4 and att.levels == 4 and att.num_features == 48


def test_identity_init_keeps_logits_exactly(tiny_model):
    randomise(tiny_model, batch=torch.randn(8, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    plain = convert(tiny_model, QuantConfig(bits=4, ie_lif="none"), calib)
    ie = convert(tiny_model, QuantConfig(bits=4, ie_lif="all"), calib)
    with torch.no_grad():
        assert torch.equal(plain(x), ie(x))
    # calibration statistics are the exact per-channel mean/var of the neuron's inputs
    seen = []
    h = plain.block3[0].attn.q_lif.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for c in calib:
            plain(c)
    h.remove()
    u = torch.cat(seen, 1).double()
    dims = [0, 1, 3, 4]
    n = ie.block3[0].attn.q_lif
    assert torch.allclose(n.running_mean.double(), u.mean(dims), atol=1e-6)
    assert torch.allclose(n.running_var.double(), u.var(dims, unbiased=False), atol=1e-5)


def test_rectify_init_and_fold(tiny_model):
    randomise(tiny_model, batch=torch.randn(8, 3, 32, 32))
    tiny_model.double()
    calib = [torch.randn(8, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    conv = convert(tiny_model, QuantConfig(bits=4, ie_lif="all", ie_lif_init="rectify"), calib)
    n = conv.block3[0].attn.k_lif
    assert torch.all(n.gamma == 0.25) and torch.all(n.beta == 0.5)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = conv(x)
        folded = fold_ie_lif(conv)
        after = folded(x)
    assert not any(isinstance(m, IELIF) for _, m in iter_neurons(folded))
    assert type(folded.block3[0].attn.k_lif) is MultiSpike  # folded into attn.k_conv[1]
    assert type(folded.block3[0].mlp.fc2_lif) is MultiSpike
    assert isinstance(folded.block3[0].attn.attn_lif, AffineMultiSpike)  # no BatchNorm right before
    assert (before - after).abs().max() <= 1e-9 * before.abs().max()


# ----------------------------------------------------------------------------- binary == integer


def _assert_parity(model, x):
    a, b = logits_both_modes(model, x)
    assert a.abs().max() > 0
    diff = (a - b).abs().max()
    assert diff <= 1e-5 * a.abs().max(), f"binary vs integer max diff {diff:.3g} (logit scale {a.abs().max():.3g})"


# The parity tests run in float64. In float32 the binary passes add the same numbers in another
# order, and on the bundled model one membrane value lands at D*u = 2.5 +- 5e-7 in one order and
# on the other side in the other: one spike flips and the logits move by 0.05. In float64 binary
# and integer mode give identical logits.


def test_binary_equals_integer_bundled_model():
    model = q.load().double()
    x = next(iter(build_loader("digits", "test", DataConfig.from_model(model), batch_size=32)))[0].double()
    _assert_parity(model, x)
    for cfg in (QuantConfig(bits=4, calib_batches=2),  # default: IE-LIF on q/k/v, identity init
                QuantConfig(bits=4, ie_lif="all", ie_lif_init="rectify", calib_batches=2)):
        conv = convert(model, cfg)
        assert any(isinstance(n, IELIF) for _, n in iter_neurons(conv))
        _assert_parity(conv, x)


@pytest.mark.slow
@pytest.mark.parametrize("D", [2, 4, 8])
def test_binary_equals_integer_random_qsd_8_256(D):
    torch.manual_seed(D)
    model = q.create_model("qsd_8_256", D=D, img_size=64, num_classes=10).double()
    randomise(model, seed=D, batch=torch.randn(4, 3, 64, 64, dtype=torch.float64))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    _assert_parity(model, x)  # float weights, plain neurons
    calib = [torch.randn(2, 3, 64, 64, dtype=torch.float64)]
    configs = [QuantConfig(bits=4, ie_lif="all", ie_lif_init="rectify", scale_init="absmax")]
    if D == 4:
        configs.append(QuantConfig(bits=4, ie_lif="none", scale_init="absmax"))
    for cfg in configs:
        conv = convert(model, cfg, calib)
        assert any(isinstance(n, IELIF) for _, n in iter_neurons(conv)) == (cfg.ie_lif != "none")
        _assert_parity(conv, x)


# ----------------------------------------------------------------------------- reference LSQ


def _lsq_fixture():
    d = load_file(str(FIXTURES / "ref_qsd_lsq4.safetensors"))
    return {k[3:]: v for k, v in d.items() if k.startswith("sd.")}, d["input"].float(), d["logits"].float()


def test_reference_lsq_import_matches_reference_forward():
    sd, x, ref_logits = _lsq_fixture()
    model = q.create_model("qsd_8_256", embed_dim=(16, 32, 64, 96), depth=4, num_heads=4, num_classes=10)
    model = import_reference_lsq(model, sd).eval()
    assert set(layer_bits(model).values()) == {4}
    for key, alpha in sd.items():
        if key.endswith(".alpha") and ".act." not in key:
            name = key[:-6]
            qt = model.get_submodule(name).quant_weight()
            a = alpha.float().view(-1, *([1] * (sd[name + ".weight"].dim() - 1)))
            ints = torch.round((sd[name + ".weight"].float() / a).clamp(-8, 7))  # reference round_pass
            assert torch.equal(qt.int().float(), ints), name
            assert torch.equal(qt.scale.reshape(-1), alpha.float().reshape(-1)), name
    with torch.no_grad():
        out = model(x)
    assert (out - ref_logits).abs().max() <= 1e-4


def test_load_imports_reference_lsq_checkpoint_automatically(tmp_path):
    from safetensors.torch import save_file

    sd, x, ref_logits = _lsq_fixture()
    path = tmp_path / "ref_lsq.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = q.load(path, arch="spikformer_8_256_CAFormer", embed_dim=(16, 32, 64, 96), depth=4, num_heads=4)
    with torch.no_grad():
        assert (model(x) - ref_logits).abs().max() <= 1e-4
    # and it survives a .qsd round trip
    q.save(model, tmp_path / "imported.qsd", kind="converted")
    again = q.load(tmp_path / "imported.qsd")
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


# ----------------------------------------------------------------------------- .qsd round trip


def test_qsd_round_trip_is_exact(tmp_path, tiny_model):
    randomise(tiny_model, batch=torch.randn(8, 3, 32, 32))
    tiny_model.qsd_meta = {"source": {"path": "x.qsd", "sha256": "ab" * 32}}
    cfg = QuantConfig(bits=3, layer_bits={"head": 8}, skip=["block4.0.mlp.fc1_conv"], ie_lif="attention",
                      ie_lif_init="rectify", first_last_bits=1)
    conv = convert(tiny_model, cfg, [torch.randn(8, 3, 32, 32)])
    path = q.save(conv, tmp_path / "c.qsd", kind="converted")
    loaded = q.load(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), conv(x))
    assert layer_bits(loaded) == layer_bits(conv)
    meta = loaded.qsd_meta
    assert meta["kind"] == "converted" and meta["quant"]["bits"] == 3
    assert meta["quant"]["layers"]["head"] == 8 and meta["quant"]["layers"]["downsample1_1.encode_conv"] == 1
    assert "block4.0.mlp.fc1_conv" in meta["quant"]["float_layers"]
    assert meta["source"]["sha256"] == "ab" * 32
    assert set(meta["neurons"]["ie_lif"]) == {n for n, m in iter_neurons(conv) if isinstance(m, IELIF)}
    # folded models round-trip too
    fold_ie_lif(conv)
    q.save(conv, tmp_path / "f.qsd")
    with torch.no_grad():
        assert torch.equal(q.load(tmp_path / "f.qsd")(x), conv(x))


def test_restore_rejects_unknown_layers(tiny_model):
    with pytest.raises(QsdError, match="do not exist"):
        restore_quantized(tiny_model, {"quant": {"layers": {"nope.conv": 4}}})


# ----------------------------------------------------------------------------- CLI


def test_cli_convert_then_eval(tmp_path, monkeypatch):
    from qsdcompress.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    r = runner.invoke(main, ["convert", "--bits", "4", "--calib-batches", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert Path(out["output"]) == Path("qsdcompress-out/converted.qsd") and Path(out["output"]).exists()
    for key in ("top1_before", "top1_after", "layers_per_bits", "neurons_replaced", "parameters", "size_bytes"):
        assert key in out
    assert 0 <= out["top1_after"] <= 1 and out["neurons_replaced"] == 12
    assert out["layers_per_bits"]["4"]["layers"] == len(layer_bits(q.load()))
    assert out["compression"] > 5
    r2 = runner.invoke(main, ["eval", "qsdcompress-out/converted.qsd", "--json"])
    assert r2.exit_code == 0, r2.output
    assert json.loads(r2.stdout)["top1"] == pytest.approx(out["top1_after"])
    meta_src = q.load("qsdcompress-out/converted.qsd").qsd_meta["source"]
    assert len(meta_src["sha256"]) == 64


@pytest.mark.parametrize("args", [["--bits", "0"], ["--bits", "9"], ["--bits", "x"], ["--layer-bits", "head"],
                                  ["--layer-bits", "head=12"], ["--skip", "nothing"]])
def test_cli_bad_arguments_one_line(tmp_path, monkeypatch, args):
    from qsdcompress.cli import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["convert", *args, "--calib-batches", "0", "--no-eval"])
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1 and "error" in r.output


def test_top_level_convert_api(tiny_model):
    conv = q.convert(tiny_model, {"bits": 8}, [torch.randn(4, 3, 32, 32)], ie_lif="attention")
    assert set(layer_bits(conv).values()) == {8}
    assert conv.qsd_quant_meta["quant"]["ie_lif"] == "attention"
    assert sum(isinstance(n, IELIF) for _, n in iter_neurons(conv)) == 16


def test_lsq_gradient_scaling_hook():
    import math

    import torch.nn as nn

    from qsdcompress.quant import QuantConfig, attach_lsq_grad_scale, quantize_

    def build():
        torch.manual_seed(0)
        return quantize_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)),
                         QuantConfig(bits=4, ie_lif="none", calib_batches=0))

    x = torch.randn(2, 3, 8, 8)
    plain, hooked = build(), build()
    attach_lsq_grad_scale(hooked)
    for m in (plain, hooked):
        m(x).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_modules(), hooked.named_modules()):
        if hasattr(a, "weight_quant"):
            pa = a.weight_quant.tensor_quant.scaling_impl.value
            pb = b.weight_quant.tensor_quant.scaling_impl.value
            g = 1 / math.sqrt(a.weight.numel() * 7)  # Qp = 7 at 4 bits
            assert torch.allclose(pb.grad, pa.grad * g, rtol=1e-6, atol=0), name


def test_calibration_is_sized_in_samples_and_recorded(tmp_path):
    m = convert(q.load(), QuantConfig(bits=4, calib_samples=10, calib_batch_size=4))
    assert m.qsd_quant_meta["calibration"] == {"data": "digits", "samples": 10, "from": "the model's metadata",
                                               "own_data": True, "batchnorm_reestimated": True, "note": None}
    assert convert(q.load(), QuantConfig(bits=4, calib_samples=0)).qsd_quant_meta["calibration"]["samples"] == 0
    r = CliRunner().invoke(main, ["convert", "--calib-samples", "40", "--no-eval", "--json",
                                  "--workdir", str(tmp_path / "wd")])
    assert r.exit_code == 0, r.output
    cal = json.loads(r.stdout)["calibration"]
    assert cal["samples"] == 40 and cal["data"] == "digits" and cal["note"] is None
    loaded = q.load(tmp_path / "wd" / "converted.qsd")
    assert loaded.qsd_meta["calibration"]["samples"] == 40 and loaded.qsd_meta["data"] == "digits"


def test_without_data_of_its_own_convert_is_weight_only_and_says_so(tiny_model):
    """A model that records no data (a reference checkpoint, a fresh model): no image is run, the
    float BatchNorm statistics stay, IE-LIF is the plain neuron, and the note names --data."""
    randomise(tiny_model, batch=torch.randn(8, 3, 32, 32))
    m = convert(tiny_model, QuantConfig(bits=2))
    cal = m.qsd_quant_meta["calibration"]
    assert cal["samples"] == 0 and cal["data"] is None and cal["batchnorm_reestimated"] is False
    assert "no calibration data" in cal["note"] and "--data" in cal["note"]
    bns = [(n, b) for n, b in tiny_model.named_modules() if type(b) in (nn.BatchNorm1d, nn.BatchNorm2d)]
    assert bns
    for name, b in bns:
        a = m.get_submodule(name)
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    x = torch.randn(4, 3, 32, 32)
    plain = convert(tiny_model, QuantConfig(bits=2, ie_lif="none"))
    with torch.no_grad():  # identity IE-LIF without statistics fires exactly as the plain neuron
        assert torch.equal(m(x), plain(x))
    with pytest.raises(QsdError, match="rectify.*--data"):
        convert(tiny_model, QuantConfig(bits=2, ie_lif_init="rectify"))
    with pytest.raises(QsdError, match="--reestimate-bn.*--data"):
        convert(tiny_model, QuantConfig(bits=2, reestimate_bn=True))


def test_data_of_another_kind_calibrates_but_never_reestimates_unless_asked():
    """Digits (10 classes) for a 100-class model: IE-LIF is calibrated, BatchNorm is left alone
    unless --reestimate-bn asks, and the note says why."""
    other = q.create_model("qsd_tiny", num_classes=100)
    m = convert(other, QuantConfig(bits=4, calib_data="digits", calib_samples=16))
    cal = m.qsd_quant_meta["calibration"]
    assert cal["samples"] == 16 and cal["own_data"] is False and cal["batchnorm_reestimated"] is False
    assert "digits has 10 classes, the model predicts 100" in cal["note"]
    forced = convert(other, QuantConfig(bits=4, calib_data="digits", calib_samples=16, reestimate_bn=True))
    assert forced.qsd_quant_meta["calibration"]["batchnorm_reestimated"] is True
    assert "as asked" in forced.qsd_quant_meta["calibration"]["note"]


def test_model_data_reads_what_a_model_records():
    from qsdcompress.data import model_data

    assert model_data(q.load()) == "digits"                       # bundled: its training data
    m = q.create_model("qsd_tiny")
    assert model_data(m) is None                                  # fresh: none
    m.qsd_meta = {"training": {"data": "fashion-mnist"}}
    assert model_data(m) == "fashion-mnist"
    m.qsd_meta = {"data": "/data/imagenet", "training": {"data": "fashion-mnist"}}
    assert model_data(m) == "/data/imagenet"                      # an explicit record wins
    m.qsd_meta = {"data": "synthetic:64"}
    assert model_data(m) is None                                  # noise is nobody's data


# ----------------------------------------------------------------------------- BatchNorm re-estimation


def test_reestimate_batchnorm_matches_hand_computed_statistics():
    """Two conv-BN stages, two batches: running statistics are the average of the per-batch
    statistics, where the second BN sees the first BN normalised with batch statistics."""
    from qsdcompress.quant import reestimate_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.fill_(3.0)
    batches = [torch.randn(6, 3, 9, 9) * 2 + 1 for _ in range(2)]
    means, vars_ = {1: [], 4: []}, {1: [], 4: []}
    with torch.no_grad():
        for x in batches:
            u = net[0](x)
            means[1].append(u.mean((0, 2, 3)))
            vars_[1].append(u.var((0, 2, 3), unbiased=True))
            mu, var = u.mean((0, 2, 3), keepdim=True), u.var((0, 2, 3), unbiased=False, keepdim=True)
            v = net[3](torch.relu((u - mu) / torch.sqrt(var + net[1].eps) * net[1].weight.view(1, -1, 1, 1)
                                  + net[1].bias.view(1, -1, 1, 1)))
            means[4].append(v.mean((0, 2, 3)))
            vars_[4].append(v.var((0, 2, 3), unbiased=True))
    net.eval()
    assert reestimate_batchnorm(net, batches) == 2
    for i in (1, 4):
        bn = net[i]
        assert torch.allclose(bn.running_mean, torch.stack(means[i]).mean(0), atol=1e-5)
        assert torch.allclose(bn.running_var, torch.stack(vars_[i]).mean(0), atol=1e-4)
        assert bn.momentum == 0.1 and not bn.training  # restored
    assert not net.training


def test_convert_reestimates_batchnorm_and_it_rescues_two_bit_ptq():
    """On the bundled digits model, W2 without re-estimation is near chance on validation;
    with it, far above (the statistics of the quantized convs' outputs are what the BNs need)."""
    model = q.load()
    val = build_loader("digits", "val", DataConfig.from_model(model), batch_size=300)
    from qsdcompress.metrics import evaluate

    with_bn = convert(model, QuantConfig(bits=2))  # auto: on at 4 bits and below
    without = convert(model, QuantConfig(bits=2, reestimate_bn=False))
    assert with_bn.qsd_quant_meta["calibration"]["batchnorm_reestimated"] is True
    assert without.qsd_quant_meta["calibration"]["batchnorm_reestimated"] is False
    assert not torch.equal(with_bn.downsample2.encode_bn.running_mean, model.downsample2.encode_bn.running_mean)
    a = evaluate(with_bn, val)["top1"]
    b = evaluate(without, val)["top1"]
    assert a > b + 0.5, (a, b)


@pytest.mark.parametrize("bits,layer_bits,option,expected", [
    (8, {}, None, False), (4, {}, None, True), (8, {"head": 2}, None, True),
    (8, {}, True, True), (2, {}, False, False)])
def test_batchnorm_reestimation_auto_rule(tiny_model, bits, layer_bits, option, expected):
    randomise(tiny_model, batch=torch.randn(8, 3, 32, 32))
    calib = [torch.randn(8, 3, 32, 32)]
    m = convert(tiny_model, QuantConfig(bits=bits, layer_bits=layer_bits, reestimate_bn=option), calib)
    assert m.qsd_quant_meta["calibration"]["batchnorm_reestimated"] is expected
    bn, ref = m.downsample2.encode_bn, tiny_model.downsample2.encode_bn
    assert torch.equal(bn.running_mean, ref.running_mean) is not expected
