"""Construction, parameter counts, timm registration and reference-checkpoint compatibility."""
import pytest
import timm
import torch

import qsdcompress as q
from qsdcompress.errors import QsdError

# Parameter counts of the reference implementations (millions), excluding quantizer extras.
REFERENCE_PARAMS_M = {
    "qsd_8_256": 8.337, "qsd_8_15m": 15.117, "qsd_8_384": 31.340,
    "qsd_8_512": 55.359, "qsd_12_512": 74.663, "qsd_8_768": 123.754,
}
ALIASES = {
    "spikformer_8_256_CAFormer": "qsd_8_256", "spikformer_8_15M_CAFormer": "qsd_8_15m",
    "spikformer_8_384_CAFormer": "qsd_8_384", "spikformer_8_512_CAFormer": "qsd_8_512",
    "spikformer_12_512_CAFormer": "qsd_12_512", "spikformer_8_768_CAFormer": "qsd_8_768",
}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS_M))
def test_parameter_counts_match_reference(name):
    with torch.device("meta"):
        m = timm.create_model(name)  # registered in timm by `import qsdcompress`
    got = n_params(m) / 1e6
    assert abs(got - REFERENCE_PARAMS_M[name]) / REFERENCE_PARAMS_M[name] < 0.005, got


@pytest.mark.parametrize("alias,name", sorted(ALIASES.items()))
def test_reference_aliases(alias, name):
    with torch.device("meta"):
        a, b = q.create_model(alias), q.create_model(name)
    assert n_params(a) == n_params(b)
    assert list(a.state_dict()) == list(b.state_dict())


@pytest.mark.parametrize("name", ["metaspikformer_8_384", "metaspikformer_8_512", "metaspikformer_8_768"])
def test_metaspikformer_topology(name):
    with torch.device("meta"):
        m = timm.create_model(name)
    assert len(m.block3) == 6 and len(m.block4) == 2
    assert m.block3[0].layer_scale1 is None
    assert m.cfg.neuron == "lif" and m.cfg.attn_scale == 0.125
    assert m.block3[0].attn.attn_lif.v_threshold == 0.5


def test_tiny_shapes_and_token_grid():
    m = q.create_model("qsd_tiny")
    assert 2e5 < n_params(m) < 5e5  # a few hundred thousand; float32 file under 2 MB
    seen = {}
    m.block3[0].attn.q_lif.register_forward_hook(lambda mod, i, o: seen.update(q=o.shape))
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert seen["q"][-2:] == (8, 8)  # attention sees an 8x8 token grid


def test_model_arguments():
    m = q.create_model("qsd_tiny", num_classes=7, in_chans=1, T=2, D=2, img_size=48)
    assert m(torch.randn(3, 1, 48, 48)).shape == (3, 7)
    assert m.block3[0].attn.q_lif.levels == 2
    assert m.pretrained_cfg["input_size"] == (1, 48, 48)


def test_ann_counterpart_has_no_spiking_neurons():
    from qsdcompress.neurons import ClampAct, iter_neurons

    m = q.create_model("qsd_tiny", ann=True)
    kinds = {type(n) for _, n in iter_neurons(m)}
    assert kinds == {ClampAct}
    snn = q.create_model("qsd_tiny")
    assert list(m.state_dict()) == list(snn.state_dict())  # same topology, same keys


def test_unknown_name_suggests_closest():
    with pytest.raises(QsdError, match="qsd_8_512"):
        q.create_model("qsd_8_51")
    with pytest.raises(QsdError, match="unknown model argument"):
        q.create_model("qsd_tiny", bogus=1)


def test_timm_create_model_entrypoint_and_lif_time_steps():
    m = timm.create_model("metaspikformer_8_384", embed_dim=(8, 16, 32, 32), num_heads=2,
                          num_classes=5, T=3)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_pretrained_without_bundled_weights_says_so():
    with pytest.raises(QsdError, match="no weights are bundled for this architecture"):
        timm.create_model("qsd_8_256", pretrained=True)
    assert q.create_model("qsd_tiny", pretrained=True).num_classes == 10
    fm = timm.create_model("qsd_tiny_fmnist", pretrained=True)  # the bundled Fashion-MNIST weights
    assert torch.equal(fm.head.weight, q.load("qsd_tiny_fmnist").head.weight)


def test_models_describe_their_structure():
    m = q.create_model("qsd_tiny")
    s = m.structure()
    names = dict(m.named_modules())
    weight_layers = [n for n, x in names.items() if isinstance(x, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))]
    assert set(s.layer_input) == set(weight_layers)  # every weight layer says what feeds it
    assert s.layer_input["downsample1_1.encode_conv"] is None and s.layer_input["head"] == "lif"
    assert all(v in names for v in s.layer_input.values() if v is not None)
    for conv, bn in s.conv_bn:
        assert isinstance(names[bn], torch.nn.modules.batchnorm._BatchNorm) and conv in names
    assert len(s.attention) == len(m.attention_blocks) == 4
    assert {site.q for site in s.attention} == {f"block3.{i}.attn.q_lif" for i in range(3)} | {"block4.0.attn.q_lif"}
    for n, bn in s.neuron_bn.items():
        assert n in names and isinstance(names[bn], torch.nn.modules.batchnorm._BatchNorm)
