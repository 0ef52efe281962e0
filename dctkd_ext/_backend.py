"""The backend registry: which implementation the ops in dctkd_ext.ops run, one place for all op families.

- "cpu" / "cuda": the C++/CUDA kernels registered with the dispatcher (torch.ops.dctkd_ext.*).
- "triton": the Triton kernels in dctkd_ext/triton/ (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
- "reference": the plain-PyTorch formulas of dctkd_ext/reference.py.
- "auto" (default): the compiled kernels for the tensors' device: "cpu" on the CPU, and on the GPU the
  backend DEFAULT_GPU_BACKEND names for the op family, else "cuda". DEFAULT_GPU_BACKEND is empty until
  GPU runs of bench/run.py (which time CUDA and Triton side by side) say which is faster.

Chosen by the environment variable DCTKD_BACKEND, `set_backend(name)` or `with use_backend(name):`.

What else lives here, so that no op family repeats it:
- run_on(device, family): the backend an op family runs on for tensors on a device and its op
  namespace (select() and kernels() below, the two steps); the families are named as their files in
  dctkd_ext/ops: "dct_at", "spectral", "fam_layer", "local_attention";
- kernels(backend): the op namespace that runs it (torch.ops.dctkd_ext, or torch.ops.dctkd_ext_triton
  with the Triton ops defined: triton is imported once, on first use, so the package works without it);
- register_family(family, register_autograd): each module of dctkd_ext/ops whose ops have Triton twins
  hands over the function that registers their autograd formulas on an op namespace; it runs for
  dctkd_ext at once and for dctkd_ext_triton when the Triton ops are loaded (both namespaces share the
  schemas and formulas).

Layering: this module imports the compiled library (_extension) and, lazily, dctkd_ext.triton; it
never imports dctkd_ext.ops or dctkd_ext.reference (see CONTRIBUTING.md, "Layers").
"""

import contextlib
import importlib.util
import os
import threading
from typing import Callable, Dict, Optional, Tuple

import torch

from ._extension import BUILD_INFO

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


def resolve(device_type: str, family: str) -> str:
    """The concrete backend for tensors on `device_type` (e.g. "cpu"/"cuda"), for an op `family`."""
    name = get_backend()
    if name == "auto":
        return DEFAULT_GPU_BACKEND.get(family, "cuda") if device_type == "cuda" else "cpu"
    if name in ("cpu", "cuda") and name != device_type:
        raise ValueError(f"backend {name!r} was selected but the inputs are on device type {device_type!r}")
    if name == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
    return name


# ------------------------------------------------------------------------------------ the registry
NAMESPACES = ("dctkd_ext", "dctkd_ext_triton")

# family -> the function that registers its autograd formulas on torch.ops.<ns>
_FAMILIES: Dict[str, Callable[[str], None]] = {}
_triton_lock = threading.RLock()
_triton_ns = None


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


_HAS_TRITON = _find_triton()  # looked up once, without importing triton


def triton_installed() -> bool:
    return _HAS_TRITON


def register_family(family: str, register_autograd: Callable[[str], None]) -> None:
    """Register an op family's autograd formulas: on torch.ops.dctkd_ext now, and on
    torch.ops.dctkd_ext_triton now or when the Triton ops are loaded."""
    with _triton_lock:
        _FAMILIES[family] = register_autograd
        register_autograd(NAMESPACES[0])
        if _triton_ns is not None:
            register_autograd(NAMESPACES[1])


def triton_ops():
    """torch.ops.dctkd_ext_triton with every Triton op defined and every family's autograd registered
    (once). Raises ImportError with what to do where triton is missing."""
    global _triton_ns
    if _triton_ns is None:
        with _triton_lock:
            if _triton_ns is None:
                from . import triton as triton_backend

                ns = triton_backend.load()
                for register_autograd in _FAMILIES.values():
                    register_autograd(NAMESPACES[1])
                _triton_ns = ns
    return _triton_ns


def select(device: torch.device, family: str) -> str:
    """The backend ("cpu", "cuda", "triton" or "reference") that op `family` runs on for tensors on
    `device`: resolve(), then what this build and environment provide (`auto` on CUDA tensors with no
    CUDA kernels built falls back to Triton where it is installed)."""
    requested = get_backend()
    name = resolve(device.type, family)
    if name == "cuda" and not BUILD_INFO["with_cuda"]:
        if requested == "auto" and triton_installed():
            return "triton"
        raise RuntimeError(
            "dctkd_ext was built without CUDA kernels; rebuild on a machine with a CUDA toolkit "
            "(CUDA_HOME set) or with FORCE_CUDA=1, or select DCTKD_BACKEND=triton or reference"
        )
    return name


def run_on(device: torch.device, family: str) -> Tuple[str, Optional[object]]:
    """(backend name, op namespace) that op `family` runs on for tensors on `device`: select(), then
    kernels() (None for the reference backend). The one way the modules of dctkd_ext.ops choose."""
    name = select(device, family)
    return name, kernels(name)


def kernels(backend: str) -> Optional[object]:
    """The op namespace that runs `backend`: torch.ops.dctkd_ext (cpu, cuda), torch.ops.dctkd_ext_triton
    (triton; same schemas), or None for the reference backend (the plain-PyTorch formulas)."""
    if backend == "triton":
        return triton_ops()
    if backend == "reference":
        return None
    return torch.ops.dctkd_ext
