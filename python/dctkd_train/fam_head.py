"""FAM-KD's distiller head as the authors released it (Pham et al., WACV 2024): cross-attention
fusion of the student's features from the deepest level to the shallowest, each level ending in a
``FrequencyAttention + BN + ReLU`` projection to the teacher's channels and size.

Levels are ordered shallow to deep; the deepest is normally the pooled feature (B, C, 1, 1), which
only starts the fusion chain. For level l with student feature x_l (C_l channels) and the fused map
r_{l+1} handed up from the level below it:

* mid channels m_l = C_l (the student's width; x_l goes through 1x1 conv + BN + ReLU only when a
  custom layout makes them differ);
* guide g = nearest-upsample(ReLU(BN(conv1x1(r_{l+1}))), size of x_l); the 1x1 reduction is
  present only when m_{l+1} != m_l;
* r_l = LocalSelfAttention(x_l, g): the query comes from the guide, keys and values from the 3x3
  neighbourhood of x_l (see :class:`LocalSelfAttention`); the deepest level has no guide, r_L = x_L;
* r_l is nearest-resized to the teacher's size S_l when they differ, and the level's output is
  ReLU(BN(FrequencyAttention(r_l))) with the teacher's channel count.

The loss is ``sum_l mse(out_l, teacher_l)`` over the compared levels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

try:  # the trainer runs ce / kd without the extension; this head needs it (methods/fam.py reports its absence)
    import dctkd_ext
except Exception:  # pragma: no cover - depends on the install
    dctkd_ext = None


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    seq = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    nn.init.kaiming_uniform_(seq[0].weight, a=1)
    return seq


class LocalSelfAttention(nn.Module):
    """Stand-alone self-attention over 3x3 windows (Ramachandran et al., 2019) in the cross form
    FAM-KD uses. With q = W_q g, k = W_k x, v = W_v x (1x1 convs, no bias), zero padding of k and v
    by one pixel, and the 9 window offsets j = (a, b):

        logit[c, p, j] = q[c, p] * (k[c, p + j] + rel[c, j])
        out[c, p]      = sum_j softmax_j(logit[c, p, :]) * v[c, p + j]

    The attention is per channel (an elementwise product, not a dot product over channels), so the
    released code's split into 4 channel groups does not change the result. rel[c, j] is a learned
    row term rel_row[c, a] for the first half of the channels and a column term rel_col[c, b] for
    the second half.

    The attention runs as one fused op (``dctkd_ext.local_attention``: no K*K-sized intermediate, the softmax
    recomputed in the backward), the key and value convs as one GEMM, the query conv on the guide before its
    nearest upsampling (they commute; fewer pixels); the parameters and their names are the
    released ones (key, query, value, rel_row, rel_col), so released checkpoints load."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        if channels % 2:
            raise UserError(f"fam: the local self-attention splits its channels in halves; got {channels} channels")
        if dctkd_ext is None:
            raise UserError("fam: the local self-attention needs the dctkd_ext package, which failed to import")
        self.channels, self.kernel_size = channels, kernel_size
        half = channels // 2
        self.rel_row = nn.Parameter(torch.randn(half, kernel_size))
        self.rel_col = nn.Parameter(torch.randn(half, kernel_size))
        self.key = nn.Conv2d(channels, channels, 1, bias=False)
        self.query = nn.Conv2d(channels, channels, 1, bias=False)
        self.value = nn.Conv2d(channels, channels, 1, bias=False)
        for conv in (self.key, self.value, self.query):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        self.released = False  # True: the released eager formulation (use_released_attention)

    def relative_terms(self) -> torch.Tensor:
        """rel (C, k*k): window offset j = a*k + b."""
        k = self.kernel_size
        row = self.rel_row[:, :, None].expand(-1, k, k)
        col = self.rel_col[:, None, :].expand(-1, k, k)
        return torch.cat([row, col], 0).reshape(self.channels, k * k)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W); guide (B, C, h, w), brought to H x W by nearest resizing (the released head's
        F.interpolate of the guide)."""
        if guide.dim() != 4 or guide.shape[:2] != x.shape[:2]:
            raise ValueError(f"guide: expected a (B, C, h, w) tensor with x's B and C {tuple(x.shape[:2])}, "
                             f"got {tuple(guide.shape)}")
        size = x.shape[-2:]

        def resize(t):
            return t if t.shape[-2:] == size else F.interpolate(t, size, mode="nearest")

        rel = self.relative_terms()
        if self.released:
            q = self.query(resize(guide))
            return dctkd_ext.reference.released_local_attention(q, self.key(x), self.value(x), rel, self.kernel_size)
        # a 1x1 conv commutes with a nearest resize: project the guide where it has fewer pixels
        small = guide.shape[-2] * guide.shape[-1] < size[0] * size[1]
        q = resize(self.query(guide)) if small else self.query(resize(guide))
        # keys and values in one 1x1 conv (one GEMM over x); the op reads the two channel halves in place
        kv = F.conv2d(x, torch.cat([self.key.weight, self.value.weight], 0))
        keys, values = kv.split(self.channels, dim=1)
        return dctkd_ext.local_attention(q, keys, values, rel, self.kernel_size)


def use_released_attention(module: nn.Module, released: bool = True) -> nn.Module:
    """Switch every LocalSelfAttention in ``module`` to the released eager formulation (the K*K shifted windows
    stacked, one softmax over them; the benchmark's baseline) or back to the fused op. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, LocalSelfAttention):
            m.released = released
    return module


class FamLevel(nn.Module):
    """One level of the head (the released ``CROSSATF``). ``guide_channels``: channels of the fused
    map handed up from the level below (None at the deepest level, which has no fusion)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, out_size: int,
                 guide_channels: int | None, fam_cls, cuton: float = 0.1, compare: bool = True):
        super().__init__()
        self.out_size, self.compare = out_size, compare
        self.reduce_x = _conv_bn_relu(in_channels, mid_channels) if in_channels != mid_channels else None
        if guide_channels is None:
            # The released distiller builds a 1 -> mid reduction at its deepest level and never runs it.
            # Kept, frozen, so that the head has the released parameter count.
            self.unused_reduce = _conv_bn_relu(1, mid_channels)
            self.unused_reduce.requires_grad_(False)
            self.reduce_guide, self.attend = None, None
        else:
            self.reduce_guide = _conv_bn_relu(guide_channels, mid_channels) if guide_channels != mid_channels else None
            self.attend = LocalSelfAttention(mid_channels)
        self.project = nn.Sequential(fam_cls(mid_channels, out_channels, out_size, cuton=cuton),
                                     nn.BatchNorm2d(out_channels), nn.ReLU())
        if not compare:
            # released: built and computed, but not in the loss; here frozen and skipped
            self.project.requires_grad_(False)

    def forward(self, x: torch.Tensor, fused_below: torch.Tensor | None = None):
        if self.reduce_x is not None:
            x = self.reduce_x(x)
        if self.attend is not None:
            g = fused_below if self.reduce_guide is None else self.reduce_guide(fused_below)
            x = self.attend(x, g)  # resizes the guide to x's size
        if tuple(x.shape[-2:]) != (self.out_size, self.out_size):
            x = F.interpolate(x, (self.out_size, self.out_size), mode="nearest")
        out = self.project(x) if self.compare else None
        return out, x


class FamHead(nn.Module):
    """FAM-KD's head for student feature shapes ``student_shapes`` and teacher feature shapes
    ``teacher_shapes`` ((C, H, W) per level, shallow to deep). ``compare[l]`` False leaves level l
    out of the loss (its projection is frozen and not run). forward(feats) -> one output per level
    (None where not compared), shaped like the teacher's feature."""

    def __init__(self, student_shapes: Sequence[tuple], teacher_shapes: Sequence[tuple], fam_cls,
                 cuton: float = 0.1, compare: Sequence[bool] | None = None):
        super().__init__()
        L = len(student_shapes)
        if len(teacher_shapes) != L:
            raise UserError(f"fam: {L} student levels and {len(teacher_shapes)} teacher levels")
        if L < 1:
            raise UserError("fam: no feature levels")
        compare = [True] * L if compare is None else list(compare)
        mids = [int(s[0]) for s in student_shapes]
        levels = []
        for i, ((cs, _, _), (ct, ht, wt)) in enumerate(zip(student_shapes, teacher_shapes)):
            if ht != wt:
                raise UserError(f"fam: FrequencyAttention needs square features; teacher level {i} is {ht}x{wt}")
            guide = mids[i + 1] if i + 1 < L else None
            levels.append(FamLevel(cs, mids[i], ct, ht, guide, fam_cls, cuton, compare[i]))
        self.levels = nn.ModuleList(levels[::-1])  # deepest first, the order of the fusion chain

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor | None]:
        x = feats[::-1]
        out, fused = self.levels[0](x[0])
        results = [out]
        for f, level in zip(x[1:], self.levels[1:]):
            out, fused = level(f, fused)
            results.insert(0, out)
        return results


def count_real_parameters(module: nn.Module) -> int:
    """Parameters counted in real numbers (a complex parameter counts twice)."""
    return sum(p.numel() * (2 if p.is_complex() else 1) for p in module.parameters())
