"""What the Triton kernel families share: interpreter mode, the op namespace and how an op is
defined, graph-traceable kernel launches, the cached transform bases and the fixed-size "slot"
argument lists that let one launch serve several tensors of different shapes and dtypes."""

import os
from typing import Callable, List, Sequence

import torch
import triton
import triton.language as tl

from .._bases import dct_matrix, dft_real_matrices
from .._dtypes import acc_dtype  # noqa: F401  (the triton modules import it from here)

# TRITON_INTERPRET=1 runs the kernels in Triton's interpreter on CPU (or CUDA) tensors. It is read
# when the kernels are decorated, i.e. when dctkd_ext.triton is first loaded.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

NAMESPACE = "dctkd_ext_triton"

# Tensors one launch can serve: the kernels take MAX_SLOTS groups of (pointer, sizes) arguments and a
# constexpr count of the groups in use (unused groups are compiled out). More tensors -> more launches.
MAX_SLOTS = 8


def is_fake(t: torch.Tensor) -> bool:
    """True for tensors that carry only metadata (fake / functional-over-fake / meta): torch.compile
    and opcheck trace the ops' Python bodies with these."""
    return t.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(t)


def wrap_triton(kernel):
    """torch.library.wrap_triton(kernel): lets torch.compile / make_fx record the launches in the
    graph (in eager mode a triton_op bypasses the wrapper at no cost). The interpreter's kernels
    cannot be traced, so there the kernel itself (see launch). Launchers call it on their kernel by
    name, so that torch can find the kernels of an op (for its compile caches)."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def launch_device(args):
    """The CUDA device a launch must run on: that of its first tensor argument (the launchers put
    every tensor of a launch on one device), or None for CPU tensors (the interpreter)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device if a.device.type == "cuda" else None
    return None


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on the tensors' device and that device's current stream, for
    kernel = wrap_triton(jit_function). Triton launches on the current device, so a call whose
    tensors live on another GPU switches to it for the launch (as the C++ ops' device guard does).
    In the interpreter the ops are opaque custom ops whose fake kernel is the same Python body, so
    there the launch is skipped when the tensors are fake (only their metadata exists)."""
    if grid[0] == 0:
        return
    if INTERPRET and any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        return
    dev = launch_device(args)
    if dev is not None and dev.index is not None and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def define_op(name: str, fn: Callable):
    """Define the custom op dctkd_ext_triton::<name> whose implementation is fn (schema from its
    type hints). Compiled Triton: torch.library.triton_op, so torch.compile sees (and can fuse
    around) the kernels; fn is also the fake kernel. Interpreter: torch.library.custom_op with fn as
    its fake kernel too (its launches become no-ops on fake tensors), kept opaque in graphs."""
    qualname = f"{NAMESPACE}::{name}"
    if INTERPRET:
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fn)
    else:
        op = torch.library.triton_op(qualname, fn, mutates_args=())
    return op


def is_channels_last(x: torch.Tensor) -> bool:
    """A (B, C, H, W) tensor the kernels read as NHWC (channels_last and not also NCHW-contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels read for a (B, C, H, W) tensor: NCHW-contiguous and channels_last are
    read in place, anything else is copied to NCHW (as the C++ kernels do)."""
    return x if is_channels_last(x) else x.contiguous()


# ----------------------------------------------------------------------------------------- bases
_BASES = {}


def _build_basis(kind: str, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    if kind == "dct":  # (n, n): D[k, m]
        return dct_matrix(n, dtype, device).contiguous()
    # "dft": (2, n, n): cos then sin of 2 pi k m / n, angles reduced mod n first, evaluated in fp64
    c, s = dft_real_matrices(n, torch.float64, device)
    return torch.stack([c, s]).to(dtype).contiguous()


def basis(kind: str, n: int, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """The transform basis of size n ("dct" or "dft") in dtype on like's device, evaluated in fp64
    then rounded. Cached per (kind, n, dtype, device) in eager mode; while the op is traced (fake
    tensors) it is built from factory ops instead, so that the graph does not capture a constant."""
    if is_fake(like):
        return _build_basis(kind, n, dtype, like.device)
    key = (kind, n, dtype, like.device)
    t = _BASES.get(key)
    if t is None:
        t = _build_basis(kind, n, dtype, like.device)
        _BASES[key] = t
    return t


# ----------------------------------------------------------------------------------------- slots
def slot_args(slots: Sequence[Sequence], pad: Sequence) -> List:
    """Flatten up to MAX_SLOTS per-slot argument tuples, padding the unused ones with `pad`."""
    assert 0 < len(slots) <= MAX_SLOTS
    out = []
    for s in list(slots) + [pad] * (MAX_SLOTS - len(slots)):
        out.extend(s)
    return out


def chunks(items: Sequence, size: int = MAX_SLOTS):
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ------------------------------------------------------------------------------ device helpers
POW_GENERAL, POW_ONE, POW_TWO = 0, 1, 2


def pow_code(p: float) -> int:
    return POW_TWO if p == 2.0 else (POW_ONE if p == 1.0 else POW_GENERAL)


@triton.jit
def _as_f64(v):
    """v (an fp64 scalar argument, or a Python float in the interpreter) as a 0-d fp64 tensor."""
    return tl.sum(tl.full([1], 0.0, tl.float64), axis=0) + v


@triton.jit
def _pow64(ax, e):
    """ax^e for ax > 0, evaluated in fp64 (exp2 / log2 are accurate there, approximate in fp32) and
    rounded once to ax's dtype, as the C++ kernels evaluate pow; e: a 0-d fp64 tensor."""
    return tl.exp2(e * tl.log2(ax.to(tl.float64))).to(ax.dtype)


@triton.jit
def abs_pow(x, p, POW: tl.constexpr):
    """|x|^p; POW = 2 and 1 are exact fast paths, else pow in fp64 (0 at x = 0). p: fp64."""
    if POW == 2:
        return x * x
    elif POW == 1:
        return tl.abs(x)
    else:
        ax = tl.abs(x)
        p64 = _as_f64(p)
        return tl.where(ax > 0, _pow64(tl.where(ax > 0, ax, 1.0), p64), 0.0)


@triton.jit
def abs_pow_grad(x, p, POW: tl.constexpr):
    """d|x|^p/dx = p |x|^(p-1) sign(x), taken as 0 at x = 0 for every p (as csrc/dctkd_math.h). p: fp64."""
    if POW == 2:
        return 2.0 * x
    else:
        sgn = tl.where(x < 0, -1.0, 1.0)
        if POW == 1:
            return tl.where(x == 0, 0.0, sgn)
        else:
            ax = tl.where(x == 0, 1.0, tl.abs(x))
            p64 = _as_f64(p)
            g = (p64 * tl.exp2((p64 - 1.0) * tl.log2(ax.to(tl.float64)))).to(x.dtype)
            return tl.where(x == 0, 0.0, g * sgn)


@triton.jit
def div_ieee(a, b):
    """a / b correctly rounded: Triton's fp32 '/' is an approximate division (2 ulp); fp64 '/' is IEEE."""
    q = a / b
    if q.dtype == tl.float32:
        a, b = tl.broadcast(a, b)  # div_rn promotes types but does not broadcast shapes
        q = tl.math.div_rn(a, b)
    return q


@triton.jit
def reciprocal(n, dtype: tl.constexpr):
    """1 / n for an integer n (runtime or constexpr), rounded once in dtype (fp32 or fp64)."""
    return div_ieee(tl.full([1], 1.0, dtype), tl.zeros([1], dtype) + n)


@triton.jit
def sqrt_ieee(x):
    """Correctly rounded square root (tl.sqrt may be approximate in fp32; fp64 sqrt is exact)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)
