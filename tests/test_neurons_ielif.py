"""IE-LIF against a direct computation of docs/method.md §4."""
import pytest
import torch

from qsdcompress.neurons import IELIF, AffineMultiSpike, MultiSpike, make_neuron


def reference_ielif(x, gamma, beta, mu, var, eps, D, out_scale):
    """u_hat = gamma (u - mu) / sqrt(var + eps) + beta ; S = floor(clamp(D u_hat, 0, D) + 0.5)."""
    v = lambda t: t.view(1, 1, -1, *([1] * (x.dim() - 3)))  # noqa: E731
    u_hat = v(gamma) * (x - v(mu)) / torch.sqrt(v(var) + eps) + v(beta)
    return torch.floor(torch.clamp(D * u_hat, 0, D) + 0.5) * out_scale


@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 4), (1, 3, 5, 7), (2, 3, 5)])
def test_training_mode_uses_batch_statistics_and_updates_running(shape):
    C = shape[2]
    n = IELIF(C, levels=4, momentum=0.1)
    n.train()
    x = torch.randn(shape) * 2 + 1
    dims = [d for d in range(x.dim()) if d != 2]
    mu, var = x.mean(dims), x.var(dims, unbiased=False)
    out = n(x)
    ref = reference_ielif(x, n.gamma.detach(), n.beta.detach(), mu, var, n.eps, 4, 0.25)
    assert torch.equal(out, ref)
    cnt = x.numel() // C
    assert torch.allclose(n.running_mean, 0.1 * mu, atol=1e-6)
    assert torch.allclose(n.running_var, 0.9 + 0.1 * x.var(dims, unbiased=True), atol=1e-6)
    assert cnt > 1 and int(n.num_batches_tracked) == 1


def test_eval_mode_uses_running_statistics():
    n = IELIF(6, levels=8, out_scale=2 / 8)
    with torch.no_grad():
        n.running_mean.copy_(torch.randn(6))
        n.running_var.copy_(torch.rand(6) + 0.5)
        n.gamma.copy_(torch.rand(6) + 0.1)
        n.beta.copy_(torch.randn(6) * 0.3)
    n.eval()
    x = torch.randn(1, 4, 6, 9) * 2
    ref = reference_ielif(x, n.gamma.detach(), n.beta.detach(), n.running_mean, n.running_var, n.eps, 8, 0.25)
    out = n(x)
    # the eval path is the folded affine a*u + c: equal to the formula up to float rounding, so a
    # level can move only where D*u_hat sits within rounding of a .5 boundary
    assert (out - ref).abs().max() <= 0.25 + 1e-6
    assert (out != ref).float().mean() < 1e-3


def test_default_init_is_rectify_and_spikes_spread_over_levels():
    n = IELIF(3)
    assert torch.all(n.gamma == 0.25) and torch.all(n.beta == 0.5)
    n.train()
    x = torch.randn(1, 2048, 3) * 0.05 + 3.0  # a potential far from the firing range
    s = n.spike_count(x)
    counts = torch.stack([(s == k).float().mean() for k in range(5)])
    assert (counts > 0.02).all()  # all D+1 levels used, where a plain neuron would saturate
    assert torch.all(MultiSpike(4).spike_count(x) == 4)


def test_identity_init_reproduces_multispike_exactly():
    torch.manual_seed(1)
    for D, out_scale in ((2, 0.5), (4, 0.25), (4, 0.5), (8, 0.125)):
        n = IELIF(5, levels=D, out_scale=out_scale)
        with torch.no_grad():
            n.running_mean.copy_(torch.randn(5))
            n.running_var.copy_(torch.rand(5) * 3 + 1e-3)
        n.set_identity()
        n.eval()
        x = torch.randn(2, 3, 5, 6, 6)
        # hit the rounding boundaries exactly too: D*x = k + 0.5
        x[0, 0, :, 0, :] = (torch.arange(6).float() + 0.5) / D
        base = MultiSpike(D, out_scale=out_scale)
        assert torch.equal(n(x), base(x))
        a, c = n.fold()
        assert torch.equal(a, torch.ones(5)) and torch.equal(c, torch.zeros(5))


def test_gamma_stays_positive_and_ste_gradient():
    n = IELIF(2)
    with torch.no_grad():
        n.gamma.copy_(torch.tensor([-1.0, 0.5]))
    n.eval()
    a, _ = n.fold()
    assert (a > 0).all()
    n.train()
    x = torch.randn(1, 64, 2, requires_grad=True)
    n(x).sum().backward()
    assert x.grad is not None and n.beta.grad is not None and n.gamma.grad is not None
    assert n.beta.grad.abs().sum() > 0


def test_binary_planes_sum_to_integer_output():
    n = IELIF(4, levels=4, out_scale=0.5)
    n.train()
    n(torch.randn(1, 8, 4, 5))
    n.eval()
    x = torch.randn(1, 3, 4, 5)
    planes = n.binary(x)
    assert planes.shape == (4, *x.shape)
    assert torch.equal(planes.sum(0), n(x))


def test_affine_multispike():
    n = AffineMultiSpike(3, levels=4, out_scale=0.25)
    n.scale.copy_(torch.tensor([1.0, 2.0, 0.5]))
    n.shift.copy_(torch.tensor([0.0, -0.1, 0.3]))
    x = torch.randn(1, 2, 3, 4)
    u = x * n.scale.view(1, 1, 3, 1) + n.shift.view(1, 1, 3, 1)
    assert torch.equal(n(x), make_neuron("multispike", 4)(u))


@pytest.mark.parametrize("blend", [0.0, 0.3, 1.0])
def test_blend_mixes_in_the_plain_neuron_in_training_and_eval(blend):
    """u_hat' = blend * u_hat + (1 - blend) * u (the IE-LIF warm-up); blend 0 is the plain neuron."""
    n = IELIF(5, levels=4)
    with torch.no_grad():
        n.running_mean.copy_(torch.randn(5))
        n.running_var.copy_(torch.rand(5) + 0.5)
    n.blend = blend
    x = torch.randn(2, 16, 5, 3)
    v = lambda t: t.view(1, 1, -1, 1)  # noqa: E731
    g, b = n.gamma.detach(), n.beta.detach()

    def ref(mu, var):
        u_hat = v(g) * (x - v(mu)) / torch.sqrt(v(var) + n.eps) + v(b)
        mixed = blend * u_hat + (1 - blend) * x
        return torch.floor(torch.clamp(4 * mixed, 0, 4) + 0.5) * 0.25

    n.eval()
    out = n(x)
    assert (out != ref(n.running_mean, n.running_var)).float().mean() < 1e-2  # folded affine: rounding only
    if blend == 0.0:
        assert torch.equal(out, MultiSpike(4)(x))
    a, c = n.fold()
    a1 = g / torch.sqrt(n.running_var + n.eps)
    assert torch.allclose(a, blend * a1 + 1 - blend) and torch.allclose(c, blend * (b - a1 * n.running_mean))
    n.train()
    dims = [0, 1, 3]
    assert torch.equal(n(x), ref(x.mean(dims), x.var(dims, unbiased=False)))
    assert "blend" in repr(n) if blend < 1 else "blend" not in repr(n)
