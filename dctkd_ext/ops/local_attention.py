"""local_attention, FAM-KD's local self-attention (docs/DESIGN.md §3.5): argument checks, fake kernels,
autograd, backend choice.

Kernels: torch.ops.dctkd_ext.local_attention[_backward] (CPU: csrc/cpu/local_attention.cpp, CUDA:
csrc/cuda/local_attention.cu), their Triton twins torch.ops.dctkd_ext_triton.* (same schemas;
dctkd_ext/triton/local_attention.py, loaded on first use), the reference in dctkd_ext/reference.py. The autograd
formulas are registered on both namespaces (dctkd_ext._backend.register_family) where the namespace has the
family's ops; a backend whose build has no kernels of this family runs the reference under "auto" and raises
NotImplementedError when it was selected by name."""

import torch
from torch import Tensor

from .. import _backend, reference
from ._checks import check_real_float, check_same_device
from ._higher_order import grads_through, wants_graph

_FAMILY = "local_attention"
_OPS = ("local_attention", "local_attention_backward")
_REL_DTYPES = (torch.float32, torch.float64)


def _cpp_dispatch_keys() -> frozenset:
    # looked up once, at import (the compiled library is loaded by then): which C++ backends have the kernels
    return frozenset(key for key in ("CPU", "CUDA")
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"dctkd_ext::{_OPS[0]}", key))


_CPP_KEYS = _cpp_dispatch_keys()


# ------------------------------------------------------------------------------------ fake kernels
def _channels_last(q: Tensor) -> bool:
    # the rule of csrc/local_attention_common.h
    return not q.is_contiguous() and q.is_contiguous(memory_format=torch.channels_last)


def _new_feature(q: Tensor) -> Tensor:
    fmt = torch.channels_last if _channels_last(q) else torch.contiguous_format
    return torch.empty(q.shape, dtype=q.dtype, device=q.device, memory_format=fmt)


def _fake(q, k, v, rel, kernel_size):
    return _new_feature(q)


def _backward_fake(grad, q, k, v, rel, kernel_size, need_q, need_k, need_v, need_rel):
    return (_new_feature(q) if need_q else q.new_empty((0,)),
            _new_feature(q) if need_k else k.new_empty((0,)),
            _new_feature(q) if need_v else v.new_empty((0,)),
            rel.new_empty(rel.shape) if need_rel else rel.new_empty((0,)))


torch.library.register_fake(f"dctkd_ext::{_OPS[0]}")(_fake)
torch.library.register_fake(f"dctkd_ext::{_OPS[1]}")(_backward_fake)


# ------------------------------------------------------------------------------------------ autograd
def _save(ctx, inputs, output):
    q, k, v, rel, kernel_size = inputs
    ctx.save_for_backward(q, k, v, rel)
    ctx.kernel_size = kernel_size


def _make_backward(backward_op):
    def backward(ctx, grad):
        q, k, v, rel = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        kernel_size = ctx.kernel_size
        if wants_graph():  # create_graph=True: a backward that can be differentiated again
            def formula(q_, k_, v_, rel_):
                return reference.local_attention(q_, k_, v_, rel_, kernel_size)

            return (*grads_through(formula, [q, k, v, rel], needs, grad), None)
        if not any(needs):
            return None, None, None, None, None
        grads = backward_op(grad, q, k, v, rel, kernel_size, *needs)
        return (*(g if need else None for g, need in zip(grads, needs)), None)

    return backward


def register_autograd(ns: str) -> None:
    """Register the backward formula of local_attention on torch.ops.<ns> ("dctkd_ext": the C++ ops,
    "dctkd_ext_triton": the Triton ops, same schema), where that namespace defines the family's ops."""
    ops = getattr(torch.ops, ns)
    if not all(hasattr(ops, name) for name in _OPS):
        return  # this build has no kernels of the family on that namespace: the other families are unaffected
    torch.library.register_autograd(f"{ns}::{_OPS[0]}", _make_backward(ops.local_attention_backward),
                                    setup_context=_save)


_backend.register_family(_FAMILY, register_autograd)


def impl(device: torch.device):
    """The local_attention op of the backend that runs on `device` (an autograd-aware op), or the reference."""
    name, ops = _backend.run_on(device, _FAMILY)
    if ops is None:
        return reference.local_attention
    if name in ("cpu", "cuda"):
        available = name.upper() in _CPP_KEYS
    else:
        available = all(hasattr(ops, op) for op in _OPS)
    if not available:
        if _backend.get_backend() == "auto":
            return reference.local_attention
        raise NotImplementedError(f"backend {name!r} has no local_attention kernels in this build; "
                                  "select 'auto', 'cpu' (CPU tensors) or 'reference'")
    return ops.local_attention


# --------------------------------------------------------------------------------------- public API
def local_attention(q: Tensor, k: Tensor, v: Tensor, rel: Tensor, kernel_size: int = 3) -> Tensor:
    """FAM-KD's local self-attention, per channel over a K x K window (K = kernel_size, odd, pad = K // 2; k and v
    zero-padded, the padded neighbours take part in the softmax with k = v = 0). For pixel p and window offset
    j = (a, b), a, b in [0, K):

        logit[b, c, p, j] = q[b, c, p] * (k[b, c, p + j - pad] + rel[c, a * K + b])
        out[b, c, p]      = sum_j softmax_j(logit[b, c, p, :]) * v[b, c, p + j - pad]

    q, k, v: (B, C, H, W) of one dtype (float32, float64, float16 or bfloat16; under autocast they run in the
    autocast dtype), on one device, any strides. rel: (C, K*K), float32, float64 or q's dtype. Returns
    (B, C, H, W) in q's dtype, channels_last when q is channels_last, else NCHW-contiguous; accumulation in
    float32 (float64 when q or rel is float64). Differentiable in q, k, v and rel (also twice)."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_real_float(t, name, ndim=4, layout_hint="(B, C, H, W) ")
    check_real_float(rel, "rel", ndim=2, layout_hint="(C, kernel_size**2) ")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd int >= 1, got {kernel_size!r}")
    check_same_device([q, k, v, rel], ["q", "k", "v", "rel"])
    dev = q.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    for t, name in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {t.dtype}")
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} like q, got {tuple(t.shape)}")
    b, c, h, w = q.shape
    if h < 1 or w < 1:
        raise ValueError(f"q: expected H, W >= 1, got shape {tuple(q.shape)}")
    if rel.dtype not in _REL_DTYPES and rel.dtype != q.dtype:
        raise TypeError(f"rel: expected float32, float64 or q's dtype {q.dtype}, got {rel.dtype}")
    kk = kernel_size * kernel_size
    if tuple(rel.shape) != (c, kk):
        raise ValueError(f"rel: expected shape ({c}, {kk}) = (C, kernel_size**2) for q {tuple(q.shape)} and "
                         f"kernel_size={kernel_size}, got {tuple(rel.shape)}")
    return impl(q.device)(q, k, v, rel, kernel_size)
