"""The base of the distillation methods, their registry and their configuration.

A method is a subclass of :class:`Method` registered with :func:`register`; its class attributes say
what it is (name, default weights, feature kind, guide, dct_at_loss preset) and its methods compute
its terms. :class:`MethodConfig` holds one run's weights and options; ``Method(config)`` builds the
registered class of ``config.name``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

FAM_MISSING = "fam needs dctkd_ext.nn.FrequencyAttention, which the installed dctkd_ext does not provide"

# name -> method class, in the order of registration (the order --help and the docs list them in)
REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` the method ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered already ({REGISTRY[cls.name].__name__})")
    REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered class of method ``name``; :class:`UserError` for an unknown name."""
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; methods: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def import_ext():
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
    """Whether method ``name`` can run with what is installed."""
    return method_class(name).available()


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


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
    loss_preset: str | None = None  # the dct_at_loss preset, when not the method's own (Method.preset)
    fam_mid_channels: int = 64  # fam-abf only: fam uses the student's widths
    fam_cuton: float = 0.1
    feat_warmup: int = 0  # epochs of linear warm-up of the feature weight (fam, fam-abf)
    fam_student_preact: bool = False  # fam: the student's pre-ReLU stage outputs
    fam_pooled_target: bool = True  # fam: the pooled level is compared with the teacher's pooled feature

    @staticmethod
    def make(name: str, ce_weight=None, kd_weight=None, feat_weight=None, **kw) -> MethodConfig:
        cls = method_class(name)
        ce, kd, feat = cls.weights
        if kw.get("guide") is None:
            kw["guide"] = cls.guide_default
        preset = kw.get("loss_preset")
        if preset is not None:
            if cls.preset is None:
                users = [n for n, c in REGISTRY.items() if c.preset is not None]
                raise UserError(f"--loss-preset selects the dct_at_loss preset of {_names(users)}; "
                                f"method {name!r} does not use dct_at_loss")
            presets = import_ext().PRESETS
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
    def method(self) -> type[Method]:
        return method_class(self.name)

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or (self.feat_weight > 0 and self.method.feature_teacher) or self.guide

    @property
    def preset(self) -> str | None:
        """The dct_at_loss preset of the feature term (None: the method has none)."""
        return self.loss_preset or self.method.preset

    @property
    def feature_kind(self) -> str | None:
        return self.method.feature_kind


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


class Method:
    """One distillation method: computes the loss terms of one step. ``Method(config)`` builds the
    registered class of ``config.name``. The head (:meth:`build_head`) is an extra trainable module
    that the loop runs on the student's features inside the (DDP-wrapped) forward.

    What a subclass declares (class attributes) and may override (methods):

    * ``name``, ``weights`` (the default ce, kd, feat weights);
    * ``feature_kind``: None (logits only), ``"dct_at"`` or ``"fam"``; with None the student's and
      teacher's features are not hooked;
    * ``preset``: the ``dct_at_loss`` preset of its feature term (None: it does not use dct_at_loss);
    * ``uses_guide`` / ``guide_default``: whether it can take the teacher-prediction guide, and whether
      it is on unless turned off;
    * ``paper``: the paper whose recipes are its own (``"dctkd"``, ``"famkd"``; None: a baseline);
    * ``feature_teacher``: whether a feature weight > 0 needs the teacher;
    * :meth:`feature_terms` (its FEAT term), :meth:`make_head`, :meth:`default_layers`, :meth:`setup`
      (what it needs installed), :meth:`available`, and :meth:`fill_config` / :meth:`record_config`
      (its options in the run's configuration).
    """

    name: str = ""
    weights: tuple[float, float, float] = (1.0, 0.0, 0.0)
    feature_kind: str | None = None
    preset: str | None = None
    uses_guide: bool = False
    guide_default: bool = False
    paper: str | None = None
    feature_teacher: bool = True  # whether a feature weight > 0 needs the teacher (ce: it does not)

    def __new__(cls, cfg: MethodConfig):
        if cls is Method:
            cls = method_class(cfg.name)
        return super().__new__(cls)

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        self.ext = None  # dctkd_ext, for the methods that call its losses
        self.fam_cls = None  # dctkd_ext.nn.FrequencyAttention, for the FAM heads
        self.setup()

    # ---- what the method needs, and its options in the run's configuration

    def setup(self) -> None:
        """Import what the method needs; :class:`UserError` when it is missing."""

    @classmethod
    def available(cls) -> bool:
        """Whether the method can run with what is installed."""
        return True

    @classmethod
    def fill_config(cls, cfg: dict, raw: dict) -> None:
        """Fill the method's options in the run's configuration ``cfg`` that the user (``raw``) left unset."""
        if cfg["feat_warmup"] is None:
            cfg["feat_warmup"] = cls.default_feat_warmup(int(cfg["epochs"]))

    @classmethod
    def default_feat_warmup(cls, epochs: int) -> int:
        return 0

    @classmethod
    def record_config(cls, mc: MethodConfig, cfg: dict) -> None:
        """Write the method's resolved options back into the run's configuration (config.json)."""

    # ---- features and head

    @property
    def uses_features(self) -> bool:
        return self.feature_kind is not None and self.cfg.feat_weight > 0

    def build_head(self, student_shapes, teacher_shapes) -> nn.Module | None:
        """The trainable head on the student's features (None: the method has none), after checking
        that the feature levels pair up."""
        if len(student_shapes) != len(teacher_shapes):
            raise UserError(
                f"method {self.cfg.name}: the student has {len(student_shapes)} feature levels and the teacher "
                f"{len(teacher_shapes)}; pick matching layers with --student-layers / --teacher-layers"
            )
        if self.cfg.level_weights is not None and len(self.cfg.level_weights) != len(student_shapes):
            raise UserError(f"--level-weights has {len(self.cfg.level_weights)} values for {len(student_shapes)} levels")
        return self.make_head(student_shapes, teacher_shapes)

    def make_head(self, student_shapes, teacher_shapes) -> nn.Module | None:
        return None

    def default_layers(self, model: nn.Module, image_size: int, role: str) -> list[str]:
        """The layers hooked when --student-layers / --teacher-layers are not given: the stage outputs."""
        from ..features import default_feature_layers

        return default_feature_layers(model, image_size)

    # ---- the loss

    def feat_scale(self, epoch: int) -> float:
        """Warm-up factor of the feature weight at (1-based) epoch ``epoch``."""
        if self.cfg.feat_warmup and self.cfg.feat_warmup > 0:
            return min(1.0, epoch / self.cfg.feat_warmup)
        return 1.0

    def feature_weight(self, epoch: int) -> float:
        """The feature term's weight at (1-based) epoch ``epoch``: feat_weight times the warm-up."""
        return self.cfg.feat_weight * self.feat_scale(epoch)

    def distill_terms(self, labels, s_logits, s_feats, head_out, t_logits, t_feats, epoch: int) -> dict[str, torch.Tensor]:
        """The distillation terms (everything but CE), unweighted except those in ``weighted_inside``,
        which carry the feature weight (``unweighted`` gives every term without it)."""
        terms: dict[str, torch.Tensor] = {}
        if self.cfg.kd_weight > 0:
            terms["kd"] = kd_loss(s_logits, t_logits, self.cfg.temperature)
        if self.cfg.feat_weight > 0:
            terms.update(self.feature_terms(labels, s_logits, s_feats, head_out, t_logits, t_feats, epoch))
        return terms

    def feature_terms(self, labels, s_logits, s_feats, head_out, t_logits, t_feats, epoch: int) -> dict[str, torch.Tensor]:
        """The method's FEAT term(s), by name (none here)."""
        return {}

    def weighted_inside(self, key: str) -> bool:
        """Whether distill_terms' ``key`` term already carries the feature weight."""
        return False

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
