"""The transform bases (docs/DESIGN.md §3.2-3.3) that both the reference and the Triton kernels use,
evaluated in float64 from exact integer angles and rounded once to the requested dtype."""

import math

import torch


def dct_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix D[k, m] = s(k) cos(pi (2m+1) k / (2n))."""
    k = torch.arange(n, dtype=torch.float64, device=device).unsqueeze(1)
    m = torch.arange(n, dtype=torch.float64, device=device).unsqueeze(0)
    d = torch.cos(math.pi * (2 * m + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] = math.sqrt(1.0 / n)
    return d.to(dtype)


def dft_real_matrices(n: int, dtype=torch.float64, device=None):
    """(C, S): cos and sin of 2 pi k m / n, the angle reduced mod n in integers before it is scaled."""
    k = torch.arange(n, dtype=torch.int64, device=device)
    ang = (2 * math.pi / n) * ((k.unsqueeze(1) * k.unsqueeze(0)) % n).to(torch.float64)
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)
