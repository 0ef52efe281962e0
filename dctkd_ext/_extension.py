"""Loads the compiled library (dctkd_ext._C), which registers the torch.ops.dctkd_ext schemas and
the CPU/CUDA kernels. Fails with a message that says what to do, never an undefined-symbol trace."""

import torch

REBUILD = "rebuild it with `pip install -e .` (in the dctkd_ext checkout)"


def load() -> dict:
    try:
        from . import _build_info
    except ImportError as exc:
        raise ImportError(f"dctkd_ext is not built (no dctkd_ext/_build_info.py): {REBUILD}") from exc
    built, running = _build_info.TORCH_VERSION, torch.__version__
    if built != running:
        raise ImportError(
            f"dctkd_ext was built against torch {built} but torch {running} is installed; "
            f"the compiled extension only works with the torch it was built against: {REBUILD}"
        )
    try:
        from . import _C  # noqa: F401  (registers torch.ops.dctkd_ext.*)
    except ImportError as exc:
        msg = str(exc)
        hint = " (an ABI mismatch with the installed torch)" if "undefined symbol" in msg else ""
        raise ImportError(f"dctkd_ext's compiled extension failed to load{hint}: {msg.splitlines()[0]}; {REBUILD}") from None
    return {
        "torch_version": built,
        "version": _build_info.VERSION,
        "with_cuda": bool(_build_info.WITH_CUDA),
        # {"path", "version", "found_by"} of the toolkit the CUDA kernels were compiled with, or None
        "cuda_toolkit": getattr(_build_info, "CUDA_TOOLKIT", None),
        # which toolkit was used, or why the CUDA kernels were skipped
        "cuda_note": getattr(_build_info, "CUDA_NOTE", ""),
    }


BUILD_INFO = load()
