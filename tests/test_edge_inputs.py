"""Edge inputs are right or refused: higher-order gradients (create_graph=True) of every op against the
float64 reference formulation, empty batches, half-precision input to the FAM layer outside autocast."""

import pytest
import torch

import dctkd_ext
from dctkd_ext import reference as R
from dctkd_ext.nn import FrequencyAttention

torch.set_default_dtype(torch.float32)


def hvp(fn, inputs, v):
    """(d/dx <grad fn(x), v>) for every input: a Hessian-vector product through create_graph=True."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    y = fn(*inputs)
    g = torch.autograd.grad(y, inputs, torch.ones_like(y), create_graph=True)
    s = sum((torch.view_as_real(gi) * torch.view_as_real(vi)).sum() if gi.is_complex() else (gi * vi).sum()
            for gi, vi in zip(g, v))
    return [t.detach() for t in torch.autograd.grad(s, inputs, allow_unused=True, materialize_grads=True)]


def assert_hvp_matches(ours, ref, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(x.shape, generator=g, dtype=x.dtype) if not x.is_complex()
         else torch.randn(x.shape, generator=g, dtype=x.dtype) for x in inputs]
    got, want = hvp(ours, inputs, v), hvp(ref, inputs, v)
    for a, b in zip(got, want):
        scale = b.abs().max().clamp_min(1e-30)
        assert (a - b).abs().max() / scale < 1e-9, (a - b).abs().max() / scale
    # a test that cannot pass with an all-zero Hessian-vector product
    assert any(w.abs().max() > 0 for w in want)


def _feats(seed, b=3, shapes=((4, 5, 6), (3, 4, 4)), tshapes=((6, 5, 6), (2, 4, 4))):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(b, *sh, generator=g, dtype=torch.float64) for sh in shapes]
    t = [torch.randn(b, *sh, generator=g, dtype=torch.float64) for sh in tshapes]
    return s, t


@pytest.mark.parametrize("preset", ["dct", "paper", "at"])
def test_dct_at_loss_second_derivative_matches_reference(preset):
    s, t = _feats(1)

    def ours(*s_):
        return dctkd_ext.dct_at_loss(list(s_), t, preset=preset, weights=[0.7, 1.3], reduction="sum")

    def ref(*s_):
        with dctkd_ext.use_backend("reference"):
            return dctkd_ext.dct_at_loss(list(s_), t, preset=preset, weights=[0.7, 1.3], reduction="sum")

    assert_hvp_matches(ours, ref, s, seed=2)


def test_attention_map_and_dct_second_derivatives_match_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    assert_hvp_matches(lambda x: dctkd_ext.attention_map(x, 3.0).pow(2).sum(),
                       lambda x: R.attention_map(x, 3.0).pow(2).sum(), [x], seed=4)
    a = torch.randn(2, 6, 7, generator=g, dtype=torch.float64)
    # dct2d is linear: its own Hessian is 0, so differentiate a non-linear function of it
    assert_hvp_matches(lambda a: dctkd_ext.dct2d(a).pow(3).sum(), lambda a: R.dct2d(a).pow(3).sum(), [a], seed=5)
    assert_hvp_matches(lambda a: dctkd_ext.idct2d(a).pow(3).sum(), lambda a: R.idct2d(a).pow(3).sum(), [a], seed=6)


def test_gradgradcheck_of_the_ops():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda x: dctkd_ext.attention_map(x), [x])
    a = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(dctkd_ext.dct2d, [a])
    s, t = _feats(8)
    s = [x.requires_grad_() for x in s]
    torch.autograd.gradgradcheck(lambda *s_: dctkd_ext.dct_at_loss(list(s_), t, preset="dct", reduction="none"), s)


def _crandn(g, *shape):
    return torch.complex(torch.randn(*shape, generator=g, dtype=torch.float64),
                         torch.randn(*shape, generator=g, dtype=torch.float64))


def test_spectral_ops_second_derivatives_match_reference():
    g = torch.Generator().manual_seed(9)
    xf, wd, wc = _crandn(g, 2, 3, 4, 3), _crandn(g, 3, 4, 3), _crandn(g, 3, 5, 4, 3)
    mask = (torch.rand(4, 3, generator=g) > 0.3).to(torch.float64)

    def sq(f):
        return lambda *a: torch.view_as_real(f(*a)).pow(2).sum()

    assert_hvp_matches(sq(lambda x, w: dctkd_ext.global_filter(x, w, mask)), sq(lambda x, w: x * w * mask),
                       [xf, wd], seed=10)
    assert_hvp_matches(sq(lambda x, w: dctkd_ext.spectral_conv(x, w, mask)),
                       sq(lambda x, w: torch.einsum("bihk,iohk->bohk", x, w) * mask), [xf, wc], seed=11)


@pytest.mark.parametrize("size", [6, 7])
def test_frequency_attention_second_derivative_matches_released_module(size):
    torch.manual_seed(12)
    ours = FrequencyAttention(3, 3, size, cuton=0.3).double()
    released = R.ReleasedFAM(3, 3, size).double()
    released.load_state_dict(ours.state_dict())
    for m in (ours, released):  # .double() leaves complex parameters as they are
        m.weights1.data = m.weights1.data.to(torch.complex128)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    assert_hvp_matches(lambda x: ours(x).pow(2).sum(), lambda x: released((x, 0.3)).pow(2).sum(), [x], seed=13)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_gives_zero_loss_and_zero_gradients(reduction):
    s = [torch.randn(0, 4, 5, 5, requires_grad=True), torch.randn(0, 3, 2, 2, requires_grad=True)]
    t = [torch.randn(0, 2, 5, 5), torch.randn(0, 6, 2, 2)]
    for preset in ("dct", "paper", "at"):
        loss = dctkd_ext.dct_at_loss(s, t, preset=preset, reduction=reduction)
        if reduction == "none":
            assert loss.shape == (0,)
        else:
            assert loss.shape == () and loss.item() == 0.0
        grads = torch.autograd.grad(loss.sum(), s)
        assert all(g.shape == x.shape for g, x in zip(grads, s))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frequency_attention_half_input_outside_autocast(dtype):
    torch.manual_seed(14)
    fam = FrequencyAttention(4, 4, 8, cuton=0.2)
    x = torch.randn(2, 4, 8, 8)
    want = fam(x.to(dtype).float())
    got = fam(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    got.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fam.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_depthwise_frequency_attention_half_input_outside_autocast(dtype):
    torch.manual_seed(15)
    fam = FrequencyAttention(4, 4, 8, cuton=0.2, mix="depthwise")
    x = torch.randn(2, 4, 8, 8)
    got = fam(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), fam(x.to(dtype).float()), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mix", ["channel", "depthwise"])
def test_frequency_attention_gradgradcheck(mix):
    torch.manual_seed(16)
    fam = FrequencyAttention(2, 2, 5, cuton=0.3, mix=mix).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda x: fam(x), [x], fast_mode=True)
