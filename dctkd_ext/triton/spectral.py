"""Triton kernels of the spectral filters (docs/DESIGN.md §3.4) and their launchers.

- global_filter forward / backward: one streaming pass over (B, C, H, K) complex data, NCHW or
  channels-last (GFNet's layout; the rule of dctkd_ext._shapes.spectrum_channels_last); the backward reads dy, xf once, writes dxf and reduces dw over the
  batch in a fixed order (per-split partial sums, then one sum).
- spectral_conv (forward and both gradients): a batched complex GEMM over the H*K frequencies,
  out[m, n, f] = mask[f] * sum_k opA(A[m, k, f]) opB(B[k, n, f]); one program per (frequency,
  m-tile, n-tile), four real tl.dot per k-step (the matrix units). fp32 dots use DOT_PRECISION
  ("tf32x3" by default: three TF32 tensor-core products, about fp32 accuracy).
- fam_filter_fused: the whole small-map chain rfft2 -> filter (channel mixing or depthwise, the
  symmetrised half-plane weight with the mask folded in) -> irfft2 in one kernel, the DFTs as small
  matmuls, so no (B, C, S, S//2+1) complex intermediate touches memory. For S <= 32.

The ops are torch.ops.dctkd_ext_triton.{global_filter, global_filter_backward, spectral_conv,
spectral_conv_backward, fam_half_weight, fam_half_weight_backward} (the schemas of the C++ ops) and
fam_filter_fused (Triton only): the launchers below, defined as ops by _common.define_op when this
module is imported (their type hints give the schemas);
dctkd_ext.triton.load() imports it, and the backend registry
(dctkd_ext._backend) registers the autograd formulas of dctkd_ext/ops on the ops. Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests),
in fp32/fp64. `python -m dctkd_ext.triton._compile_check --family spectral` compiles every kernel variant
for sm_90 without a GPU.
"""

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._shapes import fam_mask_radius, fused_tiles, next_pow2, spectrum_channels_last
from . import _common

# fp32 tl.dot precision on the GPU: "tf32x3" (tensor cores, ~fp32 accuracy), "ieee" (exact fp32 FMA,
# no tensor cores) or "tf32" (fast, ~1e-3 relative: not within the fp32 tolerance of the tests).
DOT_PRECISION = os.environ.get("DCTKD_TRITON_DOT_PRECISION", "tf32x3")
if DOT_PRECISION not in ("tf32x3", "ieee", "tf32"):
    raise ValueError(f"DCTKD_TRITON_DOT_PRECISION: expected tf32x3, ieee or tf32, got {DOT_PRECISION!r}")



def _launch(kernel, grid, *args, **kwargs) -> None:
    # through the module attribute, so that the compile check can replace it
    _common.launch(_common.wrap_triton(kernel), grid, *args, **kwargs)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float64 or _common.INTERPRET:
        return "ieee"
    return DOT_PRECISION


def _real_view(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.resolve_conj().resolve_neg())


# ---------------------------------------------------------------------------------------- global filter
@triton.jit(do_not_specialize=["B", "b_per_prog"])  # batch-dependent: no new variant per batch size
def _gf_fwd_kernel(x_ptr, w_ptr, m_ptr, y_ptr, B, N, HK, C, b_per_prog,
                   MASK_MODE: tl.constexpr, BLOCK: tl.constexpr):
    # x, y: B samples of N complex values as (re, im) pairs; w: N. MASK_MODE 0: none, 1: mask[j % HK]
    # (NCHW), 2: mask[j // C] (channels-last). A program owns BLOCK positions j (weight and mask stay
    # in registers: no index division per element) and streams them through its chunk of samples.
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = j < N
    two = tl.arange(0, 2)
    jo = j[:, None] * 2 + two[None, :]
    w = tl.load(w_ptr + jo, mask=valid[:, None], other=0.0)
    wr, wi = tl.split(w)
    if MASK_MODE == 1:
        m = tl.load(m_ptr + j % HK, mask=valid, other=0.0)
        wr = wr * m
        wi = wi * m
    elif MASK_MODE == 2:
        m = tl.load(m_ptr + j // C, mask=valid, other=0.0)
        wr = wr * m
        wi = wi * m
    chunk = tl.program_id(1)
    b0 = chunk * b_per_prog
    b1 = tl.minimum(B, b0 + b_per_prog)
    b0_64 = chunk.to(tl.int64) * b_per_prog
    for b in range(b0, b1):
        off = ((b0_64 + (b - b0)) * N) * 2 + jo
        x = tl.load(x_ptr + off, mask=valid[:, None], other=0.0)
        xr, xi = tl.split(x)
        tl.store(y_ptr + off, tl.join(xr * wr - xi * wi, xr * wi + xi * wr).to(x.dtype), mask=valid[:, None])


@triton.jit(do_not_specialize=["B", "b_per_split"])
def _gf_bwd_kernel(g_ptr, x_ptr, w_ptr, m_ptr, dx_ptr, dw_ptr, B, N, HK, C, b_per_split,
                   MASK_MODE: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr, BLOCK: tl.constexpr):
    # dx[b, j] = g * conj(w[j]) * m; dw_part[split, j] = m * sum_{b in split} g * conj(x)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = j < N
    two = tl.arange(0, 2)
    jo = j[:, None] * 2 + two[None, :]
    if MASK_MODE == 1:
        m = tl.load(m_ptr + j % HK, mask=valid, other=0.0)
    elif MASK_MODE == 2:
        m = tl.load(m_ptr + j // C, mask=valid, other=0.0)
    else:
        m = tl.full((BLOCK,), 1.0, w_ptr.dtype.element_ty)
    w = tl.load(w_ptr + jo, mask=valid[:, None], other=0.0)
    wr, wi = tl.split(w)
    wr = wr * m
    wi = wi * m
    acc_r = tl.full((BLOCK,), 0.0, w_ptr.dtype.element_ty)
    acc_i = tl.full((BLOCK,), 0.0, w_ptr.dtype.element_ty)
    b0 = split * b_per_split
    b1 = tl.minimum(B, b0 + b_per_split)
    b0_64 = split.to(tl.int64) * b_per_split
    for b in range(b0, b1):
        off = ((b0_64 + (b - b0)) * N) * 2 + jo
        g = tl.load(g_ptr + off, mask=valid[:, None], other=0.0)
        gr, gi = tl.split(g)
        if NEED_X:
            tl.store(dx_ptr + off, tl.join(gr * wr + gi * wi, gi * wr - gr * wi).to(g.dtype), mask=valid[:, None])
        if NEED_W:
            x = tl.load(x_ptr + off, mask=valid[:, None], other=0.0)
            xr, xi = tl.split(x)
            acc_r += gr * xr + gi * xi
            acc_i += gi * xr - gr * xi
    if NEED_W:
        dwo = (split.to(tl.int64) * N) * 2 + jo
        tl.store(dw_ptr + dwo, tl.join(acc_r * m, acc_i * m).to(w.dtype), mask=valid[:, None])


def _gf_layout(xf: Tensor):
    """(channels_last, B, C, H, K, N = C*H*K) of a (B, C, H, K) spectrum: whether the kernels read it (and
    write its outputs) channels-last, by the one rule of _shapes.spectrum_channels_last, and its sizes."""
    b, c, h, k = xf.shape
    return spectrum_channels_last(xf), b, c, h, k, c * h * k


def _gf_data(t: torch.Tensor, cl: bool) -> torch.Tensor:
    t = t.resolve_conj().resolve_neg()
    return t.permute(0, 2, 3, 1).contiguous() if cl else t.contiguous()


def _gf_weight(w: torch.Tensor, cl: bool) -> torch.Tensor:
    w = w.resolve_conj().resolve_neg()
    return w.permute(1, 2, 0).contiguous() if cl else w.contiguous()


def _gf_new_data(shape, cl, like):
    b, c, h, k = shape
    return torch.empty((b, h, k, c), dtype=like.dtype, device=like.device).permute(0, 3, 1, 2) if cl else \
        torch.empty((b, c, h, k), dtype=like.dtype, device=like.device)


def _mask_arg(mask, xf):
    if mask is None:
        return None
    return mask.to(dtype=xf.real.dtype).contiguous()


def global_filter(xf: Tensor, w: Tensor, mask: Optional[Tensor]) -> Tensor:
    cl, b, c, h, k, n = _gf_layout(xf)
    y = _gf_new_data(xf.shape, cl, xf)
    if y.numel() == 0:
        return y
    xd, wd, m = _gf_data(xf, cl), _gf_weight(w, cl), _mask_arg(mask, xf)
    mode = 0 if m is None else (2 if cl else 1)
    block = 1024
    blocks = triton.cdiv(n, block)
    chunks = max(1, min(b, triton.cdiv(8 * _num_sms(xf.device), blocks)))
    b_per = triton.cdiv(b, chunks)
    chunks = triton.cdiv(b, b_per)
    _launch(_gf_fwd_kernel, (blocks, chunks),
        torch.view_as_real(xd), torch.view_as_real(wd), m if m is not None else torch.view_as_real(xd),
        torch.view_as_real(y), b, n, h * k, c, b_per, MASK_MODE=mode, BLOCK=block, num_warps=4)
    return y


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def global_filter_backward(grad: Tensor, xf: Tensor, w: Tensor, mask: Optional[Tensor], need_xf: bool,
                           need_w: bool) -> Tuple[Tensor, Tensor]:
    cl, b, c, h, k, n = _gf_layout(xf)
    dx = _gf_new_data(xf.shape, cl, xf) if need_xf else xf.new_empty((0,))
    if need_w:
        dw = torch.empty((h, k, c), dtype=w.dtype, device=w.device).permute(2, 0, 1) if cl else \
            torch.empty((c, h, k), dtype=w.dtype, device=w.device)
    else:
        dw = w.new_empty((0,))
    if not (need_xf or need_w):
        return dx, dw
    if xf.numel() == 0:
        if need_w:
            dw.zero_()
        return dx, dw
    # xf is read only for dw (a caller that wants dxf alone may pass a shape-only, e.g. expanded, xf)
    gd, wd, m = _gf_data(grad, cl), _gf_weight(w, cl), _mask_arg(mask, xf)
    xd = _gf_data(xf, cl) if need_w else gd
    mode = 0 if m is None else (2 if cl else 1)
    block = 512
    blocks = triton.cdiv(n, block)
    # enough programs to fill the GPU: split the batch when there are few frequency blocks
    splits = max(1, min(b, triton.cdiv(4 * _num_sms(xf.device), blocks))) if need_w else max(1, min(b, 64))
    b_per = triton.cdiv(b, splits)
    splits = triton.cdiv(b, b_per)
    part = torch.empty((splits, n), dtype=w.dtype, device=w.device) if need_w else None
    _launch(_gf_bwd_kernel, (blocks, splits),
        torch.view_as_real(gd), torch.view_as_real(xd), torch.view_as_real(wd),
        m if m is not None else torch.view_as_real(xd),
        torch.view_as_real(dx) if need_xf else torch.view_as_real(gd),
        torch.view_as_real(part) if need_w else torch.view_as_real(gd),
        b, n, h * k, c, b_per, MASK_MODE=mode, NEED_X=need_xf, NEED_W=need_w, BLOCK=block, num_warps=4)
    if need_w:
        red = part[0] if splits == 1 else part.sum(0)
        if cl:
            dw.permute(1, 2, 0).copy_(red.view(h, k, c))
        else:
            dw.copy_(red.view(c, h, k))
    return dx, dw


# ---------------------------------------------------------------------------------------- spectral conv
@triton.jit(do_not_specialize=["M", "K"])  # M or K is the batch (forward / dw)
def _cgemm_freq_kernel(a_ptr, b_ptr, m_ptr, o_ptr, M, N, K, F, sAm, sAk, sBk, sBn,
                       CONJ_A: tl.constexpr, CONJ_B: tl.constexpr, HAS_MASK: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    # out[m, n, f] = mask[f] * sum_k opA(A[m, k, f]) * opB(B[k, n, f]); strides in complex elements,
    # the frequency contiguous; out contiguous (M, N, F). One program: one frequency, a BM x BN tile.
    # Each complex element is one 8-byte (re, im) load, split in registers. Offsets within a tile are
    # int32 (the launcher checks their range) on int64 base pointers advanced per k-step: int64
    # offset tensors double the address registers, which is what made this kernel spill.
    f = tl.program_id(0).to(tl.int64)
    m0 = tl.program_id(1) * BM
    n0 = tl.program_id(2) * BN
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    two = tl.arange(0, 2)
    a_ptrs = a_ptr + (m0.to(tl.int64) * sAm + f) * 2
    b_ptrs = b_ptr + (n0.to(tl.int64) * sBn + f) * 2
    a_off = ((rm[:, None] * sAm + rk[None, :] * sAk) * 2)[:, :, None] + two[None, None, :]
    b_off = ((rk[:, None] * sBk + rn[None, :] * sBn) * 2)[:, :, None] + two[None, None, :]
    m_ok = (m0 + rm) < M
    n_ok = (n0 + rn) < N
    acc_ty: tl.constexpr = tl.float32 if o_ptr.dtype.element_ty == tl.float32 else tl.float64
    acc_r = tl.zeros((BM, BN), acc_ty)
    acc_i = tl.zeros((BM, BN), acc_ty)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs + a_off, mask=(m_ok[:, None] & k_ok[None, :])[:, :, None], other=0.0)
        ar, ai = tl.split(a)
        if CONJ_A:
            ai = -ai
        b = tl.load(b_ptrs + b_off, mask=(k_ok[:, None] & n_ok[None, :])[:, :, None], other=0.0)
        br, bi = tl.split(b)
        if CONJ_B:
            bi = -bi
        acc_r = tl.dot(ar, br, acc_r, input_precision=PREC)
        acc_r = tl.dot(-ai, bi, acc_r, input_precision=PREC)
        acc_i = tl.dot(ar, bi, acc_i, input_precision=PREC)
        acc_i = tl.dot(ai, br, acc_i, input_precision=PREC)
        a_ptrs += sAk.to(tl.int64) * (2 * BK)
        b_ptrs += sBk.to(tl.int64) * (2 * BK)
    if HAS_MASK:
        mv = tl.load(m_ptr + f)
        acc_r = acc_r * mv
        acc_i = acc_i * mv
    o_ptrs = o_ptr + ((m0.to(tl.int64) * N + n0) * F + f) * 2
    o_off = ((rm[:, None] * N + rn[None, :]) * F * 2)[:, :, None] + two[None, None, :]
    tl.store(o_ptrs + o_off, tl.join(acc_r, acc_i), mask=(m_ok[:, None] & n_ok[None, :])[:, :, None])


def _tile(n: int, cap: int = 64) -> int:
    return max(16, min(cap, next_pow2(n)))


def cgemm_tiles(M: int, N: int, real_dtype: torch.dtype, prec: str):
    """(BM, BN, BK, num_warps, num_stages) of the frequency GEMM. Chosen from sm_90 register counts
    (triton 3.8; python -m dctkd_ext.triton.spectral prints them): at BK = 32 every precision spills
    (tf32x3 255 registers + 200-500 B of stack, "ieee" fp32 7 KB, fp64 600 B); BK = 16 with 8 warps
    for a 64 x 64 tile does not. BM does not depend on M (the batch, or the input channels for dw),
    so a new batch size compiles no new variant (small batches pad the tile: the GEMM is small there)."""
    bm = 32 if real_dtype == torch.float64 else 64
    if real_dtype == torch.float64:  # testing path: FMA, small tiles
        return bm, _tile(N, 32), 16, 4, 1
    bn = _tile(N)
    warps = 8 if bm * bn >= 64 * 64 else 4
    return bm, bn, 16, warps, (3 if prec != "ieee" else 1)


def _cgemm_freq(a, sAm, sAk, b, sBk, sBn, mask, out, M, N, K, F, conj_a, conj_b):
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    real = a.real.dtype if a.is_complex() else a.dtype
    bm, bn, bk, warps, stages = cgemm_tiles(M, N, real, _precision(real))
    for name, bound in (("xf", (bm * sAm + bk * sAk) * 2), ("w", (bk * sBk + bn * sBn) * 2), ("out", bm * N * F * 2)):
        if bound >= 2**31:
            raise ValueError(f"spectral_conv: {name} too large for the Triton kernel's int32 tile offsets "
                             f"({bound} elements per tile span); use the CUDA backend")
    grid = (F, triton.cdiv(M, bm), triton.cdiv(N, bn))
    ar, br_ = _real_view(a), _real_view(b)
    _launch(_cgemm_freq_kernel, grid,
        ar, br_, mask if mask is not None else ar, torch.view_as_real(out), M, N, K, F, sAm, sAk, sBk, sBn,
        CONJ_A=conj_a, CONJ_B=conj_b, HAS_MASK=mask is not None, BM=bm, BN=bn, BK=bk,
        PREC=_precision(ar.dtype), num_warps=warps, num_stages=stages)
    return out


def spectral_conv(xf: Tensor, w: Tensor, mask: Optional[Tensor]) -> Tensor:
    b, i, h, k = xf.shape
    o = w.shape[1]
    f = h * k
    x, wc, m = xf.resolve_conj().contiguous(), w.resolve_conj().contiguous(), _mask_arg(mask, xf)
    y = torch.empty((b, o, h, k), dtype=xf.dtype, device=xf.device)
    return _cgemm_freq(x, i * f, f, wc, o * f, f, m, y, b, o, i, f, False, False)


def spectral_conv_backward(grad: Tensor, xf: Tensor, w: Tensor, mask: Optional[Tensor], need_xf: bool,
                           need_w: bool) -> Tuple[Tensor, Tensor]:
    b, i, h, k = xf.shape
    o = w.shape[1]
    f = h * k
    # xf is read only for dw (a caller that wants dxf alone may pass a shape-only, e.g. expanded, xf)
    g, wc, m = grad.resolve_conj().contiguous(), w.resolve_conj().contiguous(), _mask_arg(mask, xf)
    x = xf.resolve_conj().contiguous() if need_w else None
    dx = xf.new_empty((0,))
    dw = w.new_empty((0,))
    if need_xf:  # dx[b, i] = sum_o g[b, o] conj(w[i, o])
        dx = _cgemm_freq(g, o * f, f, wc, f, o * f, m, xf.new_empty((b, i, h, k)), b, i, o, f, False, True)
    if need_w:  # dw[i, o] = sum_b conj(x[b, i]) g[b, o]
        dw = _cgemm_freq(x, f, i * f, g, o * f, f, m, torch.empty_like(wc), i, o, b, f, True, False)
    return dx, dw


# ------------------------------------------------------------------------------ fused small-map filter
@triton.jit
def _basis_tile(basis_ptr, rows, cols, n_rows, n_cols, S, scale):
    # (cos, sin)(2 pi r c / S) * scale on a (R, C) grid from the cached fp64-evaluated DFT basis
    # (2, S, S) (dctkd_ext.triton._common.basis("dft", S)); zero outside [0, n_rows) x [0, n_cols)
    off = rows[:, None] * S + cols[None, :]
    keep = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    c = tl.load(basis_ptr + off, mask=keep, other=0.0)
    s = tl.load(basis_ptr + S * S + off, mask=keep, other=0.0)
    return c * scale, s * scale


@triton.jit
def _fwd_dft(x, basis_ptr, S, K, inv, SP: tl.constexpr, KP: tl.constexpr, PREC: tl.constexpr):
    # x: (NB, SP, SP) real [n, h, w], zero outside S x S  ->  X^T = rfft2(x, ortho)^T: (NB, KP, SP) [n, k, m]
    # inv = 1 / sqrt(S) (a float argument: S may be a compile-time 1). The bases are re-read from
    # L1/L2 at each use rather than kept live in registers across the channel loop.
    NB: tl.constexpr = x.shape[0]
    sp = tl.arange(0, SP)
    kp = tl.arange(0, KP)
    x2 = tl.reshape(x, (NB * SP, SP))
    cw, sw = _basis_tile(basis_ptr, sp, kp, S, K, S, inv)  # (SP_w, KP): along w
    tr = tl.dot(x2, cw, input_precision=PREC)  # T[n, h, k] = sum_w x e^{-2 pi i wk/S}
    ti = -tl.dot(x2, sw, input_precision=PREC)
    tr = tl.reshape(tl.permute(tl.reshape(tr, (NB, SP, KP)), (0, 2, 1)), (NB * KP, SP))  # [n, k, h]
    ti = tl.reshape(tl.permute(tl.reshape(ti, (NB, SP, KP)), (0, 2, 1)), (NB * KP, SP))
    # X^T[n, k, m] = sum_h T^T[n, k, h] (cos - i sin)(2 pi hm / S)
    ch, sh = _basis_tile(basis_ptr, sp, sp, S, S, S, inv)  # (SP, SP): along h, symmetric
    xr = tl.dot(tr, ch, input_precision=PREC)
    xr = tl.dot(ti, sh, xr, input_precision=PREC)
    xi = tl.dot(ti, ch, input_precision=PREC)
    xi = tl.dot(-tr, sh, xi, input_precision=PREC)
    return tl.reshape(xr, (NB, KP, SP)), tl.reshape(xi, (NB, KP, SP))


@triton.jit
def _inv_dft(yr, yi, basis_ptr, S, K, inv, SP: tl.constexpr, KP: tl.constexpr, PREC: tl.constexpr):
    # Y^T (NB, KP, SP) [n, k, m] on the half plane -> irfft2(Y, s=(S, S), ortho): (NB, SP, SP) [n, h, w]
    NB: tl.constexpr = yr.shape[0]
    sp = tl.arange(0, SP)
    kp = tl.arange(0, KP)
    yr2 = tl.reshape(yr, (NB * KP, SP))
    yi2 = tl.reshape(yi, (NB * KP, SP))
    # U^T[n, k, h] = sum_m Y^T[n, k, m] (cos + i sin)(2 pi mh / S)
    ch, sh = _basis_tile(basis_ptr, sp, sp, S, S, S, inv)
    ur = tl.dot(yr2, ch, input_precision=PREC)
    ur = tl.dot(-yi2, sh, ur, input_precision=PREC)
    ui = tl.dot(yi2, ch, input_precision=PREC)
    ui = tl.dot(yr2, sh, ui, input_precision=PREC)
    ur = tl.reshape(tl.permute(tl.reshape(ur, (NB, KP, SP)), (0, 2, 1)), (NB * SP, KP))  # [n, h, k]
    ui = tl.reshape(tl.permute(tl.reshape(ui, (NB, KP, SP)), (0, 2, 1)), (NB * SP, KP))
    # y[n, h, w] = sum_k c_k (Ur cos - Ui sin)(2 pi kw / S)   (Im of the k = 0 and S/2 columns drops out);
    # c2r weights c_k: the columns k = 1 .. ceil(S/2)-1 stand for two conjugate frequencies
    ci, si = _basis_tile(basis_ptr, kp, sp, K, S, S, inv)  # (KP, SP_w)
    ck = tl.where((kp == 0) | (2 * kp == S), 1.0, 2.0)
    y = tl.dot(ur, ci * ck[:, None], input_precision=PREC)
    y = tl.dot(-ui, si * ck[:, None], y, input_precision=PREC)
    return tl.reshape(y, (NB, SP, SP))


@triton.jit
def _fam_fused_kernel(x_ptr, w_ptr, y_ptr, basis_ptr, I, O, S, K, sWi, sWo, inv_sqrt_s,
                      DEPTHWISE: tl.constexpr, CONJ: tl.constexpr, OT: tl.constexpr,
                      SP: tl.constexpr, KP: tl.constexpr, PREC: tl.constexpr):
    # y[b, o] = irfft2(sum_i W[i, o] * rfft2(x[b, i]))  (channel mixing), or
    # y[b, c] = irfft2(W[c] * rfft2(x[b, c]))          (depthwise, I == O), all ortho, S x S maps.
    # W is the half-plane weight (..., S, K) complex (mask and symmetrisation folded in), read at
    # element offset i * sWi + o * sWo + m * K + k, conjugated when CONJ (the adjoint for dx).
    # The weight offsets within a channel's tile are int32 (the launcher checks the weight size) on
    # an int64 base pointer, recomputed per channel rather than held in registers.
    b = tl.program_id(0).to(tl.int64)
    o0 = tl.program_id(1) * OT
    ot = tl.arange(0, OT)
    sp = tl.arange(0, SP)
    kp = tl.arange(0, KP)
    o_ok = (o0 + ot) < O
    map_msk = (sp[:, None] < S) & (sp[None, :] < S)
    if DEPTHWISE:
        x_off = ((b * O + o0 + ot)[:, None, None] * S + sp[None, :, None]) * S + sp[None, None, :]
        x = tl.load(x_ptr + x_off, mask=o_ok[:, None, None] & map_msk[None, :, :], other=0.0)
        xr, xi = _fwd_dft(x, basis_ptr, S, K, inv_sqrt_s, SP, KP, PREC)
        w_off = (ot[:, None, None] * sWo + kp[None, :, None] + sp[None, None, :] * K) * 2
        w_msk = o_ok[:, None, None] & (kp[None, :, None] < K) & (sp[None, None, :] < S)
        w_base = w_ptr + (o0 * sWo).to(tl.int64) * 2
        wr = tl.load(w_base + w_off, mask=w_msk, other=0.0)
        wi = tl.load(w_base + w_off + 1, mask=w_msk, other=0.0)
        if CONJ:
            wi = -wi
        acc_r = xr * wr - xi * wi
        acc_i = xr * wi + xi * wr
    else:
        acc_r = tl.full((OT, KP, SP), 0.0, tl.float32)
        acc_i = tl.full((OT, KP, SP), 0.0, tl.float32)
        x_base = x_ptr + b * I * S * S
        w_base = w_ptr + (o0 * sWo).to(tl.int64) * 2
        for i in range(I):
            x = tl.load(x_base + (sp[:, None] * S + sp[None, :]), mask=map_msk, other=0.0)
            xr, xi = _fwd_dft(x[None, :, :], basis_ptr, S, K, inv_sqrt_s, SP, KP, PREC)
            w_off = (ot[:, None, None] * sWo + kp[None, :, None] + sp[None, None, :] * K) * 2
            w_msk = o_ok[:, None, None] & (kp[None, :, None] < K) & (sp[None, None, :] < S)
            wr = tl.load(w_base + w_off, mask=w_msk, other=0.0)
            wi = tl.load(w_base + w_off + 1, mask=w_msk, other=0.0)
            if CONJ:
                wi = -wi
            acc_r += xr * wr - xi * wi
            acc_i += xr * wi + xi * wr
            x_base += S * S
            w_base += sWi * 2
    y = _inv_dft(acc_r, acc_i, basis_ptr, S, K, inv_sqrt_s, SP, KP, PREC)
    y_off = ((b * O + o0 + ot)[:, None, None] * S + sp[None, :, None]) * S + sp[None, None, :]
    tl.store(y_ptr + y_off, y, mask=o_ok[:, None, None] & map_msk[None, :, :])


def fam_filter_fused(x: Tensor, w: Tensor, depthwise: bool, adjoint: bool) -> Tensor:
    """x (B, I, S, S) float32 -> (B, O, S, S) float32: irfft2(mix(W, rfft2(x, ortho)), s=(S, S), ortho).
    w: (I, O, S, S//2+1) complex64 (channel mixing) or (C, S, S//2+1) (depthwise). adjoint=True applies
    the adjoint map (the input gradient): the weight read as conj(w) with in/out swapped."""
    b, i, s, _ = x.shape
    k = s // 2 + 1
    x = x.contiguous()
    wv = _real_view(w.contiguous())
    if depthwise:
        o = i
        s_wi, s_wo = 0, s * k
    elif adjoint:
        o = w.shape[0]
        s_wi, s_wo = s * k, w.shape[1] * s * k
    else:
        o = w.shape[1]
        s_wi, s_wo = o * s * k, s * k
    y = torch.empty((b, o, s, s), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if i == 0:
        return y.zero_()
    if wv.numel() >= 2**31:
        raise ValueError(f"w: the fused kernel indexes the weight with int32 offsets; got {w.numel()} elements")
    sp, kp, ot = fused_tiles(s, o)
    grid = (b, triton.cdiv(o, ot))
    basis = _common.basis("dft", s, torch.float32, x)
    _launch(_fam_fused_kernel, grid, x, wv, y, basis, i, o, s, k, s_wi, s_wo, 1.0 / math.sqrt(s), DEPTHWISE=depthwise, CONJ=adjoint, OT=ot,
                            SP=sp, KP=kp, PREC=_precision(x.dtype), num_warps=8 if sp * kp * ot >= 2048 else 4)
    return y


# --------------------------------------------------------------------------------- FAM half-plane weight
@triton.jit
def _fam_keep(p, q, H, W, RH, RW):
    # M[p, q] of the FAM high-pass box (see csrc/spectral_math.h): 0 when both signed indices lie in -r..r-1
    sp = tl.where(p >= H - H // 2, p - H, p)
    sq = tl.where(q >= W - W // 2, q - W, q)
    band = (sp >= -RH) & (sp <= RH - 1) & (sq >= -RW) & (sq <= RW - 1)
    return band == 0


@triton.jit
def _half_weight_fwd_kernel(w_ptr, o_ptr, total, H, W, K, RH, RW, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < total
    k = idx % K
    m = (idx // K) % H
    pl = idx // (K * H)
    nm = tl.where(m == 0, 0, H - m)
    nk = tl.where(k == 0, 0, W - k)
    a = tl.where(_fam_keep(m, k, H, W, RH, RW), 0.5, 0.0)
    b = tl.where(_fam_keep(nm, nk, H, W, RH, RW), 0.5, 0.0)
    two = tl.arange(0, 2)
    p = tl.load(w_ptr + ((pl * H + m) * W + k)[:, None] * 2 + two[None, :], mask=valid[:, None], other=0.0)
    q = tl.load(w_ptr + ((pl * H + nm) * W + nk)[:, None] * 2 + two[None, :], mask=valid[:, None], other=0.0)
    pr, pi = tl.split(p)
    qr, qi = tl.split(q)
    out = tl.join(a * pr + b * qr, a * pi - b * qi).to(p.dtype)
    tl.store(o_ptr + idx[:, None] * 2 + two[None, :], out, mask=valid[:, None])


@triton.jit
def _half_weight_bwd_kernel(g_ptr, o_ptr, total, H, W, K, RH, RW, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < total
    q = idx % W
    p = (idx // W) % H
    pl = idx // (W * H)
    keep = _fam_keep(p, q, H, W, RH, RW)
    nq = tl.where(q == 0, 0, W - q)
    npp = tl.where(p == 0, 0, H - p)
    two = tl.arange(0, 2)
    m1 = valid & keep & (q < K)
    m2 = valid & keep & (nq < K)
    a = tl.load(g_ptr + ((pl * H + p) * K + q)[:, None] * 2 + two[None, :], mask=m1[:, None], other=0.0)
    b = tl.load(g_ptr + ((pl * H + npp) * K + nq)[:, None] * 2 + two[None, :], mask=m2[:, None], other=0.0)
    ar, ai = tl.split(a)
    br, bi = tl.split(b)
    out = tl.join(0.5 * (ar + br), 0.5 * (ai - bi)).to(a.dtype)
    tl.store(o_ptr + idx[:, None] * 2 + two[None, :], out, mask=valid[:, None])


def fam_half_weight(w: Tensor, cuton: float) -> Tensor:
    w = w.resolve_conj().resolve_neg().contiguous()
    h, wd = w.shape[-2:]
    k = wd // 2 + 1
    out = torch.empty(w.shape[:-1] + (k,), dtype=w.dtype, device=w.device)
    total = out.numel()
    if total:
        block = 1024
        _launch(_half_weight_fwd_kernel, (triton.cdiv(total, block),),
            torch.view_as_real(w), torch.view_as_real(out), total, h, wd, k, fam_mask_radius(h, cuton),
            fam_mask_radius(wd, cuton), BLOCK=block, num_warps=4)
    return out


def fam_half_weight_backward(grad: Tensor, cuton: float, width: int) -> Tensor:
    g = grad.resolve_conj().resolve_neg().contiguous()
    h = g.shape[-2]
    k = width // 2 + 1
    out = torch.empty(g.shape[:-1] + (width,), dtype=g.dtype, device=g.device)
    total = out.numel()
    if total:
        block = 1024
        _launch(_half_weight_bwd_kernel, (triton.cdiv(total, block),),
            torch.view_as_real(g), torch.view_as_real(out), total, h, width, k, fam_mask_radius(h, cuton),
            fam_mask_radius(width, cuton), BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------- the ops
# torch.ops.dctkd_ext_triton.*: the launchers above, with the schemas of the C++ ops (csrc/spectral.cpp, from
# their type hints), plus the fused filter.
OPS = {
    fn.__name__: _common.define_op(fn.__name__, fn)
    for fn in (global_filter, global_filter_backward, spectral_conv, spectral_conv_backward, fam_half_weight,
               fam_half_weight_backward, fam_filter_fused)
}
