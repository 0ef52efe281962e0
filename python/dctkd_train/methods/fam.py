"""FAM-KD: ``fam`` (the released head, :mod:`dctkd_train.fam_head`) and the base of the FAM methods.

The feature term is the sum over levels of ``mse(out_l, t_l)``, where ``out_l`` is the head's output
for level l (a level the head leaves out gives None and no term)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .base import FAM_MISSING, Method, MethodConfig, frequency_attention_class, import_ext, register


class FamMethod(Method):
    """A head ending in ``dctkd_ext.nn.FrequencyAttention`` on the student's features; MSE to the teacher's."""

    feature_kind = "fam"
    paper = "famkd"

    def setup(self) -> None:
        self.fam_cls = frequency_attention_class()
        if self.fam_cls is None:
            raise UserError(FAM_MISSING)

    @classmethod
    def available(cls) -> bool:
        try:
            import_ext()
        except UserError:
            return False
        return frequency_attention_class() is not None

    @classmethod
    def record_config(cls, mc: MethodConfig, cfg: dict) -> None:
        cfg["fam_mid_channels"] = None
        cfg["fam_student_preact"], cfg["fam_pooled_target"] = None, None

    def feature_terms(self, labels, s_logits, s_feats, head_out, t_logits, t_feats, epoch: int) -> dict[str, torch.Tensor]:
        loss = 0.0
        for fused, t in zip(head_out, t_feats):
            if fused is not None:  # None: a level left out of the loss
                loss = loss + F.mse_loss(fused.float(), t.detach().float())
        return {"fam": loss}


@register
class FAM(FamMethod):
    """FAM-KD as released: cross-attention fusion over the stages and the pooled feature, with the
    pair's released weight, taps, loss levels and warm-up (recipes.FAM_PAIRS)."""

    name = "fam"
    weights = (1.0, 0.0, 1.0)

    @classmethod
    def fill_config(cls, cfg: dict, raw: dict) -> None:
        from ..recipes import apply_fam_pair

        apply_fam_pair(cfg, raw)
        super().fill_config(cfg, raw)

    @classmethod
    def record_config(cls, mc: MethodConfig, cfg: dict) -> None:
        super().record_config(mc, cfg)
        cfg["fam_student_preact"], cfg["fam_pooled_target"] = mc.fam_student_preact, mc.fam_pooled_target

    def make_head(self, student_shapes, teacher_shapes) -> nn.Module:
        from ..fam_head import FamHead

        compare = [True] * len(student_shapes)
        if not self.cfg.fam_pooled_target and tuple(teacher_shapes[-1][1:]) == (1, 1):
            compare[-1] = False
        return FamHead(student_shapes, teacher_shapes, self.fam_cls, self.cfg.fam_cuton, compare)

    def default_layers(self, model: nn.Module, image_size: int, role: str) -> list[str]:
        """The stage outputs (the student's pre-ReLU ones with fam_student_preact), and the pooled
        feature as the deepest level."""
        from ..features import default_feature_layers

        arch = getattr(model, "arch", type(model).__name__)
        if role == "student" and self.cfg.fam_student_preact:
            layers = getattr(model, "preact_feature_layers", None)
            if not layers:
                raise UserError(f"fam: pre-activation student features were asked for, but {arch} does not expose "
                                "them (pass --no-fam-student-preact, or --student-layers)")
            layers = list(layers)
        else:
            layers = default_feature_layers(model, image_size)
        pooled = getattr(model, "pooled_layer", None)
        if pooled is None:
            raise UserError(f"fam: the released head takes the {role}'s pooled feature as its deepest level, and "
                            f"{arch} has no pooling module to hook; pass --{role}-layers with the levels to use")
        return layers + [pooled]
