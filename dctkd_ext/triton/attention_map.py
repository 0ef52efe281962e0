"""Triton kernels of attention_map (docs/DESIGN.md §3.1) and of the channel-reduction / elementwise-backward
halves of the multi-level DCT-KD loss (§3.3 (a), (c)).

Two kernels, each serving up to MAX_SLOTS tensors of different shapes and dtypes in one launch
through a work list: the grid is the concatenation of every tensor's work items, and a program
finds its tensor by comparing its id with the running item counts (E0 <= E1 <= ...).

* reduce_kernel: A[b, hw] = scale * sum_c |x[b, c, hw]|^p into fp32 (fp64 for fp64) maps.
* backward_kernel: dx[b, c, hw] = gl[b] * g[b, hw] * scale * p |x|^(p-1) sign(x), in x's dtype.

Both read NCHW-contiguous and channels_last tensors in place: a program owns a (BLOCK_C, BLOCK_HW)
tile whose fastest dimension is the contiguous one of the layout (hw for NCHW, c for NHWC), so
each thread moves contiguous 16-byte vectors when the sizes allow it (the compiler vectorises from
the pointer contiguity and the divisibility of C / HW by 16, which Triton specialises on).
"""

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    abs_pow,
    abs_pow_grad,
    acc_dtype,
    chunks,
    define_op,
    is_channels_last,
    kernel_layout,
    launch,
    pow_code,
    reciprocal,
    slot_args,
    wrap_triton,
)

# Tile shapes chosen from the bytes per thread, not from GPU timings (none are recorded yet). 2048 elements per
# tile, 4 warps: 16 elements per thread, i.e. 4 vectors of 16 bytes in flight in fp32.
NCHW_TILE = (32, 64)  # (BLOCK_C, BLOCK_HW): 64 contiguous positions per channel row
NHWC_TILE = (64, 32)  # 64 contiguous channels per position
NUM_WARPS = 4


def _tile(channels_last: bool):
    return NHWC_TILE if channels_last else NCHW_TILE


# --------------------------------------------------------------------------------------- forward
@triton.jit
def _reduce_item(x_ptr, out_ptr, item, C, HW, out_off, p,
                 POW: tl.constexpr, MEAN: tl.constexpr, CL: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Work item (b, hw tile): reduce x[b, :, tile] over all channels into out[out_off + b*HW + tile]."""
    acc_ty = out_ptr.dtype.element_ty
    tiles = tl.cdiv(HW, BLOCK_HW)
    b = item // tiles
    offs_hw = (item - b * tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = tl.arange(0, BLOCK_C)
    m_hw = offs_hw < HW
    base = x_ptr + b.to(tl.int64) * C * HW
    if CL:  # x[b, hw, c]: channels contiguous
        ptrs = base + offs_hw[None, :] * C + offs_c[:, None]
        step = BLOCK_C
    else:  # x[b, c, hw]: positions contiguous
        ptrs = base + offs_c[:, None] * HW + offs_hw[None, :]
        step = BLOCK_C * HW
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_ty)
    for c0 in range(0, C, BLOCK_C):
        m = ((c0 + offs_c[:, None]) < C) & m_hw[None, :]
        x = tl.load(ptrs, mask=m, other=0.0).to(acc_ty)
        acc += abs_pow(x, p, POW)
        ptrs += step
    a = tl.sum(acc, axis=0)
    if MEAN:
        a = a * reciprocal(C, acc_ty)
    tl.store(out_ptr + out_off + b * HW + offs_hw, a, mask=m_hw)


# Batch-dependent integers (item ends, output offsets) are not specialised: a new batch size (an odd
# last batch) must not compile a new variant.
@triton.jit(do_not_specialize=[f"{n}{i}" for n in "EO" for i in range(8)])
def reduce_kernel(out_ptr,
                  x0, C0, HW0, E0, O0, x1, C1, HW1, E1, O1, x2, C2, HW2, E2, O2, x3, C3, HW3, E3, O3,
                  x4, C4, HW4, E4, O4, x5, C5, HW5, E5, O5, x6, C6, HW6, E6, O6, x7, C7, HW7, E7, O7,
                  p: tl.float64, NS: tl.constexpr, POW: tl.constexpr, MEAN: tl.constexpr, CL: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Channel reduction of NS tensors in one launch; tensor i (x_i: B_i x C_i x HW_i) owns programs
    [E_{i-1}, E_i), one per (b, BLOCK_HW positions), and writes its maps at out_ptr + O_i.
    Bytes: reads every x once (B C HW elements), writes B HW fp32 per tensor. Flops: 2 per element."""
    pid = tl.program_id(0)
    if pid < E0:
        _reduce_item(x0, out_ptr, pid, C0, HW0, O0, p, POW, MEAN, CL, BLOCK_C, BLOCK_HW)
    if NS > 1:
        if (pid >= E0) & (pid < E1):
            _reduce_item(x1, out_ptr, pid - E0, C1, HW1, O1, p, POW, MEAN, CL, BLOCK_C, BLOCK_HW)
    if NS > 2:
        if (pid >= E1) & (pid < E2):
            _reduce_item(x2, out_ptr, pid - E1, C2, HW2, O2, p, POW, MEAN, CL, BLOCK_C, BLOCK_HW)
    if NS > 3:
        if (pid >= E2) & (pid < E3):
            _reduce_item(x3, out_ptr, pid - E2, C3, HW3, O3, p, POW, MEAN, CL, BLOCK_C, BLOCK_HW)
    if NS > 4:
        if (pid >= E3) & (pid < E4):
            _reduce_item(x4, out_ptr, pid - E3, C4, HW4, O4, p, POW, MEAN, CL, BLOCK_C, BLOCK_HW)
    if NS > 5:
        if (pid >= E4) & (pid < E5):
            _reduce_item(x5, out_ptr, pid - E4, C5, HW5, O5, p, POW, MEAN, CL, BLOCK_C, BLOCK_HW)
    if NS > 6:
        if (pid >= E5) & (pid < E6):
            _reduce_item(x6, out_ptr, pid - E5, C6, HW6, O6, p, POW, MEAN, CL, BLOCK_C, BLOCK_HW)
    if NS > 7:
        if (pid >= E6) & (pid < E7):
            _reduce_item(x7, out_ptr, pid - E6, C7, HW7, O7, p, POW, MEAN, CL, BLOCK_C, BLOCK_HW)


def reduce_into(out: torch.Tensor, items: Sequence, p: float, mean: bool = True) -> None:
    """items: (x, out_offset) with x (B, C, H, W) in the kernel layout (see kernel_layout) and out a
    flat-addressable fp32/fp64 buffer; writes the map of x at out_offset. Tensors of one layout share
    launches (MAX_SLOTS each); programs with the most bytes per item come first, so that the long
    items start early and the short ones fill the tail."""
    for cl in (False, True):
        group = [(x, off) for x, off in items if is_channels_last(x) == cl and x.numel() > 0]
        if not group:
            continue
        block_c, block_hw = _tile(cl)
        group.sort(key=lambda it: -int(it[0].shape[1]) * min(int(it[0].shape[2] * it[0].shape[3]), block_hw))
        for part in chunks(group):
            slots, end = [], 0
            for x, off in part:
                b, c, h, w = (int(n) for n in x.shape)  # concrete sizes (specialised when traced)
                end += b * triton.cdiv(h * w, block_hw)
                slots.append((x, c, h * w, end, off))
            args = slot_args(slots, pad=(part[0][0], 1, 1, end, 0))
            launch(wrap_triton(reduce_kernel), (end,), out, *args, float(p), NS=len(part), POW=pow_code(p),
                   MEAN=mean, CL=cl, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=NUM_WARPS)


# -------------------------------------------------------------------------------------- backward
@triton.jit
def _backward_item(x_ptr, dx_ptr, g_ptr, gl_ptr, gl_stride, item, C, HW, p,
                   POW: tl.constexpr, MEAN: tl.constexpr, CL: tl.constexpr, HAS_GL: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Work item (b, c tile, hw tile): dx = gl[b] * g[b, hw] * scale * d|x|^p/dx on one tile."""
    acc_ty = g_ptr.dtype.element_ty
    hw_tiles = tl.cdiv(HW, BLOCK_HW)
    c_tiles = tl.cdiv(C, BLOCK_C)
    per_b = hw_tiles * c_tiles
    b = item // per_b
    r = item - b * per_b
    # consecutive programs walk the layout's contiguous dimension
    if CL:
        ht = r // c_tiles
        ct = r - ht * c_tiles
    else:
        ct = r // hw_tiles
        ht = r - ct * hw_tiles
    offs_hw = ht * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    m_hw = offs_hw < HW
    g = tl.load(g_ptr + b * HW + offs_hw, mask=m_hw, other=0.0).to(acc_ty)
    if HAS_GL:
        g = g * tl.load(gl_ptr + b * gl_stride).to(acc_ty)
    if MEAN:
        g = g * reciprocal(C, acc_ty)
    if CL:
        off = b.to(tl.int64) * C * HW + offs_hw[None, :] * C + offs_c[:, None]
    else:
        off = b.to(tl.int64) * C * HW + offs_c[:, None] * HW + offs_hw[None, :]
    m = (offs_c[:, None] < C) & m_hw[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(acc_ty)
    dx = g[None, :] * abs_pow_grad(x, p, POW)
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=[f"E{i}" for i in range(8)])
def backward_kernel(gl_ptr, gl_stride,
                    x0, d0, g0, C0, HW0, E0, x1, d1, g1, C1, HW1, E1, x2, d2, g2, C2, HW2, E2,
                    x3, d3, g3, C3, HW3, E3, x4, d4, g4, C4, HW4, E4, x5, d5, g5, C5, HW5, E5,
                    x6, d6, g6, C6, HW6, E6, x7, d7, g7, C7, HW7, E7,
                    p: tl.float64, NS: tl.constexpr, POW: tl.constexpr, MEAN: tl.constexpr, CL: tl.constexpr,
                    HAS_GL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Elementwise backward of NS tensors in one launch (x_i, its gradient d_i, its map gradient g_i
    of shape (B, HW_i) in fp32/fp64); tensor i owns programs [E_{i-1}, E_i), one per tile.
    gl (B,), with stride gl_stride, is the per-sample upstream gradient (HAS_GL).
    Bytes: reads x once and writes dx once (2 B C HW elements), plus the small g (L2-resident)."""
    pid = tl.program_id(0)
    if pid < E0:
        _backward_item(x0, d0, g0, gl_ptr, gl_stride, pid, C0, HW0, p, POW, MEAN, CL, HAS_GL, BLOCK_C, BLOCK_HW)
    if NS > 1:
        if (pid >= E0) & (pid < E1):
            _backward_item(x1, d1, g1, gl_ptr, gl_stride, pid - E0, C1, HW1, p, POW, MEAN, CL, HAS_GL,
                           BLOCK_C, BLOCK_HW)
    if NS > 2:
        if (pid >= E1) & (pid < E2):
            _backward_item(x2, d2, g2, gl_ptr, gl_stride, pid - E1, C2, HW2, p, POW, MEAN, CL, HAS_GL,
                           BLOCK_C, BLOCK_HW)
    if NS > 3:
        if (pid >= E2) & (pid < E3):
            _backward_item(x3, d3, g3, gl_ptr, gl_stride, pid - E2, C3, HW3, p, POW, MEAN, CL, HAS_GL,
                           BLOCK_C, BLOCK_HW)
    if NS > 4:
        if (pid >= E3) & (pid < E4):
            _backward_item(x4, d4, g4, gl_ptr, gl_stride, pid - E3, C4, HW4, p, POW, MEAN, CL, HAS_GL,
                           BLOCK_C, BLOCK_HW)
    if NS > 5:
        if (pid >= E4) & (pid < E5):
            _backward_item(x5, d5, g5, gl_ptr, gl_stride, pid - E4, C5, HW5, p, POW, MEAN, CL, HAS_GL,
                           BLOCK_C, BLOCK_HW)
    if NS > 6:
        if (pid >= E5) & (pid < E6):
            _backward_item(x6, d6, g6, gl_ptr, gl_stride, pid - E5, C6, HW6, p, POW, MEAN, CL, HAS_GL,
                           BLOCK_C, BLOCK_HW)
    if NS > 7:
        if (pid >= E6) & (pid < E7):
            _backward_item(x7, d7, g7, gl_ptr, gl_stride, pid - E6, C7, HW7, p, POW, MEAN, CL, HAS_GL,
                           BLOCK_C, BLOCK_HW)


def backward_into(items: Sequence, p: float, mean: bool = True, grad_loss=None) -> None:
    """items: (x, dx, g) with x (B, C, H, W) in the kernel layout, dx = empty_like(x) and g the
    contiguous (B, H, W) map gradient in the accumulation dtype. grad_loss: optional (B,) tensor that
    multiplies sample b's gradient (any stride)."""
    for cl in (False, True):
        group = [it for it in items if is_channels_last(it[0]) == cl and it[0].numel() > 0]
        if not group:
            continue
        block_c, block_hw = _tile(cl)
        for part in chunks(group):
            slots, end = [], 0
            for x, dx, g in part:
                b, c, h, w = (int(n) for n in x.shape)
                end += b * triton.cdiv(c, block_c) * triton.cdiv(h * w, block_hw)
                slots.append((x, dx, g, c, h * w, end))
            x0, dx0, g0 = part[0]
            args = slot_args(slots, pad=(x0, dx0, g0, 1, 1, end))
            gl = grad_loss if grad_loss is not None else g0
            gl_stride = grad_loss.stride(0) if grad_loss is not None else 0
            launch(wrap_triton(backward_kernel), (end,), gl, gl_stride, *args, float(p), NS=len(part),
                   POW=pow_code(p), MEAN=mean, CL=cl, HAS_GL=grad_loss is not None, BLOCK_C=block_c,
                   BLOCK_HW=block_hw, num_warps=NUM_WARPS)


# ------------------------------------------------------------------------------------------- ops
def _check_p_reduce(p: float, reduce: str) -> bool:
    if not p > 0:
        raise ValueError(f"p: expected a positive exponent, got {p}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce: expected 'mean' or 'sum', got {reduce!r}")
    return reduce == "mean"


def _check_features(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")


def _attention_map(x: torch.Tensor, p: float, reduce: str) -> torch.Tensor:
    mean = _check_p_reduce(p, reduce)
    _check_features(x)
    x = kernel_layout(x)
    b, _, h, w = x.shape
    out = torch.empty((b, h, w), dtype=acc_dtype(x), device=x.device)
    reduce_into(out, [(x, 0)], p, mean)
    return out


def _attention_map_backward(grad: torch.Tensor, x: torch.Tensor, p: float, reduce: str) -> torch.Tensor:
    mean = _check_p_reduce(p, reduce)
    _check_features(x)
    b, _, h, w = x.shape
    if tuple(grad.shape) != (b, h, w):
        raise ValueError(f"grad: expected shape {(b, h, w)} to match x, got {tuple(grad.shape)}")
    x = kernel_layout(x)
    g = grad.to(acc_dtype(x)).contiguous()
    dx = torch.empty_like(x)
    backward_into([(x, dx, g)], p, mean)
    return dx


# Same schemas as csrc/ops.cpp (inferred from the type hints).
attention_map = define_op("attention_map", _attention_map)
attention_map_backward = define_op("attention_map_backward", _attention_map_backward)

__all__ = ["reduce_into", "backward_into", "reduce_kernel", "backward_kernel", "attention_map",
           "attention_map_backward"]
