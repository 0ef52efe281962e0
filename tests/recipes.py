"""The test recipe of each op family, shared by the tests of every backend: run the public op on the
backend given (use_backend), and compare its outputs and its gradients, for a random upstream gradient,
with the float64 reference on the same inputs, within conftest's error bounds (ACC_TOL / error_bound)
times the backend's BACKEND_FACTOR. The tests parametrise shapes, dtypes, layouts and options; the
recipe is the same for all of them."""

import torch

import dctkd_ext
from dctkd_ext import reference
from dctkd_ext.ops.dct_at import kernel_layout_like

from conftest import BACKEND_FACTOR, assert_close


def _ref_leaf(x):
    """float64 CPU leaf copy of x for the reference."""
    return x.detach().to("cpu", torch.float64).requires_grad_(x.requires_grad)


def _ref_arg(v):
    # tensor arguments (sample_weight) go to the reference on the CPU
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


def _upstream(shape, gen, like):
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    return g, g.to(device=like.device, dtype=like.dtype)


# ------------------------------------------------------------------------------------- dct_at family
def check_attention_map(backend, x, gen, p=2.0, reduce="mean", factor=1.0, what="attention_map"):
    """attention_map(x) and its gradient; the gradient in the kernels' layout (kernel_layout_like)."""
    factor *= BACKEND_FACTOR.get(backend, 1.0)
    xr = _ref_leaf(x)
    with dctkd_ext.use_backend(backend):
        out = dctkd_ext.attention_map(x, p, reduce)
    ref = reference.attention_map(xr, p, reduce)
    assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert_close(out, ref, x.dtype, what, factor)
    g64, g = _upstream(ref.shape, gen, out)
    (dx,) = torch.autograd.grad(out, x, g)
    (dxr,) = torch.autograd.grad(ref, xr, g64)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    if backend != "reference":  # the kernels' layout; the reference's is autograd's
        assert dx.stride() == kernel_layout_like(x).stride(), f"{what} backward: layout {dx.stride()}"
    assert_close(dx, dxr, x.dtype, f"{what} backward", factor)
    return out


def check_dct2d(backend, a, gen, factor=1.0):
    """dct2d(a) and idct2d(a) in a's dtype, and dct2d's gradient (idct2d of the upstream gradient)."""
    factor *= BACKEND_FACTOR.get(backend, 1.0)
    ar = _ref_leaf(a)
    with dctkd_ext.use_backend(backend):
        y = dctkd_ext.dct2d(a)
        yi = dctkd_ext.idct2d(a.detach())
    assert y.dtype == a.dtype and yi.dtype == a.dtype
    yr = reference.dct2d(ar)
    assert_close(y, yr, a.dtype, "dct2d", factor)
    assert_close(yi, reference.idct2d(ar.detach()), a.dtype, "idct2d", factor)
    g64, g = _upstream(y.shape, gen, y)
    (da,) = torch.autograd.grad(y, a, g)
    (dar,) = torch.autograd.grad(yr, ar, g64)
    assert_close(da, dar, a.dtype, "dct2d backward", factor)
    return y


def check_loss(backend, student, teacher, gen, what="dct_at_loss", factor=1.0, reduction="none", **kwargs):
    """The loss (per sample by default) and the students' gradients for a random upstream gradient (per
    sample with reduction="none": a backward that mixes samples fails)."""
    factor *= BACKEND_FACTOR.get(backend, 1.0)
    dtype = student[0].dtype
    sr, tr = [_ref_leaf(x) for x in student], [_ref_leaf(x) for x in teacher]
    with dctkd_ext.use_backend(backend):
        out = dctkd_ext.dct_at_loss(student, teacher, reduction=reduction, **kwargs)
    ref = reference.dct_at_loss(sr, tr, reduction=reduction, **{k: _ref_arg(v) for k, v in kwargs.items()})
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref, dtype, f"{what} loss", factor)
    g64, g = _upstream(ref.shape, gen, out)
    grads = torch.autograd.grad(out, student, g)
    refs = torch.autograd.grad(ref, sr, g64)
    for l, (a, b) in enumerate(zip(grads, refs)):
        assert a.dtype == student[l].dtype and a.shape == student[l].shape
        if backend != "reference":
            assert a.stride() == kernel_layout_like(student[l]).stride(), f"{what} grad[{l}]: layout {a.stride()}"
        assert_close(a, b, dtype, f"{what} grad[{l}]", factor)
    return out


# ---------------------------------------------------------------------------------- local_attention family
def local_attention_layout(q):
    """The layout the kernels give out, dq, dk and dv: channels_last when q is (and is not also NCHW), else NCHW."""
    cl = not q.is_contiguous() and q.is_contiguous(memory_format=torch.channels_last)
    return torch.empty(q.shape, memory_format=torch.channels_last if cl else torch.contiguous_format).stride()


def check_local_attention(backend, q, k, v, rel, kernel_size, gen, factor=1.0, what="local_attention"):
    """local_attention(q, k, v, rel) in q's dtype and its four gradients for a random upstream gradient,
    against the float64 reference; on the kernels' backends, the outputs' layout."""
    factor *= BACKEND_FACTOR.get(backend, 1.0)
    inputs = (q, k, v, rel)
    leaves = [_ref_leaf(t) for t in inputs]
    with dctkd_ext.use_backend(backend):
        out = dctkd_ext.local_attention(q, k, v, rel, kernel_size)
    ref = reference.local_attention(*leaves, kernel_size)
    assert out.dtype == q.dtype and out.shape == q.shape
    if backend != "reference":
        assert out.stride() == local_attention_layout(q), f"{what}: layout {out.stride()}"
    assert_close(out, ref, q.dtype, what, factor)
    _, g = _upstream(ref.shape, gen, out)
    # the reference gets the upstream gradient the op gets (rounded to a half dtype): dq, dk and drel take
    # differences (v_j - out) of it, which would amplify its rounding beyond the bound of one final rounding
    grads = torch.autograd.grad(out, inputs, g)
    grads_ref = torch.autograd.grad(ref, leaves, g.detach().to("cpu", torch.float64))
    for name, d, dr, t in zip(("q", "k", "v", "rel"), grads, grads_ref, inputs):
        assert d.dtype == t.dtype and d.shape == t.shape, f"{what} d{name}: {d.dtype} {tuple(d.shape)}"
        if backend != "reference" and name != "rel":
            assert d.stride() == local_attention_layout(q), f"{what} d{name}: layout {d.stride()}"
        assert_close(d, dr, q.dtype, f"{what} d{name}", factor)
    return out
