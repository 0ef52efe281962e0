"""``fam-abf``: the FAM-KD loss with ReviewKD's knowledge-review fusion (ABF), each level's output
conv a ``dctkd_ext.nn.FrequencyAttention`` (this project's variant; FAM-KD as released is ``fam``)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .base import FAM_MISSING, MethodConfig, register
from .fam import FamMethod


class ABF(nn.Module):
    """Attention-based fusion (ReviewKD): 1x1 conv+BN of the student feature; fused with the
    nearest-upsampled deeper fused feature by a 2-channel sigmoid attention; then the output conv,
    here ``FrequencyAttention + BN + ReLU`` (FAM-KD), producing the teacher's channel count."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, out_size: int, fuse: bool,
                 fam_cls, cuton: float = 0.1):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            fam_cls(mid_channels, out_channels, out_size, cuton=cuton),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channels * 2, 2, 1), nn.Sigmoid()) if fuse else None
        self.out_size = out_size
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        h, w = x.shape[-2:]
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(residual, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0:1] + y * z[:, 1:2]
        if x.shape[-2:] != (self.out_size, self.out_size):
            x = F.interpolate(x, (self.out_size, self.out_size), mode="nearest")
        return self.conv2(x), x


class ReviewFusionHead(nn.Module):
    """Fuses the student's stage features from deepest to shallowest (knowledge review); returns
    one fused map per level, shallow to deep, each shaped like the teacher's feature at that level."""

    def __init__(self, student_shapes, teacher_shapes, mid_channels: int = 64, fam_cls=None, cuton: float = 0.1):
        super().__init__()
        if fam_cls is None:
            raise UserError(FAM_MISSING)
        abfs = []
        L = len(student_shapes)
        for i, ((cs, _, _), (ct, ht, wt)) in enumerate(zip(student_shapes, teacher_shapes)):
            if ht != wt:
                raise UserError(f"fam: FrequencyAttention needs square features; teacher level {i} is {ht}x{wt}")
            abfs.append(ABF(cs, mid_channels, ct, ht, fuse=i < L - 1, fam_cls=fam_cls, cuton=cuton))
        self.abfs = nn.ModuleList(abfs[::-1])  # deepest first

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x = feats[::-1]
        out, res = self.abfs[0](x[0])
        results = [out]
        for f, abf in zip(x[1:], self.abfs[1:]):
            out, res = abf(f, res)
            results.insert(0, out)
        return results


@register
class FamAbf(FamMethod):
    name = "fam-abf"
    weights = (1.0, 0.0, 1.0)

    @classmethod
    def default_feat_warmup(cls, epochs: int) -> int:
        # FAM-KD / ReviewKD warm the feature weight up over 20 of 240 epochs; keep that fraction on short runs.
        return min(20, max(0, round(epochs * 20 / 240)))

    @classmethod
    def record_config(cls, mc: MethodConfig, cfg: dict) -> None:
        super().record_config(mc, cfg)
        cfg["fam_mid_channels"] = mc.fam_mid_channels

    def make_head(self, student_shapes, teacher_shapes) -> nn.Module:
        return ReviewFusionHead(student_shapes, teacher_shapes, self.cfg.fam_mid_channels, self.fam_cls,
                                self.cfg.fam_cuton)
