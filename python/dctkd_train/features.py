"""Capture intermediate features of any model with forward hooks on named layers.

>>> hooks = FeatureHooks(model, ["layer1", "layer2", "layer3"])
>>> logits = model(x)
>>> feats = hooks.pop()          # [layer1 output, layer2 output, layer3 output], then cleared

The default layers are the model's stage outputs: ``model.feature_layers`` for the models of
:mod:`dctkd_train.models`, else found by :func:`find_stage_outputs` (the last top-level module at
each spatial resolution, found with one dummy forward).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .errors import UserError


class FeatureHooks:
    """Forward hooks that store the outputs of the named submodules, in the order given: a
    :class:`dctkd_ext.StageFeatures` whose bad layer names are reported as :class:`UserError`."""

    def __init__(self, model: nn.Module, layers: Sequence[str], detach: bool = False):
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules or n == ""]
        if missing:
            candidates = [n for n, _ in model.named_children()]
            raise UserError(
                f"no layer named {', '.join(repr(m) for m in missing)} in {type(model).__name__}; "
                f"top-level layers are: {', '.join(candidates)} (use dotted names for deeper ones)"
            )
        if len(set(layers)) != len(layers):
            raise UserError(f"feature layers repeat a name: {list(layers)}")
        from dctkd_ext.features import StageFeatures  # the compiled extension is needed only with features

        self.layers = list(layers)
        self._stages = StageFeatures(model, self.layers, detach=detach)

    @property
    def _store(self) -> dict:
        """The outputs captured since the last pop (empty after pop and after remove)."""
        return self._stages._store

    def pop(self) -> list[torch.Tensor]:
        """The captured features of the last forward, in layer order; clears the store."""
        return self._stages.pop()

    def remove(self) -> None:
        self._stages.remove()


@torch.no_grad()
def find_stage_outputs(model: nn.Module, image_size: int, device="cpu") -> list[str]:
    """Names of the last top-level modules at each spatial resolution (4D outputs only), skipping
    the first resolution when a smaller one follows only through a stem (a heuristic for models
    that do not declare ``feature_layers``). Recurses one level into a single ``features``-like
    Sequential child."""
    root = model
    prefix = ""
    children = list(model.named_children())
    if len(children) <= 3:
        for name, child in children:
            if isinstance(child, nn.Sequential) and len(child) > 3:
                root, prefix = child, name + "."
                break
    shapes: dict[str, tuple] = {}
    handles = []
    for name, child in root.named_children():
        handles.append(child.register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)) if torch.is_tensor(o) else None))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    # 4-D outputs with a spatial extent (a global pool's (B, C, 1, 1) is not a stage)
    order = [n for n, _ in root.named_children()
             if n in shapes and len(shapes[n]) == 4 and shapes[n][-1] * shapes[n][-2] > 1]
    stages: list[str] = []
    for i, n in enumerate(order):
        nxt = order[i + 1] if i + 1 < len(order) else None
        if nxt is None or shapes[nxt][-2:] != shapes[n][-2:]:
            stages.append(prefix + n)
    return stages


def default_feature_layers(model: nn.Module, image_size: int = 32) -> list[str]:
    layers = getattr(model, "feature_layers", None)
    if layers:
        return list(layers)
    return find_stage_outputs(model, image_size)


@torch.no_grad()
def probe_feature_shapes(model: nn.Module, layers: Sequence[str], image_size: int, device) -> list[tuple]:
    """(C, H, W) of each named layer's output for an image_size x image_size input."""
    hooks = FeatureHooks(model, layers)
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(2, 3, image_size, image_size, device=device))
        feats = hooks.pop()
    finally:
        model.train(was_training)
        hooks.remove()
    for n, f in zip(layers, feats):
        if f.dim() != 4:
            raise UserError(f"layer {n!r} gives a {f.dim()}-D output {tuple(f.shape)}; feature layers must give (B, C, H, W)")
    return [tuple(f.shape[1:]) for f in feats]
