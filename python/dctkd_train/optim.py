"""The trainer's optimiser: SGD as ``torch.optim.SGD`` computes it, run by torch's fused kernel where the
device has one, complex parameters included.

The for-loop SGD makes four elementwise passes per parameter and step (the decayed gradient into a new
tensor, the momentum buffer's scaling and update, the parameter's update); the fused kernel makes one. That matters for FAM-KD's head, whose
FrequencyAttention weights (``weights1``, complex, I x O x S x S) hold about 100 MB at the CIFAR shapes:
there the for-loop step took about 100 ms on a 2-core CPU and the fused one about 20 ms. The fused kernel
takes no complex tensors, but SGD's update is elementwise with real coefficients
(``d = g + wd p``, ``buf = momentum buf + (1 - dampening) d``, ``p -= lr buf``, nesterov alike), so on a
complex parameter it acts on the real and imaginary parts alike: :class:`SGD` steps each complex
parameter through its real view (``torch.view_as_real``, the same storage), whose gradient is linked to
the parameter's gradient at each step.
"""
from __future__ import annotations

import torch
from torch.torch_version import TorchVersion


def fused_sgd_runs(device_type: str) -> bool:
    """Whether torch has the fused SGD kernel for this device type: CPU and CUDA from torch 2.4 on (the
    package's minimum). Decided from the version, not by a trial step, so that no optimiser step runs
    outside training (tests count them)."""
    return device_type in ("cpu", "cuda") and TorchVersion(torch.__version__) >= "2.4"


class SGD(torch.optim.SGD):
    """``torch.optim.SGD(params, lr, momentum, weight_decay=..., nesterov=...)`` over a flat list of
    parameters, with ``fused=True`` when ``fused`` (complex parameters stepped through their real views).
    With ``fused=False`` it is torch's for-loop SGD, unchanged. zero_grad, state_dict and load_state_dict
    work on the parameters as given; a state dict whose momentum buffers are complex (saved by the
    for-loop SGD) loads too."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, fused: bool = False):
        params = list(params)
        if any(isinstance(p, dict) for p in params):
            raise TypeError("params: expected a flat iterable of tensors, not parameter groups")
        # (complex parameter, its real view) pairs; the optimiser holds the view in the parameter's place
        self._complex = [(p, torch.view_as_real(p.detach())) for p in params if fused and p.is_complex()]
        views = {id(p): v for p, v in self._complex}
        super().__init__([views.get(id(p), p) for p in params], lr=lr, momentum=momentum,
                         weight_decay=weight_decay, nesterov=nesterov, fused=True if fused else None)

    @property
    def fused_step(self) -> bool:
        """Whether the steps run torch's fused kernel."""
        return bool(self.defaults["fused"])

    def _link_grads(self) -> None:
        for p, view in self._complex:
            view.grad = None if p.grad is None else torch.view_as_real(p.grad.resolve_conj())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # the gradients it computes are linked below
            with torch.enable_grad():
                loss = closure()
        self._link_grads()
        super().step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p, view in self._complex:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
            view.grad = None

    def load_state_dict(self, state_dict: dict) -> None:
        # A momentum buffer saved for a complex parameter is complex when the for-loop SGD saved it and
        # real (..., 2) when the fused one did: each is brought to the form this optimiser holds.
        held = [p for g in self.param_groups for p in g["params"]]
        state_dict = dict(state_dict)
        state_dict["state"] = {k: {n: _as_held(v, held[k]) if isinstance(k, int) and k < len(held) else v
                                   for n, v in s.items()}
                               for k, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # how to step is this optimiser's, not the saved one's
            group["fused"], group["foreach"] = (True if self.fused_step else None), None


def _as_held(value, param: torch.Tensor):
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.is_complex() and not param.is_complex() and tuple(value.shape) + (2,) == tuple(param.shape):
        return torch.view_as_real(value)
    if param.is_complex() and not value.is_complex() and tuple(value.shape) == tuple(param.shape) + (2,):
        return torch.view_as_complex(value.contiguous())
    return value


def make_sgd(params, lr: float, momentum: float, weight_decay: float, nesterov: bool, device: torch.device,
             grad_scaler: bool) -> SGD:
    """The trainer's SGD: fused where the device has the kernel, except under a float16 GradScaler, which
    checks the gradients for infinities through the optimiser's parameters before the step links the
    complex parameters' gradients to their real views (there the for-loop SGD runs)."""
    fused = not grad_scaler and fused_sgd_runs(torch.device(device).type)
    return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, fused=fused)
