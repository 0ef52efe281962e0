"""Triton kernels of local_attention: FAM-KD's per-channel self-attention over K x K windows with
zero-padded keys and values, forward and backward, and the ops
torch.ops.dctkd_ext_triton.{local_attention, local_attention_backward} (the schemas of the C++ ops).

    logit[b,c,p,j] = q[b,c,p] * (k[b,c,p + j - pad] + rel[c,j]),   j = (a, b') in [0, K)^2, pad = K // 2
    out[b,c,p]     = sum_j softmax_j(logit)[j] * v[b,c,p + j - pad]

Out-of-image neighbours take part in the softmax with k = v = 0. Every kernel owns a tile of
(BLOCK_C channels x BLOCK_P pixels) of one sample, the tile's fastest dimension the layout's contiguous
one (pixels for NCHW, channels for channels_last); q, k, v, grad are read in place through their
strides (any layout), outputs are NCHW-contiguous or channels_last after q.

* _fwd_kernel: online softmax over the K*K offsets (running max and sum), fp32 accumulation (fp64 for
  fp64). The exponentials are base 2 on q * log2(e): one multiply per pixel instead of one per offset.
* _bwd_pixel_kernel: per pixel, the softmax again (online), then a second pass over the offsets with
  a_j = exp2(logit2_j - lse2) and dlogit_j = a_j g (v_j - o): dq directly, drel as one partial sum per
  program ((B * pixel tiles, C, K*K), summed over its first dim afterwards: a fixed order, no atomics;
  channels_last tiles of 32 channels x 64 pixels here, so that the rows stay few), and the two
  per-pixel statistics the gather needs: lse2 = log2 sum_j exp2(logit2_j) and go = g * o.
* _bwd_gather_kernel: dk and dv of a target pixel p' sum over the pixels p = p' - j + pad whose window
  holds it: a_j(p) = exp2(q(p) log2(e) (k(p') + rel_j) - lse2(p)), dv = sum a_j(p) g(p) and
  dk = sum a_j(p) q(p) (g(p) v(p') - go(p)). A gather, so every gradient element is written once by
  one program (deterministic); only in-image neighbours p contribute.

The fp32 exponentials are the hardware's exp2 (ex2.approx, relative error ~2^-22): arguments are <= 0
(max subtracted), far below fp32 accumulation's error bound, as in every fused softmax.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._shapes import next_pow2
from . import _common

LOG2E = tl.constexpr(1.4426950408889634)
# Elements per tile: 256 with 4 warps, two per thread.
TILE = 256
NUM_WARPS = 4
# Spatial offsets within one sample are int32 (the batch offset is int64).
_INT32_EXTENT = 2**31 - 1
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _launch(kernel, grid, *args, **kwargs) -> None:
    # through the module attribute, so that the compile check can replace it
    _common.launch(_common.wrap_triton(kernel), grid, *args, **kwargs)


# --------------------------------------------------------------------------------------- device
@triton.jit
def _tile(pid, C, HW, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """(b, pixel tile, channel offsets, pixel offsets) of program pid; consecutive programs walk the
    layout's contiguous dimension (channel tiles for channels_last, pixel tiles for NCHW)."""
    c_tiles = tl.cdiv(C, BLOCK_C)
    p_tiles = tl.cdiv(HW, BLOCK_P)
    per_b = c_tiles * p_tiles
    b = pid // per_b
    r = pid - b * per_b
    if CL:
        pt = r // c_tiles
        ct = r - pt * c_tiles
    else:
        ct = r // p_tiles
        pt = r - ct * p_tiles
    return b, pt, ct * BLOCK_C + tl.arange(0, BLOCK_C), pt * BLOCK_P + tl.arange(0, BLOCK_P)


@triton.jit
def _to_out(x, ptr, RNE_BF16: tl.constexpr):
    """x (fp32 / fp64) in the element type of ptr. RNE_BF16 (interpreter, bf16 outputs only): Triton's
    interpreter truncates fp32 -> bf16, the GPU rounds to nearest even; round the bits first so that
    both give the same values."""
    if RNE_BF16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, u.to(tl.float32, bitcast=True), x)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _softmax_stats(s, kb, vb, rel_ptr, offs_c, mc, m, y, x, H, W, skh, skw, svh, svw, src, srj,
                   K: tl.constexpr, ACC: tl.constexpr):
    """Online softmax over the K*K offsets of logit2_j = s (k_j + rel_j) (s = q log2 e): the running
    max m2, sum l = sum_j exp2(logit2_j - m2) and acc = sum_j exp2(logit2_j - m2) v_j."""
    PAD: tl.constexpr = K // 2
    m2 = tl.full(s.shape, float("-inf"), ACC)
    l = tl.zeros(s.shape, ACC)
    acc = tl.zeros(s.shape, ACC)
    for a in range(K):
        ny = y + (a - PAD)
        in_y = (ny >= 0) & (ny < H)
        for bb in range(K):
            nx = x + (bb - PAD)
            inside = m & (in_y & (nx >= 0) & (nx < W))[None, :]
            kj = tl.load(kb + (ny * skh + nx * skw)[None, :], mask=inside, other=0.0).to(ACC)
            vj = tl.load(vb + (ny * svh + nx * svw)[None, :], mask=inside, other=0.0).to(ACC)
            rj = tl.load(rel_ptr + offs_c * src + (a * K + bb) * srj, mask=mc, other=0.0).to(ACC)
            t = s * (kj + rj[:, None])
            m_new = tl.maximum(m2, t)
            alpha = tl.exp2(m2 - m_new)
            e = tl.exp2(t - m_new)
            l = l * alpha + e
            acc = acc * alpha + e * vj
            m2 = m_new
    return m2, l, acc


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, rel_ptr, out_ptr, C, H, W,
                sqb, sqc, sqh, sqw, skb, skc, skh, skw, svb, svc, svh, svw, sob, soc, soh, sow, src, srj,
                K: tl.constexpr, ACC: tl.constexpr, CL: tl.constexpr, RNE_BF16: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """out on one (BLOCK_C, BLOCK_P) tile. Bytes: q, out once, k and v once plus their halo."""
    HW = H * W
    b, _, offs_c, offs_p = _tile(tl.program_id(0), C, HW, CL, BLOCK_C, BLOCK_P)
    mc = offs_c < C
    y = offs_p // W
    x = offs_p - y * W
    m = mc[:, None] & (offs_p < HW)[None, :]
    b64 = b.to(tl.int64)
    c64 = offs_c.to(tl.int64)[:, None]
    q = tl.load(q_ptr + b64 * sqb + c64 * sqc + (y * sqh + x * sqw)[None, :], mask=m, other=0.0).to(ACC)
    _, l, acc = _softmax_stats(q * LOG2E, k_ptr + b64 * skb + c64 * skc, v_ptr + b64 * svb + c64 * svc,
                               rel_ptr, offs_c, mc, m, y, x, H, W, skh, skw, svh, svw, src, srj, K, ACC)
    o = _common.div_ieee(acc, l)
    tl.store(out_ptr + b64 * sob + c64 * soc + (y * soh + x * sow)[None, :], _to_out(o, out_ptr, RNE_BF16),
             mask=m)


@triton.jit
def _bwd_pixel_kernel(g_ptr, q_ptr, k_ptr, v_ptr, rel_ptr, dq_ptr, lse_ptr, go_ptr, part_ptr, C, H, W,
                      sgb, sgc, sgh, sgw, sqb, sqc, sqh, sqw, skb, skc, skh, skw, svb, svc, svh, svw,
                      sob, soc, soh, sow, src, srj,
                      K: tl.constexpr, ACC: tl.constexpr, CL: tl.constexpr, RNE_BF16: tl.constexpr,
                      NEED_Q: tl.constexpr, NEED_REL: tl.constexpr, NEED_STATS: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-pixel half of the backward on one tile: dq (NEED_Q), the drel partial of this program at
    row b * pixel_tiles + pt of part (NEED_REL), lse2 and g * o (NEED_STATS; strides of dq: so*)."""
    PAD: tl.constexpr = K // 2
    KK: tl.constexpr = K * K
    HW = H * W
    b, pt, offs_c, offs_p = _tile(tl.program_id(0), C, HW, CL, BLOCK_C, BLOCK_P)
    mc = offs_c < C
    y = offs_p // W
    x = offs_p - y * W
    m = mc[:, None] & (offs_p < HW)[None, :]
    b64 = b.to(tl.int64)
    c64 = offs_c.to(tl.int64)[:, None]
    q = tl.load(q_ptr + b64 * sqb + c64 * sqc + (y * sqh + x * sqw)[None, :], mask=m, other=0.0).to(ACC)
    g = tl.load(g_ptr + b64 * sgb + c64 * sgc + (y * sgh + x * sgw)[None, :], mask=m, other=0.0).to(ACC)
    s = q * LOG2E
    kb = k_ptr + b64 * skb + c64 * skc
    vb = v_ptr + b64 * svb + c64 * svc
    m2, l, acc = _softmax_stats(s, kb, vb, rel_ptr, offs_c, mc, m, y, x, H, W, skh, skw, svh, svw, src, srj, K, ACC)
    o = _common.div_ieee(acc, l)
    lse2 = m2 + tl.log2(l)
    out_off = b64 * sob + c64 * soc + (y * soh + x * sow)[None, :]
    if NEED_STATS:
        tl.store(lse_ptr + out_off, lse2, mask=m)
        tl.store(go_ptr + out_off, g * o, mask=m)
    if NEED_Q or NEED_REL:
        dq = tl.zeros(q.shape, ACC)
        row = (b64 * tl.cdiv(HW, BLOCK_P) + pt) * C * KK
        for a in range(K):
            ny = y + (a - PAD)
            in_y = (ny >= 0) & (ny < H)
            for bb in range(K):
                nx = x + (bb - PAD)
                inside = m & (in_y & (nx >= 0) & (nx < W))[None, :]
                kj = tl.load(kb + (ny * skh + nx * skw)[None, :], mask=inside, other=0.0).to(ACC)
                vj = tl.load(vb + (ny * svh + nx * svw)[None, :], mask=inside, other=0.0).to(ACC)
                rj = tl.load(rel_ptr + offs_c * src + (a * K + bb) * srj, mask=mc, other=0.0).to(ACC)
                kr = kj + rj[:, None]
                dl = tl.exp2(s * kr - lse2) * g * (vj - o)
                if NEED_Q:
                    dq += dl * kr
                if NEED_REL:
                    # masked lanes: q = g = 0, so dl * q = 0
                    tl.store(part_ptr + row + offs_c * KK + (a * K + bb), tl.sum(dl * q, axis=1), mask=mc)
        if NEED_Q:
            tl.store(dq_ptr + out_off, _to_out(dq, dq_ptr, RNE_BF16), mask=m)


@triton.jit
def _bwd_gather_kernel(q_ptr, k_ptr, v_ptr, rel_ptr, lse_ptr, go_ptr, g_ptr, dk_ptr, dv_ptr, C, H, W,
                       sqb, sqc, sqh, sqw, skb, skc, skh, skw, svb, svc, svh, svw, sgb, sgc, sgh, sgw,
                       sob, soc, soh, sow, src, srj,
                       K: tl.constexpr, ACC: tl.constexpr, CL: tl.constexpr, RNE_BF16: tl.constexpr,
                       NEED_K: tl.constexpr, NEED_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dk and dv of the tile's target pixels p', gathered from the pixels p = p' - j + pad that see p'
    at offset j (in-image p only); lse2, g * o and the outputs share the strides so*."""
    PAD: tl.constexpr = K // 2
    HW = H * W
    b, _, offs_c, offs_p = _tile(tl.program_id(0), C, HW, CL, BLOCK_C, BLOCK_P)
    mc = offs_c < C
    y = offs_p // W
    x = offs_p - y * W
    m = mc[:, None] & (offs_p < HW)[None, :]
    b64 = b.to(tl.int64)
    c64 = offs_c.to(tl.int64)[:, None]
    kt = tl.load(k_ptr + b64 * skb + c64 * skc + (y * skh + x * skw)[None, :], mask=m, other=0.0).to(ACC)
    vt = tl.load(v_ptr + b64 * svb + c64 * svc + (y * svh + x * svw)[None, :], mask=m, other=0.0).to(ACC)
    qb = q_ptr + b64 * sqb + c64 * sqc
    gb = g_ptr + b64 * sgb + c64 * sgc
    ob = b64 * sob + c64 * soc
    dk = tl.zeros(kt.shape, ACC)
    dv = tl.zeros(kt.shape, ACC)
    for a in range(K):
        ny = y - (a - PAD)
        in_y = (ny >= 0) & (ny < H)
        for bb in range(K):
            nx = x - (bb - PAD)
            inside = m & (in_y & (nx >= 0) & (nx < W))[None, :]
            qn = tl.load(qb + (ny * sqh + nx * sqw)[None, :], mask=inside, other=0.0).to(ACC)
            gn = tl.load(gb + (ny * sgh + nx * sgw)[None, :], mask=inside, other=0.0).to(ACC)
            sn = ob + (ny * soh + nx * sow)[None, :]
            lse2 = tl.load(lse_ptr + sn, mask=inside, other=0.0)
            rj = tl.load(rel_ptr + offs_c * src + (a * K + bb) * srj, mask=mc, other=0.0).to(ACC)
            an = tl.where(inside, tl.exp2(qn * LOG2E * (kt + rj[:, None]) - lse2), 0.0)
            if NEED_V:
                dv += an * gn
            if NEED_K:
                gon = tl.load(go_ptr + sn, mask=inside, other=0.0)
                dk += an * qn * (gn * vt - gon)
    out_off = b64 * sob + c64 * soc + (y * soh + x * sow)[None, :]
    if NEED_K:
        tl.store(dk_ptr + out_off, _to_out(dk, dk_ptr, RNE_BF16), mask=m)
    if NEED_V:
        tl.store(dv_ptr + out_off, _to_out(dv, dv_ptr, RNE_BF16), mask=m)


# ------------------------------------------------------------------------------------ launchers
def _check_features(t: Tensor, name: str, like: Tensor = None) -> None:
    if like is None:
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D (B, C, H, W) tensor, got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {t.dtype}")
        return
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} like q, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} like q, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device} like q, got one on {t.device}")


def _extent(t: Tensor) -> int:
    """The largest spatial/channel offset of one sample, in elements (the kernels index it in int32)."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]) if n > 0)


def check_args(q: Tensor, k: Tensor, v: Tensor, rel: Tensor, kernel_size: int) -> None:
    """The invariants the kernels index by (as csrc/local_attention_common.h): ValueError / TypeError
    naming the argument."""
    _check_features(q, "q")
    _check_features(k, "k", q)
    _check_features(v, "v", q)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd integer >= 1, got {kernel_size!r}")
    c, kk = q.shape[1], kernel_size * kernel_size
    if rel.dim() != 2 or tuple(rel.shape) != (c, kk):
        raise ValueError(f"rel: expected shape ({c}, {kk}) = (C, kernel_size**2), got {tuple(rel.shape)}")
    if rel.dtype not in (torch.float32, torch.float64, q.dtype):
        raise TypeError(f"rel: expected a float32/float64 tensor (or q's dtype {q.dtype}), got {rel.dtype}")
    if rel.device != q.device:
        raise ValueError(f"rel: expected a tensor on {q.device} like q, got one on {rel.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if _extent(t) > _INT32_EXTENT:
            raise ValueError(f"{name}: one sample spans more than 2**31 elements; the kernels index it in int32")


def _new_like(q: Tensor, dtype: torch.dtype) -> Tensor:
    """An output of q's shape: channels_last when q is (and not also NCHW-contiguous), else NCHW."""
    fmt = torch.channels_last if _common.is_channels_last(q) else torch.contiguous_format
    return torch.empty(q.shape, dtype=dtype, device=q.device, memory_format=fmt)


def _plan(q: Tensor, kernel_size: int, drel_rows: bool = False):
    """(programs, pixel tiles, the launches' constexpr and launch options) for q's shape and layout.
    drel_rows: the tiles of the per-pixel backward, whose programs each write one drel partial row per
    (sample, pixel tile): at least 64 pixels per tile, so that the rows stay few (channels_last)."""
    _, c, h, w = (int(n) for n in q.shape)
    cl = _common.is_channels_last(q)
    warps = NUM_WARPS
    if cl and drel_rows:  # 32 channels x 64 pixels (8 warps)
        block_c = min(32, next_pow2(max(c, 1)))
        block_p = max(64, TILE // block_c)
        warps = 2 * NUM_WARPS if block_c * block_p > TILE else NUM_WARPS
    elif cl:  # channels contiguous: up to 64 of them, the rest of the tile in pixels
        block_c = min(64, next_pow2(max(c, 1)))
        block_p = TILE // block_c
    else:  # pixels contiguous; small maps put several channels in one tile
        block_p = min(TILE, max(16, next_pow2(max(h * w, 1))))
        block_c = min(TILE // block_p, next_pow2(max(c, 1)))
    p_tiles = triton.cdiv(h * w, block_p)
    meta = dict(K=kernel_size, ACC=tl.float64 if q.dtype == torch.float64 else tl.float32, CL=cl,
                RNE_BF16=_common.INTERPRET and q.dtype == torch.bfloat16, BLOCK_C=block_c, BLOCK_P=block_p,
                num_warps=warps)
    return q.shape[0] * triton.cdiv(c, block_c) * p_tiles, p_tiles, meta


def local_attention(q: Tensor, k: Tensor, v: Tensor, rel: Tensor, kernel_size: int) -> Tensor:
    check_args(q, k, v, rel, kernel_size)
    out = _new_like(q, q.dtype)
    programs, _, meta = _plan(q, kernel_size)
    if out.numel() == 0:
        return out
    _launch(_fwd_kernel, (programs,), q, k, v, rel, out, q.shape[1], q.shape[2], q.shape[3],
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *rel.stride(), **meta)
    return out


def local_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, rel: Tensor, kernel_size: int,
                             need_q: bool, need_k: bool, need_v: bool,
                             need_rel: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    check_args(q, k, v, rel, kernel_size)
    _check_features(grad, "grad", q)
    acc_dtype = _common.acc_dtype(q)
    dq = _new_like(q, q.dtype) if need_q else q.new_empty((0,))
    dk = _new_like(q, q.dtype) if need_k else q.new_empty((0,))
    dv = _new_like(q, q.dtype) if need_v else q.new_empty((0,))
    programs, p_tiles, meta = _plan(q, kernel_size, drel_rows=True)
    b, c = q.shape[0], q.shape[1]
    kk = kernel_size * kernel_size
    part = torch.empty((b * p_tiles, c, kk) if need_rel else (0,), dtype=acc_dtype, device=q.device)
    need_stats = need_k or need_v
    lse = _new_like(q, acc_dtype) if need_stats else part
    go = _new_like(q, acc_dtype) if need_stats else part
    if programs > 0 and (need_q or need_rel or need_stats):
        so = (dq if need_q else lse).stride() if (need_q or need_stats) else q.stride()
        _launch(_bwd_pixel_kernel, (programs,), grad, q, k, v, rel, dq if need_q else lse, lse, go, part,
                c, q.shape[2], q.shape[3], *grad.stride(), *q.stride(), *k.stride(), *v.stride(), *so,
                *rel.stride(), NEED_Q=need_q, NEED_REL=need_rel, NEED_STATS=need_stats, **meta)
        if need_stats:
            programs, _, meta = _plan(q, kernel_size)
            _launch(_bwd_gather_kernel, (programs,), q, k, v, rel, lse, go, grad, dk if need_k else lse,
                    dv if need_v else lse, c, q.shape[2], q.shape[3], *q.stride(), *k.stride(), *v.stride(),
                    *grad.stride(), *lse.stride(), *rel.stride(), NEED_K=need_k, NEED_V=need_v, **meta)
    if need_rel:
        # the programs' partials in a fixed order (B = 0 or an empty map: zeros)
        drel = part.sum(0).to(rel.dtype)
    else:
        drel = rel.new_empty((0,))
    return dq, dk, dv, drel


# ---------------------------------------------------------------------------------------------- the ops
# torch.ops.dctkd_ext_triton.*: the schemas of csrc/local_attention.cpp (from the type hints).
def _op_local_attention(q: Tensor, k: Tensor, v: Tensor, rel: Tensor, kernel_size: int) -> Tensor:
    return local_attention(q, k, v, rel, kernel_size)


def _op_local_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, rel: Tensor, kernel_size: int,
                                 need_q: bool, need_k: bool, need_v: bool,
                                 need_rel: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return local_attention_backward(grad, q, k, v, rel, kernel_size, need_q, need_k, need_v, need_rel)


OPS = {
    name: _common.define_op(name, fn)
    for name, fn in (
        ("local_attention", _op_local_attention),
        ("local_attention_backward", _op_local_attention_backward),
    )
}
