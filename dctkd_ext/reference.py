"""Plain-PyTorch reference of every op (docs/DESIGN.md §3), differentiable by autograd, in any dtype
(the tests run it in float64), plus the released-code formulations the benchmark compares against.

Nothing here is fused or fast: it states the math once, readably.
"""

import math
from typing import Optional, Sequence

import torch

from ._bases import dct_matrix, dft_real_matrices
from ._dtypes import acc_dtype as _acc_dtype
from ._shapes import fam_mask_radius
from .presets import resolve_options

__all__ = [
    "attention_map",
    "dct_matrix",
    "dct2d",
    "idct2d",
    "phi",
    "dct_at_loss",
    "released_dct_loss",
    "released_dct_loss_main",
    "released_at_loss",
]


# ---------------------------------------------------------------------------------------------- 3.1
def attention_map(x: torch.Tensor, p: float = 2.0, reduce: str = "mean") -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W): (1/C) sum_c |x|^p (reduce="sum" drops 1/C), in fp32 (fp64 for fp64)."""
    xa = x.to(_acc_dtype(x))
    a = xa * xa if p == 2 else xa.abs().pow(p)
    return a.mean(1) if reduce == "mean" else a.sum(1)


# ---------------------------------------------------------------------------------------------- 3.2
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
        ch, sh = dft_real_matrices(h, v.dtype, v.device)
        cw, sw = dft_real_matrices(w, v.dtype, v.device)
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
        # sqrt with a zero-safe gradient: 0 (not NaN) at exactly zero distance; NaN and inf pass
        # through (a test on `ss > 0` would turn a NaN distance into 0)
        ss = sq.sum(1)
        zero = ss == 0
        safe = torch.where(zero, torch.ones_like(ss), ss)
        return torch.where(zero, torch.zeros_like(ss), safe.sqrt())
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
def _released_level_sum(student_feats, teacher_feats, return_am, compute_dct, mask):
    """The loop both branches of the released DCT-KD loss share, as written there: per level the L2
    distance of the flattened coefficients per sample, summed over levels, masked, batch mean."""
    bs = student_feats[-1].shape[0]
    scale_loss = torch.zeros(bs, dtype=student_feats[-1].dtype, device=student_feats[-1].device)
    for fs, ft in zip(student_feats, teacher_feats):
        ffts_s = compute_dct(return_am(fs))
        ffts_t = compute_dct(return_am(ft.detach()))
        ffts_s = ffts_s.reshape(ffts_s.shape[0], -1)
        ffts_t = ffts_t.reshape(ffts_t.shape[0], -1)
        scale_loss = scale_loss + torch.sqrt(torch.sum(torch.pow(ffts_s - ffts_t, 2), dim=1))
    if mask is not None:
        scale_loss = scale_loss * mask
    return scale_loss.mean()


def released_dct_loss(student_feats, teacher_feats, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The DCT-KD authors' released formulation (alexlopezcifuentes/Distillation-Attention, branch
    dev, `Distillation Zoo/DFTOurs.py`), eager and unfused, as they wrote it:
    map = x.pow(2).mean(1); (A - min) / max per sample; subtract the map mean;
    abs(real(fft(fft(A, dim=1), dim=2))); (C - min) / max per sample; per level the per-sample L2
    distance; plain sum over levels; optional mask of teacher-correct samples; mean over the batch.
    `preset="fft-abs-max"` (also named "paper") equals this to fp32 rounding."""

    def return_am(feature_conv):
        bs, nc, h, w = feature_conv.shape
        cam = feature_conv.pow(2).mean(1)
        cam = cam.view(bs, -1)
        min = torch.min(cam, dim=1)[0]
        max = torch.max(cam, dim=1)[0]
        cam = cam - min[:, None]
        cam = cam / max[:, None]
        return cam.view(bs, h, w)

    def compute_dct(activation_map):
        bs, h, w = activation_map.shape
        mean = torch.repeat_interleave(torch.unsqueeze(torch.mean(activation_map.view(bs, -1), dim=1), dim=1), h, dim=1)
        mean = torch.repeat_interleave(torch.unsqueeze(mean, dim=2), w, dim=2)
        activation_map = activation_map - mean
        dct_am = torch.fft.fft(torch.fft.fft(activation_map, dim=1), dim=2)
        dct_am = torch.abs(torch.real(dct_am))
        min_s = torch.repeat_interleave(torch.unsqueeze(torch.min(dct_am.view(bs, -1), dim=1)[0], dim=1), h, dim=1)
        min_s = torch.repeat_interleave(torch.unsqueeze(min_s, dim=2), w, dim=2)
        max_s = torch.repeat_interleave(torch.unsqueeze(torch.max(dct_am.view(bs, -1), dim=1)[0], dim=1), h, dim=1)
        max_s = torch.repeat_interleave(torch.unsqueeze(max_s, dim=2), w, dim=2)
        return (dct_am - min_s) / max_s

    return _released_level_sum(student_feats, teacher_feats, return_am, compute_dct, mask)


def released_dct_loss_main(student_feats, teacher_feats, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same file on branch main (last commit to it titled "Final version of paper"), as written
    there: `returnAM` and `computeDCT` take the per-sample min and max with
    torch.min(torch.min(x, dim=1)[0], dim=1)[0] and normalise by (x - min) / (max - min) (no eps),
    both the map and the coefficients; the coefficients are real(fft(fft(A, dim=1), dim=2)) without
    the absolute value; the rest as on dev. `preset="fft-real-minmax"` equals this to fp32 rounding."""

    def return_am(feature_conv):
        cam = feature_conv.pow(2).mean(1)
        min_v = torch.min(torch.min(cam, dim=1)[0], dim=1)[0][:, None, None]
        max_v = torch.max(torch.max(cam, dim=1)[0], dim=1)[0][:, None, None]
        return (cam - min_v) / (max_v - min_v)

    def compute_dct(activation_map):
        bs, h, w = activation_map.shape
        mean = torch.repeat_interleave(torch.unsqueeze(torch.mean(activation_map.view(bs, -1), dim=1), dim=1), h, dim=1)
        mean = torch.repeat_interleave(torch.unsqueeze(mean, dim=2), w, dim=2)
        activation_map = activation_map - mean
        dct_am = torch.real(torch.fft.fft(torch.fft.fft(activation_map, dim=1), dim=2))
        min_s = torch.min(torch.min(dct_am, dim=1)[0], dim=1)[0][:, None, None]
        max_s = torch.max(torch.max(dct_am, dim=1)[0], dim=1)[0][:, None, None]
        return (dct_am - min_s) / (max_s - min_s)

    return _released_level_sum(student_feats, teacher_feats, return_am, compute_dct, mask)


def released_at_loss(student_feats, teacher_feats, p: float = 2.0) -> torch.Tensor:
    """Attention transfer as mdistiller/RepDistiller compute it (before their weight of 1000):
    sum over levels of mean((normalize(x.pow(p).mean(1).view(B, -1)) difference)^2)."""
    import torch.nn.functional as F

    def at(x):
        return F.normalize(x.pow(p).mean(1).view(x.size(0), -1))

    return sum((at(fs) - at(ft.detach())).pow(2).mean() for fs, ft in zip(student_feats, teacher_feats))


# ------------------------------------------------------------- spectral filters (FAM-KD / GFNet), 3.4
__all__ += [
    "global_filter",
    "spectral_conv",
    "fam_highpass_mask",
    "fam_half_weight",
    "fam_global",
    "released_fam_forward",
    "ReleasedFAM",
    "gfnet_global_filter",
]


def global_filter(xf: torch.Tensor, w: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise filter in the frequency domain: y[b,c,h,k] = xf[b,c,h,k] * w[c,h,k] * mask[h,k]."""
    y = xf * w
    return y if mask is None else y * mask.to(y.real.dtype)


def spectral_conv(xf: torch.Tensor, w: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Channel mixing per frequency: y[b,o,h,k] = mask[h,k] * sum_i xf[b,i,h,k] * w[i,o,h,k]."""
    y = torch.einsum("bihk,iohk->bohk", xf, w)
    return y if mask is None else y * mask.to(y.real.dtype)


def fam_highpass_mask(n_h: int, n_w: int, cuton: float = 0.1, dtype=torch.float32, device=None) -> torch.Tensor:
    """The FAM high-pass mask on the full (n_h, n_w) frequency plane, in fft2 order (DC at [0, 0]).

    Per dim of size N, r = int(cuton * (N // 2)); a frequency is zeroed (0) when its signed index
    (k taken mod N into {-N//2.., ..}) lies in {-r, ..., r-1} in BOTH dims, else kept (1). This is the
    released code's `batch_fftshift[:, :, cy - rh:cy + rh, cx - rw:cx + rw] = 0` on the centred
    spectrum (cy = int(h / 2), rh = int(cuton * cy)), moved back to fft2 order."""

    def zeroed(n):
        r = fam_mask_radius(n, cuton)
        k = torch.arange(n, device=device)
        signed = torch.where(k >= n - n // 2, k - n, k)  # the centred index after fftshift, minus cy
        return (signed >= -r) & (signed <= r - 1)

    box = zeroed(n_h)[:, None] & zeroed(n_w)[None, :]
    return (~box).to(dtype)


def fam_half_weight(weights: torch.Tensor, cuton: float = 0.1) -> torch.Tensor:
    """The exact cheaper form of FAM's filter (docs/DESIGN.md §3.4): for real x,
    Re(ifft2(M * W (.) fft2(x))) == irfft2(W' (.) rfft2(x)) with, on the rfft half plane,
        W'(k) = (M(k) W(k) + conj(M(-k) W(-k))) / 2
    (the Hermitian part of the masked filter; -k taken mod the size in both dims; the conj applies to
    the weight at -k of the same channel pair). weights: (..., S_h, S_w) complex -> (..., S_h, S_w//2+1).
    Differentiable in weights."""
    sh, sw = weights.shape[-2:]
    m = fam_highpass_mask(sh, sw, cuton, weights.real.dtype, weights.device)
    mw = weights * m
    # mw at (-h, -w): flip gives index n-1-h, a roll by one more gives (n - h) mod n
    neg = torch.roll(torch.flip(mw, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    return (0.5 * (mw + neg.conj()))[..., : sw // 2 + 1]


def fam_global(x: torch.Tensor, weights: torch.Tensor, cuton: float = 0.1, mix: str = "channel") -> torch.Tensor:
    """FAM's global branch on the full plane, as the authors compute it (without their fftshift round
    trip): Re(ifft2(M * mix(fft2(x, ortho), weights), ortho)). mix="channel": weights (I, O, S, S),
    einsum over I; mix="depthwise": weights (C, S, S), elementwise."""
    xf = torch.fft.fft2(x, norm="ortho")
    yf = spectral_conv(xf, weights) if mix == "channel" else global_filter(xf, weights)
    yf = yf * fam_highpass_mask(x.shape[-2], x.shape[-1], cuton, yf.real.dtype, x.device)
    return torch.fft.ifft2(yf, norm="ortho").real


def _released_roll_n(x, axis, n):
    f_idx = tuple(slice(None, None, None) if i != axis else slice(0, n, None) for i in range(x.dim()))
    b_idx = tuple(slice(None, None, None) if i != axis else slice(n, None, None) for i in range(x.dim()))
    return torch.cat([x[b_idx], x[f_idx]], axis)


def _released_fftshift2d(x):
    real, imag = x.real, x.imag
    for dim in range(1, len(real.size())):
        n_shift = real.size(dim) // 2
        if real.size(dim) % 2 != 0:
            n_shift += 1  # for odd-sized images
        real = _released_roll_n(real, axis=dim, n=n_shift)
        imag = _released_roll_n(imag, axis=dim, n=n_shift)
    return torch.stack((real, imag), -1)


def _released_ifftshift2d(x):
    real, imag = torch.unbind(x, -1)
    for dim in range(len(real.size()) - 1, 0, -1):
        real = _released_roll_n(real, axis=dim, n=real.size(dim) // 2)
        imag = _released_roll_n(imag, axis=dim, n=imag.size(dim) // 2)
    return torch.stack((real, imag), -1)


def released_fam_forward(x, weights1, w0_weight, w0_bias, rate1, rate2, cuton: float = 0.1) -> torch.Tensor:
    """The FAM-KD authors' FAM module forward (distillers/FAM_KD.py, FAM_Module), eager and unfused,
    as they wrote it: fft2(ortho) of the full plane, einsum("bixy,ioxy->boxy"), an fftshift by
    rolls/cat/stack of real and imaginary parts (the channel dim is rolled too and rolled back), a box
    of the centred spectrum set to zero in place, the inverse shift, ifft2(ortho).real; plus a 1x1
    conv; rate1 * global + rate2 * local. This is the baseline the benchmark times."""
    import torch.nn.functional as F

    x_ft = torch.fft.fft2(x, norm="ortho")
    out_ft = torch.einsum("bixy,ioxy->boxy", x_ft, weights1)
    batch_fftshift = _released_fftshift2d(out_ft)
    h, w = batch_fftshift.shape[2:4]
    cy, cx = int(h / 2), int(w / 2)
    rh, rw = int(cuton * cy), int(cuton * cx)
    batch_fftshift[:, :, cy - rh:cy + rh, cx - rw:cx + rw, :] = 0
    out_ft = torch.view_as_complex(_released_ifftshift2d(batch_fftshift))
    out = torch.fft.ifft2(out_ft, s=(x.size(-2), x.size(-1)), norm="ortho").real
    out2 = F.conv2d(x, w0_weight, w0_bias)
    return rate1 * out + rate2 * out2


class ReleasedFAM(torch.nn.Module):
    """The authors' FAM_Module with their parameter names, shapes and initialisation:
    weights1 (in, out, S, S) complex64 = (1/(in*out)) * rand, w0 = Conv2d(in, out, 1) (with bias),
    rate1 = rate2 = 0.5 (shape (1,), as their torch.Tensor(1) filled with 0.5). forward(x) or
    forward((x, cuton)); the default cuton is 0.1. A state_dict of theirs loads as is."""

    def __init__(self, in_channels: int, out_channels: int, shapes: int):
        super().__init__()
        self.in_channels, self.out_channels, self.shapes = in_channels, out_channels, shapes
        self.rate1 = torch.nn.Parameter(torch.full((1,), 0.5))
        self.rate2 = torch.nn.Parameter(torch.full((1,), 0.5))
        self.scale = 1 / (in_channels * out_channels)
        self.weights1 = torch.nn.Parameter(
            self.scale * torch.rand(in_channels, out_channels, shapes, shapes, dtype=torch.cfloat)
        )
        self.w0 = torch.nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        if isinstance(x, tuple):
            x, cuton = x
        else:
            cuton = 0.1
        return released_fam_forward(x, self.weights1, self.w0.weight, self.w0.bias, self.rate1, self.rate2, cuton)


def gfnet_global_filter(x: torch.Tensor, complex_weight: torch.Tensor, spatial_size=None) -> torch.Tensor:
    """GFNet's GlobalFilter.forward (Rao et al.): x (B, N, C) with N = a*b (a = b = sqrt(N) unless
    spatial_size=(a, b) is given), or (B, a, b, C); complex_weight (a, b//2+1, C, 2) real.
    rfft2 over the spatial dims (ortho), times the complex weight, irfft2; returned in float32 and in
    the input's layout."""
    shape = x.shape
    if x.dim() == 3:
        b, n, c = x.shape
        a, bb = (int(math.sqrt(n)),) * 2 if spatial_size is None else spatial_size
        x = x.view(b, a, bb, c)
    else:
        b, a, bb, c = x.shape
    x = x.to(torch.float32)
    x = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")
    weight = torch.view_as_complex(complex_weight)
    x = x * weight
    x = torch.fft.irfft2(x, s=(a, bb), dim=(1, 2), norm="ortho")
    return x.reshape(shape)


# ---------------------------------------------------------------------------------------------- 3.5
__all__ += ["local_attention", "released_local_attention"]


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: torch.Tensor,
                    kernel_size: int = 3) -> torch.Tensor:
    """FAM-KD's local self-attention (docs/DESIGN.md §3.5), per channel over the K*K window (K = kernel_size,
    k and v zero-padded by K // 2): out = sum_j softmax_j(q (k_j + rel[:, j])) v_j. q, k, v (B, C, H, W),
    rel (C, K*K); computed in fp32 (fp64 when q or rel is fp64), returned in q's dtype."""
    acc = _acc_dtype(q, rel)
    b, c, h, w = q.shape
    kk, pad = kernel_size * kernel_size, kernel_size // 2

    def windows(t):  # (B, C, K*K, H, W), offset j = a*K + b; unfold zero-pads
        return torch.nn.functional.unfold(t.to(acc), kernel_size, padding=pad).view(b, c, kk, h, w)

    logits = q.to(acc)[:, :, None] * (windows(k) + rel.to(acc)[None, :, :, None, None])
    return (torch.softmax(logits, dim=2) * windows(v)).sum(2).to(q.dtype)


def released_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: torch.Tensor,
                             kernel_size: int = 3) -> torch.Tensor:
    """The FAM-KD head's eager formulation of local_attention (its LocalSelfAttention.forward after the 1x1
    convs): the K*K shifted windows of the padded k and v stacked on a leading dim, one softmax over it.
    Computed in q's dtype; the benchmark's baseline and an independent oracle of the op."""
    pad = kernel_size // 2
    h, w = q.shape[-2:]
    keys = torch.nn.functional.pad(k, (pad, pad, pad, pad))
    values = torch.nn.functional.pad(v, (pad, pad, pad, pad))
    # window offsets on a leading dim: a softmax over a short last dim is several times slower on CPU
    windows = [(a, b) for a in range(kernel_size) for b in range(kernel_size)]
    keys = torch.stack([keys[:, :, a:a + h, b:b + w] for a, b in windows], 0)  # (K*K, B, C, H, W)
    values = torch.stack([values[:, :, a:a + h, b:b + w] for a, b in windows], 0)
    rel = rel.to(q.dtype).t()[:, None, :, None, None]
    attn = torch.softmax((keys + rel) * q, dim=0)
    return (attn * values).sum(0)
