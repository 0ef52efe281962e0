"""Distillation losses as modules: DCTATLoss (any preset of dct_at_loss) and AttentionTransferLoss."""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..ops import dct_at_loss
from ..presets import resolve_options


class DCTATLoss(torch.nn.Module):
    """`dct_at_loss` as a module: `loss = DCTATLoss(preset="dct", weights=None, reduction="mean")(fs, ft)`.

    Options of the preset may be overridden by keyword (p, map_norm, center, transform, coef_abs,
    coef_norm, distance, eps). `forward(student_feats, teacher_feats, sample_weight=None)`.
    With `pool_to_student=True` a teacher map larger than the student's is adaptive-average-pooled to
    the student's H, W first (and vice versa), as attention-transfer code does when sizes differ.
    """

    def __init__(self, preset: str = "dct", weights: Optional[Sequence[float]] = None, reduction: str = "mean",
                 pool_to_student: bool = False, **overrides):
        super().__init__()
        resolve_options(preset, overrides)  # fail at construction, not at the first step
        self.preset, self.reduction, self.overrides = preset, reduction, dict(overrides)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.pool_to_student = pool_to_student

    def forward(self, student_feats, teacher_feats, sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pool_to_student:
            student_feats, teacher_feats = match_spatial(student_feats, teacher_feats)
        return dct_at_loss(student_feats, teacher_feats, preset=self.preset, weights=self.weights,
                           sample_weight=sample_weight, reduction=self.reduction, **self.overrides)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.overrides.items())
        return f"preset={self.preset!r}, weights={self.weights}, reduction={self.reduction!r}{extra}"


class AttentionTransferLoss(DCTATLoss):
    """Attention transfer (Zagoruyko & Komodakis) as RepDistiller/mdistiller compute it, times `weight`
    (their convention: 1000). Spatial sizes that differ are matched by adaptive average pooling of the
    larger map."""

    def __init__(self, weight: float = 1000.0, p: float = 2.0, reduction: str = "mean"):
        super().__init__(preset="at", reduction=reduction, pool_to_student=True, p=p)
        self.weight = float(weight)

    def forward(self, student_feats, teacher_feats, sample_weight=None):
        return self.weight * super().forward(student_feats, teacher_feats, sample_weight)


def match_spatial(student_feats, teacher_feats):
    """Pool whichever of each (student, teacher) pair is spatially larger to the other's size."""
    fs_out, ft_out = [], []
    for s, t in zip(student_feats, teacher_feats):
        if s.shape[-2:] != t.shape[-2:]:
            if s.shape[-2] * s.shape[-1] > t.shape[-2] * t.shape[-1]:
                s = F.adaptive_avg_pool2d(s, t.shape[-2:])
            else:
                t = F.adaptive_avg_pool2d(t, s.shape[-2:])
        fs_out.append(s)
        ft_out.append(t)
    return fs_out, ft_out
