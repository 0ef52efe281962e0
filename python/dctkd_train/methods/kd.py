"""``kd``: Hinton's knowledge distillation (the KD term of :class:`Method`, no feature term)."""
from __future__ import annotations

from .base import Method, register


@register
class KD(Method):
    name = "kd"
    weights = (0.1, 0.9, 0.0)
