"""Backend selection: which implementation the ops in dctkd_ext.ops run.

- "cpu" / "cuda": the C++/CUDA kernels registered with the dispatcher (torch.ops.dctkd_ext.*).
- "triton": the Triton kernels in dctkd_ext/triton/ (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
- "reference": the plain-PyTorch formulas of dctkd_ext/reference.py.
- "auto" (default): the compiled kernels for the tensors' device; on GPU the faster of CUDA/Triton
  where an op has both (see DEFAULT_GPU_BACKEND).

Chosen by the environment variable DCTKD_BACKEND, `set_backend(name)` or `with use_backend(name):`.
"""

import contextlib
import os
import threading

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

# Per op family, the GPU backend that `auto` picks, set from the GPU runs of bench/run.py (the suites time
# both backends side by side); a family not listed runs on "cuda".
DEFAULT_GPU_BACKEND = {}

_state = threading.local()


def _check(name: str, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{where}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name.lower()


_default = _check(os.environ.get("DCTKD_BACKEND", "auto") or "auto", "DCTKD_BACKEND")


def get_backend() -> str:
    """The backend in force in this thread: the innermost use_backend(), else set_backend()/DCTKD_BACKEND."""
    return getattr(_state, "name", None) or _default


def set_backend(name: str) -> None:
    """Set the process-wide default backend (as DCTKD_BACKEND does)."""
    global _default
    _default = _check(name, "backend")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed ops on backend `name` (this thread only)."""
    name = _check(name, "backend")
    prev = getattr(_state, "name", None)
    _state.name = name
    try:
        yield
    finally:
        _state.name = prev


def resolve(device_type: str, family: str, available: tuple = ("cpu", "cuda", "triton", "reference")) -> str:
    """The concrete backend for tensors on `device_type` (e.g. "cpu"/"cuda"), for an op `family`."""
    name = get_backend()
    if name == "auto":
        if device_type == "cuda":
            name = DEFAULT_GPU_BACKEND.get(family, "cuda")
        else:
            name = "cpu"
        if name not in available:
            name = "reference"
        return name
    if name not in available:
        raise NotImplementedError(
            f"backend {name!r} has no implementation of {family} yet; available: {', '.join(available)}"
        )
    if name in ("cpu", "cuda") and name != device_type:
        raise ValueError(f"backend {name!r} was selected but the inputs are on device type {device_type!r}")
    if name == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
    return name
