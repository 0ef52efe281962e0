"""Registers this trainer's CIFAR networks as torchdistill models (``key: 'resnet32x4'`` in a YAML).

torchdistill ships its own CIFAR ResNets (``resnet20`` ... ``resnet110``) and WRNs (``wide_resnet*``);
this adds the RepDistiller-layout networks it lacks -- ``resnet8``, ``resnet14``, ``resnet8x4``,
``resnet32x4``, ``wrn16_1``, ``wrn16_2``, ``wrn40_1``, ``wrn40_2`` -- and leaves every key torchdistill
already has untouched. Load it with a ``dependencies:`` entry ``- name: 'dctkd_train.torchdistill_models'``.
The models start from random initialisation; a teacher's weights come from the YAML's ``src_ckpt``
(a local file: RepDistiller/mdistiller ``{"model": state_dict}`` checkpoints load as is).
"""
from __future__ import annotations

from torchdistill.models.registry import MODEL_DICT, register_model

from .models import _CIFAR

REGISTERED: list[str] = []


def _factory(name: str):
    def build(num_classes: int = 100, pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(
                f"{name}: pretrained=True is not supported (nothing is downloaded); set pretrained: False and give "
                "the weights as a local file in the model's src_ckpt"
            )
        if kwargs:
            raise TypeError(f"{name}: unexpected keyword argument(s) {sorted(kwargs)}; it takes num_classes")
        return _CIFAR[name](int(num_classes))

    build.__name__ = name
    return build


for _name in _CIFAR:
    if _name not in MODEL_DICT:
        register_model(key=_name)(_factory(_name))
        REGISTERED.append(_name)
