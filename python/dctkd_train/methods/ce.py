"""``ce``: cross-entropy with the labels only (a teacher, or the baseline student)."""
from __future__ import annotations

from .base import Method, register


@register
class CE(Method):
    name = "ce"
    weights = (1.0, 0.0, 0.0)
    feature_teacher = False
