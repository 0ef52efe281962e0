"""The accumulation dtype rule of every op (docs/DESIGN.md §3): fp64 when any input is fp64, else fp32."""

import torch


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
