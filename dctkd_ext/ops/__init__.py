"""The Python face of every op: argument checks, fake (meta) kernels for torch.compile, autograd
registration, and the backend choice (dctkd_ext._backend). One module per op family."""

from .dct_at import attention_map, dct2d, dct_at_loss, idct2d

__all__ = ["attention_map", "dct2d", "idct2d", "dct_at_loss"]
