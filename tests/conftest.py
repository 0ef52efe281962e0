"""Shared helpers of the test suite: devices to run on, fresh random inputs, the relative-error check."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (docs/DESIGN.md §5). Triton
# reads this when a kernel is defined, so it is set before dctkd_ext.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dctkd_ext  # noqa: E402,F401  (loads the ops)

# Devices that the compiled kernels run on here: the CPU always, CUDA where a GPU exists.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Relative-norm tolerances (docs/DESIGN.md §5): fp32 well under 1e-5, half-precision inputs within 1e-2.
TOL = {torch.float64: 1e-10, torch.float32: 5e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-6) -> float:
    """||out - ref|| / max(||ref||, floor): relative, except for a reference that is zero up to
    rounding (1x1 maps, identical inputs), where it becomes absolute."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return (out - ref).norm().item() / max(ref.norm().item(), floor)


def assert_close(out, ref, dtype, what="", factor=1.0):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values in the output"
    err = rel_err(out, ref)
    assert err <= TOL[dtype] * factor, f"{what}: relative error {err:.3e} > {TOL[dtype] * factor:.1e}"


def features(b, c, h, w, dtype=torch.float32, device="cpu", channels_last=False, generator=None, requires_grad=False):
    """Fresh random features: no exact zeros, no ties in the maps (continuous distribution)."""
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=generator) + 0.1
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


@pytest.fixture
def gen(request):
    # A fresh seed per test (from its name and the run's seed) so data differ across tests and runs,
    # while a failure can be replayed with the printed DCTKD_TEST_SEED.
    base = int(os.environ.get("DCTKD_TEST_SEED", torch.seed() % (2**31)))
    seed = (base + hash(request.node.nodeid)) % (2**31)
    g = torch.Generator().manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    return g
