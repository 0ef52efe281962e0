"""Benchmark suite of the spectral family's Fourier-domain filter ops (docs/DESIGN.md §3.4, §6).

Cases:
- "global_filter": the depthwise filter op (ours: dctkd_ext.global_filter) against the eager
  `xf * w * mask` multiply, at GFNet and FAM sizes.
- "spectral_conv": the channel-mixing op (ours: dctkd_ext.spectral_conv) against the eager einsum.
  On GPU both ops also time "ours_triton" (backend "triton"; "ours" is the default backend, CUDA), to
  set DEFAULT_GPU_BACKEND["spectral"] in dctkd_ext/_backend.py from measurements.
The FAM layer built on them is timed by bench/suites/fam_layer.py.

Minimal bytes: forward reads xf (and the weight) and writes y; backward reads dy, xf and the weight and
writes dxf and the weight gradient; fwd+bwd is their sum. complex64. The headline global_filter case runs
twice: with ones as the upstream gradient and with the gradient of a mean-squared-error loss ("/grad=mse").
"""

from typing import List

import torch

import dctkd_ext
from dctkd_ext import reference as R

try:  # bench/run.py puts bench/ on sys.path
    from common import Case, Impl, Prepared, grid_batches, has_triton, on_backend, wants_fp32
except ImportError:  # pragma: no cover  (imported as bench.suites.spectral from the repository root)
    from bench.common import Case, Impl, Prepared, grid_batches, has_triton, on_backend, wants_fp32

# The headline case (`python bench/run.py`); --full runs the op shapes below.
HEADLINE_GF = ("fam_cifar_64ch_32", 64, 64, 32, 32)
# global_filter / spectral_conv op shapes: (name, batch, channels, H, W) on the rfft half plane of W
GF_SHAPES = [("gfnet_h14_384ch", 128, 384, 14, 14), ("fam_cifar_64ch_32", 64, 64, 32, 32),
             ("fam_imagenet_64ch_56", 128, 64, 56, 56)]
SC_SHAPES = [("fam_cifar_32ch_32", 64, 32, 32, 32), ("fam_cifar_256ch_8", 64, 256, 8, 8),
             ("fam_imagenet_128ch_28", 128, 128, 28, 28)]

C64 = 8  # bytes per complex64 element


def _crandn(*shape, device):
    return torch.randn(*shape, dtype=torch.complex64, device=device)


def _gf_case(name, b, c, h, w, device, upstream="ones") -> Case:
    k = w // 2 + 1
    torch.manual_seed(0)
    xf0, w0 = _crandn(b, c, h, k, device=device), _crandn(c, h, k, device=device)
    mask = R.fam_highpass_mask(h, w, 0.1, torch.float32, device)[:, :k].contiguous()
    n, nw = b * c * h * k * C64, c * h * k * C64

    def make(fn):
        def build():
            xf, wt = xf0.clone().requires_grad_(), w0.clone().requires_grad_()
            return Prepared(fwd=lambda: torch.view_as_real(fn(xf, wt, mask)), leaves=[xf, wt])

        return build

    return Case(
        op="global_filter",
        shape_name=name + ("" if upstream == "ones" else f"/grad={upstream}"),
        upstream=upstream,
        batch=b,
        dtype=torch.complex64,
        min_bytes={"fwd": 2 * n + nw, "bwd": 3 * n + 2 * nw, "fwd+bwd": 5 * n + 3 * nw},
        impls=[Impl("ours", make(dctkd_ext.global_filter)), Impl("eager", make(lambda a, b_, m: a * b_ * m))]
        + ([Impl("ours_triton", make(on_backend("triton", dctkd_ext.global_filter)))]
           if device.type == "cuda" and has_triton() else []),
        notes="y = xf * w * mask on the rfft half plane, complex64; bwd: dxf and dw",
        extra={"channels": c, "h": h, "k": k},
    )


def _sc_case(name, b, c, h, w, device) -> Case:
    k = w // 2 + 1
    torch.manual_seed(0)
    xf0, w0 = _crandn(b, c, h, k, device=device), _crandn(c, c, h, k, device=device)
    nx, nw = b * c * h * k * C64, c * c * h * k * C64

    def make(fn):
        def build():
            xf, wt = xf0.clone().requires_grad_(), w0.clone().requires_grad_()
            return Prepared(fwd=lambda: torch.view_as_real(fn(xf, wt)), leaves=[xf, wt])

        return build

    return Case(
        op="spectral_conv",
        shape_name=name,
        batch=b,
        dtype=torch.complex64,
        min_bytes={"fwd": 2 * nx + nw, "bwd": 3 * nx + 2 * nw, "fwd+bwd": 5 * nx + 3 * nw},
        impls=[Impl("ours", make(dctkd_ext.spectral_conv)),
               Impl("eager", make(lambda a, b_: torch.einsum("bihk,iohk->bohk", a, b_)))]
        + ([Impl("ours_triton", make(on_backend("triton", dctkd_ext.spectral_conv)))]
           if device.type == "cuda" and has_triton() else []),
        notes="per-frequency channel mixing (batched complex GEMM), complex64",
        extra={"in_channels": c, "out_channels": c, "h": h, "k": k,
               "gflop": 8 * b * c * c * h * k / 1e9},
    )


def cases(args, device: torch.device) -> List[Case]:
    device = torch.device(device)
    if not wants_fp32(args):
        return []
    if not getattr(args, "full", False):
        name, batch, c, h, w = HEADLINE_GF
        return [_gf_case(name, b, c, h, w, device, upstream) for upstream in ("ones", "mse")
                for b in getattr(args, "batches", None) or [batch]]
    out: List[Case] = []
    for name, batch, c, h, w in GF_SHAPES:
        for b in grid_batches(args, batch, device):
            out.append(_gf_case(name, b, c, h, w, device))
    for name, batch, c, h, w in SC_SHAPES:
        for b in grid_batches(args, batch, device):
            out.append(_sc_case(name, b, c, h, w, device))
    return out
