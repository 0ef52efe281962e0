"""Argument checks shared by the ops: each error names the argument and what was expected."""

import os
from typing import Sequence

import torch

_REAL_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_real_float(t, name: str, ndim=None, min_ndim=None, layout_hint: str = "") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D {layout_hint}tensor, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims {layout_hint}, got shape {tuple(t.shape)}")
    if t.dtype not in _REAL_FLOAT:
        raise TypeError(f"{name}: expected a real floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    return t


def check_cuton(cuton) -> float:
    """The FAM mask's cut-on: a number in [0, 1] (a bool is not one); returned as a float."""
    if isinstance(cuton, bool) or not isinstance(cuton, (int, float)) or not 0.0 <= float(cuton) <= 1.0:
        raise ValueError(f"cuton: expected a number in [0, 1], got {cuton!r}")
    return float(cuton)


def check_same_device(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> torch.device:
    dev = tensors[0].device
    for t, n in zip(tensors, names):
        if t.device != dev:
            raise ValueError(f"{n}: expected a tensor on {dev} like {names[0]}, got one on {t.device}")
    return dev


def check_finite_enabled(device: torch.device) -> bool:
    """Whether to look for non-finite values after an op. On by default on the CPU (free: it looks at
    the small result first); on GPU it would need a host sync, so only with DCTKD_CHECK_FINITE=1.
    Never while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    flag = os.environ.get("DCTKD_CHECK_FINITE", "")
    if flag in ("0", "1"):
        return flag == "1"
    return device.type == "cpu"


def report_non_finite(groups) -> None:
    """groups: iterable of (name, tensor). Raises ValueError naming the first tensor with nan/inf."""
    for name, t in groups:
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains non-finite values (nan or inf)")
