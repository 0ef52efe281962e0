"""timm and torchvision classifiers as trainer models: ``--model timm:NAME`` / ``tv:NAME``.

Each is wrapped so that one forward gives the logits and, on the way, the chosen stage outputs:

* ``timm:NAME`` -- ``timm.create_model(NAME, pretrained=False)``; the stages are its ``feature_info``
  entries, taken with ``forward_intermediates`` (NCHW, also for transformers) and the logits with
  ``forward_head`` of the same pass.
* ``tv:NAME`` -- ``torchvision.models.get_model(NAME, weights=None)`` traced by
  ``torchvision.models.feature_extraction.create_feature_extractor``, returning the stage nodes and the
  output node in one pass.

The stage outputs pass through ``nn.Identity`` taps (``taps.<stage>``), so the trainer's forward hooks
(:class:`dctkd_ext.StageFeatures`) collect them like any layer's. Stages are chosen by name (a
``feature_info`` module for timm, a graph node for torchvision) or by index into the model's stage list
(``--stages 1,2,3`` / ``--stages layer2,layer3``). Nothing is downloaded: the weights start random; a
teacher's come from a local file (``--teacher FILE``: a timm/torchvision state dict, ``.pth`` or
``.safetensors``, or a checkpoint of this trainer).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .errors import UserError

PREFIXES = {"timm": "timm", "tv": "torchvision"}


def is_external(name: str | None) -> bool:
    return isinstance(name, str) and name.split(":", 1)[0] in PREFIXES and ":" in name


def _split(name: str) -> tuple[str, str]:
    kind, _, rest = name.partition(":")
    if not rest or ":" in rest or "/" in rest:
        raise UserError(
            f"model {name!r}: expected {kind}:NAME with a bare model name; nothing is downloaded, so pretrained "
            "tags and hub paths are not accepted: start from random weights, or give a teacher's weights as a "
            "local file with --teacher FILE"
        )
    return kind, rest


def _sanitize(stage: str) -> str:
    return stage.replace(".", "_")


class StageTapClassifier(nn.Module):
    """A classifier (``self.net``) whose forward returns the logits and passes each chosen stage output
    through ``self.taps[<stage>]`` (identity), where forward hooks can take it."""

    def __init__(self, net: nn.Module, stages: Sequence[str], all_stages: Sequence[str], arch: str):
        super().__init__()
        self.net = net
        self.stages = list(stages)
        self.all_stages = list(all_stages)
        self.arch = arch
        self.taps = nn.ModuleDict({_sanitize(s): nn.Identity() for s in self.stages})
        self.feature_layers = tuple(f"taps.{_sanitize(s)}" for s in self.stages)

    def _tap(self, feats: Sequence[torch.Tensor]) -> None:
        for s, f in zip(self.stages, feats):
            self.taps[_sanitize(s)](f)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, stages={self.stages}"


class TimmClassifier(StageTapClassifier):
    def __init__(self, net: nn.Module, stages: Sequence[str], all_stages: Sequence[str], arch: str):
        super().__init__(net, stages, all_stages, arch)
        self.indices = [self.all_stages.index(s) for s in self.stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        final, inter = self.net.forward_intermediates(x, indices=self.indices)
        self._tap(inter)
        return self.net.forward_head(final)


class TorchvisionClassifier(StageTapClassifier):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self._tap([out[f"stage{i}"] for i in range(len(self.stages))])
        return out["logits"]


def default_stages(all_stages: Sequence[str], reductions: Sequence[int]) -> list[str]:
    """The last stage at each resolution, without the stem (reduction <= 2) when deeper stages exist."""
    keep = []
    for i, (s, r) in enumerate(zip(all_stages, reductions)):
        nxt = reductions[i + 1] if i + 1 < len(reductions) else None
        if nxt is None or nxt != r:
            keep.append((s, r))
    if any(r > 2 for _, r in keep):
        keep = [(s, r) for s, r in keep if r > 2]
    return [s for s, _ in keep]


def resolve_stage_spec(spec: Sequence[str] | str | None, stage_list: Sequence[str], default: Sequence[str],
                       what: str, names: Sequence[str] | None = None) -> list[str]:
    """Stage names from a spec of names and/or indices; ``default`` if None. An index points into
    ``stage_list`` (the model's stages, negative from the end); a name may be any of ``names``
    (default: ``stage_list``)."""
    if spec is None:
        return list(default)
    names = stage_list if names is None else names
    out = []
    for it in _items(spec):
        if _is_index(it):
            idx = int(it)
            if not -len(stage_list) <= idx < len(stage_list):
                raise UserError(f"{what}: stage index {idx} out of range for the {len(stage_list)} stages "
                                f"{', '.join(stage_list)}")
            out.append(stage_list[idx])
        elif it in names:
            out.append(it)
        else:
            raise UserError(f"{what}: no stage {it!r}; the stages are {', '.join(stage_list)} (or their indices "
                            f"0..{len(stage_list) - 1})")
    if not out:
        raise UserError(f"{what}: no stages given")
    if len(set(out)) != len(out):
        raise UserError(f"{what}: stages repeat: {out}")
    return out


def _items(spec) -> list[str]:
    return [s.strip() for s in (spec.split(",") if isinstance(spec, str) else map(str, spec)) if s.strip()]


def _is_index(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _build_timm(name: str, num_classes: int, stages) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError(f"model 'timm:{name}' needs timm, which is not installed (pip install timm, or the "
                        "package's [timm] extra)") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        raise UserError(f"timm has no model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    net = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if not hasattr(net, "forward_intermediates") or not hasattr(net, "feature_info"):
        raise UserError(f"timm model {name!r} has no forward_intermediates/feature_info, so its stages cannot be taken")
    info = list(net.feature_info)
    all_stages = [f["module"] for f in info]
    chosen = resolve_stage_spec(stages, all_stages, default_stages(all_stages, [f["reduction"] for f in info]),
                                f"--stages for timm:{name}")
    return TimmClassifier(net, chosen, all_stages, f"timm:{name}")


# Stage outputs (one per resolution) of common torchvision classifiers; others are found by probing.
TV_STAGES: dict[str, tuple[str, ...]] = {
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "resnet34": ("layer1", "layer2", "layer3", "layer4"),
    "resnet50": ("layer1", "layer2", "layer3", "layer4"),
    "resnet101": ("layer1", "layer2", "layer3", "layer4"),
    "mobilenet_v2": ("features.3", "features.6", "features.13", "features.18"),
}


def _build_tv(name: str, num_classes: int, stages, image_size: int) -> nn.Module:
    try:
        import torchvision
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    except ImportError:
        raise UserError(f"model 'tv:{name}' needs torchvision, which is not installed") from None
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"torchvision has no classification model {name!r}; e.g. "
                        f"{', '.join(torchvision.models.list_models(module=torchvision.models)[:8])}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    train_nodes, _ = get_graph_node_names(model)
    if name in TV_STAGES:
        default = list(TV_STAGES[name])
    else:
        from .features import find_stage_outputs

        default = find_stage_outputs(model, image_size)
    chosen = resolve_stage_spec(stages, default, default, f"--stages for tv:{name}", names=train_nodes)
    nodes = {s: f"stage{i}" for i, s in enumerate(chosen)}
    nodes[train_nodes[-1]] = "logits"
    net = create_feature_extractor(model, return_nodes=nodes)
    return TorchvisionClassifier(net, chosen, default, f"tv:{name}")


def build_external(name: str, num_classes: int, stages=None, image_size: int = 224) -> nn.Module:
    """Build ``timm:NAME`` or ``tv:NAME`` with random weights and its stage taps."""
    kind, model_name = _split(name)
    if kind == "timm":
        return _build_timm(model_name, num_classes, stages)
    return _build_tv(model_name, num_classes, stages, image_size)


def adapt_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm/torchvision state dict (keys of the bare network) for the wrapped model (keys ``net.*``);
    a state dict of the wrapped model is returned as is."""
    if isinstance(model, StageTapClassifier) and sd and not any(k.startswith("net.") for k in sd):
        return {"net." + k: v for k, v in sd.items()}
    return sd


def stage_layers(model: nn.Module, stages, image_size: int, what: str) -> list[str]:
    """The layers to hook for ``--stages``: the taps of a timm/torchvision model (built with those
    stages); for the other models, names and/or indices into their default stage layers."""
    from .features import default_feature_layers

    if isinstance(model, StageTapClassifier):
        return list(model.feature_layers)
    default = default_feature_layers(model, image_size)
    return resolve_stage_spec(stages, default, default, what, names=[n for n, _ in model.named_modules() if n])


def make_deterministic() -> None:
    """``--deterministic``: deterministic algorithms where PyTorch has them (a warning, not an error, for
    the few CUDA backward kernels that have none, e.g. adaptive pooling), cuDNN without autotuning, and
    the cuBLAS workspace setting that deterministic cuBLAS needs."""
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
