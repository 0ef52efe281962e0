"""Triton backend of dctkd_ext: the kernels of attention_map, dct2d / idct2d, the multi-level
dct_at_loss, local_attention and the spectral filters, as the custom ops torch.ops.dctkd_ext_triton.*
(same schemas as torch.ops.dctkd_ext.*, plus fam_filter_fused).

Nothing here is imported by `import dctkd_ext`: the backend registry (dctkd_ext._backend) calls load()
the first time the "triton" backend is used, so the package works where triton is not installed, and
registers the autograd formulas of dctkd_ext/ops on these ops. This package imports neither
dctkd_ext.ops nor dctkd_ext.reference (the bases it shares with the reference are in dctkd_ext._bases).

Files, one per kernel family (kernels + launcher + op): attention_map.py (channel reduction and
its elementwise backward, multi-tensor), dct.py (dct2d / idct2d as small matmuls, and the transform
passes the loss reuses), dct_at_loss.py (phi, distances and dL/dA of all levels in one launch),
local_attention.py (FAM-KD's windowed per-channel attention, forward and backward), spectral.py
(global_filter, spectral_conv, the FAM half-plane weight and the fused small-map FAM filter). _common.py holds what they share, _compile_check.py compiles them for a GPU architecture
without a GPU.
"""

import threading

_lock = threading.Lock()
_ops = None


def load():
    """Import triton and define the ops (once); returns torch.ops.dctkd_ext_triton. Raises ImportError
    with what to do where triton is missing. Their autograd: dctkd_ext._backend.triton_ops()."""
    global _ops
    if _ops is not None:
        return _ops
    with _lock:
        if _ops is None:
            try:
                import triton  # noqa: F401
            except ImportError as exc:
                raise ImportError(
                    "dctkd_ext: the 'triton' backend needs the triton package (pip install triton; it comes "
                    "with CUDA builds of torch). Select another backend with dctkd_ext.set_backend('auto') "
                    f"or DCTKD_BACKEND=auto. ({exc})"
                ) from None
            import torch

            from . import attention_map, dct, dct_at_loss, local_attention, spectral  # noqa: F401  (define the ops)

            _ops = torch.ops.dctkd_ext_triton
    return _ops
