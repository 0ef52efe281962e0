"""The methods whose feature term is ``dctkd_ext.dct_at_loss``: attention transfer (``at``) and
DCT-KD (``dct``, ``dct-paper``, with KD ``dct+kd``, ``dct-paper+kd``)."""
from __future__ import annotations

import torch

from .base import Method, import_ext, match_spatial, register


class DctAtMethod(Method):
    """The feature term ``dct_at_loss(student_feats, teacher_feats, preset=...)`` over the levels, named
    ``term``. Feature pairs of different sizes are matched by pooling the larger one; with the guide
    each sample is weighted by whether the teacher predicts its label."""

    feature_kind = "dct_at"
    term = "dct"
    uses_guide = True
    paper = "dctkd"

    def setup(self) -> None:
        self.ext = import_ext()

    @classmethod
    def available(cls) -> bool:
        try:
            import_ext()
        except Exception:
            return False
        return True

    def feature_terms(self, labels, s_logits, s_feats, head_out, t_logits, t_feats, epoch: int) -> dict[str, torch.Tensor]:
        c = self.cfg
        pairs = [match_spatial(s, t.detach()) for s, t in zip(s_feats, t_feats)]
        sw = (t_logits.argmax(1) == labels).float() if c.guide else None
        # The feature weight goes into the op's level weights, so the loss reaches the total with
        # an upstream gradient of 1 and its backward hands over the gradient its forward wrote.
        scale = self.feature_weight(epoch)
        levels = c.level_weights if c.level_weights is not None else [1.0] * len(pairs)
        return {self.term: self.ext.dct_at_loss(
            [p[0] for p in pairs], [p[1] for p in pairs],
            preset=c.preset, weights=[scale * w for w in levels], sample_weight=sw, **c.loss_options,
        )}

    def weighted_inside(self, key: str) -> bool:
        return key == self.term


@register
class AT(DctAtMethod):
    name = "at"
    weights = (1.0, 0.0, 1000.0)
    preset = "at"
    term = "at"
    uses_guide = False
    paper = None


@register
class DCT(DctAtMethod):
    name = "dct"
    weights = (1.0, 0.0, 1.0)
    preset = "dct"


@register
class DCTPaper(DctAtMethod):
    """The authors' released formula; its guide is on unless turned off (``PRED_GUIDE: True``)."""

    name = "dct-paper"
    weights = (1.0, 0.0, 1.0)
    preset = "paper"
    guide_default = True


@register
class DCTKD(DctAtMethod):
    name = "dct+kd"
    weights = (0.1, 1.0, 1.0)
    preset = "dct"


@register
class DCTPaperKD(DctAtMethod):
    name = "dct-paper+kd"
    weights = (0.1, 1.0, 1.0)
    preset = "paper"
    guide_default = True
