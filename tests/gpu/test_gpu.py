"""GPU validation of every backend (CUDA kernels and Triton) against the float64 reference, run by
bench/gpu_check.sh on a GPU machine; skipped where there is no GPU.

What it covers: fp32 / bf16 / fp16 features, NCHW and channels_last, sliced (non-contiguous,
offset) inputs x[1:] and x[:, 1:], odd channel counts, outputs poisoned with NaN (torch.empty fills
NaN in deterministic mode, so an element a kernel leaves unwritten fails), tf32x3 accuracy of the
Triton frequency GEMM, a large-index attention_map (B=256, C=2048, 56x56 bf16: 3.3 GB), CUDA-graph
capture, bitwise-equal reruns, and inputs on cuda:1 while cuda:0 is current.
"""

import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU validation: needs a CUDA GPU (bench/gpu_check.sh runs it)", allow_module_level=True)

import dctkd_ext  # noqa: E402
from dctkd_ext import reference  # noqa: E402

from conftest import ACC_TOL, assert_rel_close, rel_err  # noqa: E402

BACKENDS = ["cuda"] + (["triton"] if dctkd_ext._backend.triton_installed() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# This validation's relative bounds (conftest.assert_rel_close: shape, finiteness, rel_err <= bound) per
# dtype; fp64 is conftest's ACC_TOL. For fp32 and half outputs conftest's error_bound is stricter.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: ACC_TOL[torch.float64]}
DEV = "cuda"


# every output a kernel allocates is NaN until written (conftest.nan_poisoned_empty)
pytestmark = pytest.mark.usefixtures("poison_outputs_warn_only")


def feats(shape, dtype, layout, seed, device=DEV):
    """Features in one of the layouts the kernels must handle: nchw, channels_last, and views that are
    neither (x[1:]: offset start; x[:, 1:]: channel slice, strided)."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    if layout == "batch_slice":
        x = torch.randn(b + 1, c, h, w, generator=g, dtype=torch.float64) + 0.1
        return x.to(device=device, dtype=dtype)[1:]
    if layout == "channel_slice":
        x = torch.randn(b, c + 1, h, w, generator=g, dtype=torch.float64) + 0.1
        return x.to(device=device, dtype=dtype)[:, 1:]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.1).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


LAYOUTS = ["nchw", "channels_last", "batch_slice", "channel_slice"]
SHAPES = [(3, 67, 14, 14), (2, 3, 7, 7), (2, 64, 56, 56), (4, 129, 28, 28)]


# ---------------------------------------------------------------------------------- attention_map
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_map(backend, dtype, layout):
    for i, shape in enumerate(SHAPES):
        for p in (2.0, 1.5):
            x = feats(shape, dtype, layout, seed=i).requires_grad_()
            xr = x.detach().double().requires_grad_()
            with dctkd_ext.use_backend(backend):
                a = dctkd_ext.attention_map(x, p)
            ar = reference.attention_map(xr, p)
            assert_rel_close(a, ar.float(), 1e-5 if dtype == torch.float32 else 5e-3, f"{backend} map {shape} {dtype} {layout} p={p}")
            g = torch.randn_like(ar)
            a.backward(g.float())
            ar.backward(g)
            assert_rel_close(x.grad, xr.grad, TOL[dtype], f"{backend} map grad {shape} {dtype} {layout} p={p}")


# ------------------------------------------------------------------------------------------ dct2d
@pytest.mark.parametrize("backend", BACKENDS)
def test_dct2d(backend):
    for shape in ((3, 7, 7), (2, 56, 56), (1, 5, 9), (2, 100, 100)):
        for dtype in (torch.float32, torch.float64):
            a = torch.randn(shape, dtype=torch.float64, device=DEV)
            with dctkd_ext.use_backend(backend):
                c = dctkd_ext.dct2d(a.to(dtype))
                back = dctkd_ext.idct2d(a.to(dtype))
            assert_rel_close(c, reference.dct2d(a).to(dtype), TOL[dtype], f"{backend} dct2d {shape} {dtype}")
            assert_rel_close(back, reference.idct2d(a).to(dtype), TOL[dtype], f"{backend} idct2d {shape} {dtype}")


# ----------------------------------------------------------------------------------- dct_at_loss
R50_R18 = [(64, 256, 56), (128, 512, 28), (256, 1024, 14), (512, 2048, 7)]
ODD = [(3, 5, 13), (67, 33, 9), (2, 129, 100)]  # odd channels, odd sizes, a map past shared memory


def level_feats(levels, batch, dtype, layout, seed):
    s = [feats((batch, cs, h, h), dtype, layout, seed + 2 * i).requires_grad_() for i, (cs, _, h) in enumerate(levels)]
    t = [feats((batch, ct, h, h), dtype, layout, seed + 2 * i + 1) for i, (_, ct, h) in enumerate(levels)]
    return s, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("preset", ["dct", "paper", "at"])
def test_dct_at_loss(backend, dtype, layout, preset):
    for levels, batch in ((R50_R18, 3), (ODD, 2)):
        s, t = level_feats(levels, batch, dtype, layout, seed=7)
        sr = [x.detach().double().requires_grad_() for x in s]
        tr = [x.double() for x in t]
        weights = [0.1, 0.7, 1.3, 2.0][: len(levels)]
        with dctkd_ext.use_backend(backend):
            loss = dctkd_ext.dct_at_loss(s, t, preset=preset, weights=weights, reduction="none")
        ref = reference.dct_at_loss(sr, tr, preset=preset, weights=weights, reduction="none")
        # the maps of half inputs are exact sums in fp32, so the loss is as accurate as fp32's; only
        # the stored gradient dS is rounded to the input's dtype
        what = f"{backend} {preset} {dtype} {layout} {[lv[2] for lv in levels]}"
        assert_rel_close(loss, ref.to(loss.dtype), 1e-4 if dtype == torch.float32 else 1e-3, what)
        gl = torch.rand(batch, device=DEV, dtype=torch.float64)
        loss.backward(gl.to(loss.dtype))
        ref.backward(gl)
        for l, (a, b) in enumerate(zip(s, sr)):
            assert_rel_close(a.grad, b.grad, 1e-4 if dtype == torch.float32 else 1e-2, f"{what} grad level {l}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dct_at_loss_float64(backend):
    """fp64 follows the reference to rounding, weights and eps included (passed as fp64)."""
    s, t = level_feats(ODD[:2], 2, torch.float64, "nchw", seed=3)
    sr = [x.detach().clone().requires_grad_() for x in s]
    with dctkd_ext.use_backend(backend):
        out = dctkd_ext.dct_at_loss(s, t, preset="dct", weights=[0.1, 0.3], eps=1e-7, reduction="sum")
    ref = reference.dct_at_loss(sr, t, preset="dct", weights=[0.1, 0.3], eps=1e-7, reduction="sum")
    assert abs(out.item() - ref.item()) <= 1e-11 * abs(ref.item())
    out.backward()
    ref.backward()
    for a, b in zip(s, sr):
        assert rel_err(a.grad, b.grad) < 1e-9


# ------------------------------------------------------------------------------ spectral filters
def crandn(*shape, dtype=torch.complex64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.complex128, generator=g).to(device=DEV, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_global_filter(backend, channels_last):
    for b, c, h, k in ((3, 67, 14, 8), (2, 64, 32, 17)):
        xf = crandn(b, c, h, k, seed=1)
        if channels_last:
            xf = xf.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        xf.requires_grad_()
        w = crandn(c, h, k, seed=2).requires_grad_()
        mask = torch.rand(h, k, device=DEV)
        with dctkd_ext.use_backend(backend):
            y = dctkd_ext.global_filter(xf, w, mask)
        xr, wr = xf.detach().to(torch.complex128).requires_grad_(), w.detach().to(torch.complex128).requires_grad_()
        yr = reference.global_filter(xr, wr, mask.double())
        assert_rel_close(torch.view_as_real(y), torch.view_as_real(yr), 1e-6, f"{backend} global_filter")
        g = crandn(*y.shape, seed=3)
        y.backward(g)
        yr.backward(g.to(torch.complex128))
        assert_rel_close(torch.view_as_real(xf.grad), torch.view_as_real(xr.grad), 1e-6, f"{backend} global_filter dxf")
        assert_rel_close(torch.view_as_real(w.grad), torch.view_as_real(wr.grad), 1e-5, f"{backend} global_filter dw")


@pytest.mark.parametrize("backend", BACKENDS)
def test_spectral_conv(backend):
    """Includes the benchmark's shapes, so the Triton GEMM runs at the tiles real runs pick; on the
    Triton backend fp32 runs as tf32x3, whose accuracy this checks (about fp32's)."""
    for b, i, o, h, k in ((3, 5, 7, 6, 4), (64, 32, 32, 32, 17), (64, 256, 256, 8, 5), (17, 128, 128, 28, 15)):
        xf = crandn(b, i, h, k, seed=4).requires_grad_()
        w = (crandn(i, o, h, k, seed=5) / i ** 0.5).requires_grad_()
        mask = torch.rand(h, k, device=DEV)
        with dctkd_ext.use_backend(backend):
            y = dctkd_ext.spectral_conv(xf, w, mask)
        xr, wr = xf.detach().to(torch.complex128).requires_grad_(), w.detach().to(torch.complex128).requires_grad_()
        yr = reference.spectral_conv(xr, wr, mask.double())
        what = f"{backend} spectral_conv {(b, i, o, h, k)}"
        assert_rel_close(torch.view_as_real(y), torch.view_as_real(yr), 1e-5, what)
        g = crandn(*y.shape, seed=6)
        y.backward(g)
        yr.backward(g.to(torch.complex128))
        assert_rel_close(torch.view_as_real(xf.grad), torch.view_as_real(xr.grad), 1e-5, what + " dxf")
        assert_rel_close(torch.view_as_real(w.grad), torch.view_as_real(wr.grad), 1e-5, what + " dw")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,mix", [(32, "channel"), (16, "depthwise"), (7, "channel"), (56, "channel")])
def test_frequency_attention(backend, size, mix):
    torch.manual_seed(0)
    c = 32
    fam = dctkd_ext.nn.FrequencyAttention(c, c, size, mix=mix).to(DEV)
    x = torch.randn(4, c, size, size, device=DEV, requires_grad=True)
    with dctkd_ext.use_backend(backend):
        y = fam(x)
    ref = copy.deepcopy(fam).double()
    xr = x.detach().double().requires_grad_()
    with dctkd_ext.use_backend("reference"):
        yr = ref(xr)
    assert_rel_close(y, yr.float(), 1e-5, f"{backend} FAM {size} {mix}")
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    assert_rel_close(x.grad, xr.grad, 1e-5, f"{backend} FAM {size} {mix} dx")


# ------------------------------------------------------------------------------ large index case
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_map_large_index(backend):
    """B=256, C=2048, 56x56 bf16 (3.3 GB: byte offsets past 2^31), forward and backward, checked
    against float64 in chunks of the batch."""
    b, c, h = 256, 2048, 56
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GB of GPU memory")
    x = torch.empty(b, c, h, h, device=DEV, dtype=torch.bfloat16).normal_().requires_grad_()
    with dctkd_ext.use_backend(backend):
        a = dctkd_ext.attention_map(x)
        g = torch.randn(b, h, h, device=DEV)
        (dx,) = torch.autograd.grad(a, x, g)
    for b0 in range(0, b, 16):
        xs = x.detach()[b0 : b0 + 16].double()
        ref = xs.pow(2).mean(1)
        assert_rel_close(a[b0 : b0 + 16], ref.float(), 5e-3, f"{backend} large map rows {b0}")
        dref = g[b0 : b0 + 16, None].double() * 2 * xs / c
        assert_rel_close(dx[b0 : b0 + 16], dref, 1e-2, f"{backend} large grad rows {b0}")


# ------------------------------------------------------------------ graphs, determinism, devices
def _step(backend, s, t, xf, w, mask):
    with dctkd_ext.use_backend(backend):
        loss = dctkd_ext.dct_at_loss(s, t, preset="dct")
        y = dctkd_ext.spectral_conv(xf, w, mask)
        z = dctkd_ext.global_filter(xf, w[:, 0], mask)
        total = loss + torch.view_as_real(y).square().mean() + torch.view_as_real(z).square().mean()
        total.backward()
    return total.detach()


def _inputs(device):
    s, t = level_feats([(64, 128, 28), (67, 33, 9)], 4, torch.bfloat16, "nchw", seed=11)
    s = [x.detach().to(device).requires_grad_() for x in s]
    t = [x.to(device) for x in t]
    xf = crandn(4, 16, 14, 8, seed=12).to(device).requires_grad_()
    w = crandn(16, 16, 14, 8, seed=13).to(device).requires_grad_()
    mask = torch.rand(14, 8, generator=torch.Generator().manual_seed(14)).to(device)
    return s, t, xf, w, mask


def _grads(s, xf, w):
    return [x.grad.clone() for x in s] + [xf.grad.clone(), w.grad.clone()]


def _zero(s, xf, w):
    for v in s + [xf, w]:
        v.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_runs_bitwise_equal(backend):
    s, t, xf, w, mask = _inputs(DEV)
    out1 = _step(backend, s, t, xf, w, mask)
    g1 = _grads(s, xf, w)
    _zero(s, xf, w)
    out2 = _step(backend, s, t, xf, w, mask)
    g2 = _grads(s, xf, w)
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture(backend):
    s, t, xf, w, mask = _inputs(DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: compiles the Triton kernels, fills the basis caches
            _zero(s, xf, w)
            want = _step(backend, s, t, xf, w, mask)
    torch.cuda.current_stream().wait_stream(side)
    want_grads = _grads(s, xf, w)
    graph = torch.cuda.CUDAGraph()
    _zero(s, xf, w)
    with torch.cuda.graph(graph):
        got = _step(backend, s, t, xf, w, mask)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(_grads(s, xf, w), want_grads))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_on_second_gpu(backend):
    """Inputs on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (device guard) and give
    exactly the results computed on cuda:0."""
    s0, t0, xf0, w0, m0 = _inputs("cuda:0")
    want = _step(backend, s0, t0, xf0, w0, m0)
    want_grads = _grads(s0, xf0, w0)
    s1, t1, xf1, w1, m1 = _inputs("cuda:1")
    with torch.cuda.device(0):
        got = _step(backend, s1, t1, xf1, w1, m1)
    torch.cuda.synchronize(1)
    assert got.device == torch.device("cuda:1")
    assert torch.equal(got.cpu(), want.cpu())
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(_grads(s1, xf1, w1), want_grads))

