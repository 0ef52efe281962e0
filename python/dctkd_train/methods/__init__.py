"""Distillation methods: which loss terms, with which weights, from which features.

Every method's total loss is ``ce_weight * CE + kd_weight * KD + feat_weight * FEAT`` where

* CE  -- cross-entropy with the labels;
* KD  -- Hinton's loss, ``KL(softmax(t/T) || softmax(s/T)) * T^2`` (batch mean), T = 4;
* FEAT -- the method's feature term:

  ================  ===========================================================================  ======================
  method            FEAT                                                                         (ce, kd, feat) default
  ================  ===========================================================================  ======================
  ``ce``            none (a teacher or a baseline)                                               (1, 0, 0)
  ``kd``            none                                                                         (0.1, 0.9, 0)
  ``at``            ``dctkd_ext.dct_at_loss(preset="at")`` (attention transfer)                  (1, 0, 1000)
  ``dct``           ``dctkd_ext.dct_at_loss(preset="dct")`` (DCT-KD, orthonormal DCT)            (1, 0, 1)
  ``dct-paper``     ``dctkd_ext.dct_at_loss(preset="paper")`` (the authors' released formula,    (1, 0, 1)
                    branch dev; ``loss_preset="fft-real-minmax"``: their branch main)
  ``dct+kd``        ``dctkd_ext.dct_at_loss(preset="dct")``                                      (0.1, 1, 1)
  ``dct-paper+kd``  ``dctkd_ext.dct_at_loss(preset="paper")``                                    (0.1, 1, 1)
  ``fam``           FAM-KD as released (:mod:`dctkd_train.fam_head`): cross-attention fusion     (1, 0, 1), warmed up;
                    over the stages and the pooled feature, each level ending in                 the pair's released
                    ``dctkd_ext.nn.FrequencyAttention``; sum over levels of ``mse(out_l, t_l)``  weight (recipes.py)
  ``fam-abf``       the same loss with ReviewKD's ABF fusion (this project's variant)            (1, 0, 1), warmed up
  ================  ===========================================================================  ======================

Feature pairs whose spatial sizes differ are matched by ``adaptive_avg_pool2d`` of the larger one
(as mdistiller does for AT). ``guide=True`` (the teacher-prediction guide of DCT-KD) passes
``sample_weight = (argmax(teacher_logits) == labels)`` to ``dct_at_loss``; it is on by default for
``dct-paper`` and ``dct-paper+kd`` (the released DCT-KD configuration's ``PRED_GUIDE: True``).
``loss_preset`` replaces the ``dct_at_loss`` preset of the DCT/AT methods (e.g. the other released
DCT-KD variant, ``fft-real-minmax``).

Each method is one class (a subclass of :class:`~.base.Method`, registered with :func:`~.base.register`)
in this package; ``REGISTRY`` maps the names to them, in the order above. Adding a method is one
class and its test (docs/TRAINER.md, "Adding a method").
"""
from __future__ import annotations

# isort: off
# importing a method's module registers it; this order is REGISTRY's
from . import ce, kd, dct_at, fam, fam_abf  # noqa: F401
# isort: on
from .base import (
    FAM_MISSING,
    REGISTRY,
    Method,
    MethodConfig,
    frequency_attention_class,
    kd_loss,
    match_spatial,
    method_available,
    method_class,
    parse_loss_options,
    register,
)
from .fam_abf import ABF, ReviewFusionHead

# The methods this package defines (REGISTRY also holds any registered later).
METHODS = tuple(REGISTRY)

__all__ = ["ABF", "FAM_MISSING", "METHODS", "REGISTRY", "Method", "MethodConfig", "ReviewFusionHead",
           "frequency_attention_class", "kd_loss", "match_spatial", "method_available", "method_class",
           "parse_loss_options", "register"]
