"""Triton kernels of the multi-level DCT-KD loss (docs/DESIGN.md §3.3).

Forward, three launches for up to MAX_SLOTS levels (more levels: more launches of the same):
  (a) attention_map.reduce_kernel: the maps of S and T of every level, into one fp32 buffer
      (the only pass over the features: all the bytes are here);
  (b) phi_kernel: one program per (level, sample) for all levels: phi of both maps (normalise,
      centre, transform, abs, normalise), the distance, and by hand-written reverse mode
      dL_b/dA_S (the gradient w.r.t. the student's map, saved for backward), as
      csrc/cpu/dct_at_loss.cpp does: first index wins min/max ties, l2 distance 0 -> gradient 0;
  (c) the per-sample loss sum_l w_l dist_l (a sum over the small (L, B) table).
Backward, one launch: attention_map.backward_kernel, dS = g[b] * dL/dA[b,h,w] * (p/C) |S|^(p-1) sign(S)
for every level.

Two exact identities keep fp32 close to the float64 reference when the map is centred (and the
transform is dct or fft_real): the DC coefficient of a zero-mean map is 0, so it is stored as 0
rather than as rounding noise (which could even win the coefficients' min); and the gradient that
reaches the DC coefficient maps back to a constant, which the centring's backward removes, so it is
dropped before the transposed transform rather than subtracted in fp32 afterwards (which cost ~1e-5
of relative error at 56 x 56; the results are otherwise the same).
"""

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    MAX_SLOTS,
    acc_dtype,
    basis,
    chunks,
    define_op,
    div_ieee,
    kernel_layout,
    launch,
    slot_args,
    sqrt_ieee,
    wrap_triton,
)
from .attention_map import backward_into, reduce_into
from .dct import (
    K_CHUNK,
    NUM_STAGES,
    TRANSFORMS,
    load_tile,
    plan,
    scalar,
    stats_init,
    stats_update,
    store_tile,
    tile_index,
    transform_map,
)

# option codes: the ABI of the kernels (= dctkd::Norm / dctkd::Distance in csrc/dctkd_math.h)
NORMS = {"none": 0, "minmax": 1, "max": 2, "l2": 3}
DISTANCES = {"l2": 0, "mse": 1, "sse": 2}
# scratch maps per (level, sample): u / coefficient gradient, c_S, c_T, and the transform's
# intermediates (one for dct, two for fft_real; used only by maps larger than one tile)
NBUF = {0: 3, 1: 4, 2: 5}
# Maps held in registers whole by phi: up to 16 x 16 (sm_90 builds, 4 levels of ResNet sizes, 8 warps,
# no pipelining: 128 / 166 / 80 registers a thread for dct / paper / at, no spills; 32 x 32 would spill).
PHI_REG_TILE = 16 * 16


# ---------------------------------------------------------------------------------- device helpers
@triton.jit
def _as_acc(n, ACC: tl.constexpr):
    return scalar(0.0, ACC) + n


@triton.jit
def _to_acc(v, ACC: tl.constexpr):
    """v (an fp64 scalar argument, or a Python float in the interpreter) rounded once to ACC."""
    return (scalar(0.0, ACC) + v).to(ACC)


@triton.jit
def _norm_params(lo, hi, ss, KIND: tl.constexpr, eps):
    """u = (x - shift) / denom for the normalisation KIND (none, minmax, max, l2); nrm = ||x||_2."""
    zero = lo * 0.0
    if KIND == 0:
        return zero, zero + 1.0, zero
    elif KIND == 1:
        return lo, hi - lo + eps, zero
    elif KIND == 2:
        return lo, hi + eps, zero
    else:
        nrm = sqrt_ieee(ss)
        return zero, nrm + eps, nrm


@triton.jit
def _norm_backward(g, x, idx, sum_g, sum_gu, denom, nrm, imin, imax, KIND: tl.constexpr):
    """Gradient w.r.t. the input x of u = (x - shift) / denom (the normalisation KIND), given the
    output gradient g and the sums over the map of g and g*u. min/max gradients go to the first
    index; the l2 norm's gradient is 0 at x = 0 (as csrc/cpu/dct_at_loss.cpp norm_backward)."""
    if KIND == 0:
        return g
    else:
        gin = div_ieee(g, denom)
        if KIND == 3:
            coef = tl.where(nrm > 0, div_ieee(-sum_gu, denom * tl.where(nrm > 0, nrm, 1.0)), 0.0)
            gin += coef * x
        else:
            if KIND == 1:
                cmin = div_ieee(sum_gu - sum_g, denom)
            else:
                cmin = div_ieee(-sum_g, denom)
            gin += tl.where(idx == imin, cmin, 0.0)
            gin += tl.where(idx == imax, div_ieee(-sum_gu, denom), 0.0)
        return gin


@triton.jit
def _map_forward(a_ptr, u_ptr, c_ptr, t1_ptr, t2_ptr, bh_ptr, bw_ptr, H, W, eps,
                 MAP_NORM: tl.constexpr, CENTER: tl.constexpr, TRANSFORM: tl.constexpr,
                 COEF_ABS: tl.constexpr, REGS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, KB: tl.constexpr,
                 ACC: tl.constexpr):
    """phi up to the coefficients: writes c = T(u - mean u), u = norm(a), to c_ptr (u to u_ptr).
    Returns the map normalisation (shift, denom, nrm, argmin, argmax) and the statistics of
    c (of |c| with COEF_ABS): (min, argmin, max, argmax, sum of squares)."""
    lo, ilo, hi, ihi, ss, s = stats_init(ACC)
    for i0 in range(0, H, TH):
        for j0 in range(0, W, TW):
            a = load_tile(a_ptr, H, W, i0, j0, 0.0, TH, TW, ACC, False)
            idx, valid = tile_index(H, W, i0, j0, TH, TW)
            lo, ilo, hi, ihi, ss, s = stats_update(a, idx, valid, lo, ilo, hi, ihi, ss, s)
    shift, denom, nrm = _norm_params(lo, hi, ss, MAP_NORM, eps)
    su = scalar(0.0, ACC)
    for i0 in range(0, H, TH):
        for j0 in range(0, W, TW):
            a = load_tile(a_ptr, H, W, i0, j0, 0.0, TH, TW, ACC, False)
            idx, valid = tile_index(H, W, i0, j0, TH, TW)
            u = tl.where(valid, div_ieee(a - shift, denom), 0.0)
            su += tl.sum(tl.sum(u, axis=1), axis=0)
            store_tile(u_ptr, H, W, i0, j0, u, TH, TW)
    if CENTER:
        mean = div_ieee(su, _as_acc(H * W, ACC))
    else:
        mean = su * 0.0
    tl.debug_barrier()
    # centred input: the DC coefficient is exactly 0 (set it so, rather than to rounding noise)
    clo, cilo, chi, cihi, css, cs = transform_map(u_ptr, c_ptr, t1_ptr, t2_ptr, bh_ptr, bw_ptr, H, W, mean,
                                                  TRANSFORM, False, REGS, COEF_ABS, True,
                                                  CENTER and TRANSFORM != 0, TH, TW, KB, ACC)
    tl.debug_barrier()
    return shift, denom, nrm, ilo, ihi, clo, cilo, chi, cihi, css


@triton.jit
def _coef(c, COEF_ABS: tl.constexpr):
    if COEF_ABS:
        return tl.abs(c)
    else:
        return c


@triton.jit
def _phi_level(b, maps_ptr, scr_ptr, dist_ptr, gmap_ptr, bh_ptr, bw_ptr, B, H, W, weight, map_off, scr_off,
               eps, MAP_NORM: tl.constexpr, CENTER: tl.constexpr, TRANSFORM: tl.constexpr,
               COEF_ABS: tl.constexpr, COEF_NORM: tl.constexpr, DISTANCE: tl.constexpr,
               NB: tl.constexpr, REGS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, KB: tl.constexpr):
    """Sample b of one level: dist_ptr[b] = w * dist(phi(A_S), phi(A_T)) and gmap[b] = w * d dist / d A_S."""
    ACC: tl.constexpr = maps_ptr.dtype.element_ty
    # eps and the weight arrive as fp64 (exact for an fp64 loss); fp32 losses round them once here
    eps = _to_acc(eps, ACC)
    weight = _to_acc(weight, ACC)
    n = H * W
    a_s = maps_ptr + map_off + b * n
    a_t = maps_ptr + map_off + (B + b) * n
    scr = scr_ptr + scr_off + b.to(tl.int64) * (NB * n)
    u_buf = scr
    cs_buf = scr + n
    ct_buf = scr + 2 * n
    t1_buf = scr + 3 * n
    t2_buf = scr + 4 * n  # fft_real only (NB = 5)

    # ---- forward: phi(A_S), phi(A_T) up to the coefficients, and the coefficient normalisations
    s1, d1, n1, ilo1, ihi1, clo, cilo, chi, cihi, css = _map_forward(
        a_s, u_buf, cs_buf, t1_buf, t2_buf, bh_ptr, bw_ptr, H, W, eps,
        MAP_NORM, CENTER, TRANSFORM, COEF_ABS, REGS, TH, TW, KB, ACC)
    s2, d2, n2 = _norm_params(clo, chi, css, COEF_NORM, eps)
    ilo2 = cilo
    ihi2 = cihi
    _s1, _d1, _n1, _i1, _j1, tlo, _ti, thi, _tj, tss = _map_forward(
        a_t, u_buf, ct_buf, t1_buf, t2_buf, bh_ptr, bw_ptr, H, W, eps,
        MAP_NORM, CENTER, TRANSFORM, COEF_ABS, REGS, TH, TW, KB, ACC)
    s2t, d2t, _n2t = _norm_params(tlo, thi, tss, COEF_NORM, eps)

    # ---- distance, and the sums the coefficient normalisation's backward needs
    ss = scalar(0.0, ACC)
    sd = scalar(0.0, ACC)
    sdz = scalar(0.0, ACC)
    for i0 in range(0, H, TH):
        for j0 in range(0, W, TW):
            idx, valid = tile_index(H, W, i0, j0, TH, TW)
            zs = div_ieee(_coef(load_tile(cs_buf, H, W, i0, j0, 0.0, TH, TW, ACC, True), COEF_ABS) - s2, d2)
            zt = div_ieee(_coef(load_tile(ct_buf, H, W, i0, j0, 0.0, TH, TW, ACC, True), COEF_ABS) - s2t, d2t)
            diff = tl.where(valid, zs - zt, 0.0)
            ss += tl.sum(tl.sum(diff * diff, axis=1), axis=0)
            sd += tl.sum(tl.sum(diff, axis=1), axis=0)
            sdz += tl.sum(tl.sum(diff * zs, axis=1), axis=0)
    if DISTANCE == 0:  # l2; at exactly 0 the gradient is 0
        dist = sqrt_ieee(ss)
        gscale = tl.where(dist > 0, div_ieee(weight, tl.where(dist > 0, dist, 1.0)), 0.0)
    elif DISTANCE == 1:  # mse
        dist = div_ieee(ss, _as_acc(n, ACC))
        gscale = div_ieee(weight * 2.0, _as_acc(n, ACC))
    else:  # sse
        dist = ss
        gscale = ss * 0.0 + weight * 2.0
    tl.store(dist_ptr + b, weight * dist)
    sum_g = gscale * sd
    sum_gu = gscale * sdz

    # ---- backward: coefficient normalisation, abs -> gradient of c, written over u
    for i0 in range(0, H, TH):
        for j0 in range(0, W, TW):
            idx, valid = tile_index(H, W, i0, j0, TH, TW)
            c = load_tile(cs_buf, H, W, i0, j0, 0.0, TH, TW, ACC, True)
            cabs = _coef(c, COEF_ABS)
            zs = div_ieee(cabs - s2, d2)
            zt = div_ieee(_coef(load_tile(ct_buf, H, W, i0, j0, 0.0, TH, TW, ACC, True), COEF_ABS) - s2t, d2t)
            g = tl.where(valid, (zs - zt) * gscale, 0.0)
            g = _norm_backward(g, cabs, idx, sum_g, sum_gu, d2, n2, ilo2, ihi2, COEF_NORM)
            if COEF_ABS:  # d|c|/dc = sign(c), 0 at 0
                g = tl.where(c > 0, g, tl.where(c < 0, -g, 0.0))
            if CENTER and TRANSFORM != 0:
                # the DC coefficient's gradient maps to a constant, which the centring removes exactly:
                # drop it here instead of subtracting a large constant in fp32 later
                g = tl.where(idx == 0, 0.0, g)
            store_tile(u_buf, H, W, i0, j0, g, TH, TW)
    tl.debug_barrier()
    # ---- transform's transpose -> gradient of the centred map, written over c_S
    _lo, _il, _hi, _ih, _ss, sg = transform_map(u_buf, cs_buf, t1_buf, t2_buf, bh_ptr, bw_ptr, H, W, 0.0,
                                                TRANSFORM, True, REGS, False, True, False, TH, TW, KB, ACC)
    tl.debug_barrier()
    if CENTER:
        gmean = div_ieee(sg, _as_acc(n, ACC))
    else:
        gmean = sg * 0.0
    # ---- map normalisation's backward -> dL/dA_S
    sum_g1 = scalar(0.0, ACC)
    sum_gu1 = scalar(0.0, ACC)
    if MAP_NORM != 0:
        for i0 in range(0, H, TH):
            for j0 in range(0, W, TW):
                idx, valid = tile_index(H, W, i0, j0, TH, TW)
                g = load_tile(cs_buf, H, W, i0, j0, gmean, TH, TW, ACC, True)
                u = tl.where(valid, div_ieee(load_tile(a_s, H, W, i0, j0, 0.0, TH, TW, ACC, False) - s1, d1), 0.0)
                if not CENTER:  # a centred gradient sums to 0 exactly
                    sum_g1 += tl.sum(tl.sum(g, axis=1), axis=0)
                sum_gu1 += tl.sum(tl.sum(g * u, axis=1), axis=0)
    out = gmap_ptr + b * n
    for i0 in range(0, H, TH):
        for j0 in range(0, W, TW):
            idx, valid = tile_index(H, W, i0, j0, TH, TW)
            g = load_tile(cs_buf, H, W, i0, j0, gmean, TH, TW, ACC, True)
            a = load_tile(a_s, H, W, i0, j0, 0.0, TH, TW, ACC, False)
            g = _norm_backward(g, a, idx, sum_g1, sum_gu1, d1, n1, ilo1, ihi1, MAP_NORM)
            store_tile(out, H, W, i0, j0, g, TH, TW)


# B and the offsets that grow with it are not specialised (no new variant for a new batch size).
@triton.jit(do_not_specialize=["dist_off", "B"] + [f"{n}{i}" for n in "MS" for i in range(8)])
def phi_kernel(maps_ptr, scr_ptr, dist_ptr, dist_off, B, eps: tl.float64,
               g0, bh0, bw0, H0, W0, w0: tl.float64, M0, S0, g1, bh1, bw1, H1, W1, w1: tl.float64, M1, S1,
               g2, bh2, bw2, H2, W2, w2: tl.float64, M2, S2, g3, bh3, bw3, H3, W3, w3: tl.float64, M3, S3,
               g4, bh4, bw4, H4, W4, w4: tl.float64, M4, S4, g5, bh5, bw5, H5, W5, w5: tl.float64, M5, S5,
               g6, bh6, bw6, H6, W6, w6: tl.float64, M6, S6, g7, bh7, bw7, H7, W7, w7: tl.float64, M7, S7,
               NS: tl.constexpr, MAP_NORM: tl.constexpr, CENTER: tl.constexpr, TRANSFORM: tl.constexpr,
               COEF_ABS: tl.constexpr, COEF_NORM: tl.constexpr, DISTANCE: tl.constexpr, NB: tl.constexpr,
               KB: tl.constexpr,
               O0: tl.constexpr, TH0: tl.constexpr, TW0: tl.constexpr, O1: tl.constexpr, TH1: tl.constexpr,
               TW1: tl.constexpr, O2: tl.constexpr, TH2: tl.constexpr, TW2: tl.constexpr, O3: tl.constexpr,
               TH3: tl.constexpr, TW3: tl.constexpr, O4: tl.constexpr, TH4: tl.constexpr, TW4: tl.constexpr,
               O5: tl.constexpr, TH5: tl.constexpr, TW5: tl.constexpr, O6: tl.constexpr, TH6: tl.constexpr,
               TW6: tl.constexpr, O7: tl.constexpr, TH7: tl.constexpr, TW7: tl.constexpr):
    """phi, distance and dL/dA_S of NS levels in one launch: program (level l, sample b) = l * B + b.

    Level l: maps at maps_ptr + M_l (the B student maps, then the B teacher maps, H_l x W_l each),
    bases bh_l / bw_l, weight w_l, scratch at scr_ptr + S_l (NB maps per sample), output gmap g_l
    (B, H_l, W_l) and dist_ptr[dist_off + l * B + b] = w_l dist_l. Tiles (TH_l, TW_l); O_l: the map
    is held in registers (dct.plan); KB: K per tl.dot otherwise.
    Per program: reads the 2 maps (2 H W fp32) and writes the gradient map (H W); its passes re-read
    the maps and move ~20 H W of scratch (L1/L2-resident), plus the transform's intermediates
    (t1, t2) for maps larger than 16 x 16. Flops: 3 transforms of 2 H W (H + W) each (twice that for fft_real), on the
    tile-padded sizes; the rest is O(H W). Latency-bound: the feature reduction (a) dominates."""
    pid = tl.program_id(0)
    lvl = pid // B
    b = pid - lvl * B
    dist_ptr += dist_off
    if lvl == 0:
        _phi_level(b, maps_ptr, scr_ptr, dist_ptr, g0, bh0, bw0, B, H0, W0, w0, M0, S0, eps,
                   MAP_NORM, CENTER, TRANSFORM, COEF_ABS, COEF_NORM, DISTANCE, NB, O0, TH0, TW0, KB)
    if NS > 1:
        if lvl == 1:
            _phi_level(b, maps_ptr, scr_ptr, dist_ptr + B, g1, bh1, bw1, B, H1, W1, w1, M1, S1, eps,
                       MAP_NORM, CENTER, TRANSFORM, COEF_ABS, COEF_NORM, DISTANCE, NB, O1, TH1, TW1, KB)
    if NS > 2:
        if lvl == 2:
            _phi_level(b, maps_ptr, scr_ptr, dist_ptr + 2 * B, g2, bh2, bw2, B, H2, W2, w2, M2, S2, eps,
                       MAP_NORM, CENTER, TRANSFORM, COEF_ABS, COEF_NORM, DISTANCE, NB, O2, TH2, TW2, KB)
    if NS > 3:
        if lvl == 3:
            _phi_level(b, maps_ptr, scr_ptr, dist_ptr + 3 * B, g3, bh3, bw3, B, H3, W3, w3, M3, S3, eps,
                       MAP_NORM, CENTER, TRANSFORM, COEF_ABS, COEF_NORM, DISTANCE, NB, O3, TH3, TW3, KB)
    if NS > 4:
        if lvl == 4:
            _phi_level(b, maps_ptr, scr_ptr, dist_ptr + 4 * B, g4, bh4, bw4, B, H4, W4, w4, M4, S4, eps,
                       MAP_NORM, CENTER, TRANSFORM, COEF_ABS, COEF_NORM, DISTANCE, NB, O4, TH4, TW4, KB)
    if NS > 5:
        if lvl == 5:
            _phi_level(b, maps_ptr, scr_ptr, dist_ptr + 5 * B, g5, bh5, bw5, B, H5, W5, w5, M5, S5, eps,
                       MAP_NORM, CENTER, TRANSFORM, COEF_ABS, COEF_NORM, DISTANCE, NB, O5, TH5, TW5, KB)
    if NS > 6:
        if lvl == 6:
            _phi_level(b, maps_ptr, scr_ptr, dist_ptr + 6 * B, g6, bh6, bw6, B, H6, W6, w6, M6, S6, eps,
                       MAP_NORM, CENTER, TRANSFORM, COEF_ABS, COEF_NORM, DISTANCE, NB, O6, TH6, TW6, KB)
    if NS > 7:
        if lvl == 7:
            _phi_level(b, maps_ptr, scr_ptr, dist_ptr + 7 * B, g7, bh7, bw7, B, H7, W7, w7, M7, S7, eps,
                       MAP_NORM, CENTER, TRANSFORM, COEF_ABS, COEF_NORM, DISTANCE, NB, O7, TH7, TW7, KB)


# ------------------------------------------------------------------------------------------- host
def _option(table, value, name):
    if value not in table:
        raise ValueError(f"{name}: expected one of {', '.join(repr(k) for k in table)}, got {value!r}")
    return table[value]


# The invariants the launchers rely on: the set csrc/dct_at_args.h asserts for the C++ kernels, so that
# every backend rejects the same direct op calls. The user-facing checks are dctkd_ext/ops/dct_at.py's.
def _check_level_tensor(x, name, device):
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one channel")
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {x.device}")


def _check_levels(student, teacher, weights):
    if len(student) == 0:
        raise ValueError("student_feats: expected a non-empty list of (B, C, H, W) tensors")
    if len(teacher) != len(student):
        raise ValueError(f"teacher_feats: expected {len(student)} levels to match student_feats, got {len(teacher)}")
    if len(weights) != len(student):
        raise ValueError(f"weights: expected {len(student)} values, got {len(weights)}")
    dev = student[0].device
    for l, (s, t) in enumerate(zip(student, teacher)):
        _check_level_tensor(s, f"student_feats[{l}]", dev)
        _check_level_tensor(t, f"teacher_feats[{l}]", dev)
        if s.shape[0] != student[0].shape[0]:
            raise ValueError(f"student_feats[{l}]: expected batch {student[0].shape[0]}, got {s.shape[0]}")
        if (t.shape[0], t.shape[2], t.shape[3]) != (s.shape[0], s.shape[2], s.shape[3]):
            raise ValueError(f"teacher_feats[{l}]: expected B, H, W = {(s.shape[0], s.shape[2], s.shape[3])} "
                             f"to match student_feats[{l}], got shape {tuple(t.shape)}")


def _check_backward_levels(grad_loss, grad_maps, student):
    if len(grad_maps) != len(student):
        raise ValueError(f"grad_maps: expected {len(student)} levels, got {len(grad_maps)}")
    if grad_loss.dim() != 1:
        raise ValueError(f"grad_loss: expected a 1-D (B,) tensor, got shape {tuple(grad_loss.shape)}")
    if not grad_loss.is_floating_point():
        raise TypeError(f"grad_loss: expected a floating tensor, got {grad_loss.dtype}")
    for l, (g, s) in enumerate(zip(grad_maps, student)):
        _check_level_tensor(s, f"student[{l}]", grad_loss.device)
        b, _, h, w = s.shape
        if grad_loss.shape[0] != b:
            raise ValueError(f"grad_loss: expected {b} values, got {grad_loss.shape[0]}")
        if tuple(g.shape) != (b, h, w):
            raise ValueError(f"grad_maps[{l}]: expected shape {(b, h, w)} to match student[{l}], got {tuple(g.shape)}")
        if not g.is_floating_point():
            raise TypeError(f"grad_maps[{l}]: expected a floating tensor, got {g.dtype}")
        if g.device != grad_loss.device:
            raise ValueError(f"grad_maps[{l}]: expected a tensor on {grad_loss.device}, got one on {g.device}")


def _dct_at_loss(student: List[torch.Tensor], teacher: List[torch.Tensor], weights: List[float], p: float,
                 map_norm: str, center: bool, transform: str, coef_abs: bool, coef_norm: str, distance: str,
                 eps: float) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    _check_levels(student, teacher, weights)
    if not p > 0:
        raise ValueError(f"p: expected a positive exponent, got {p}")
    if not eps >= 0:
        raise ValueError(f"eps: expected a non-negative value, got {eps}")
    n1, n2 = _option(NORMS, map_norm, "map_norm"), _option(NORMS, coef_norm, "coef_norm")
    tr, dist_code = _option(TRANSFORMS, transform, "transform"), _option(DISTANCES, distance, "distance")
    acc = acc_dtype(*student, *teacher)
    dev = student[0].device
    bsz = int(student[0].shape[0])  # concrete sizes (specialised when traced)
    sizes = [(int(s.shape[2]), int(s.shape[3])) for s in student]
    plans = [plan(h, w, PHI_REG_TILE) for h, w in sizes]  # (TH, TW, in registers?)
    nb = NBUF[0] if all(regs for _, _, regs in plans) else NBUF[tr]  # the transform's scratch if needed

    # (a) the maps of S and T of every level, in one buffer: level l at map_off[l], its B student
    # maps then its B teacher maps. One launch for all (up to MAX_SLOTS tensors per launch).
    map_off, scr_off, total_maps, total_scr = [], [], 0, 0
    for h, w in sizes:
        map_off.append(total_maps)
        scr_off.append(total_scr)
        total_maps += 2 * bsz * h * w
        total_scr += nb * bsz * h * w
    maps = torch.empty(total_maps, dtype=acc, device=dev)
    items = []
    for l, (s, t) in enumerate(zip(student, teacher)):
        items.append((kernel_layout(s), map_off[l]))
        items.append((kernel_layout(t), map_off[l] + bsz * sizes[l][0] * sizes[l][1]))
    reduce_into(maps, items, p, mean=True)

    # (b) phi, distances and dL/dA_S: one program per (level, sample), all levels in one launch.
    # Levels with empty maps contribute 0 (as the CPU kernel): the kernel sees the others only,
    # and row k of `dist` holds w_l dist_l of the k-th of them.
    grad_maps = [torch.empty((bsz, h, w), dtype=acc, device=dev) for h, w in sizes]
    scratch = torch.empty(total_scr, dtype=acc, device=dev)
    live = [l for l, (h, w) in enumerate(sizes) if h * w > 0]
    dist = torch.empty((len(live), bsz), dtype=acc, device=dev)
    for k, part in enumerate(chunks(live)):
        slots, consts = [], {}
        for i, l in enumerate(part):
            (h, w), (th, tw, regs) = sizes[l], plans[l]
            if tr == TRANSFORMS["identity"]:
                bh = bw = maps  # not read
            else:
                kind = "dct" if tr == TRANSFORMS["dct"] else "dft"
                bh, bw = basis(kind, h, acc, maps), basis(kind, w, acc, maps)
            slots.append((grad_maps[l], bh, bw, h, w, float(weights[l]), map_off[l], scr_off[l]))
            consts.update({f"O{i}": regs, f"TH{i}": th, f"TW{i}": tw})
        for i in range(len(part), MAX_SLOTS):
            consts.update({f"O{i}": True, f"TH{i}": 16, f"TW{i}": 16})
        warps = 4 if all(plans[l][0] * plans[l][1] <= PHI_REG_TILE for l in part) else 8
        launch(wrap_triton(phi_kernel), (len(part) * bsz,), maps, scratch, dist, k * MAX_SLOTS * bsz, bsz, float(eps),
               *slot_args(slots, pad=slots[0]), NS=len(part), MAP_NORM=n1, CENTER=bool(center), TRANSFORM=tr,
               COEF_ABS=bool(coef_abs), COEF_NORM=n2, DISTANCE=dist_code, NB=nb, KB=K_CHUNK, num_warps=warps,
               num_stages=NUM_STAGES, **consts)

    # (c) per-sample loss: sum_l w_l dist_l (the kernel stored w_l dist_l)
    return dist.sum(0), grad_maps


def _dct_at_loss_backward(grad_loss: torch.Tensor, grad_maps: List[torch.Tensor], student: List[torch.Tensor],
                          p: float) -> List[torch.Tensor]:
    _check_backward_levels(grad_loss, grad_maps, student)
    items, grads = [], []
    for g, s in zip(grad_maps, student):
        x = kernel_layout(s)
        dx = torch.empty_like(x)
        items.append((x, dx, g.to(acc_dtype(x, g)).contiguous()))
        grads.append(dx)
    backward_into(items, p, mean=True, grad_loss=grad_loss)
    return grads


dct_at_loss = define_op("dct_at_loss", _dct_at_loss)
dct_at_loss_backward = define_op("dct_at_loss_backward", _dct_at_loss_backward)
