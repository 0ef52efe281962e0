"""global_filter and spectral_conv, the spectral filters of FAM-KD / GFNet (docs/DESIGN.md §3.4): argument checks,
fake kernels, autograd (PyTorch's conjugate convention), backend choice. The FAM pieces built on them
(the half-plane weight, the fused small-map filter, fam_global) are in fam_global.py.

Kernels: torch.ops.dctkd_ext.{global_filter, spectral_conv}[_backward] (CPU: csrc/cpu/spectral.cpp,
CUDA: csrc/cuda/spectral.cu), their Triton twins torch.ops.dctkd_ext_triton.* (same schemas;
dctkd_ext/triton/spectral.py, loaded on first use), the reference in dctkd_ext/reference.py. The
autograd formulas are registered on both namespaces (dctkd_ext._backend.register_family)."""

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend, reference
from ._higher_order import grads_through, wants_graph

_ops = torch.ops.dctkd_ext
_FAMILY = "spectral"
_COMPLEX = (torch.complex64, torch.complex128)


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
def _gf_channels_last(xf: Tensor) -> bool:
    # the rule of csrc/spectral_common.h: a permuted (B, H, K, C)-contiguous tensor that is not NCHW-contiguous
    return xf.dim() == 4 and not xf.is_contiguous() and xf.permute(0, 2, 3, 1).is_contiguous()


def _gf_out_like(xf: Tensor) -> Tensor:
    if _gf_channels_last(xf):
        b, c, h, k = xf.shape
        return xf.new_empty((b, h, k, c)).permute(0, 3, 1, 2)
    return xf.new_empty(xf.shape)


def _gf_fake(xf, w, mask):
    return _gf_out_like(xf)


def _gf_backward_fake(grad, xf, w, mask, need_xf, need_w):
    dx = _gf_out_like(xf) if need_xf else xf.new_empty((0,))
    if not need_w:
        return dx, w.new_empty((0,))
    if _gf_channels_last(xf):
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


# ------------------------------------------------------------------------------------------ autograd
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


def register_autograd(ns: str) -> None:
    """Register the backward formulas of the spectral ops on torch.ops.<ns>: the C++ ops ("dctkd_ext")
    and the Triton ops ("dctkd_ext_triton", same schemas) share them."""
    ops = getattr(torch.ops, ns)
    torch.library.register_autograd(
        f"{ns}::global_filter", _make_backward(ops.global_filter_backward, ops.global_filter, reference.global_filter),
        setup_context=_save)
    torch.library.register_autograd(
        f"{ns}::spectral_conv", _make_backward(ops.spectral_conv_backward, ops.spectral_conv, reference.spectral_conv),
        setup_context=_save)

# -------------------------------------------------------------------------------------- backends
_backend.register_family(_FAMILY, register_autograd)


class SpectralKernels(NamedTuple):
    """The spectral ops of one backend; the backward ops are None on the reference backend (autograd)."""

    global_filter: Callable
    global_filter_backward: Optional[Callable]
    spectral_conv: Callable
    spectral_conv_backward: Optional[Callable]


def spectral_kernels(device: torch.device, family: str = _FAMILY) -> SpectralKernels:
    """The spectral ops of the backend that op `family` runs on for tensors on `device`."""
    _, ops = _backend.run_on(device, family)
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
