"""nn.Module wrappers of the dctkd_ext ops."""

from .loss import AttentionTransferLoss, DCTATLoss
from .spectral import FrequencyAttention, GlobalFilter

__all__ = ["DCTATLoss", "AttentionTransferLoss", "FrequencyAttention", "GlobalFilter"]
