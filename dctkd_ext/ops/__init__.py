"""The Python face of every op: argument checks, fake (meta) kernels for torch.compile, autograd
registration, and the backend choice (dctkd_ext._backend). One module per op family."""

from .dct_at import attention_map, dct2d, dct_at_loss, idct2d
from .fam_layer import fam_layer
from .local_attention import local_attention
from .spectral import global_filter, spectral_conv

__all__ = ["attention_map", "dct2d", "idct2d", "dct_at_loss", "global_filter", "spectral_conv", "fam_layer", "local_attention"]
