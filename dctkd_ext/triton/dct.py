"""Triton kernels of dct2d / idct2d (docs/DESIGN.md §3.2) as small matmuls with cached bases, and the
tiled transform pass (dct, fft_real, identity; forward or transposed) that the loss kernel reuses.

A map of H x W is processed in (TH, TW) tiles, TH = clamp(next_pow2(H), 16, MAX_TILE = 32) (tl.dot
needs dims >= 16; padding is zero through masked loads, so it never changes a result). A map that fits
in one tile (H, W <= 32, e.g. the 7 x 7 and 14 x 14 stages of a ResNet on 224 x 224 images) stays in
registers: Y = L (X R) is two tl.dot's. Larger maps loop over tiles and keep X R in a scratch buffer
(L2-resident).
The products run in IEEE fp32 (input_precision="ieee": never TF32), fp64 for fp64.
"""

import torch
import triton
import triton.language as tl

from .._shapes import next_pow2
from ._common import acc_dtype, basis, define_op, launch, wrap_triton

# Tiling, chosen from the register counts of sm_90 builds (triton 3.8), not from timings:
MAX_TILE = 32  # output tile side
REG_TILE = 32 * 32  # largest map dct2d holds in registers whole (64 registers a thread)
K_CHUNK = 16  # K per tl.dot outside registers
NUM_STAGES = 1  # no software pipelining of the tile loops: it multiplies the registers, for L2 data

# transform codes: the ABI of the kernels (= dctkd::Transform in csrc/dctkd_math.h)
IDENTITY, DCT, DFT = 0, 1, 2
TRANSFORMS = {"identity": IDENTITY, "dct": DCT, "fft_real": DFT}


def tile_size(n: int) -> int:
    return min(max(next_pow2(n), 16), MAX_TILE)


def warps_for(th: int, tw: int) -> int:
    return 4 if th * tw <= 32 * 32 else 8


# ---------------------------------------------------------------------------------- device helpers
@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def scalar(value, dtype: tl.constexpr):
    """A 0-d tensor of dtype holding value (for loop-carried reductions)."""
    return tl.sum(tl.full([1], value, dtype), axis=0)


@triton.jit
def basis_tile(ptr, n, r0, c0, TR: tl.constexpr, TC: tl.constexpr, TRANS: tl.constexpr):
    """Rows r0.., columns c0.. of the n x n row-major matrix M at ptr (of M^T if TRANS); 0 outside."""
    r = r0 + tl.arange(0, TR)[:, None]
    c = c0 + tl.arange(0, TC)[None, :]
    m = (r < n) & (c < n)
    if TRANS:
        off = c * n + r
    else:
        off = r * n + c
    return tl.load(ptr + off, mask=m, other=0.0)


@triton.jit
def load_tile(ptr, H, W, r0, c0, shift, TR: tl.constexpr, TC: tl.constexpr, ACC: tl.constexpr,
              CG: tl.constexpr):
    """Tile of an H x W row-major map minus `shift`, in ACC; 0 outside the map. CG: read through L2
    only (data written earlier by this program)."""
    r = r0 + tl.arange(0, TR)[:, None]
    c = c0 + tl.arange(0, TC)[None, :]
    m = (r < H) & (c < W)
    if CG:
        x = tl.load(ptr + r * W + c, mask=m, other=0.0, cache_modifier=".cg").to(ACC)
    else:
        x = tl.load(ptr + r * W + c, mask=m, other=0.0).to(ACC)
    return tl.where(m, x - shift, 0.0)


@triton.jit
def store_tile(ptr, H, W, r0, c0, v, TR: tl.constexpr, TC: tl.constexpr):
    r = r0 + tl.arange(0, TR)[:, None]
    c = c0 + tl.arange(0, TC)[None, :]
    tl.store(ptr + r * W + c, v.to(ptr.dtype.element_ty), mask=(r < H) & (c < W))


@triton.jit
def tile_index(H, W, r0, c0, TR: tl.constexpr, TC: tl.constexpr):
    """(flat index r*W + c, in-map mask) of a tile."""
    r = r0 + tl.arange(0, TR)[:, None]
    c = c0 + tl.arange(0, TC)[None, :]
    return r * W + c, (r < H) & (c < W)


@triton.jit
def stats_init(ACC: tl.constexpr):
    """(min, argmin, max, argmax, sum of squares, sum) before any element."""
    return (scalar(float("inf"), ACC), scalar(0, tl.int32), scalar(float("-inf"), ACC), scalar(0, tl.int32),
            scalar(0.0, ACC), scalar(0.0, ACC))


@triton.jit
def stats_update(v, idx, valid, lo, ilo, hi, ihi, ss, s):
    """Fold a tile v (valid elements, flat indices idx) into the running statistics. min / max keep
    the first index among equal values, as torch.min(x, dim) / torch.max(x, dim)."""
    big = 2147483647
    tmin = tl.min(tl.min(tl.where(valid, v, float("inf")), axis=1), axis=0)
    imin = tl.min(tl.min(tl.where(valid & (v == tmin), idx, big), axis=1), axis=0)
    tmax = tl.max(tl.max(tl.where(valid, v, float("-inf")), axis=1), axis=0)
    imax = tl.min(tl.min(tl.where(valid & (v == tmax), idx, big), axis=1), axis=0)
    take = (tmin < lo) | ((tmin == lo) & (imin < ilo))
    lo = tl.where(take, tmin, lo)
    ilo = tl.where(take, imin, ilo)
    take = (tmax > hi) | ((tmax == hi) & (imax < ihi))
    hi = tl.where(take, tmax, hi)
    ihi = tl.where(take, imax, ihi)
    vz = tl.where(valid, v, 0.0)
    ss += tl.sum(tl.sum(vz * vz, axis=1), axis=0)
    s += tl.sum(tl.sum(vz, axis=1), axis=0)
    return lo, ilo, hi, ihi, ss, s


@triton.jit
def _transform_tile(x, bh_ptr, bw_ptr, H, W, TRANSFORM: tl.constexpr, BACKWARD: tl.constexpr,
                    TH: tl.constexpr, TW: tl.constexpr):
    """Transform of a whole map held in one (TH, TW) tile (zero outside the map)."""
    if TRANSFORM == 1:  # forward D_H x D_W^T, backward D_H^T x D_W
        t = _dot(x, basis_tile(bw_ptr, W, 0, 0, TW, TW, not BACKWARD))
        y = _dot(basis_tile(bh_ptr, H, 0, 0, TH, TH, BACKWARD), t)
    else:  # C_H x C_W - S_H x S_W (symmetric bases: its own transpose)
        t1 = _dot(x, basis_tile(bw_ptr, W, 0, 0, TW, TW, False))
        t2 = _dot(x, basis_tile(bw_ptr + W * W, W, 0, 0, TW, TW, False))
        y = _dot(basis_tile(bh_ptr, H, 0, 0, TH, TH, False), t1) - \
            _dot(basis_tile(bh_ptr + H * H, H, 0, 0, TH, TH, False), t2)
    return y


@triton.jit
def transform_map(in_ptr, out_ptr, t1_ptr, t2_ptr, bh_ptr, bw_ptr, H, W, shift,
                  TRANSFORM: tl.constexpr, BACKWARD: tl.constexpr, REGS: tl.constexpr,
                  STATS_ABS: tl.constexpr, IN_CG: tl.constexpr, ZERO_DC: tl.constexpr,
                  TH: tl.constexpr, TW: tl.constexpr, KB: tl.constexpr, ACC: tl.constexpr):
    """out = T(in - shift) for one H x W row-major map (the shift applies inside the map only).

    T: identity, dct (orthonormal DCT-II, D_H x D_W^T; BACKWARD: its transpose D_H^T x D_W) or
    fft_real (C_H x C_W - S_H x S_W, its own transpose). bh / bw: the bases of sizes H and W (for
    fft_real cos then sin). REGS: the map fits in one (TH, TW) tile that stays in registers, the
    products take the whole K at once. Otherwise the products run over (TH, TW) output tiles with K
    in chunks of KB (bounding the registers of tl.dot's FMA path), and the intermediate goes through
    t1 / t2, H x W scratch of this map (t2 for fft_real). Returns the statistics of out (of |out| if STATS_ABS):
    (min, first argmin, max, first argmax, sum of squares, sum). ZERO_DC: out[0, 0] = 0 (exact for a
    zero-mean input, whose DC coefficient is 0). The caller puts a barrier between this pass and any
    pass that reads out."""
    lo, ilo, hi, ihi, ss, s = stats_init(ACC)
    if REGS:
        x = load_tile(in_ptr, H, W, 0, 0, shift, TH, TW, ACC, IN_CG)
        if TRANSFORM == 0:
            y = x
        else:
            y = _transform_tile(x, bh_ptr, bw_ptr, H, W, TRANSFORM, BACKWARD, TH, TW)
        idx, valid = tile_index(H, W, 0, 0, TH, TW)
        if ZERO_DC:
            y = tl.where(idx == 0, 0.0, y)
        store_tile(out_ptr, H, W, 0, 0, y, TH, TW)
        if STATS_ABS:
            y = tl.abs(y)
        lo, ilo, hi, ihi, ss, s = stats_update(y, idx, valid, lo, ilo, hi, ihi, ss, s)
    elif TRANSFORM == 0:
        for i0 in range(0, H, TH):
            for j0 in range(0, W, TW):
                y = load_tile(in_ptr, H, W, i0, j0, shift, TH, TW, ACC, IN_CG)
                idx, valid = tile_index(H, W, i0, j0, TH, TW)
                if ZERO_DC:
                    y = tl.where(idx == 0, 0.0, y)
                store_tile(out_ptr, H, W, i0, j0, y, TH, TW)
                if STATS_ABS:
                    y = tl.abs(y)
                lo, ilo, hi, ihi, ss, s = stats_update(y, idx, valid, lo, ilo, hi, ihi, ss, s)
    else:
        # stage 1: t = (in - shift) R, R = D_W^T (forward dct), D_W (backward dct), C_W and S_W (fft_real)
        for i0 in range(0, H, TH):
            for j0 in range(0, W, TW):
                acc1 = tl.zeros([TH, TW], dtype=ACC)
                acc2 = tl.zeros([TH, TW], dtype=ACC)
                for m0 in range(0, W, KB):
                    x = load_tile(in_ptr, H, W, i0, m0, shift, TH, KB, ACC, IN_CG)
                    if TRANSFORM == 1:
                        acc1 += _dot(x, basis_tile(bw_ptr, W, m0, j0, KB, TW, not BACKWARD))
                    else:
                        acc1 += _dot(x, basis_tile(bw_ptr, W, m0, j0, KB, TW, False))
                        acc2 += _dot(x, basis_tile(bw_ptr + W * W, W, m0, j0, KB, TW, False))
                store_tile(t1_ptr, H, W, i0, j0, acc1, TH, TW)
                if TRANSFORM == 2:
                    store_tile(t2_ptr, H, W, i0, j0, acc2, TH, TW)
        tl.debug_barrier()
        # stage 2: out = L t, L = D_H (forward dct), D_H^T (backward dct); C_H t1 - S_H t2 (fft_real)
        for i0 in range(0, H, TH):
            for j0 in range(0, W, TW):
                acc1 = tl.zeros([TH, TW], dtype=ACC)
                acc2 = tl.zeros([TH, TW], dtype=ACC)
                for k0 in range(0, H, KB):
                    t = load_tile(t1_ptr, H, W, k0, j0, 0.0, KB, TW, ACC, True)
                    if TRANSFORM == 1:
                        acc1 += _dot(basis_tile(bh_ptr, H, i0, k0, TH, KB, BACKWARD), t)
                    else:
                        acc1 += _dot(basis_tile(bh_ptr, H, i0, k0, TH, KB, False), t)
                        t = load_tile(t2_ptr, H, W, k0, j0, 0.0, KB, TW, ACC, True)
                        acc2 += _dot(basis_tile(bh_ptr + H * H, H, i0, k0, TH, KB, False), t)
                y = acc1 - acc2
                idx, valid = tile_index(H, W, i0, j0, TH, TW)
                if ZERO_DC:
                    y = tl.where(idx == 0, 0.0, y)
                store_tile(out_ptr, H, W, i0, j0, y, TH, TW)
                if STATS_ABS:
                    y = tl.abs(y)
                lo, ilo, hi, ihi, ss, s = stats_update(y, idx, valid, lo, ilo, hi, ihi, ss, s)
    return lo, ilo, hi, ihi, ss, s


# ------------------------------------------------------------------------------------ dct2d kernel
@triton.jit
def dct2d_kernel(x_ptr, y_ptr, t_ptr, bh_ptr, bw_ptr, H, W,
                 BACKWARD: tl.constexpr, REGS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                 KB: tl.constexpr):
    """One program per map: y = D_H x D_W^T (BACKWARD: D_H^T x D_W, the inverse).
    Bytes: reads x and writes y once (2 H W elements per map; + 2 H W fp32 of L2-resident scratch
    when the map is not held in registers); the bases (H^2 + W^2) stay in L2.
    Flops: 2 H W (H + W) per map (on the padded tile sizes)."""
    acc_ty = bh_ptr.dtype.element_ty
    base = tl.program_id(0).to(tl.int64) * H * W
    transform_map(x_ptr + base, y_ptr + base, t_ptr + base, t_ptr + base, bh_ptr, bw_ptr, H, W, 0.0,
                  1, BACKWARD, REGS, False, False, False, TH, TW, KB, acc_ty)


def plan(h: int, w: int, reg_tile: int = REG_TILE):
    """(TH, TW, REGS) for an h x w map: REGS when it fits one tile of at most reg_tile elements
    (larger register tiles make tl.dot's fp32 FMA path spill)."""
    th, tw = tile_size(h), tile_size(w)
    return th, tw, (h <= th and w <= tw and th * tw <= reg_tile)


def dct2d_apply(a: torch.Tensor, inverse: bool) -> torch.Tensor:
    name = "c" if inverse else "a"
    if a.dim() < 2:
        raise ValueError(f"{name}: expected a tensor with at least 2 dims (..., H, W), got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {a.dtype}")
    a = a.contiguous()
    y = torch.empty_like(a)
    h, w = int(a.shape[-2]), int(a.shape[-1])
    if a.numel() == 0:
        return y
    acc = acc_dtype(a)
    th, tw, regs = plan(h, w)
    scratch = y if regs else torch.empty(a.shape, dtype=acc, device=a.device)  # not read with REGS
    launch(wrap_triton(dct2d_kernel), (int(a.numel()) // (h * w),), a, y, scratch, basis("dct", h, acc, a),
           basis("dct", w, acc, a), h, w, BACKWARD=inverse, REGS=regs, TH=th, TW=tw, KB=K_CHUNK,
           num_warps=warps_for(th, tw), num_stages=NUM_STAGES)
    return y


def _dct2d(a: torch.Tensor) -> torch.Tensor:
    return dct2d_apply(a, inverse=False)


def _idct2d(c: torch.Tensor) -> torch.Tensor:
    return dct2d_apply(c, inverse=True)


dct2d = define_op("dct2d", _dct2d)
idct2d = define_op("idct2d", _idct2d)
