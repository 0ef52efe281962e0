"""The spectral family of FAM-KD / GFNet (docs/DESIGN.md §3.4): the Fourier-domain filters global_filter and
spectral_conv, FAM's symmetrised half-plane weight fam_half_weight, the fused small-map filter
fam_filter_fused (Triton) and the custom op fam_global (FAM's global branch) that chains them; argument
checks, fake kernels, autograd (PyTorch's conjugate convention), backend choice (family "spectral").

Kernels: torch.ops.dctkd_ext.{global_filter, spectral_conv, fam_half_weight}[_backward] (CPU:
csrc/cpu/spectral.cpp, CUDA: csrc/cuda/spectral.cu), their Triton twins torch.ops.dctkd_ext_triton.* (same
schemas) and dctkd_ext_triton::fam_filter_fused (dctkd_ext/triton/spectral.py, loaded on first use), the
reference in dctkd_ext/reference.py. The autograd formulas are registered on both namespaces
(dctkd_ext._backend.register_family). The whole FAM layer is its own family (ops/fam_layer.py)."""

import os
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend, reference
from .._shapes import fam_mask_radius, spectrum_channels_last  # noqa: F401  (fam_mask_radius: part of the face)
from ._checks import check_cuton
from ._higher_order import grads_through, wants_graph

_ops = torch.ops.dctkd_ext
_FAMILY = "spectral"
_COMPLEX = (torch.complex64, torch.complex128)


def resolve_backend(device: torch.device) -> str:
    """The backend the spectral ops run on for tensors on `device` ("cpu", "cuda", "triton", "reference")."""
    return _backend.select(device, _FAMILY)


# ------------------------------------------------------------------------------------------- checks
def _check_complex(t, name: str, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a {layout} complex64 tensor, got {type(t).__name__}")
    if t.dtype not in _COMPLEX:
        hint = ""
        if not t.is_complex():
            hint = (" (a real tensor: pass its spectrum, e.g. torch.fft.rfft2(x, norm='ortho'), or "
                    "torch.view_as_complex of a (..., 2) float tensor)")
        raise TypeError(f"{name}: expected a complex64 (or complex128) tensor {layout}, got {t.dtype}{hint}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D {layout} tensor, got shape {tuple(t.shape)}")


def _check_mask(mask, xf: Tensor) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a real (H, K) tensor or None, got {type(mask).__name__}")
    h, k = xf.shape[-2:]
    if mask.is_complex():
        raise TypeError(f"mask: expected a real or bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != (h, k):
        raise ValueError(f"mask: expected shape ({h}, {k}) = (H, K) of xf, got {tuple(mask.shape)}")
    if mask.device != xf.device:
        raise ValueError(f"mask: expected a tensor on {xf.device} like xf, got one on {mask.device}")
    if not mask.is_floating_point():
        mask = mask.to(xf.real.dtype)
    return mask


def _check_w(w, xf: Tensor, ndim: int, layout: str, expected) -> None:
    _check_complex(w, "w", ndim, layout)
    if w.dtype != xf.dtype:
        raise TypeError(f"w: expected dtype {xf.dtype} like xf, got {w.dtype}")
    if w.device != xf.device:
        raise ValueError(f"w: expected a tensor on {xf.device} like xf, got one on {w.device}")
    if any(e is not None and e != s for e, s in zip(expected, w.shape)):
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"w: expected shape ({want}) = {layout} to match xf {tuple(xf.shape)}, got {tuple(w.shape)}")


# ------------------------------------------------------------------------------------ fake kernels
def _gf_out_like(xf: Tensor) -> Tensor:
    if spectrum_channels_last(xf):
        b, c, h, k = xf.shape
        return xf.new_empty((b, h, k, c)).permute(0, 3, 1, 2)
    return xf.new_empty(xf.shape)


def _gf_fake(xf, w, mask):
    return _gf_out_like(xf)


def _gf_backward_fake(grad, xf, w, mask, need_xf, need_w):
    dx = _gf_out_like(xf) if need_xf else xf.new_empty((0,))
    if not need_w:
        return dx, w.new_empty((0,))
    if spectrum_channels_last(xf):
        c, h, k = w.shape
        return dx, w.new_empty((h, k, c)).permute(2, 0, 1)
    return dx, w.new_empty(w.shape)


def _sc_fake(xf, w, mask):
    b, _, h, k = xf.shape
    return xf.new_empty((b, w.shape[1], h, k))


def _sc_backward_fake(grad, xf, w, mask, need_xf, need_w):
    return (xf.new_empty(xf.shape) if need_xf else xf.new_empty((0,)),
            w.new_empty(w.shape) if need_w else w.new_empty((0,)))


torch.library.register_fake("dctkd_ext::global_filter")(_gf_fake)
torch.library.register_fake("dctkd_ext::global_filter_backward")(_gf_backward_fake)
torch.library.register_fake("dctkd_ext::spectral_conv")(_sc_fake)
torch.library.register_fake("dctkd_ext::spectral_conv_backward")(_sc_backward_fake)


# ---------------------------------------------------------------------- autograd of global_filter / spectral_conv
def _save(ctx, inputs, output):
    xf, w, mask = inputs
    ctx.save_for_backward(xf, w, mask)


def _mask_grad(grad: Tensor, y_unmasked: Tensor, mask: Tensor) -> Tensor:
    # y = z * mask with mask real: dmask = Re(sum over batch and channels of grad * conj(z))
    return (grad * y_unmasked.conj()).real.sum(dim=(0, 1)).to(mask.dtype)


def _make_backward(backward_op, forward_op, formula):
    def backward(ctx, grad):
        xf, w, mask = ctx.saved_tensors
        need_xf, need_w, need_mask = ctx.needs_input_grad
        if wants_graph():  # create_graph=True: a backward that can be differentiated again
            if mask is None:
                return (*grads_through(lambda a, b: formula(a, b, None), [xf, w], [need_xf, need_w], grad), None)
            return tuple(grads_through(formula, [xf, w, mask], [need_xf, need_w, need_mask], grad))
        dxf = dw = dmask = None
        if need_xf or need_w:
            dxf, dw = backward_op(grad, xf, w, mask, need_xf, need_w)
        if need_mask and mask is not None:
            dmask = _mask_grad(grad, forward_op(xf, w, None), mask)
        return (dxf if need_xf else None), (dw if need_w else None), dmask

    return backward


# ------------------------------------------------------------------------------ the half-plane weight
def _half_weight_fake(w, cuton):
    return w.new_empty(tuple(w.shape[:-1]) + (w.shape[-1] // 2 + 1,))


def _half_weight_backward_fake(grad, cuton, width):
    return grad.new_empty(tuple(grad.shape[:-1]) + (width,))


torch.library.register_fake("dctkd_ext::fam_half_weight")(_half_weight_fake)
torch.library.register_fake("dctkd_ext::fam_half_weight_backward")(_half_weight_backward_fake)


def fam_half_weight(weights: Tensor, cuton: float) -> Tensor:
    """W'(k) = (M(k) W(k) + conj(M(-k) W(-k))) / 2 on the rfft half plane (docs/DESIGN.md §3.4), one pass each way,
    differentiable in weights. weights: (..., S_h, S_w) complex -> (..., S_h, S_w//2+1). Equals
    reference.fam_half_weight."""
    if isinstance(weights, torch.Tensor) and weights.dim() < 2:
        raise ValueError(f"weights: expected at least 2 dims (..., H, W), got shape {tuple(weights.shape)}")
    _check_complex(weights, "weights", getattr(weights, "ndim", 2), "(..., H, W)")
    check_cuton(cuton)
    ops = _backend.run_on(weights.device, _FAMILY)[1]
    if ops is None:
        return reference.fam_half_weight(weights, cuton)
    return ops.fam_half_weight(weights, float(cuton))


# ------------------------------------------------------------------------------ the fused small-map filter
# rfft2 -> filter -> irfft2 in one Triton kernel: dctkd_ext_triton::fam_filter_fused.
def c2r_multiplicity(s: int, device, dtype) -> Tensor:
    """(s // 2 + 1,) weights of the rfft half-plane columns in irfft's backward: 2 on the columns that stand
    for two conjugate frequencies, 1 on column 0 and (even s) the Nyquist column s / 2."""
    mult = torch.full((s // 2 + 1,), 2.0, dtype=dtype, device=device)
    mult[0] = 1.0
    if s % 2 == 0:
        mult[-1] = 1.0
    return mult


def _fam_fused_setup(ctx, inputs, output):
    x, w, depthwise, adjoint = inputs
    ctx.save_for_backward(x, w)
    ctx.depthwise, ctx.adjoint = depthwise, adjoint


def _fam_fused_backward(ctx, grad):
    x, w = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    dx = dw = None
    if need_x:  # the map is linear in x: its adjoint is the same filter, conjugated and transposed
        dx = _backend.triton_ops().fam_filter_fused(grad.contiguous(), w, ctx.depthwise, not ctx.adjoint)
    if need_w:
        if ctx.adjoint:
            raise RuntimeError("fam_filter_fused: the weight gradient of the adjoint (double backward) is not supported")
        s = x.shape[-1]
        xf = torch.fft.rfft2(x, norm="ortho")
        gf = torch.fft.rfft2(grad, norm="ortho") * c2r_multiplicity(s, grad.device, grad.dtype)
        kern = spectral_kernels(x.device)
        if ctx.depthwise:
            dw = _backward_w(kern.global_filter_backward, reference.global_filter, gf, xf, w)
        else:
            dw = _backward_w(kern.spectral_conv_backward, reference.spectral_conv, gf, xf, w)
    return dx, dw, None, None


def _backward_w(backward_op, ref, grad, xf, w):
    if backward_op is None:  # reference backend
        with torch.enable_grad():
            wr = w.detach().requires_grad_()
            return torch.autograd.grad(ref(xf, wr), wr, grad)[0]
    return backward_op(grad, xf, w, None, False, True)[1]


def fused_available(device: torch.device) -> bool:
    """Whether the fused small-map kernel can run on `device` (Triton on CUDA, or the interpreter)."""
    if not _backend.triton_installed():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def fam_filter_fused(x: Tensor, w_half: Tensor, depthwise: bool = False) -> Tensor:
    """irfft2(mix(w_half, rfft2(x, ortho)), s=(S, S), ortho) for x (B, I, S, S) float32, S <= 32, in one
    Triton kernel; w_half (I, O, S, S//2+1) complex64 (channel mixing) or (C, S, S//2+1) (depthwise)."""
    return _backend.triton_ops().fam_filter_fused(x, w_half, depthwise, False)


# ------------------------------------------------------------------------------------------ autograd
def register_autograd(ns: str) -> None:
    """Register the backward formulas of the family's ops on torch.ops.<ns>: global_filter, spectral_conv and
    fam_half_weight on both namespaces (the C++ ops "dctkd_ext" and the Triton ops "dctkd_ext_triton", same
    schemas), fam_filter_fused (Triton only) on dctkd_ext_triton."""
    ops = getattr(torch.ops, ns)
    torch.library.register_autograd(
        f"{ns}::global_filter", _make_backward(ops.global_filter_backward, ops.global_filter, reference.global_filter),
        setup_context=_save)
    torch.library.register_autograd(
        f"{ns}::spectral_conv", _make_backward(ops.spectral_conv_backward, ops.spectral_conv, reference.spectral_conv),
        setup_context=_save)

    def half_weight_setup(ctx, inputs, output):
        w, cuton = inputs
        ctx.cuton, ctx.width = cuton, w.shape[-1]
        ctx.w_shape, ctx.w_dtype = w.shape, w.dtype

    def half_weight_backward(ctx, g):
        if wants_graph():  # linear in the weight: its adjoint as a graph, at any point (zeros)
            w0 = torch.zeros(ctx.w_shape, dtype=ctx.w_dtype, device=g.device, requires_grad=True)
            (dw,) = grads_through(lambda w: reference.fam_half_weight(w, ctx.cuton), [w0], [True], g)
            return dw, None
        return ops.fam_half_weight_backward(g, ctx.cuton, ctx.width), None

    torch.library.register_autograd(f"{ns}::fam_half_weight", half_weight_backward, setup_context=half_weight_setup)
    if ns == _backend.NAMESPACES[1]:
        torch.library.register_autograd(f"{ns}::fam_filter_fused", _fam_fused_backward,
                                        setup_context=_fam_fused_setup)


_backend.register_family(_FAMILY, register_autograd)


# -------------------------------------------------------------------------------------- backends
class SpectralKernels(NamedTuple):
    """The spectral ops of one backend; the backward ops are None on the reference backend (autograd)."""

    global_filter: Callable
    global_filter_backward: Optional[Callable]
    spectral_conv: Callable
    spectral_conv_backward: Optional[Callable]


def spectral_kernels(device: torch.device) -> SpectralKernels:
    """The spectral ops of the backend this family runs on for tensors on `device`."""
    _, ops = _backend.run_on(device, _FAMILY)
    if ops is None:
        return SpectralKernels(reference.global_filter, None, reference.spectral_conv, None)
    return SpectralKernels(ops.global_filter, ops.global_filter_backward, ops.spectral_conv, ops.spectral_conv_backward)


# --------------------------------------------------------------------------------------- public API
def global_filter(xf: Tensor, w: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Depthwise filter in the frequency domain (GFNet's global filter):
    y[b, c, h, k] = xf[b, c, h, k] * w[c, h, k] * mask[h, k].

    xf: (B, C, H, K) complex64 (complex128 for testing), e.g. torch.fft.rfft2(x, norm="ortho") of
    (B, C, H, W) features, K = W // 2 + 1; NCHW-contiguous or channels-last (a permuted contiguous
    (B, H, K, C) tensor, GFNet's layout), and y has the same layout. w: (C, H, K), same dtype.
    mask: optional real (H, K). Differentiable in xf, w (dxf = dy conj(w), dw = sum_b dy conj(xf)) and mask."""
    _check_complex(xf, "xf", 4, "(B, C, H, K)")
    b, c, h, k = xf.shape
    _check_w(w, xf, 3, "(C, H, K)", (c, h, k))
    mask = _check_mask(mask, xf)
    return spectral_kernels(xf.device).global_filter(xf, w, mask)


def spectral_conv(xf: Tensor, w: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Channel mixing per frequency (a batched complex GEMM over the H*K frequencies):
    y[b, o, h, k] = mask[h, k] * sum_i xf[b, i, h, k] * w[i, o, h, k].

    xf: (B, I, H, K) complex64 (complex128 for testing); w: (I, O, H, K), same dtype (the layout of
    the FNO / FAM weights); mask: optional real (H, K). Differentiable in xf, w and mask
    (dxf[b, i] = sum_o dy[b, o] conj(w[i, o]), dw[i, o] = sum_b conj(xf[b, i]) dy[b, o])."""
    _check_complex(xf, "xf", 4, "(B, I, H, K)")
    b, i, h, k = xf.shape
    _check_w(w, xf, 4, "(I, O, H, K)", (i, None, h, k))
    mask = _check_mask(mask, xf)
    return spectral_kernels(xf.device).spectral_conv(xf, w, mask)


# ---------------------------------------------------------------------------------- the FAM global branch
# One custom op for the whole filter x -> irfft2(mix(W', rfft2(x))), W' = fam_half_weight(weights, cuton),
# so that autograd keeps only x and weights (which exist anyway): W', rfft2(x) and the spectra are
# transients, recomputed in the backward (one gather for W', one rfft2 of x). The backward:
#   dx = irfft2(mix^H(W', rfft2(dg)))                   (the adjoint; the fused kernel with adjoint=True)
#   dW' = sum_b conj(rfft2(x)) * rfft2(dg) * c_k         (c_k = 2 on the columns that stand for two)
#   dweights = fam_half_weight_backward(dW')
def _half_impl(device):
    return _backend.run_on(device, _FAMILY)[1].fam_half_weight


def _half_backward_impl(device):
    return _backend.run_on(device, _FAMILY)[1].fam_half_weight_backward


@torch.library.custom_op("dctkd_ext::fam_global", mutates_args=())
def _fam_global(x: Tensor, weights: Tensor, cuton: float, depthwise: bool, fused: bool) -> Tensor:
    s = x.shape[-1]
    w_half = _half_impl(x.device)(weights, cuton)
    if fused:
        return _backend.triton_ops().fam_filter_fused(x.contiguous(), w_half, depthwise, False)
    kern = spectral_kernels(x.device)
    xf = torch.fft.rfft2(x, norm="ortho")
    yf = kern.global_filter(xf, w_half, None) if depthwise else kern.spectral_conv(xf, w_half, None)
    return torch.fft.irfft2(yf, s=(s, s), norm="ortho")


@torch.library.register_fake("dctkd_ext::fam_global")
def _(x, weights, cuton, depthwise, fused):
    b, i, s, _ = x.shape
    o = i if depthwise else weights.shape[1]
    return x.new_empty((b, o, s, s))


def _fam_global_setup(ctx, inputs, output):
    x, weights, cuton, depthwise, fused = inputs
    ctx.save_for_backward(x, weights)
    ctx.cuton, ctx.depthwise, ctx.fused = cuton, depthwise, fused


def _reference_fam_global(x, weights, cuton, depthwise):
    s = x.shape[-1]
    w_half = reference.fam_half_weight(weights, cuton)
    xf = torch.fft.rfft2(x, norm="ortho")
    yf = reference.global_filter(xf, w_half) if depthwise else reference.spectral_conv(xf, w_half)
    return torch.fft.irfft2(yf, s=(s, s), norm="ortho")


def _fam_global_backward(ctx, dg):
    x, weights = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    if wants_graph():  # create_graph=True: a backward that can be differentiated again
        dx, dweights = grads_through(lambda a, b: _reference_fam_global(a, b, ctx.cuton, ctx.depthwise),
                                     [x, weights], [need_x, need_w], dg)
        return dx, dweights, None, None, None
    s = x.shape[-1]
    k = s // 2 + 1
    kern = spectral_kernels(x.device)
    backward = kern.global_filter_backward if ctx.depthwise else kern.spectral_conv_backward
    w_half = _half_impl(x.device)(weights, ctx.cuton)
    dg = dg.contiguous()
    dx = dweights = gf = None
    if need_x:
        if ctx.fused:
            dx = _backend.triton_ops().fam_filter_fused(dg, w_half, ctx.depthwise, True)
        else:
            gf = torch.fft.rfft2(dg, norm="ortho")
            # only the shape of xf matters when its gradient alone is asked for
            xf_shape = gf.new_zeros(()).expand(x.shape[0], x.shape[1], s, k)
            dxf, _ = backward(gf, xf_shape, w_half, None, True, False)
            dx = torch.fft.irfft2(dxf, s=(s, s), norm="ortho")
    if need_w:
        if gf is None:
            gf = torch.fft.rfft2(dg, norm="ortho")
        xf = torch.fft.rfft2(x, norm="ortho")
        mult = c2r_multiplicity(s, x.device, x.dtype).expand(s, k)
        _, dw_half = backward(gf, xf, w_half, mult, False, True)
        dweights = _half_backward_impl(x.device)(dw_half, ctx.cuton, s)
    return dx, dweights, None, None, None


torch.library.register_autograd("dctkd_ext::fam_global", _fam_global_backward, setup_context=_fam_global_setup)


def fam_global(x: Tensor, weights: Tensor, cuton: float, depthwise: bool = False, fused: bool = False) -> Tensor:
    """FAM's global branch Re(ifft2(M * mix(weights, fft2(x, ortho)), ortho)), computed exactly as
    irfft2(mix(W', rfft2(x))) (docs/DESIGN.md §3.4). x: (B, I, S, S) float32 (float64 for testing); weights:
    (I, O, S, S) complex (channel mixing) or (C, S, S) (depthwise), of x's complex dtype. fused=True:
    the fused small-map Triton kernel (float32, S <= 32). Differentiable in x and weights; autograd keeps
    only x and weights. On the "reference" backend: plain autograd of the reference formulas."""
    if resolve_backend(x.device) == "reference":
        return _reference_fam_global(x, weights, float(cuton), depthwise)
    return _ops.fam_global(x, weights, float(cuton), bool(depthwise), bool(fused))
