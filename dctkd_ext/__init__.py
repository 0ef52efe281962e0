"""dctkd_ext: fused kernels for frequency-domain knowledge distillation (DCT-KD, FAM-KD).

Public API:
    dct_at_loss(student_feats, teacher_feats, *, preset="dct", weights=None, sample_weight=None,
                reduction="mean", **overrides)
    attention_map(x, p=2, reduce="mean"), dct2d(a), idct2d(c)
    global_filter(xf, w, mask=None), spectral_conv(xf, w, mask=None), local_attention(q, k, v, rel, kernel_size=3)
    set_backend(name), get_backend(), use_backend(name)   # "auto" | "cpu" | "cuda" | "triton" | "reference"
    PRESETS, nn (DCTATLoss, AttentionTransferLoss, ...), reference (plain-PyTorch formulas)
    StageFeatures(model, stages, detach=False)   # forward hooks that collect named stage outputs
    amp.GradScaler   # torch.amp.GradScaler that also unscales complex (FrequencyAttention) gradients
    integrations.torchdistill (imported on its own; needs torchdistill)
"""

from ._extension import BUILD_INFO  # loads the compiled ops first; fails with a "rebuild" message

# isort: split
from . import amp, features, nn, reference
from ._backend import BACKENDS, get_backend, set_backend, use_backend
from .features import StageFeatures
from .ops import attention_map, dct2d, dct_at_loss, global_filter, idct2d, local_attention, spectral_conv
from .presets import PRESETS

__version__ = BUILD_INFO["version"]

__all__ = [
    "dct_at_loss",
    "attention_map",
    "dct2d",
    "idct2d",
    "global_filter",
    "spectral_conv",
    "local_attention",
    "set_backend",
    "get_backend",
    "use_backend",
    "BACKENDS",
    "PRESETS",
    "BUILD_INFO",
    "nn",
    "reference",
    "StageFeatures",
    "features",
    "amp",
]
