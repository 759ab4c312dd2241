"""Neurons against direct reference computations."""
import torch

from qsdcompress.neurons import LIF, ClampAct, MultiSpike, make_neuron, round_half_up


def test_multispike_forward_matches_reference_formula():
    x = torch.linspace(-1, 2, 301)
    n = MultiSpike(4)
    # reference Multispike: floor(clamp(4x, 0, 4) + 0.5) / 4
    ref = torch.floor(torch.clamp(4 * x, 0, 4) + 0.5) / 4
    assert torch.equal(n(x), ref)
    att = make_neuron("multispike", 4, attention=True)
    assert torch.equal(att(x), torch.floor(torch.clamp(4 * x, 0, 4) + 0.5) / 2)


def test_round_half_up_differs_from_torch_round_at_half():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5])
    assert round_half_up(x).tolist() == [1.0, 2.0, 3.0, 0.0]
    assert torch.round(x).tolist() == [0.0, 2.0, 2.0, -0.0]


def test_multispike_straight_through_gradient():
    x = torch.tensor([-0.1, 0.0, 0.1, 0.5, 0.99, 1.0, 1.3], requires_grad=True)
    MultiSpike(4)(x).sum().backward()
    # d/dx of S(4x)/4 with STE inside 0 < 4x < 4 is 1, else 0
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    y = torch.tensor([0.1, 2.0], requires_grad=True)
    make_neuron("multispike", 4, attention=True)(y).sum().backward()
    assert y.grad.tolist() == [2.0, 0.0]


def test_general_levels():
    for D in (1, 2, 8):
        x = torch.randn(1000)
        ref = torch.floor(torch.clamp(D * x, 0, D) + 0.5) / D
        assert torch.equal(MultiSpike(D)(x), ref)


def test_binary_planes_sum_to_integer_spikes():
    for D in (2, 4, 8):
        n = MultiSpike(D)
        x = torch.randn(2, 3, 5, 7)
        planes = n.binary(x)
        assert planes.shape == (D, *x.shape)
        assert set(torch.unique(planes * D).tolist()) <= {0.0, 1.0}
        assert torch.equal(planes.sum(0), n(x))


def test_clamp_act_is_real_valued():
    x = torch.linspace(-1, 2, 31)
    assert torch.allclose(ClampAct(4)(x), torch.clamp(x, 0, 1))
    assert torch.allclose(make_neuron("relu", 4, attention=True)(x), torch.clamp(2 * x, 0, 2))


def reference_lif(x, tau=2.0, vth=1.0, vreset=0.0, soft=False):
    v = torch.full_like(x[0], vreset)
    out = []
    for t in range(x.shape[0]):
        h = v + (x[t] - (v - vreset)) / tau
        s = (h >= vth).float()
        v = h - vth * s if soft else h * (1 - s) + vreset * s
        out.append(s)
    return torch.stack(out)


def test_lif_matches_direct_recurrence():
    x = torch.randn(6, 4, 10) * 2
    assert torch.equal(LIF()(x), reference_lif(x))
    assert torch.equal(LIF(reset="soft", v_threshold=0.5)(x), reference_lif(x, vth=0.5, soft=True))
    assert torch.equal(LIF(tau=4.0)(x), reference_lif(x, tau=4.0))


def test_lif_surrogate_gradient():
    x = torch.tensor([[0.0, 2.0, 4.0]], requires_grad=True)
    LIF(detach_reset=True)(x).sum().backward()
    h = x.detach() / 2  # first step: h = x / tau
    sg = torch.sigmoid(4 * (h - 1))
    assert torch.allclose(x.grad, 4 * sg * (1 - sg) / 2)
