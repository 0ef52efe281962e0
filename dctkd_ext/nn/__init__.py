"""nn.Module wrappers of the dctkd_ext ops."""

from .loss import AttentionTransferLoss, DCTATLoss

__all__ = ["DCTATLoss", "AttentionTransferLoss"]
