"""Shared helpers of the test suite: the backends to run on, replayable random seeds, fresh random
inputs in several memory layouts, and the error bounds every backend is held to.

Seeds: each run draws a base seed (or takes DCTKD_TEST_SEED); each test derives its own from the base
and its node id (crc32, stable across processes), seeds torch/numpy/random with it and gets a
generator `gen`. A failing test prints `DCTKD_TEST_SEED=<base> python -m pytest '<node id>'`, which
replays it exactly.

Error bounds (relative to the float64 reference's norm): an op that accumulates in fp32 (fp64 for
fp64 inputs) and returns fp32/fp64 is held to ACC_TOL; one that returns fp16/bf16 is held to the
error of the float64 reference rounded to that dtype plus twice ACC_TOL. That is what round-to-nearest
of a correct fp32 result gives (|round(o) - r| <= |round(r) - r| + 2 |o - r| elementwise), so a kernel
that accumulates or stores intermediates in half precision fails it.
"""

import contextlib
import os
import random
import zlib

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (docs/DESIGN.md §5). Triton
# reads this when a kernel is defined, so it is set before dctkd_ext.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import dctkd_ext  # noqa: E402,F401  (loads the ops)

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Devices that the compiled kernels run on here: the CPU always, CUDA where a GPU exists.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# (backend, device): every implementation of the ops that can run here. Triton runs on CPU tensors
# in its interpreter when there is no GPU (or TRITON_INTERPRET=1 is set).
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
BACKENDS = [("cpu", "cpu"), ("reference", "cpu")]
if HAS_TRITON and (HAS_CUDA or INTERPRET):
    BACKENDS.append(("triton", TRITON_DEVICE))
if HAS_CUDA and dctkd_ext.BUILD_INFO.get("with_cuda"):
    BACKENDS.append(("cuda", "cuda"))
BACKEND_IDS = [b for b, _ in BACKENDS]
# The backends with kernels: every one above but the plain-PyTorch reference, which the tests compare them
# with (a `reference` case compared with the reference cannot fail).
KERNEL_BACKENDS = [(b, d) for b, d in BACKENDS if b != "reference"]
KERNEL_BACKEND_IDS = [b for b, _ in KERNEL_BACKENDS]

HALF = (torch.float16, torch.bfloat16)


def require_triton_kernels():
    """Called at the top of a module of Triton-kernel tests: skips the module unless the kernels can run
    here (a CUDA GPU, or Triton's interpreter on CPU tensors) and triton is installed."""
    if not INTERPRET and not HAS_CUDA:
        pytest.skip("the Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run on CPU tensors in "
                    "Triton's interpreter", allow_module_level=True)
    pytest.importorskip("triton", reason="the Triton backend needs the triton package")


@pytest.fixture(scope="module")
def tops():
    """torch.ops.dctkd_ext_triton with the Triton ops defined and their autograd registered (a test that
    differentiates through them passes when run alone, too)."""
    from dctkd_ext import _backend

    return _backend.triton_ops()


# Relative-norm error of a correct kernel accumulating in fp32 / fp64, against the float64 reference.
ACC_TOL = {torch.float64: 1e-10, torch.float32: 5e-6}
# Error of one sum with cancellation (a scalar parameter's gradient), relative to the sum of its summands'
# magnitudes: a few units of the accumulation's rounding times the depth of a blocked sum.
SUM_TOL = {torch.float64: 2e-11, torch.float32: 1e-6}
# Relative-norm error of a computation that itself runs in half precision (autocast's convolutions, whose
# inputs and outputs are rounded to the half dtype), against the same computation in fp32: a few units
# of that rounding (2^-8 for bf16), not fp32's accuracy.
HALF_COMPUTE_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Per backend, the factor on ACC_TOL: the Triton kernels sum in other orders (tiles, tl.dot) than the
# C++ ones, which the reference's order is closest to.
BACKEND_FACTOR = {"triton": 2.0}


# ------------------------------------------------------------------------------------------ seeds
def _base_seed() -> int:
    env = os.environ.get("DCTKD_TEST_SEED")
    if env:
        return int(env)
    return int.from_bytes(os.urandom(4), "little") % (2**31)


RUN_SEED = _base_seed()


def seed_for(nodeid: str) -> int:
    """The seed of one test: stable across processes (crc32, not the salted hash())."""
    return (RUN_SEED + zlib.crc32(nodeid.encode())) % (2**31)


def replay_command(nodeid: str) -> str:
    return f"DCTKD_TEST_SEED={RUN_SEED} python -m pytest '{nodeid}'"


def pytest_report_header(config):
    return f"dctkd_ext tests: DCTKD_TEST_SEED={RUN_SEED} (set it to replay this run's random data)"


def pytest_configure(config):
    config.addinivalue_line("markers", "long: the full sweeps (run with DCTKD_LONG_TESTS=1); a "
                                       "representative subset of each runs by default")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DCTKD_LONG_TESTS", "0") == "1":
        return
    skip = pytest.mark.skip(reason="long sweep: set DCTKD_LONG_TESTS=1 to run it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded(request):
    """Seeds torch, numpy and random from the test's id, so that every draw replays."""
    seed = seed_for(request.node.nodeid)
    request.node._dctkd_seed = seed
    request.node.user_properties.append(("seed", seed))
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture
def gen(_seeded):
    return torch.Generator().manual_seed(_seeded)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    seed = getattr(item, "_dctkd_seed", None)
    if rep.failed and seed is not None:
        rep.sections.append(("random seed", f"test seed {seed}; replay with: {replay_command(item.nodeid)}"))


# ----------------------------------------------------------------------------------- error bounds
def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-6) -> float:
    """||out - ref|| / max(||ref||, floor): relative, except for a reference that is zero up to
    rounding (1x1 maps, identical inputs), where it becomes absolute. Complex tensors: the norm of
    their (re, im) pairs."""
    out, ref = _real(out).detach().double().cpu(), _real(ref).detach().double().cpu()
    return (out - ref).norm().item() / max(ref.norm().item(), floor)


def _real(t):
    """A complex tensor as its (re, im) pairs (a conjugate view resolved first), a real one as it is."""
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def acc_dtype_of(input_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if input_dtype in (torch.float64, torch.complex128) else torch.float32


def error_bound(out_dtype: torch.dtype, ref: torch.Tensor, acc: torch.dtype, factor: float = 1.0,
                floor: float = 1e-6) -> float:
    """The bound on rel_err(out, ref) for an op accumulating in `acc` and returning `out_dtype`
    (see the module docstring): ACC_TOL, plus for a half-precision output the rounding error of the
    reference itself."""
    r = _real(ref).detach().double().cpu()
    tol = ACC_TOL[acc] * factor
    if out_dtype not in HALF:
        return tol
    rounding = (r.to(out_dtype).double() - r).norm().item() / max(r.norm().item(), floor)
    return rounding + 2 * tol


def assert_close(out, ref, dtype, what="", factor=1.0, terms=None):
    """out (any dtype) against a float64 reference; `dtype` is the inputs' dtype, which sets the
    accumulation precision (fp64 for fp64 inputs, else fp32). terms: for an output that is one sum with
    cancellation (a scalar parameter's gradient), the sum of its summands' magnitudes; its rounding error
    scales with that, not with the sum, so the bound is at least SUM_TOL relative to it."""
    acc = acc_dtype_of(dtype)
    bound = error_bound(out.dtype, ref, acc, factor)
    if terms is not None:
        size = max(_real(ref).detach().double().norm().item(), 1e-300)
        bound = max(bound, SUM_TOL[acc] * terms / size)
    assert_rel_close(out, ref, bound, what)


def assert_rel_close(out, ref, bound, what=""):
    """out against ref: the same shape, finite (an element left unwritten in a poisoned output is NaN),
    and rel_err(out, ref) <= bound. assert_close gives the bound from the dtypes; a test with a bound of
    its own (the GPU validation's) passes it here."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(_real(out)).all(), f"{what}: non-finite values in the output"
    err = rel_err(out, ref)
    assert err <= bound, f"{what}: relative error {err:.3e} > bound {bound:.2e} ({out.dtype} output)"


# ------------------------------------------------------------------------------ poisoned outputs
@contextlib.contextmanager
def nan_poisoned_empty(warn_only: bool = False):
    """torch.empty returns NaN-filled memory while deterministic algorithms are on: an element a kernel
    leaves unwritten fails the finiteness checks. warn_only: nondeterministic ops warn instead of raising."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.fixture
def poison_outputs():
    """Outputs the kernels allocate are NaN until written (nan_poisoned_empty), for the test's duration."""
    with nan_poisoned_empty():
        yield


@pytest.fixture
def poison_outputs_warn_only():
    """poison_outputs, with nondeterministic torch ops (e.g. on the GPU) warning instead of raising."""
    with nan_poisoned_empty(warn_only=True):
        yield


# ----------------------------------------------------------------------------------------- inputs
LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed"]


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of x (any rank >= 2) in another memory layout, as a new leaf:
    channels_last (4-D), sliced (a strided view into a larger buffer, with an offset), transposed
    (the last two dims swapped in memory)."""
    x = x.detach()
    if layout == "contiguous":
        y = x.contiguous()
    elif layout == "channels_last":
        y = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        shape = list(x.shape)
        big = torch.zeros([2 * n + 1 for n in shape], dtype=x.dtype, device=x.device)
        idx = tuple(slice(1, 1 + 2 * n, 2) for n in shape)
        big[idx] = x
        y = big[idx]
    elif layout == "transposed":
        y = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        raise ValueError(layout)
    assert torch.equal(y, x)
    return y


def features(b, c, h, w, dtype=torch.float32, device="cpu", channels_last=False, generator=None, requires_grad=False,
             layout=None):
    """Fresh random features: no exact zeros, no ties in the maps (continuous distribution)."""
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=generator) + 0.1
    x = x.to(device=device, dtype=dtype)
    if layout is not None:
        x = in_layout(x, layout)
    elif channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def crandn(*shape, dtype=torch.complex64, device="cpu", generator=None, requires_grad=False):
    real = torch.randn(*shape, 2, dtype=torch.float64, generator=generator)
    t = torch.view_as_complex(real).to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def _use_backend(request):
    name, device = request.param
    if name == "triton":
        from dctkd_ext import _backend

        _backend.triton_ops()
    with dctkd_ext.use_backend(name):
        yield name, device


@pytest.fixture(params=BACKENDS, ids=BACKEND_IDS)
def backend(request):
    """(name, device) of each backend, selected with use_backend for the test's duration."""
    yield from _use_backend(request)


@pytest.fixture(params=KERNEL_BACKENDS, ids=KERNEL_BACKEND_IDS)
def kernel_backend(request):
    """backend, without the reference: for tests that compare with the reference."""
    yield from _use_backend(request)


def assert_same_nested(a, b, what):
    """Two nested values (state dicts, checkpoints: dicts, lists, tensors, numbers) are identical,
    tensors bit for bit; `what` names the first place that differs."""
    if isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            assert_same_nested(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_nested(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    else:
        assert a == b, what


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A trainer checkpoint of a random resnet8 teacher (4 classes) for the trainer's tests."""
    from dctkd_train.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"arch": "resnet8", "num_classes": 4, "model": build_model("resnet8", 4).state_dict()}, path)
    return str(path)
