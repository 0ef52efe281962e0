"""Distillation methods: which loss terms, with which weights, from which features.

Every method's total loss is ``ce_weight * CE + kd_weight * KD + feat_weight * FEAT`` where

* CE  -- cross-entropy with the labels;
* KD  -- Hinton's loss, ``KL(softmax(t/T) || softmax(s/T)) * T^2`` (batch mean), T = 4;
* FEAT -- the method's feature term:

  ================  ===========================================================================  ======================
  method            FEAT                                                                         (ce, kd, feat) default
  ================  ===========================================================================  ======================
  ``ce``            none (a teacher or a baseline)                                               (1, 0, 0)
  ``kd``            none                                                                         (0.1, 0.9, 0)
  ``at``            ``dctkd_ext.dct_at_loss(preset="at")`` (attention transfer)                  (1, 0, 1000)
  ``dct``           ``dctkd_ext.dct_at_loss(preset="dct")`` (DCT-KD, orthonormal DCT)            (1, 0, 1)
  ``dct-paper``     ``dctkd_ext.dct_at_loss(preset="paper")`` (the authors' released formula,    (1, 0, 1)
                    branch dev; ``loss_preset="fft-real-minmax"``: their branch main)
  ``dct+kd``        ``dctkd_ext.dct_at_loss(preset="dct")``                                      (0.1, 1, 1)
  ``dct-paper+kd``  ``dctkd_ext.dct_at_loss(preset="paper")``                                    (0.1, 1, 1)
  ``fam``           FAM-KD as released (:mod:`dctkd_train.fam_head`): cross-attention fusion     (1, 0, 1), warmed up;
                    over the stages and the pooled feature, each level ending in                 the pair's released
                    ``dctkd_ext.nn.FrequencyAttention``; sum over levels of ``mse(out_l, t_l)``  weight (recipes.py)
  ``fam-abf``       the same loss with ReviewKD's ABF fusion (this project's variant)            (1, 0, 1), warmed up
  ================  ===========================================================================  ======================

Feature pairs whose spatial sizes differ are matched by ``adaptive_avg_pool2d`` of the larger one
(as mdistiller does for AT). ``guide=True`` (the teacher-prediction guide of DCT-KD) passes
``sample_weight = (argmax(teacher_logits) == labels)`` to ``dct_at_loss``; it is on by default for
``dct-paper`` and ``dct-paper+kd`` (the released DCT-KD configuration's ``PRED_GUIDE: True``).
``loss_preset`` replaces the ``dct_at_loss`` preset of the DCT/AT methods (e.g. the other released
DCT-KD variant, ``fft-real-minmax``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

METHODS = ("ce", "kd", "at", "dct", "dct-paper", "dct+kd", "dct-paper+kd", "fam", "fam-abf")

DEFAULT_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "ce": (1.0, 0.0, 0.0),
    "kd": (0.1, 0.9, 0.0),
    "at": (1.0, 0.0, 1000.0),
    "dct": (1.0, 0.0, 1.0),
    "dct-paper": (1.0, 0.0, 1.0),
    "dct+kd": (0.1, 1.0, 1.0),
    "dct-paper+kd": (0.1, 1.0, 1.0),
    "fam": (1.0, 0.0, 1.0),
    "fam-abf": (1.0, 0.0, 1.0),
}

_PRESET = {"at": "at", "dct": "dct", "dct-paper": "paper", "dct+kd": "dct", "dct-paper+kd": "paper"}

# Methods whose teacher-prediction guide is on unless turned off (the released DCT-KD configuration).
GUIDED_BY_DEFAULT = ("dct-paper", "dct-paper+kd")
# Methods that can use the guide (the DCT-KD losses).
GUIDE_METHODS = ("dct", "dct-paper", "dct+kd", "dct-paper+kd")

FAM_MISSING = "fam needs dctkd_ext.nn.FrequencyAttention, which the installed dctkd_ext does not provide"


def _import_ext():
    try:
        import dctkd_ext
    except Exception as e:  # pragma: no cover - depends on the install
        raise UserError(f"this method needs the dctkd_ext package, which failed to import ({e}); "
                        "build it with `pip install -e .`") from None
    if not hasattr(dctkd_ext, "dct_at_loss"):
        raise UserError("dctkd_ext has no dct_at_loss (the extension is not built/installed); "
                        "build it with `pip install -e .`")
    return dctkd_ext


def frequency_attention_class():
    """``dctkd_ext.nn.FrequencyAttention`` if it exists, else None."""
    try:
        import dctkd_ext.nn as ext_nn
    except Exception:
        return None
    return getattr(ext_nn, "FrequencyAttention", None)


def method_available(name: str) -> bool:
    if name in ("ce", "kd"):
        return True
    try:
        _import_ext()
    except UserError:
        return False
    return name not in ("fam", "fam-abf") or frequency_attention_class() is not None


@dataclass
class MethodConfig:
    name: str
    ce_weight: float
    kd_weight: float
    feat_weight: float
    temperature: float = 4.0
    guide: bool = False
    level_weights: list[float] | None = None
    loss_options: dict[str, Any] = field(default_factory=dict)
    loss_preset: str | None = None  # the dct_at_loss preset, when not the method's own (_PRESET)
    fam_mid_channels: int = 64  # fam-abf only: fam uses the student's widths
    fam_cuton: float = 0.1
    feat_warmup: int = 0  # epochs of linear warm-up of the feature weight (fam, fam-abf)
    fam_student_preact: bool = False  # fam: the student's pre-ReLU stage outputs
    fam_pooled_target: bool = True  # fam: the pooled level is compared with the teacher's pooled feature

    @staticmethod
    def make(name: str, ce_weight=None, kd_weight=None, feat_weight=None, **kw) -> "MethodConfig":
        if name not in METHODS:
            raise UserError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
        ce, kd, feat = DEFAULT_WEIGHTS[name]
        if kw.get("guide") is None:
            kw["guide"] = name in GUIDED_BY_DEFAULT
        preset = kw.get("loss_preset")
        if preset is not None:
            if name not in _PRESET:
                raise UserError(f"--loss-preset selects the dct_at_loss preset of at, dct, dct-paper, dct+kd and "
                                f"dct-paper+kd; method {name!r} does not use dct_at_loss")
            presets = _import_ext().PRESETS
            if preset not in presets:
                raise UserError(f"--loss-preset: unknown preset {preset!r}; presets: {', '.join(presets)}")
        return MethodConfig(
            name,
            ce if ce_weight is None else float(ce_weight),
            kd if kd_weight is None else float(kd_weight),
            feat if feat_weight is None else float(feat_weight),
            **{k: v for k, v in kw.items() if v is not None},
        )

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or (self.feat_weight > 0 and self.name != "ce") or self.guide

    @property
    def preset(self) -> str | None:
        """The dct_at_loss preset of the feature term (None: the method has none)."""
        return self.loss_preset or _PRESET.get(self.name)

    @property
    def feature_kind(self) -> str | None:
        if self.name in _PRESET:
            return "dct_at"
        if self.name in ("fam", "fam-abf"):
            return "fam"
        return None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: KL(p_t || p_s) at temperature T, summed over classes, mean over the batch, x T^2."""
    T = temperature
    log_ps = F.log_softmax(student_logits.float() / T, dim=1)
    pt = F.softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_ps, pt, reduction="batchmean") * (T * T)


def match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the larger of two (B, C, H, W) maps to the other's H x W (adaptive average pooling)."""
    hs, ws = s.shape[-2:]
    ht, wt = t.shape[-2:]
    if (hs, ws) == (ht, wt):
        return s, t
    if hs * ws > ht * wt:
        return F.adaptive_avg_pool2d(s, (ht, wt)), t
    return s, F.adaptive_avg_pool2d(t, (hs, ws))


# ---------------------------------------------------------------------------------------------
# fam-abf: knowledge-review fusion (ReviewKD's ABF) with a FrequencyAttention output conv
# (FAM-KD as released is dctkd_train.fam_head)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The method object used by the loop
# ---------------------------------------------------------------------------------------------


class Method:
    """Computes the loss terms of one step. ``head`` (fam) is an extra trainable module that the
    loop runs on the student's features inside the (DDP-wrapped) forward."""

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        self.ext = _import_ext() if cfg.feature_kind == "dct_at" else None
        self.fam_cls = None
        if cfg.feature_kind == "fam":
            self.fam_cls = frequency_attention_class()
            if self.fam_cls is None:
                raise UserError(FAM_MISSING)

    @property
    def uses_features(self) -> bool:
        return self.cfg.feature_kind is not None and self.cfg.feat_weight > 0

    def build_head(self, student_shapes, teacher_shapes) -> nn.Module | None:
        if len(student_shapes) != len(teacher_shapes):
            raise UserError(
                f"method {self.cfg.name}: the student has {len(student_shapes)} feature levels and the teacher "
                f"{len(teacher_shapes)}; pick matching layers with --student-layers / --teacher-layers"
            )
        if self.cfg.level_weights is not None and len(self.cfg.level_weights) != len(student_shapes):
            raise UserError(f"--level-weights has {len(self.cfg.level_weights)} values for {len(student_shapes)} levels")
        if self.cfg.feature_kind != "fam":
            return None
        if self.cfg.name == "fam-abf":
            return ReviewFusionHead(student_shapes, teacher_shapes, self.cfg.fam_mid_channels, self.fam_cls,
                                    self.cfg.fam_cuton)
        from .fam_head import FamHead

        compare = [True] * len(student_shapes)
        if not self.cfg.fam_pooled_target and tuple(teacher_shapes[-1][1:]) == (1, 1):
            compare[-1] = False
        return FamHead(student_shapes, teacher_shapes, self.fam_cls, self.cfg.fam_cuton, compare)

    def default_layers(self, model: nn.Module, image_size: int, role: str) -> list[str]:
        """The layers hooked when --student-layers / --teacher-layers are not given: the stage
        outputs; for fam also the pooled feature as the deepest level, and the student's pre-ReLU
        stage outputs with fam_student_preact."""
        from .features import default_feature_layers

        if self.cfg.name != "fam":
            return default_feature_layers(model, image_size)
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

    def feat_scale(self, epoch: int) -> float:
        """Warm-up factor of the feature weight at (1-based) epoch ``epoch``."""
        if self.cfg.feat_warmup and self.cfg.feat_warmup > 0:
            return min(1.0, epoch / self.cfg.feat_warmup)
        return 1.0

    def distill_terms(self, labels, s_logits, s_feats, head_out, t_logits, t_feats, epoch: int) -> dict[str, torch.Tensor]:
        """The distillation terms (everything but CE), unweighted except the dct_at losses, which
        carry the feature weight (see weighted_inside; ``unweighted`` gives every term without it)."""
        c = self.cfg
        terms: dict[str, torch.Tensor] = {}
        if c.kd_weight > 0:
            terms["kd"] = kd_loss(s_logits, t_logits, c.temperature)
        if c.feat_weight > 0 and c.feature_kind == "dct_at":
            pairs = [match_spatial(s, t.detach()) for s, t in zip(s_feats, t_feats)]
            sw = (t_logits.argmax(1) == labels).float() if c.guide else None
            name = "at" if c.name == "at" else "dct"
            # The feature weight goes into the op's level weights, so the loss reaches the total with
            # an upstream gradient of 1 and its backward hands over the gradient its forward wrote.
            scale = self.feature_weight(epoch)
            levels = c.level_weights if c.level_weights is not None else [1.0] * len(pairs)
            terms[name] = self.ext.dct_at_loss(
                [p[0] for p in pairs], [p[1] for p in pairs],
                preset=c.preset, weights=[scale * w for w in levels], sample_weight=sw, **c.loss_options,
            )
        elif c.feat_weight > 0 and c.feature_kind == "fam":
            loss = 0.0
            for fused, t in zip(head_out, t_feats):
                if fused is not None:  # None: a level left out of the loss
                    loss = loss + F.mse_loss(fused.float(), t.detach().float())
            terms["fam"] = loss
        return terms

    def feature_weight(self, epoch: int) -> float:
        """The feature term's weight at (1-based) epoch ``epoch``: feat_weight times the warm-up."""
        return self.cfg.feat_weight * self.feat_scale(epoch)

    def weighted_inside(self, key: str) -> bool:
        """Whether distill_terms' ``key`` term already carries the feature weight (the dct_at losses)."""
        return key in ("at", "dct") and self.cfg.feature_kind == "dct_at"

    def total(self, ce: torch.Tensor, terms: dict[str, torch.Tensor], epoch: int) -> torch.Tensor:
        c = self.cfg
        total = c.ce_weight * ce
        for k, v in terms.items():
            if k == "kd":
                total = total + c.kd_weight * v
            elif self.weighted_inside(k):
                total = total + v
            else:
                total = total + self.feature_weight(epoch) * v
        return total

    def unweighted(self, terms: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        """The terms without their weights, detached (what the metrics report)."""
        w = self.feature_weight(epoch)
        return {k: (v.detach() / w if self.weighted_inside(k) else v.detach()) for k, v in terms.items()}


def parse_loss_options(items: list[str] | None) -> dict[str, Any]:
    """``--loss-opt key=value`` -> keyword overrides for ``dct_at_loss`` (numbers parsed)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--loss-opt expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        k, v = k.strip(), v.strip()
        val: Any = v
        if v.lower() in ("true", "false", "yes", "no"):
            val = v.lower() in ("true", "yes")
        else:
            try:
                val = int(v)
            except ValueError:
                try:
                    val = float(v)
                except ValueError:
                    pass
        out[k] = val
    return out
