"""Spectral filters (docs/DESIGN.md §3.4). The standard tests of global_filter and spectral_conv come from
their specs, recipes.GLOBAL_FILTER and recipes.SPECTRAL_CONV (tests/recipes.py): every kernel backend
against the float64 reference (einsum) over shapes, complex64 / complex128, with and without a mask, in
every layout, with poisoned outputs; gradcheck on complex128; opcheck; torch.compile; bad input. Here
besides: the CPU kernels' blocking, fam_half_weight and fam_global, FrequencyAttention against the FAM-KD
authors' module (outputs, gradients, state_dict), the exact half-plane form, the fused small-map path,
GlobalFilter against GFNet's formula, autocast, torch.compile of the module, NaN propagation and the
modules' bad input."""

import os
import subprocess
import sys

import pytest
import torch

import dctkd_ext
import recipes
from dctkd_ext import _backend
from dctkd_ext import reference as R
from dctkd_ext.nn import FrequencyAttention, GlobalFilter
from dctkd_ext.ops import spectral as fg

from conftest import (
    ACC_TOL,
    HAS_CUDA,
    HAS_TRITON,
    TRITON_DEVICE,
    assert_close,
    assert_rel_close,
    crandn,
    in_layout,
    rel_err,
)

# test_{global_filter,spectral_conv,fam_half_weight}_{matches_reference,layouts,gradcheck_float64,opcheck,
# torch_compile_fullgraph,bad_input}
globals().update(recipes.family_tests(recipes.GLOBAL_FILTER, prefix="global_filter_"))
globals().update(recipes.family_tests(recipes.SPECTRAL_CONV, prefix="spectral_conv_"))
globals().update(recipes.family_tests(recipes.FAM_HALF_WEIGHT, prefix="fam_half_weight_"))


@pytest.fixture
def triton_mode():
    """Runs the Triton kernels here: on the GPU, or on CPU tensors under TRITON_INTERPRET=1 (set by
    conftest.py before dctkd_ext.triton is imported when there is no GPU)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    return _backend.triton_ops()


def channels_last(t):
    return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def cuton_for(size, r):
    """A cut-on whose high-pass box has radius r at this size (r = int(cuton * int(size / 2)))."""
    c = min(1.0, (r + 0.5) / max(1, int(size / 2)))
    assert fg.fam_mask_radius(size, c) == r or size < 2
    return c


def assert_mask_not_empty(size, cuton):
    m = R.fam_highpass_mask(size, size, cuton)
    assert (m == 0).any(), f"cuton {cuton} masks nothing at size {size}"


# ------------------------------------------------------------------------------- the CPU kernels' blocking
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["both", "dx", "dw"])
def test_global_filter_backward_row_blocks_cpu(layout, need, gen, poison_outputs):
    # samples of 64 x 32 x 17 complex128: a CPU thread takes its weight rows in several blocks of
    # accumulators (csrc/cpu/spectral.cpp, kGfAccBytes = 128 KiB), the last one short, in either layout
    b, c, h, k = 3, 64, 32, 17
    xf = crandn(b, c, h, k, dtype=torch.complex128, generator=gen).requires_grad_()
    w = crandn(c, h, k, dtype=torch.complex128, generator=gen).requires_grad_()
    mask = torch.rand(h, k, generator=gen, dtype=torch.float64)
    g = crandn(b, c, h, k, dtype=torch.complex128, generator=gen)
    dx_ref, dw_ref = torch.autograd.grad(R.global_filter(xf, w, mask), (xf, w), g)
    xin, gin = (channels_last(xf.detach()), channels_last(g)) if layout == "channels_last" else (xf.detach(), g)
    dx, dw = torch.ops.dctkd_ext.global_filter_backward(gin, xin, w.detach(), mask, *need)
    if need[0]:
        assert_rel_close(dx, dx_ref, 1e-13, "dxf")
    if need[1]:
        assert_rel_close(dw, dw_ref, 1e-13, "dw")


def test_spectral_conv_large_channels_cpu(gen, poison_outputs):
    # more rows than a CPU work item (8), more frequencies than its vector (16), odd counts everywhere
    xf = crandn(11, 70, 9, 5, generator=gen)
    w = crandn(70, 13, 9, 5, generator=gen)
    out = dctkd_ext.spectral_conv(xf, w)
    assert_rel_close(out, R.spectral_conv(xf.to(torch.complex128), w.to(torch.complex128)),
                     2 * ACC_TOL[torch.float32], "spectral_conv")


def test_opcheck_triton(triton_mode, gen):
    dev = TRITON_DEVICE
    xf = crandn(2, 3, 4, 3, generator=gen).to(dev)
    w = crandn(3, 4, 3, generator=gen).to(dev)
    w2 = crandn(3, 5, 4, 3, generator=gen).to(dev)
    mask = torch.rand(4, 3, generator=gen).to(dev)
    ops = triton_mode
    torch.library.opcheck(ops.global_filter.default, (xf.requires_grad_(), w.requires_grad_(), mask))
    torch.library.opcheck(ops.spectral_conv.default, (xf, w2.requires_grad_(), None))
    torch.library.opcheck(ops.fam_half_weight.default, (w2.detach().requires_grad_(), 0.3))
    x = torch.randn(2, 3, 7, 7, generator=gen).to(dev).requires_grad_()
    wh = crandn(3, 4, 7, 4, generator=gen).to(dev).requires_grad_()
    with dctkd_ext.use_backend("triton"):
        torch.library.opcheck(ops.fam_filter_fused.default, (x, wh, False, False))


def test_triton_kernels_compile_for_sm90():
    """Every Triton kernel variant the spectral launchers use compiles for sm_90 (H100/H200) with the
    installed triton, GPU or not (the interpreter checks neither types, layouts nor resources)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    import triton.backends.nvidia as nv

    if not os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    r = subprocess.run([sys.executable, "-m", "dctkd_ext.triton._compile_check", "--family", "spectral", "--arch", "90"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "kernel variants compiled" in r.stdout


# ------------------------------------------------------------------------------ FAM: exact half plane
@pytest.mark.parametrize("size", [1, 2, 7, 8, 20, 21])
@pytest.mark.parametrize("cuton", [0.0, 0.1, 0.3, 1.0])
def test_half_plane_form_is_exact(size, cuton, gen):
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=gen)
    w = crandn(3, 4, size, size, dtype=torch.complex128, generator=gen)
    wd = crandn(3, size, size, dtype=torch.complex128, generator=gen)
    for mix, weight in (("channel", w), ("depthwise", wd)):
        full = R.fam_global(x, weight, cuton, mix)
        wh = R.fam_half_weight(weight, cuton)
        assert torch.equal(fg.fam_half_weight(weight, cuton), wh), "ops and reference half weights differ"
        xf = torch.fft.rfft2(x, norm="ortho")
        yf = R.spectral_conv(xf, wh) if mix == "channel" else R.global_filter(xf, wh)
        half = torch.fft.irfft2(yf, s=(size, size), norm="ortho")
        assert_rel_close(half, full, 1e-12, f"{mix} half-plane form")
    # the mask is the released code's box on the centred spectrum
    m = R.fam_highpass_mask(size, size, cuton, torch.float64)
    centred = torch.fft.fftshift(m)
    cy, r = size // 2, int(cuton * int(size / 2))
    box = torch.ones(size, size, dtype=torch.float64)
    box[cy - r:cy + r, cy - r:cy + r] = 0
    assert torch.equal(centred, box)


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("size", [5, 6])  # odd; even (a Nyquist column that stands for one frequency)
def test_fam_global_op_gradcheck_and_opcheck(depthwise, size, gen):
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=gen, requires_grad=True)
    shape = (3, size, size) if depthwise else (3, 2, size, size)
    w = crandn(*shape, dtype=torch.complex128, generator=gen, requires_grad=True)
    with dctkd_ext.use_backend("cpu"):
        # fast mode (random projections of the Jacobian): the full Jacobian takes minutes here
        assert torch.autograd.gradcheck(lambda a, b_: fg.fam_global(a, b_, 0.5, depthwise), (x, w), fast_mode=True)
        assert_rel_close(fg.fam_global(x, w, 0.5, depthwise), R.fam_global(x, w, 0.5, "depthwise" if depthwise else "channel"),
                   1e-12, "fam_global")
        torch.library.opcheck(torch.ops.dctkd_ext.fam_global.default, (x.float().detach().requires_grad_(),
                                                                       w.to(torch.complex64).detach().requires_grad_(),
                                                                       0.5, depthwise, False))


def _released_and_ours(cin, cout, size, cuton, dtype, mix="channel", seed=0):
    torch.manual_seed(seed)
    ref = R.ReleasedFAM(cin, cout, size)
    ours = FrequencyAttention(cin, cout, size, cuton=cuton, mix=mix)
    if mix == "channel":
        ours.load_state_dict(ref.state_dict())
    if dtype == torch.float64:
        for m in (ref, ours):
            m.double()
            m.weights1.data = m.weights1.data.to(torch.complex128)
    return ref, ours


@pytest.mark.parametrize("size", [1, 2, 7, 8, 20, 21])
@pytest.mark.parametrize("radius", ["r1", "full"])
def test_frequency_attention_matches_released_fp64(size, radius, gen, poison_outputs):
    # the high-pass box is never empty (but at size 1, where int(1 / 2) = 0 leaves no box to cut)
    cuton = 1.0 if radius == "full" else cuton_for(size, 1)
    if size > 1:
        assert_mask_not_empty(size, cuton)
    ref, ours = _released_and_ours(4, 3, size, cuton, torch.float64)
    x = torch.randn(3, 4, size, size, dtype=torch.float64, generator=gen)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref((xr, cuton)), ours(xo)
    assert_rel_close(yo, yr, 1e-12, "output")
    g = torch.randn(yr.shape, dtype=torch.float64, generator=gen)
    yr.backward(g)
    yo.backward(g)
    assert_rel_close(xo.grad, xr.grad, 1e-12, "dx")
    for (name, pr), po in zip(ref.named_parameters(), ours.parameters()):
        assert_rel_close(po.grad, pr.grad, 1e-11, f"d{name}")


@pytest.mark.parametrize("size", [7, 8, 20, 32])
def test_frequency_attention_matches_released_fp32(size, gen, poison_outputs):
    cuton = 0.5
    assert_mask_not_empty(size, cuton)
    ref, ours = _released_and_ours(6, 5, size, cuton, torch.float32)
    ref64, _ = _released_and_ours(6, 5, size, cuton, torch.float64)
    x = torch.randn(4, 6, size, size, generator=gen)
    xo, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    yo, y64 = ours(xo), ref64((x64, cuton))
    assert_rel_close(yo, y64, 5 * ACC_TOL[torch.float32], "output")
    g = torch.randn(y64.shape, dtype=torch.float64, generator=gen)
    yo.backward(g.float())
    y64.backward(g)
    assert_rel_close(xo.grad, x64.grad, 5 * ACC_TOL[torch.float32], "dx")
    terms = recipes.fam_layer_rate_terms(x64, ref64.weights1, ref64.w0.weight, ref64.w0.bias, None, None,
                                         cuton, g)
    for (name, p64), po in zip(ref64.named_parameters(), ours.parameters()):
        assert_close(po.grad, p64.grad, torch.float32, f"d{name}", 20, terms.get(name))


def test_frequency_attention_state_dict_and_init():
    torch.manual_seed(1)
    ref = R.ReleasedFAM(5, 4, 9)
    torch.manual_seed(1)
    ours = FrequencyAttention(5, 4, 9)
    # the same parameters, names, shapes and (same seed, same order of draws) values
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours) == ["rate1", "rate2", "weights1", "w0.weight", "w0.bias"]
    for k in sd_ref:
        assert sd_ref[k].shape == sd_ours[k].shape and sd_ref[k].dtype == sd_ours[k].dtype, k
        assert torch.equal(sd_ref[k], sd_ours[k]), k
    assert ours.weights1.dtype == torch.complex64 and ours.rate1.item() == 0.5 == ours.rate2.item()
    assert 0 <= ours.weights1.real.min() and ours.weights1.real.max() <= 1 / 20
    ref.load_state_dict(ours.state_dict())  # and back
    # rates saved as 0-dim tensors load too
    sd = dict(sd_ref)
    sd["rate1"], sd["rate2"] = torch.tensor(0.25), torch.tensor(0.75)
    ours.load_state_dict(sd)
    assert ours.rate1.shape == (1,) and ours.rate1.item() == 0.25 and ours.rate2.item() == 0.75


@pytest.mark.parametrize("size", [9, 8])  # odd; even (a Nyquist column that stands for one frequency)
def test_frequency_attention_depthwise(size, gen):
    # the depthwise module runs the fam_global op (rfft2 -> global_filter -> irfft2 and its backward)
    torch.manual_seed(2)
    m = FrequencyAttention(4, 4, size, cuton=0.5, mix="depthwise").double()
    m.weights1.data = m.weights1.data.to(torch.complex128)
    assert m.weights1.shape == (4, size, size)
    x = torch.randn(2, 4, size, size, dtype=torch.float64, generator=gen, requires_grad=True)
    w = m.weights1.detach().clone().requires_grad_()
    y = m(x)
    ref = m.rate1 * R.fam_global(x, w, 0.5, "depthwise") + m.rate2 * m.w0(x)
    assert_rel_close(y, ref, 1e-12, "depthwise output")
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    dx, dw = torch.autograd.grad(y, (x, m.weights1), g)
    rdx, rdw = torch.autograd.grad(ref, (x, w), g)
    assert_rel_close(dx, rdx, 1e-12, "depthwise dx")
    assert_rel_close(dw, rdw, 1e-12, "depthwise dweights1")


def _released_fp64(m, x, cuton):
    """The authors' forward in float64 with m's parameters: the independent reference of a module."""
    return R.released_fam_forward(x.double(), m.weights1.detach().to(torch.complex128),
                                  m.w0.weight.detach().double(), m.w0.bias.detach().double(),
                                  m.rate1.detach().double(), m.rate2.detach().double(), cuton)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_frequency_attention_strided_input(backend, layout, gen, poison_outputs):
    _, device = backend
    cuton = 0.5
    m = FrequencyAttention(3, 2, 8, cuton=cuton).to(device)
    x = in_layout(torch.randn(2, 3, 8, 8, generator=gen).to(device), layout).requires_grad_()
    y = m(x)
    x64 = x.detach().double().cpu().requires_grad_()
    y64 = _released_fp64(m, x64, cuton)
    assert_rel_close(y, y64, 5 * ACC_TOL[torch.float32], f"{layout} output")
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, x, g.to(device, y.dtype))
    (dx64,) = torch.autograd.grad(y64, x64, g)
    assert_rel_close(dx, dx64, 5 * ACC_TOL[torch.float32], f"{layout} dx")


def test_frequency_attention_half_input(gen):
    cuton = 0.5
    m = FrequencyAttention(3, 2, 8, cuton=cuton)
    mh = FrequencyAttention(3, 2, 8, cuton=cuton)
    mh.load_state_dict(m.state_dict())
    mh.w0.to(torch.bfloat16)
    mh.rate1.data, mh.rate2.data = mh.rate1.data.bfloat16(), mh.rate2.data.bfloat16()
    xh = torch.randn(2, 3, 8, 8, generator=gen).bfloat16()
    yh = mh(xh)
    assert yh.dtype == torch.bfloat16
    # against the float64 formula on the bf16 inputs and parameters: the bf16 conv branch and the
    # rounding of the output are the error (a few bf16 ulps), the FFT branch runs in fp32
    ref = R.released_fam_forward(xh.double(), mh.weights1.detach().to(torch.complex128),
                                 mh.w0.weight.detach().double(), mh.w0.bias.detach().double(),
                                 mh.rate1.detach().double(), mh.rate2.detach().double(), cuton)
    assert_rel_close(yh.float(), ref, 1e-2, "bf16 features")


def test_frequency_attention_autocast(gen):
    cuton = 0.5
    m = FrequencyAttention(3, 4, 8, cuton=cuton)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = m.global_branch(x)
        y = m(x)
    assert g.dtype == torch.float32, "the FFT branch must stay fp32 under autocast"
    g64 = R.fam_global(x.double(), m.weights1.detach().to(torch.complex128), cuton)
    assert_rel_close(g, g64, 5 * ACC_TOL[torch.float32], "global branch under autocast")
    assert y.dtype == torch.float32
    assert_rel_close(y, _released_fp64(m, x, cuton), 2e-2, "output under autocast (bf16 conv branch)")
    y.sum().backward()
    assert m.weights1.grad is not None and m.weights1.grad.dtype == torch.complex64


@pytest.mark.parametrize("size", [7, 8])
def test_frequency_attention_forward_cuton(size, gen):
    """forward(x, cuton) and the released forward((x, cuton)) use the given cut-on, not the
    constructor's; forward(x) uses the constructor's."""
    cuton = cuton_for(size, 2 if size >= 8 else 1)
    torch.manual_seed(5)
    m = FrequencyAttention(4, 3, size).double()  # constructor cut-on 0.1: no box at these sizes
    m.weights1.data = m.weights1.data.to(torch.complex128)
    x = torch.randn(2, 4, size, size, dtype=torch.float64, generator=gen)
    want = _released_fp64(m, x, cuton)
    plain = _released_fp64(m, x, m.cuton)
    assert rel_err(want, plain) > 1e-3, "the test needs a cut-on that changes the output"
    assert_rel_close(m(x, cuton), want, 1e-12, "forward(x, cuton)")
    assert_rel_close(m((x, cuton)), want, 1e-12, "forward((x, cuton))")
    assert_rel_close(m(x), plain, 1e-12, "forward(x)")
    assert_rel_close(m.global_branch(x, cuton), R.fam_global(x, m.weights1, cuton), 1e-12, "global_branch(x, cuton)")
    with pytest.raises(ValueError, match=r"x: expected a tensor or a \(x, cuton\) tuple"):
        m((x, cuton, 1))


def test_frequency_attention_depthwise_init():
    torch.manual_seed(4)
    m = FrequencyAttention(6, 6, 9, mix="depthwise")
    assert m.weights1.shape == (6, 9, 9) and m.weights1.dtype == torch.complex64
    assert m.scale == pytest.approx(1 / 6)
    # (1/in) * rand, real and imaginary parts uniform in [0, 1/in)
    for part in (m.weights1.real, m.weights1.imag):
        assert 0 <= part.min().item() and part.max().item() < 1 / 6
        assert part.mean().item() == pytest.approx(0.5 / 6, rel=0.15)
    assert m.rate1.shape == (1,) and m.rate1.item() == 0.5 == m.rate2.item()
    assert m.w0.weight.shape == (6, 6, 1, 1) and m.w0.bias.shape == (6,)
    assert list(m.state_dict()) == ["rate1", "rate2", "weights1", "w0.weight", "w0.bias"]
    # the same draws as the channel-mixing module's, in the same order
    torch.manual_seed(4)
    expect = (1 / 6) * torch.rand(6, 9, 9, dtype=torch.cfloat)
    assert torch.equal(m.weights1.detach(), expect)


# --------------------------------------------------------------------------------- the fused path
@pytest.mark.parametrize("size", [4, 7, 8, 16])
@pytest.mark.parametrize("mix", ["channel", "depthwise"])
def test_fused_path_matches_fft_path(triton_mode, size, mix, gen):
    dev = TRITON_DEVICE
    cin, cout = (3, 5) if mix == "channel" else (4, 4)
    torch.manual_seed(3)
    assert_mask_not_empty(size, 0.5)
    fused = FrequencyAttention(cin, cout, size, cuton=0.5, mix=mix, path="fused").to(dev)
    fft = FrequencyAttention(cin, cout, size, cuton=0.5, mix=mix, path="fft").to(dev)
    fft.load_state_dict(fused.state_dict())
    x = torch.randn(2, cin, size, size, generator=gen).to(dev)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with dctkd_ext.use_backend("triton"):
        assert fused.choose_path(xa) == "fused"
        ya = fused(xa)
    yb = fft(xb)
    assert_rel_close(ya, yb, 5 * ACC_TOL[torch.float32], "fused output")
    g = torch.randn(ya.shape, generator=gen).to(dev)
    with dctkd_ext.use_backend("triton"):
        ya.backward(g)
    yb.backward(g)
    assert_rel_close(xa.grad, xb.grad, 5 * ACC_TOL[torch.float32], "fused dx")
    with torch.no_grad():  # the rate gradients are sums with cancellation: scale by sum |dy * branch|
        scales = {"rate1": (g * fft.global_branch(x)).abs().sum().item(), "rate2": (g * fft.w0(x)).abs().sum().item()}
    for (name, pa), pb in zip(fused.named_parameters(), fft.parameters()):
        if name in scales:
            assert abs(pa.grad.item() - pb.grad.item()) <= 1e-6 * scales[name], f"fused d{name}"
        else:
            assert_rel_close(pa.grad, pb.grad, 5 * ACC_TOL[torch.float32], f"fused d{name}")


def test_auto_path_rule(monkeypatch):
    from dctkd_ext.nn import spectral as nsp

    # the size rule a GPU applies: the fused kernel for small layers only
    small, big = FrequencyAttention(8, 8, 8), FrequencyAttention(32, 32, 32)
    assert small.fused_pays(2) and not big.fused_pays(64)
    monkeypatch.setattr(nsp, "FUSED_MAX_FLOPS", nsp.fused_flops_estimate(2, 8, 8, 8, False) - 1)
    assert not small.fused_pays(2)
    monkeypatch.undo()
    # the CPU always takes the rfft path, also where the size rule would pick the fused kernel
    assert small.choose_path(torch.randn(2, 8, 8, 8)) == "fft"
    assert FrequencyAttention(4, 4, 40).choose_path(torch.randn(1, 4, 40, 40)) == "fft"


def test_auto_routes_to_the_cpu_kernels(gen):
    """`auto` on CPU tensors runs the C++ kernels (op names in the profiler), forward and backward, for
    the ops and for both modules, not the plain-PyTorch reference."""
    xf = crandn(2, 3, 5, 3, generator=gen, requires_grad=True)
    w = crandn(3, 5, 3, generator=gen, requires_grad=True)
    w2 = crandn(3, 4, 5, 3, generator=gen, requires_grad=True)
    fam = FrequencyAttention(3, 4, 8, cuton=0.5)
    gfm = GlobalFilter(3, 6, 6)
    with dctkd_ext.use_backend("auto"), torch.autograd.profiler.profile() as prof:
        dctkd_ext.global_filter(xf, w).abs().sum().backward()
        dctkd_ext.spectral_conv(xf, w2).abs().sum().backward()
    names = {e.name for e in prof.function_events}
    ours = sorted(n for n in names if n.startswith("dctkd_ext::"))
    for op in ("global_filter", "global_filter_backward", "spectral_conv", "spectral_conv_backward"):
        assert f"dctkd_ext::{op}" in names, f"auto did not run the C++ {op}; dctkd_ext ops that ran: {ours}"
    for module, x in ((fam, torch.randn(2, 3, 8, 8, generator=gen)), (gfm, torch.randn(2, 6, 6, 3, generator=gen))):
        with dctkd_ext.use_backend("auto"), torch.autograd.profiler.profile() as prof:
            module(x.requires_grad_()).sum().backward()
        ran = sorted({e.name for e in prof.function_events if e.name.startswith("dctkd_ext::")})
        assert ran, f"auto ran no C++ op in {type(module).__name__}"


def test_non_finite_inputs_propagate(backend, gen):
    """A NaN in the input reaches the outputs it feeds, and only those, on every backend (no
    masking that hides it)."""
    _, dev = backend
    xf = crandn(2, 3, 4, 3, generator=gen)
    xf[1, 2, 3, 1] = complex(float("nan"), 0.0)
    w = crandn(3, 4, 3, generator=gen)
    w2 = crandn(3, 5, 4, 3, generator=gen)
    y = dctkd_ext.global_filter(xf.to(dev), w.to(dev)).cpu()
    bad = torch.isnan(torch.view_as_real(y)).any(-1)
    expect = torch.zeros_like(bad)
    expect[1, 2, 3, 1] = True
    assert torch.equal(bad, expect)
    y = dctkd_ext.spectral_conv(xf.to(dev), w2.to(dev)).cpu()
    bad = torch.isnan(torch.view_as_real(y)).any(-1)
    expect = torch.zeros_like(bad)
    expect[1, :, 3, 1] = True
    assert torch.equal(bad, expect)
    # the module: one NaN pixel spreads over its sample's spectrum, never to other samples
    m = FrequencyAttention(3, 2, 6, cuton=0.5).to(dev)
    x = torch.randn(3, 3, 6, 6, generator=gen)
    x[1, 0, 2, 2] = float("inf")
    y = m(x.to(dev)).detach().cpu()
    assert torch.isfinite(y[[0, 2]]).all() and not torch.isfinite(y[1]).all()


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_global_filter_module_strided(backend, layout, gen):
    # fam_half_weight in these layouts: test_fam_half_weight_layouts
    _, dev = backend
    h, wd, dim = 6, 7, 5
    m = GlobalFilter(dim, h, wd).to(dev)
    x = in_layout(torch.randn(3, h, wd, dim, generator=gen).to(dev), layout).requires_grad_()
    xr = x.detach().cpu().contiguous().requires_grad_()
    y = m(x)
    cw = m.complex_weight.detach().cpu()
    yr = R.gfnet_global_filter(xr, cw)
    assert_rel_close(y, yr, 5 * ACC_TOL[torch.float32], f"GlobalFilter {layout}")
    gy = torch.randn(y.shape, generator=gen)
    assert_rel_close(torch.autograd.grad(y, x, gy.to(dev))[0], torch.autograd.grad(yr, xr, gy)[0], 5 * ACC_TOL[torch.float32],
               f"GlobalFilter dx {layout}")


# ---------------------------------------------------------------------------------------- GFNet
@pytest.mark.parametrize("tokens", [False, True])
def test_global_filter_module_matches_gfnet(backend, tokens, gen):
    name, device = backend
    h, w, dim = 6, 7, 5
    m = GlobalFilter(dim, h, w).to(device)
    assert m.complex_weight.shape == (h, w // 2 + 1, dim, 2)
    x = torch.randn(3, h, w, dim, generator=gen).to(device)
    if tokens:
        x = x.reshape(3, h * w, dim)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    cw = m.complex_weight.detach().clone().requires_grad_()
    y = m(xa, spatial_size=(h, w)) if tokens else m(xa)
    ref = R.gfnet_global_filter(xb, cw, (h, w))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert_rel_close(y, ref, 5 * ACC_TOL[torch.float32], "GlobalFilter output")
    g = torch.randn(y.shape, generator=gen).to(device)
    da, dwa = torch.autograd.grad(y, (xa, m.complex_weight), g)
    db, dwb = torch.autograd.grad(ref, (xb, cw), g)
    assert_rel_close(da, db, 5 * ACC_TOL[torch.float32], "GlobalFilter dx")
    assert_rel_close(dwa, dwb, 5 * ACC_TOL[torch.float32], "GlobalFilter dcomplex_weight")


# ------------------------------------------------------------------------------------ torch.compile
@pytest.mark.slow
def test_frequency_attention_torch_compile_fullgraph(gen):
    # the ops alone: test_global_filter_torch_compile_fullgraph, test_spectral_conv_torch_compile_fullgraph
    torch._dynamo.reset()
    m = FrequencyAttention(3, 4, 7)
    x = torch.randn(2, 3, 7, 7, generator=gen)

    def f(x):
        return m(x).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_rel_close(cf(x), f(x), 1e-6, "compiled")


# -------------------------------------------------------------------------------------- bad input
def test_module_bad_inputs(backend, gen):
    # the ops' own: test_{global_filter,spectral_conv,fam_half_weight}_bad_input; here the C++ ops called
    # directly and the modules, on every backend
    name, dev = backend
    xf = crandn(2, 3, 4, 3, generator=gen, device=dev)
    w = crandn(3, 4, 3, generator=gen, device=dev)
    if name == "cpu":  # the C++ ops check too when called directly
        c_ops_check_their_arguments(xf, w, gen)

    m = FrequencyAttention(3, 4, 8).to(dev)
    with pytest.raises(ValueError, match=r"x: expected spatial size \(8, 8\).*got \(7, 7\)"):
        m(torch.randn(2, 3, 7, 7, device=dev))
    with pytest.raises(ValueError, match=r"x: expected 3 channels \(in_channels\)"):
        m(torch.randn(2, 5, 8, 8, device=dev))
    with pytest.raises(ValueError, match=r"x: expected a 4-D"):
        m(torch.randn(3, 8, 8, device=dev))
    with pytest.raises(TypeError, match=r"x: expected a real floating"):
        m(torch.randn(2, 3, 8, 8, dtype=torch.complex64, device=dev))
    with pytest.raises(ValueError, match=r"cuton: expected a number in \[0, 1\]"):
        m(torch.randn(2, 3, 8, 8, device=dev), cuton=1.5)
    with pytest.raises(ValueError, match=r"in_channels == out_channels"):
        FrequencyAttention(3, 4, 8, mix="depthwise")
    with pytest.raises(ValueError, match=r"mix: expected"):
        FrequencyAttention(3, 4, 8, mix="grouped")
    with pytest.raises(ValueError, match=r"size: expected a positive int"):
        FrequencyAttention(3, 4, 0)
    with pytest.raises(ValueError, match=r"path: expected"):
        FrequencyAttention(3, 4, 8, path="cufft")
    if name in ("cpu", "reference"):
        with pytest.raises(ValueError, match=r"path='fused' needs"):
            FrequencyAttention(3, 4, 8, path="fused")(torch.randn(1, 3, 8, 8, device=dev))

    gf = GlobalFilter(4, 6, 6).to(dev)
    with pytest.raises(ValueError, match=r"x: expected spatial size \(6, 6\)"):
        gf(torch.randn(2, 5, 6, 4, device=dev))
    with pytest.raises(ValueError, match=r"x: expected 4 channels \(dim\)"):
        gf(torch.randn(2, 6, 6, 3, device=dev))
    with pytest.raises(ValueError, match=r"x: expected N = 6\*6 = 36 tokens"):
        gf(torch.randn(2, 35, 4, device=dev))


def c_ops_check_their_arguments(xf, w, gen):
    dev = xf.device
    with pytest.raises(RuntimeError, match=r"w: expected shape"):
        torch.ops.dctkd_ext.spectral_conv(xf, crandn(2, 5, 4, 3, generator=gen, device=dev), None)
    with pytest.raises(RuntimeError, match=r"mask: expected shape"):
        torch.ops.dctkd_ext.global_filter(xf, w, torch.ones(2, 2, device=dev))
    with pytest.raises(RuntimeError, match=r"xf: expected a complex64"):
        torch.ops.dctkd_ext.global_filter(torch.randn(2, 3, 4, 3, device=dev), w, None)
    with pytest.raises(RuntimeError, match=r"cuton: expected a number in \[0, 1\]"):
        torch.ops.dctkd_ext.fam_half_weight(crandn(3, 4, 4, generator=gen, device=dev), 2.0)
