"""Collect named stage outputs of any model with forward hooks, for feature distillation in a plain loop.

>>> t_feats = StageFeatures(teacher, ["layer1", "layer2", "layer3"], detach=True)
>>> s_feats = StageFeatures(student, ["layer1", "layer2", "layer3"])
>>> with torch.no_grad():
...     t_logits = teacher(x)
>>> s_logits = student(x)
>>> loss = dctkd_ext.dct_at_loss(s_feats.pop(), t_feats.pop())

The hooks sit on the submodules themselves, so the features come from the same forward as the logits
(no second pass), and a model wrapped in DistributedDataParallel (or torch.compile's OptimizedModule)
can be passed as is: the hooks go on the wrapped module, whose forward DDP runs in the same process.
"""

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["StageFeatures", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class StageFeatures:
    """Forward hooks that keep the outputs of the named submodules of `model` from its last forward.

    stages: dotted module names (`model.named_modules()`), in the order the loss pairs them; None uses
    `model.feature_layers` when the model declares it. detach=True stores `output.detach()` (a teacher:
    no graph is kept even outside `torch.no_grad()`). A module that returns a tuple or list contributes
    its first element. `pop()` returns the list and clears it; `remove()` (or leaving a `with` block)
    takes the hooks off.
    """

    def __init__(self, model: nn.Module, stages: Optional[Sequence[str]] = None, detach: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        inner = unwrap_model(model)
        if stages is None:
            stages = getattr(inner, "feature_layers", None)
            if not stages:
                raise ValueError(
                    f"stages: {type(inner).__name__} declares no feature_layers; pass the module names, e.g. "
                    f"{[n for n, _ in inner.named_children()][:4]}"
                )
        if isinstance(stages, str) or not all(isinstance(s, str) for s in stages):
            raise TypeError(f"stages: expected a sequence of module names (str), got {stages!r}")
        stages = list(stages)
        if not stages:
            raise ValueError("stages: expected at least one module name, got an empty list")
        if len(set(stages)) != len(stages):
            raise ValueError(f"stages: names repeat: {stages}")
        modules = dict(inner.named_modules())
        missing = [s for s in stages if s == "" or s not in modules]
        if missing:
            top = ", ".join(n for n, _ in inner.named_children())
            raise ValueError(
                f"stages: no module named {', '.join(repr(m) for m in missing)} in {type(inner).__name__}; "
                f"its top-level modules are: {top} (use dotted names for deeper ones)"
            )
        self.stages: List[str] = stages
        self.detach = bool(detach)
        self._store: Dict[str, torch.Tensor] = {}
        self._handles = [modules[s].register_forward_hook(self._hook(s)) for s in stages]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            self._store[name] = output.detach() if self.detach and torch.is_tensor(output) else output

        return hook

    def pop(self) -> List[torch.Tensor]:
        """The stage outputs of the last forward, in `stages` order; clears them."""
        missing = [s for s in self.stages if s not in self._store]
        if missing:
            raise RuntimeError(
                f"StageFeatures: {', '.join(repr(m) for m in missing)} did not run since the last pop() "
                "(run the model's forward first, once per pop)"
            )
        feats = [self._store[s] for s in self.stages]
        self._store = {}
        return feats

    def clear(self) -> None:
        self._store = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._store = {}

    def __enter__(self) -> "StageFeatures":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"StageFeatures(stages={self.stages}, detach={self.detach})"
