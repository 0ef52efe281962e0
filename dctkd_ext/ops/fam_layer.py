"""The fam_layer family: the whole FAM layer (global spectral filter + 1x1 conv + rates) as one op
(docs/DESIGN.md §3.4): argument checks, fake kernels, autograd, backend choice (family "fam_layer").

A 1x1 conv is the same real matrix at every frequency, so it commutes with the FFT exactly
(w0 * x = irfft2(w0 rfft2(x))) and folds into the frequency weight:

    out = rate1 irfft2(W' rfft2(x)) + rate2 (w0 * x + b) = irfft2(Wc rfft2(x)) + rate2 b,
    Wc(k) = rate1 W'(k) + rate2 w0^T,

one complex GEMM per half-plane frequency (W' = fam_half_weight(weights1, cuton), the symmetrised masked
half-plane weight). Autograd keeps only the inputs (x and the parameters): the spectra and Wc are
recomputed in the backward. With g = sum_b conj(rfft2(x)) rfft2(dy), c_k the multiplicity of the
half-plane columns (1 on column 0 and, for even W, W/2; 2 elsewhere) and dWc = c_k g:
    dx = irfft2(Wc^H rfft2(dy)),  dweights1 = rate1 fam_half_weight_backward(dWc),
    dw0[o, i] = rate2 sum_k Re dWc[i, o, k],  drate1 = sum Re(conj(W') dWc),
    drate2 = sum w0^T . sum_k Re dWc + sum_o b[o] sum dy[:, o],  db = rate2 sum dy[:, o].

Kernels: CPU torch.ops.dctkd_ext.fam_layer_forward / fam_layer_backward (csrc/cpu/fam_layer.cpp:
frequency-major spectra, the GEMMs through torch's BLAS, the combined weight formed a chunk of rows at a
time). CUDA / Triton: this file's composite over the backend's fam_half_weight and spectral_conv (or the
fused small-map Triton kernel), with Wc formed once per call; the spectral ops are those of the backend
this family resolves to. Reference backend: plain autograd of dctkd_ext.reference formulas."""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend, reference
from ._checks import check_cuton
from ._higher_order import grads_through, wants_graph
from .spectral import c2r_multiplicity

_ops = torch.ops.dctkd_ext
_FAMILY = "fam_layer"


def resolve_backend(device: torch.device) -> str:
    """The backend fam_layer runs on for tensors on `device` ("cpu", "cuda", "triton", "reference")."""
    return _backend.select(device, _FAMILY)


# ------------------------------------------------------------------------------------------ checks
def check_layer(x, weights1, w0_weight, w0_bias, rate1, rate2, cuton) -> None:
    """The argument checks of fam_layer (ValueError / TypeError naming the argument)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x: expected a float32 (or float64) tensor, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D (B, I, H, W) tensor, got shape {tuple(x.shape)}")
    b, i, h, w = x.shape
    cdt = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    if not isinstance(weights1, Tensor) or weights1.dtype != cdt:
        raise TypeError(f"weights1: expected a {cdt} tensor (I, O, H, W) to match x, got "
                        f"{getattr(weights1, 'dtype', type(weights1).__name__)}")
    if weights1.dim() != 4 or weights1.shape[0] != i or tuple(weights1.shape[2:]) != (h, w):
        raise ValueError(f"weights1: expected shape ({i}, O, {h}, {w}) = (I, O, H, W) of x, got {tuple(weights1.shape)}")
    o = weights1.shape[1]
    if not isinstance(w0_weight, Tensor) or w0_weight.dtype != x.dtype:
        raise TypeError(f"w0_weight: expected a {x.dtype} tensor like x, got {getattr(w0_weight, 'dtype', type(w0_weight).__name__)}")
    if w0_weight.dim() not in (2, 4) or tuple(w0_weight.shape[:2]) != (o, i) or w0_weight.numel() != o * i:
        raise ValueError(f"w0_weight: expected shape ({o}, {i}, 1, 1) = (O, I, 1, 1), got {tuple(w0_weight.shape)}")
    if w0_bias is not None:
        if not isinstance(w0_bias, Tensor) or w0_bias.dtype != x.dtype:
            raise TypeError(f"w0_bias: expected a {x.dtype} tensor like x or None, got "
                            f"{getattr(w0_bias, 'dtype', type(w0_bias).__name__)}")
        if tuple(w0_bias.shape) != (o,):
            raise ValueError(f"w0_bias: expected shape ({o},) = (O,), got {tuple(w0_bias.shape)}")
    for name, r in (("rate1", rate1), ("rate2", rate2)):
        if not isinstance(r, Tensor) or r.dtype != x.dtype or r.numel() != 1:
            raise ValueError(f"{name}: expected a one-element {x.dtype} tensor, got "
                             f"{tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__}"
                             f"{' ' + str(r.dtype) if isinstance(r, Tensor) else ''}")
    for name, t in (("weights1", weights1), ("w0_weight", w0_weight), ("w0_bias", w0_bias), ("rate1", rate1),
                    ("rate2", rate2)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} like x, got one on {t.device}")
    check_cuton(cuton)


# ------------------------------------------------------------------------------------ fake kernels
@torch.library.register_fake("dctkd_ext::fam_layer_forward")
def _(x, weights1, w0_weight, w0_bias, rate1, rate2, cuton):
    return x.new_empty((x.shape[0], weights1.shape[1], x.shape[2], x.shape[3]))


@torch.library.register_fake("dctkd_ext::fam_layer_backward")
def _(grad, x, weights1, w0_weight, w0_bias, rate1, rate2, cuton, needs):
    return _backward_like(x, weights1, w0_weight, w0_bias, rate1, rate2, needs)


def _backward_like(x, weights1, w0_weight, w0_bias, rate1, rate2, needs):
    like = (x, weights1, w0_weight, w0_bias, rate1, rate2)
    out = []
    for n, t, ref in zip(needs, like, (x, weights1, x, x, x, x)):
        out.append(t.new_empty(t.shape) if n and t is not None else ref.new_empty((0,)))
    return tuple(out)


# ------------------------------------------------------------------------ the GPU composite (and Triton)
def _combined_weight(ops, weights1, w0_weight, rate1, rate2, cuton) -> Tuple[Tensor, Tensor]:
    """(Wc, W') on the half plane, (I, O, H, K): W' = fam_half_weight(weights1), Wc = rate1 W' + rate2 w0^T."""
    o, i = w0_weight.shape[:2]
    w_half = ops.fam_half_weight(weights1, float(cuton))
    w0t = w0_weight.reshape(o, i).t()[:, :, None, None]
    return rate1 * w_half + (rate2 * w0t).to(w_half.dtype), w_half


def _composite_forward(ops, x, weights1, w0_weight, w0_bias, rate1, rate2, cuton, fused):
    h, w = x.shape[-2:]
    wc, _ = _combined_weight(ops, weights1, w0_weight, rate1, rate2, cuton)
    if fused:
        y = _backend.triton_ops().fam_filter_fused(x.contiguous(), wc, False, False)
    else:
        y = torch.fft.irfft2(ops.spectral_conv(torch.fft.rfft2(x, norm="ortho"), wc, None), s=(h, w), norm="ortho")
    if w0_bias is not None:
        y = y + (rate2 * w0_bias).view(1, -1, 1, 1)
    return y


def _composite_backward(ops, grad, x, weights1, w0_weight, w0_bias, rate1, rate2, cuton, fused, needs):
    need_x, need_w1, need_w0, need_b, need_r1, need_r2 = needs
    b, i, h, w = x.shape
    o = weights1.shape[1]
    k = w // 2 + 1
    grad = grad.contiguous()
    dx, dw1, dw0, db, dr1, dr2 = _backward_like(x, weights1, w0_weight, w0_bias, rate1, rate2, (False,) * 6)
    wc, w_half = _combined_weight(ops, weights1, w0_weight, rate1, rate2, cuton)
    gf = None
    if need_x:
        if fused:
            dx = _backend.triton_ops().fam_filter_fused(grad, wc, False, True)
        else:
            gf = torch.fft.rfft2(grad, norm="ortho")
            xf_shape = gf.new_zeros(()).expand(b, i, h, k)  # only its shape is read for dxf alone
            dxf, _ = ops.spectral_conv_backward(gf, xf_shape, wc, None, True, False)
            dx = torch.fft.irfft2(dxf, s=(h, w), norm="ortho")
    gsum = grad.sum(dim=(0, 2, 3)) if w0_bias is not None and (need_b or need_r2) else None
    if need_w1 or need_w0 or need_r1 or need_r2:
        if gf is None:
            gf = torch.fft.rfft2(grad, norm="ortho")
        xf = torch.fft.rfft2(x, norm="ortho")
        mult = c2r_multiplicity(w, x.device, x.dtype).expand(h, k)
        _, dwc = ops.spectral_conv_backward(gf, xf, wc, mult, False, True)
        if need_w1:
            dw1 = rate1 * ops.fam_half_weight_backward(dwc, float(cuton), w)
        wsum = dwc.real.sum(dim=(2, 3))  # (I, O)
        if need_w0:
            dw0 = (rate2 * wsum.t()).reshape(w0_weight.shape)
        if need_r1:
            dr1 = (w_half.conj() * dwc).real.sum().reshape(1)
        if need_r2:
            dr2 = (w0_weight.reshape(o, i).t() * wsum).sum().reshape(1)
    elif need_r2:
        dr2 = x.new_zeros((1,))
    if need_b and w0_bias is not None:
        db = rate2 * gsum
    if need_r2 and w0_bias is not None:
        dr2 = dr2 + (w0_bias * gsum).sum()
    return dx, dw1, dw0, db, dr1, dr2


# ------------------------------------------------------------------------------------------ the op
def _layer_ops(device):
    # the op namespace of the backend; a direct call under the reference backend runs the C++ kernels
    _, ops = _backend.run_on(device, _FAMILY)
    return _ops if ops is None else ops


def _fam_layer_impl(x, weights1, w0_weight, w0_bias, rate1, rate2, cuton, fused):
    ops = _layer_ops(x.device)
    if ops is _ops and x.device.type == "cpu" and not fused:
        return _ops.fam_layer_forward(x, weights1, w0_weight, w0_bias, rate1, rate2, cuton)
    return _composite_forward(ops, x, weights1, w0_weight, w0_bias, rate1, rate2, cuton, fused)


@torch.library.custom_op("dctkd_ext::fam_layer", mutates_args=())
def _fam_layer(x: Tensor, weights1: Tensor, w0_weight: Tensor, w0_bias: Optional[Tensor], rate1: Tensor,
               rate2: Tensor, cuton: float, fused: bool) -> Tensor:
    return _fam_layer_impl(x, weights1, w0_weight, w0_bias, rate1, rate2, cuton, fused)


@_fam_layer.register_fake
def _(x, weights1, w0_weight, w0_bias, rate1, rate2, cuton, fused):
    return x.new_empty((x.shape[0], weights1.shape[1], x.shape[2], x.shape[3]))


def _setup(ctx, inputs, output):
    x, weights1, w0_weight, w0_bias, rate1, rate2, cuton, fused = inputs
    ctx.save_for_backward(x, weights1, w0_weight, w0_bias, rate1, rate2)
    ctx.cuton, ctx.fused = cuton, fused


def _backward(ctx, grad):
    x, weights1, w0_weight, w0_bias, rate1, rate2 = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    if w0_bias is None:
        needs[3] = False
    if wants_graph():  # create_graph=True: a backward that can be differentiated again
        inputs = [x, weights1, w0_weight, w0_bias if w0_bias is not None else x.new_zeros(()), rate1, rate2]

        def formula(x, weights1, w0_weight, w0_bias, rate1, rate2):
            bias = w0_bias if ctx.saved_tensors[3] is not None else None
            return _reference_layer(x, weights1, w0_weight, bias, rate1, rate2, ctx.cuton)

        return tuple(grads_through(formula, inputs, needs, grad)) + (None, None)
    ops = _layer_ops(x.device)
    if ops is _ops and x.device.type == "cpu" and not ctx.fused:
        grad, unscale = _normal_range(grad)
        grads = _ops.fam_layer_backward(grad, x, weights1, w0_weight, w0_bias, rate1, rate2, ctx.cuton, needs)
        if unscale != 1.0:
            grads = tuple(g.mul_(unscale) if n else g for g, n in zip(grads, needs))
    else:
        grads = _composite_backward(ops, grad, x, weights1, w0_weight, w0_bias, rate1, rate2, ctx.cuton, ctx.fused,
                                    needs)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None, None)


torch.library.register_autograd("dctkd_ext::fam_layer", _backward, setup_context=_setup)

# Upstream gradients whose largest magnitude is below this are scaled up before the CPU backward.
_SMALL_UPSTREAM = 2.0**-8


def _normal_range(grad: Tensor) -> Tuple[Tensor, float]:
    """(grad * 2^k, 2^-k) with the largest |grad * 2^k| in [1, 2), when grad is small (else (grad, 1)).

    A loss's gradient is often tiny (an MSE's mean over a large output gives values near 1e-7), and
    the backward's products of it with the spectra and weights then underflow into subnormal floats,
    which x86 CPUs compute many times slower. The backward is linear in grad, so scaling it by a
    power of two and its results back is exact, and keeps the intermediates in the normal range
    without touching the thread's floating-point state. Traces (torch.compile, opcheck) keep grad as
    it is: the scale would depend on its values."""
    if torch.compiler.is_compiling() or type(grad) is not Tensor:  # a trace: no value to look at
        return grad, 1.0
    amax = float(torch.linalg.vector_norm(grad, float("inf"))) if grad.numel() else 0.0  # one pass, no |grad| copy
    if amax == 0.0 or amax >= _SMALL_UPSTREAM or not math.isfinite(amax):
        return grad, 1.0
    k = 1 - math.frexp(amax)[1]  # amax = m 2^e, m in [0.5, 1): amax 2^k in [1, 2)
    return grad * math.ldexp(1.0, k), math.ldexp(1.0, -k)


def _reference_layer(x, weights1, w0_weight, w0_bias, rate1, rate2, cuton):
    h, w = x.shape[-2:]
    o, i = w0_weight.shape[:2]
    wc = rate1 * reference.fam_half_weight(weights1, cuton) + (rate2 * w0_weight.reshape(o, i).t()[:, :, None, None])
    y = torch.fft.irfft2(reference.spectral_conv(torch.fft.rfft2(x, norm="ortho"), wc), s=(h, w), norm="ortho")
    return y if w0_bias is None else y + (rate2 * w0_bias).view(1, -1, 1, 1)


def fam_layer(x: Tensor, weights1: Tensor, w0_weight: Tensor, w0_bias: Optional[Tensor], rate1: Tensor, rate2: Tensor,
              cuton: float = 0.1, fused: bool = False) -> Tensor:
    """The FAM layer rate1 * Re(ifft2(M * einsum(fft2(x, ortho), weights1), ortho)) + rate2 * (conv1x1(x, w0) + b),
    computed as one spectral GEMM with the folded weight (see the module docstring).

    x: (B, I, H, W) float32 (float64 for testing); weights1: (I, O, H, W) complex64 (complex128);
    w0_weight (O, I, 1, 1), w0_bias (O,) or None, rate1 / rate2 (1,), all of x's dtype and device.
    fused=True: the fused small-map Triton kernel for the filter (float32, H == W <= 32, CUDA or the
    interpreter). Differentiable in x and every parameter; autograd keeps only the inputs."""
    check_layer(x, weights1, w0_weight, w0_bias, rate1, rate2, cuton)
    if resolve_backend(x.device) == "reference":
        return _reference_layer(x, weights1, w0_weight, w0_bias, rate1, rate2, float(cuton))
    return _ops.fam_layer(x, weights1, w0_weight, w0_bias, rate1, rate2, float(cuton), bool(fused))
