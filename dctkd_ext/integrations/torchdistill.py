"""torchdistill integration: DCT-KD and FAM-KD as torchdistill registry entries.

Importing this module registers, with torchdistill's own registries:

* mid-level loss ``DCTATLoss`` -- one :func:`dctkd_ext.dct_at_loss` call over all configured
  teacher/student pairs (read from torchdistill's io dicts), configured like torchdistill's ``ATLoss``;
* auxiliary model wrapper ``Student4FAMKD`` -- the student plus FAM-KD's fusion head (knowledge-review
  fusion whose output layers are :class:`dctkd_ext.nn.FrequencyAttention`); its parameters are the
  wrapper's, so the optimizer torchdistill builds from the student trains them;
* mid-level loss ``FAMKDLoss`` -- the MSE between the wrapper's fused maps and the teacher's features.

In a torchdistill YAML, one line loads it::

    dependencies:
      - name: 'dctkd_ext.integrations.torchdistill'

(see ``examples/torchdistill/`` and ``docs/INTEGRATIONS.md``).
"""

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torchdistill.losses.registry import register_mid_level_loss
    from torchdistill.models.registry import register_auxiliary_model_wrapper
    from torchdistill.models.util import wrap_if_distributed
    from torchdistill.models.wrapper import AuxiliaryModelWrapper
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dctkd_ext.integrations.torchdistill needs torchdistill (pip install torchdistill, or this "
        f"package's [torchdistill] extra); importing it failed: {e}"
    ) from e

from ..nn.loss import match_spatial
from ..nn.spectral import FrequencyAttention
from ..ops import dct_at_loss
from ..presets import resolve_options

__all__ = ["DCTATLoss", "FAMKDLoss", "Student4FAMKD", "FAMReviewFusion", "ReviewFusionBlock"]

# torchdistill's key of the model itself in an io dict (its SELF_MODULE_PATH)
SELF_PATH = "."


def _io_ref(cfg: Any, what: str) -> tuple:
    """(path, io) of a ``{io: 'output', path: 'layer1'}`` entry; errors name the entry."""
    if not isinstance(cfg, dict) or "path" not in cfg:
        raise ValueError(f"{what}: expected a mapping with 'path' (and 'io', default 'output'), got {cfg!r}")
    io = cfg.get("io", "output")
    if io not in ("input", "output"):
        raise ValueError(f"{what}.io: expected 'input' or 'output', got {io!r}")
    return str(cfg["path"]), io


def _read(io_dict: dict, path: str, io: str, what: str):
    try:
        return io_dict[path][io]
    except KeyError:
        raise KeyError(
            f"{what}: no {io!r} of module {path!r} in the io dict (keys: {sorted(io_dict)}); add {path!r} to "
            f"the model's forward_hook: {io}: [...] list in the YAML"
        ) from None


def _pair_list(pairs: Any) -> List[tuple]:
    """[(name, pair_cfg)] from a mapping of named pairs (as ATLoss's at_pairs) or a list of pairs."""
    if isinstance(pairs, dict):
        items = list(pairs.items())
    elif isinstance(pairs, (list, tuple)):
        items = [(f"pairs[{i}]", p) for i, p in enumerate(pairs)]
    else:
        raise TypeError(f"pairs: expected a mapping of named pairs or a list of pairs, got {type(pairs).__name__}")
    if not items:
        raise ValueError("pairs: expected at least one teacher/student pair")
    return items


@register_mid_level_loss(key="DCTATLoss")
class DCTATLoss(nn.Module):
    """DCT-KD (or AT) over teacher/student feature pairs read from torchdistill's io dicts.

    ``pairs``: named pairs ``{teacher: {io, path}, student: {io, path}, weight}`` (``weight`` default 1),
    as torchdistill's ``ATLoss``; a list of such pairs is accepted too. All pairs go into ONE
    :func:`dctkd_ext.dct_at_loss` call, the pair weights into its ``weights``. ``preset`` (``dct``,
    ``paper``, ``at``), ``reduction`` and any option of the preset (``distance: 'mse'``, ...) are passed
    through. Pairs whose spatial sizes differ are matched by adaptive average pooling of the larger map
    (as ``python -m dctkd_train`` does); channels may differ. ``guide: True`` applies DCT-KD's
    teacher-prediction guide: only samples whose teacher prediction (the teacher's ``teacher_logits``
    entry, by default the model output ``{path: '.', io: 'output'}``) equals the target count.
    """

    def __init__(self, pairs, preset: str = "dct", reduction: str = "mean", guide: bool = False,
                 teacher_logits: Optional[dict] = None, **overrides):
        super().__init__()
        resolve_options(preset, overrides)  # an unknown option fails here, not at the first step
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: expected 'mean' or 'sum' (a torchdistill loss is a scalar), got {reduction!r}")
        self.pairs = []
        weights = []
        for name, cfg in _pair_list(pairs):
            if not isinstance(cfg, dict) or "teacher" not in cfg or "student" not in cfg:
                raise ValueError(f"{name}: expected a mapping with 'teacher' and 'student' entries, got {cfg!r}")
            w = cfg.get("weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise TypeError(f"{name}.weight: expected a number, got {w!r}")
            self.pairs.append((name, _io_ref(cfg["teacher"], f"{name}.teacher"), _io_ref(cfg["student"], f"{name}.student")))
            weights.append(float(w))
        self.weights = weights
        self.preset, self.reduction, self.overrides = preset, reduction, dict(overrides)
        self.guide = bool(guide)
        self.teacher_logits = _io_ref(teacher_logits or {"path": SELF_PATH, "io": "output"}, "teacher_logits")

    def features(self, student_io_dict: dict, teacher_io_dict: dict):
        """(student feats, teacher feats), spatially matched, in pair order."""
        fs = [_read(student_io_dict, sp, sio, f"{n}.student") for n, _, (sp, sio) in self.pairs]
        ft = [_read(teacher_io_dict, tp, tio, f"{n}.teacher") for n, (tp, tio), _ in self.pairs]
        return match_spatial(fs, ft)

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        fs, ft = self.features(student_io_dict, teacher_io_dict)
        sample_weight = None
        if self.guide:
            if targets is None:
                raise ValueError("DCTATLoss(guide=True) needs the targets (torchdistill passes them to the criterion)")
            t_logits = _read(teacher_io_dict, *self.teacher_logits, "teacher_logits")
            sample_weight = (t_logits.argmax(1) == targets).float()
        return dct_at_loss(fs, ft, preset=self.preset, weights=self.weights, sample_weight=sample_weight,
                           reduction=self.reduction, **self.overrides)

    def extra_repr(self) -> str:
        names = [n for n, _, _ in self.pairs]
        extra = "".join(f", {k}={v!r}" for k, v in self.overrides.items())
        return f"pairs={names}, weights={self.weights}, preset={self.preset!r}, guide={self.guide}{extra}"

    def __str__(self) -> str:  # torchdistill logs the criterion with str()
        return f"DCTATLoss({self.extra_repr()})"


# ---------------------------------------------------------------------------------------------
# FAM-KD
# ---------------------------------------------------------------------------------------------


class ReviewFusionBlock(nn.Module):
    """One level of the knowledge-review fusion: 1x1 conv + BN of the student feature; fused with the
    deeper level's (nearest-upsampled) fused map by a two-channel sigmoid attention; resized to the
    teacher's size; then FAM-KD's output layer, FrequencyAttention + BN + ReLU, to the teacher's channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, size: int, fuse: bool, cuton: float):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        self.fam = FrequencyAttention(mid_channels, out_channels, size, cuton=cuton)
        self.out = nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.size = size
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)

    def forward(self, x: torch.Tensor, deeper: Optional[torch.Tensor] = None):
        x = self.reduce(x)
        if self.attention is not None:
            y = F.interpolate(deeper, x.shape[-2:], mode="nearest")
            a = self.attention(torch.cat([x, y], dim=1))
            x = x * a[:, 0:1] + y * a[:, 1:2]
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, (self.size, self.size), mode="nearest")
        return self.out(self.fam(x)), x


class FAMReviewFusion(nn.Module):
    """FAM-KD's fusion head: student stage features (shallow to deep) -> one map per level shaped like
    the teacher's feature at that level, fusing from the deepest level up (knowledge review).

    levels: per level (shallow to deep) ``(student_channels, teacher_channels, teacher_size)``.
    """

    def __init__(self, levels: Sequence[Sequence[int]], mid_channels: int = 64, cuton: float = 0.1):
        super().__init__()
        levels = [tuple(int(v) for v in lv) for lv in levels]
        if not levels or any(len(lv) != 3 for lv in levels):
            raise ValueError(f"levels: expected (student_channels, teacher_channels, teacher_size) per level, got {levels}")
        n = len(levels)
        blocks = [ReviewFusionBlock(cs, mid_channels, ct, size, fuse=i < n - 1, cuton=cuton)
                  for i, (cs, ct, size) in enumerate(levels)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(feats) != len(self.blocks):
            raise ValueError(f"feats: expected {len(self.blocks)} student features (one per level), got {len(feats)}")
        out: List[Optional[torch.Tensor]] = [None] * len(feats)
        deeper = None
        for i in range(len(feats) - 1, -1, -1):
            out[i], deeper = self.blocks[i](feats[i], deeper)
        return out


@register_auxiliary_model_wrapper(key="Student4FAMKD")
class Student4FAMKD(AuxiliaryModelWrapper):
    """The student and FAM-KD's fusion head (:class:`FAMReviewFusion`) as one torchdistill model.

    ``features``: the student's stage features, shallow to deep, each ``{io, path, in_channels,
    out_channels, size}``: ``path`` is relative to this wrapper (``student_model.layer1``) and must be
    in the student's ``forward_hook`` list; ``in_channels`` the student's channels there,
    ``out_channels`` and ``size`` the teacher's channels and (square) spatial size at the paired level.
    ``mid_channels`` (64) and ``cuton`` (0.1) configure the fusion. ``forward`` is the student's;
    ``secondary_forward`` (called by torchdistill after it) runs the fusion on the hooked features and
    puts the list of fused maps in the io dict under ``output_path`` (``fam_head``), io ``output``,
    where :class:`FAMKDLoss` reads it.
    """

    def __init__(self, student_model, features, mid_channels: int = 64, cuton: float = 0.1,
                 output_path: str = "fam_head", device=None, device_ids=None, distributed: bool = False,
                 find_unused_parameters=None, **kwargs):
        super().__init__()
        if not isinstance(features, (list, tuple)) or not features:
            raise ValueError(f"features: expected a non-empty list of {{io, path, in_channels, out_channels, size}}, got {features!r}")
        refs, levels = [], []
        for i, f in enumerate(features):
            refs.append(_io_ref(f, f"features[{i}]"))
            try:
                levels.append((int(f["in_channels"]), int(f["out_channels"]), int(f["size"])))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"features[{i}]: expected integer in_channels, out_channels and size, got {f!r}") from None
        self.feature_refs = refs
        self.output_path = output_path
        self.student_model = wrap_if_distributed(student_model, device, device_ids, distributed, find_unused_parameters)
        head = FAMReviewFusion(levels, mid_channels=mid_channels, cuton=cuton)
        if device is not None:
            head = head.to(device)
        self.fam_head = wrap_if_distributed(head, device, device_ids, distributed, find_unused_parameters)

    def forward(self, *args, **kwargs):
        return self.student_model(*args, **kwargs)

    def secondary_forward(self, io_dict: Dict[str, dict]):
        feats = [_read(io_dict, path, io, f"features[{i}]") for i, (path, io) in enumerate(self.feature_refs)]
        io_dict[self.output_path] = {"output": self.fam_head(feats)}


@register_mid_level_loss(key="FAMKDLoss")
class FAMKDLoss(nn.Module):
    """FAM-KD's feature loss: ``sum_l weight_l * mse(fused_l, teacher_l)`` (mean over elements).

    ``teacher_features``: the teacher's features, shallow to deep, each ``{io, path}`` (in the teacher's
    ``forward_hook`` list), one per level of :class:`Student4FAMKD`'s ``features``. ``student``: where
    the fused maps are in the student's io dict (``{path: 'fam_head', io: 'output'}``). ``weights``:
    one per level (default 1).
    """

    def __init__(self, teacher_features, student: Optional[dict] = None, weights: Optional[Sequence[float]] = None,
                 **kwargs):
        super().__init__()
        if not isinstance(teacher_features, (list, tuple)) or not teacher_features:
            raise ValueError(f"teacher_features: expected a non-empty list of {{io, path}}, got {teacher_features!r}")
        self.teacher_refs = [_io_ref(t, f"teacher_features[{i}]") for i, t in enumerate(teacher_features)]
        self.student_ref = _io_ref(student or {"path": "fam_head", "io": "output"}, "student")
        if weights is None:
            weights = [1.0] * len(self.teacher_refs)
        if len(weights) != len(self.teacher_refs):
            raise ValueError(f"weights: expected {len(self.teacher_refs)} values (one per level), got {list(weights)}")
        self.weights = [float(w) for w in weights]

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        fused = _read(student_io_dict, *self.student_ref, "student")
        if len(fused) != len(self.teacher_refs):
            raise ValueError(f"FAMKDLoss: {len(fused)} fused maps but {len(self.teacher_refs)} teacher_features")
        loss = 0.0
        for i, ((path, io), w, s) in enumerate(zip(self.teacher_refs, self.weights, fused)):
            t = _read(teacher_io_dict, path, io, f"teacher_features[{i}]")
            if s.shape != t.shape:
                raise ValueError(
                    f"FAMKDLoss level {i}: fused map {tuple(s.shape)} vs teacher {path!r} {tuple(t.shape)}; set "
                    "the wrapper's out_channels and size to the teacher's"
                )
            loss = loss + w * F.mse_loss(s.float(), t.detach().float())
        return loss

    def __str__(self) -> str:
        return f"FAMKDLoss(teacher_features={[p for p, _ in self.teacher_refs]}, weights={self.weights})"
