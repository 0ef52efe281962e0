"""fp16 training with complex parameters (FrequencyAttention.weights1): a GradScaler that unscales them.

PyTorch's GradScaler unscales and checks gradients with a kernel that takes real dtypes only, so a
model with complex parameters stops at the first ``scaler.step`` ("not implemented for
'ComplexFloat'"). :class:`GradScaler` unscales those gradients through their real views
(``torch.view_as_real``: the same memory) and folds their non-finite check into the same
``found_inf`` flags; everything else is ``torch.amp.GradScaler``. bf16 autocast needs no scaler.
"""

from typing import Dict

import torch

__all__ = ["GradScaler"]


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` that also handles complex gradients. Same arguments and use:

    >>> scaler = dctkd_ext.amp.GradScaler("cuda")
    >>> scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
    """

    def _unscale_grads_(self, optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor,
                        allow_fp16: bool) -> Dict[torch.device, torch.Tensor]:
        held = [(p, p.grad) for group in optimizer.param_groups for p in group["params"]
                if p.grad is not None and p.grad.is_complex()]
        if not held:
            return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        for p, g in held:  # hide them from the real-only kernel, then unscale them as real views
            if g.is_sparse:
                raise NotImplementedError("GradScaler: sparse complex gradients are not supported")
            p.grad = None
        try:
            per_device = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        finally:
            for p, g in held:
                p.grad = g
        with torch.no_grad():
            by_device: Dict[torch.device, list] = {}
            for _, g in held:
                by_device.setdefault(g.device, []).append(torch.view_as_real(g))
            for device, grads in by_device.items():
                if device not in per_device:
                    per_device[device] = found_inf.to(device=device, non_blocking=True, copy=True)
                torch._amp_foreach_non_finite_check_and_unscale_(
                    grads, per_device[device], inv_scale.to(device=device, non_blocking=True))
        return per_device
