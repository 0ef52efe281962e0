"""Plain-PyTorch reference of every op (DESIGN §3), differentiable by autograd, in any dtype
(the tests run it in float64), plus the released-code formulations the benchmark compares against.

Nothing here is fused or fast: it states the math once, readably.
"""

import math
from typing import Optional, Sequence

import torch

from .presets import resolve_options

__all__ = [
    "attention_map",
    "dct_matrix",
    "dct2d",
    "idct2d",
    "phi",
    "dct_at_loss",
    "released_dct_loss",
    "released_at_loss",
]


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---------------------------------------------------------------------------------------------- 3.1
def attention_map(x: torch.Tensor, p: float = 2.0, reduce: str = "mean") -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W): (1/C) sum_c |x|^p (reduce="sum" drops 1/C), in fp32 (fp64 for fp64)."""
    xa = x.to(_acc_dtype(x))
    a = xa * xa if p == 2 else xa.abs().pow(p)
    return a.mean(1) if reduce == "mean" else a.sum(1)


# ---------------------------------------------------------------------------------------------- 3.2
def dct_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix D[k, m] = s(k) cos(pi (2m+1) k / (2n))."""
    k = torch.arange(n, dtype=torch.float64, device=device).unsqueeze(1)
    m = torch.arange(n, dtype=torch.float64, device=device).unsqueeze(0)
    d = torch.cos(math.pi * (2 * m + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] = math.sqrt(1.0 / n)
    return d.to(dtype)


def dct2d(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2D DCT-II over the last two dims: D_H A D_W^T (computed in fp32/fp64, returned in a's dtype)."""
    acc = _acc_dtype(a)
    dh = dct_matrix(a.shape[-2], acc, a.device)
    dw = dct_matrix(a.shape[-1], acc, a.device)
    return (dh @ a.to(acc) @ dw.T).to(a.dtype)


def idct2d(c: torch.Tensor) -> torch.Tensor:
    """Inverse of dct2d (orthonormal DCT-III): D_H^T C D_W."""
    acc = _acc_dtype(c)
    dh = dct_matrix(c.shape[-2], acc, c.device)
    dw = dct_matrix(c.shape[-1], acc, c.device)
    return (dh.T @ c.to(acc) @ dw).to(c.dtype)


# ---------------------------------------------------------------------------------------------- 3.3
def _normalise(a: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """Per-sample normalisation of (B, N) rows. min/max via torch.min/max(dim): one index gets the gradient."""
    if kind == "none":
        return a
    if kind == "l2":
        return a / (torch.linalg.vector_norm(a, dim=1, keepdim=True) + eps)
    lo = a.min(dim=1, keepdim=True).values
    hi = a.max(dim=1, keepdim=True).values
    if kind == "minmax":
        return (a - lo) / (hi - lo + eps)
    if kind == "max":
        return (a - lo) / (hi + eps)
    raise ValueError(f"unknown normalisation {kind!r}")


def _dft_real_matrices(n: int, dtype, device):
    k = torch.arange(n, dtype=torch.int64, device=device)
    ang = (2 * math.pi / n) * ((k.unsqueeze(1) * k.unsqueeze(0)) % n).to(torch.float64)
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def _transform(v: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, H, W) -> (B, H, W)."""
    if kind == "identity":
        return v
    h, w = v.shape[-2:]
    if kind == "dct":
        dh, dw = dct_matrix(h, v.dtype, v.device), dct_matrix(w, v.dtype, v.device)
        return dh @ v @ dw.T
    if kind == "fft_real":
        # Re(FFT2(v)), unnormalised: C_H v C_W^T - S_H v S_W^T
        ch, sh = _dft_real_matrices(h, v.dtype, v.device)
        cw, sw = _dft_real_matrices(w, v.dtype, v.device)
        return ch @ v @ cw.T - sh @ v @ sw.T
    raise ValueError(f"unknown transform {kind!r}")


def phi(a: torch.Tensor, *, map_norm, center, transform, coef_abs, coef_norm, eps, **_unused) -> torch.Tensor:
    """The DCT-KD pipeline on attention maps (B, H, W) -> coefficients (B, H*W)."""
    b, h, w = a.shape
    u = _normalise(a.reshape(b, h * w), map_norm, eps)
    if center:
        u = u - u.mean(dim=1, keepdim=True)
    c = _transform(u.reshape(b, h, w), transform).reshape(b, h * w)
    if coef_abs:
        c = c.abs()
    return _normalise(c, coef_norm, eps)


def _distance(zs: torch.Tensor, zt: torch.Tensor, kind: str) -> torch.Tensor:
    sq = (zs - zt).pow(2)
    if kind == "l2":
        # sqrt with a zero-safe gradient: 0 (not NaN) at exactly zero distance
        ss = sq.sum(1)
        safe = torch.where(ss > 0, ss, torch.ones_like(ss))
        return torch.where(ss > 0, safe.sqrt(), torch.zeros_like(ss))
    if kind == "mse":
        return sq.mean(1)
    if kind == "sse":
        return sq.sum(1)
    raise ValueError(f"unknown distance {kind!r}")


def dct_at_loss(
    student_feats: Sequence[torch.Tensor],
    teacher_feats: Sequence[torch.Tensor],
    *,
    preset: str = "dct",
    weights: Optional[Sequence[float]] = None,
    sample_weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    **overrides,
) -> torch.Tensor:
    """Reference of dctkd_ext.dct_at_loss (same arguments). The teacher is detached."""
    opts = resolve_options(preset, overrides)
    levels = len(student_feats)
    weights = [1.0] * levels if weights is None else [float(w) for w in weights]
    acc = _acc_dtype(*student_feats, *teacher_feats)
    total = None
    for s, t, w in zip(student_feats, teacher_feats, weights):
        zs = phi(attention_map(s, opts["p"]).to(acc), **opts)
        zt = phi(attention_map(t.detach(), opts["p"]).to(acc), **opts)
        d = w * _distance(zs, zt, opts["distance"])
        total = d if total is None else total + d
    if sample_weight is not None:
        total = total * sample_weight.to(total.dtype)
    if reduction == "mean":
        return total.mean()
    if reduction == "sum":
        return total.sum()
    return total


# ------------------------------------------------------------------------- released-code formulations
def released_dct_loss(student_feats, teacher_feats, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The DCT-KD authors' released formulation (branch dev), eager and unfused, as they wrote it:
    map = x.pow(2).mean(1); (A - min) / max per sample; subtract the map mean;
    abs(real(fft(fft(A, dim=1), dim=2))); (C - min) / max per sample; per level the per-sample L2
    distance; plain sum over levels; optional mask of teacher-correct samples; mean over the batch.
    `preset="paper"` equals this to fp32 rounding."""

    def pipeline(x):
        am = x.pow(2).mean(1)
        bs = am.size(0)
        flat = am.view(bs, -1)
        am = (am - flat.min(1)[0].view(bs, 1, 1)) / flat.max(1)[0].view(bs, 1, 1)
        am = am - am.view(bs, -1).mean(1).view(bs, 1, 1)
        coef = torch.abs(torch.real(torch.fft.fft(torch.fft.fft(am, dim=1), dim=2)))
        flat = coef.view(bs, -1)
        coef = (coef - flat.min(1)[0].view(bs, 1, 1)) / flat.max(1)[0].view(bs, 1, 1)
        return coef

    loss = 0
    for fs, ft in zip(student_feats, teacher_feats):
        cs, ct = pipeline(fs), pipeline(ft.detach())
        loss = loss + torch.sqrt(torch.sum((cs - ct).pow(2).view(cs.size(0), -1), dim=1))
    if mask is not None:
        loss = loss * mask
    return loss.mean()


def released_at_loss(student_feats, teacher_feats, p: float = 2.0) -> torch.Tensor:
    """Attention transfer as mdistiller/RepDistiller compute it (before their weight of 1000):
    sum over levels of mean((normalize(x.pow(p).mean(1).view(B, -1)) difference)^2)."""
    import torch.nn.functional as F

    def at(x):
        return F.normalize(x.pow(p).mean(1).view(x.size(0), -1))

    return sum((at(fs) - at(ft.detach())).pow(2).mean() for fs, ft in zip(student_feats, teacher_feats))
