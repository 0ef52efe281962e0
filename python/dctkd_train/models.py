"""Model zoo: CIFAR ResNets and WRNs (RepDistiller/mdistiller layouts), torchvision models when present.

The CIFAR models use the same module names as RepDistiller's ``models/resnet.py`` and
``models/wrn.py``, so their released teacher checkpoints (``{"model": state_dict}``) load into them.
The only difference is an adaptive average pool in place of ``AvgPool2d(8)``, which has no
parameters and lets the same network run on inputs other than 32x32.

Every model built here carries ``feature_layers``: the names of its stage outputs, the default
layers whose outputs the feature-distillation methods compare (see :mod:`dctkd_train.features`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .external_models import build_external, is_external

# ---------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, CIFAR variant; RepDistiller naming)
# ---------------------------------------------------------------------------------------------


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        # No parameters: a hook point for the pre-ReLU sum (FAM-KD's pre-activation student features).
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(self.preact(out + residual))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: a 3x3 stem and three stages (strides 1, 2, 2).

    ``preact_feature_layers`` name the pre-ReLU outputs of the stages (the last block's sum before
    its ReLU); ``pooled_layer`` the global pool, whose (B, C, 1, 1) output is the pooled feature."""

    feature_layers = ("layer1", "layer2", "layer3")
    pooled_layer = "avgpool"

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.preact_feature_layers = tuple(f"layer{i}.{n - 1}.preact" for i in (1, 2, 3))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# ---------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016; RepDistiller naming)
# ---------------------------------------------------------------------------------------------


class WRNBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pre-activation block. Never modify `x` in place: it may be a hooked stage output.
        o = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(o)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.equalInOut else self.convShortcut(o)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WRNBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    feature_layers = ("block1", "block2", "block3")
    pooled_layer = "avgpool"  # pool of relu(bn1(block3)), (B, C, 1, 1)

    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1, drop_rate: float = 0.0):
        super().__init__()
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n_ = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n_))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block1(out)
        out = self.block2(out)
        out = self.block3(out)
        out = self.relu(self.bn1(out))
        out = self.avgpool(out).flatten(1)
        return self.fc(out)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_CIFAR: dict[str, Callable[[int], nn.Module]] = {
    "resnet8": lambda nc: CifarResNet(8, [16, 16, 32, 64], nc),
    "resnet14": lambda nc: CifarResNet(14, [16, 16, 32, 64], nc),
    "resnet20": lambda nc: CifarResNet(20, [16, 16, 32, 64], nc),
    "resnet32": lambda nc: CifarResNet(32, [16, 16, 32, 64], nc),
    "resnet44": lambda nc: CifarResNet(44, [16, 16, 32, 64], nc),
    "resnet56": lambda nc: CifarResNet(56, [16, 16, 32, 64], nc),
    "resnet110": lambda nc: CifarResNet(110, [16, 16, 32, 64], nc),
    "resnet8x4": lambda nc: CifarResNet(8, [32, 64, 128, 256], nc),
    "resnet32x4": lambda nc: CifarResNet(32, [32, 64, 128, 256], nc),
    "wrn16_1": lambda nc: WideResNet(16, nc, 1),
    "wrn16_2": lambda nc: WideResNet(16, nc, 2),
    "wrn40_1": lambda nc: WideResNet(40, nc, 1),
    "wrn40_2": lambda nc: WideResNet(40, nc, 2),
}

# torchvision models and their stage outputs (one per spatial resolution, /4 ... /32).
_TORCHVISION: dict[str, tuple[str, ...]] = {
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "resnet34": ("layer1", "layer2", "layer3", "layer4"),
    "resnet50": ("layer1", "layer2", "layer3", "layer4"),
    "mobilenet_v2": ("features.3", "features.6", "features.13", "features.18"),
}


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def available_models() -> list[str]:
    names = list(_CIFAR)
    if torchvision_available():
        names += list(_TORCHVISION)
    return names


def model_family(name: str) -> str:
    """"cifar" for the small-input CIFAR networks, "imagenet" for the torchvision and timm ones."""
    return "imagenet" if name in _TORCHVISION or is_external(name) else "cifar"


def build_model(name: str, num_classes: int, stages=None, image_size: int = 224) -> nn.Module:
    """Build a model by name; raise :class:`UserError` for an unknown or unavailable name.
    ``timm:NAME`` / ``tv:NAME``: see :mod:`dctkd_train.external_models` (``stages``, ``image_size``)."""
    if is_external(name):
        return build_external(name, num_classes, stages, image_size)
    if name in _CIFAR:
        model = _CIFAR[name](num_classes)
    elif name in _TORCHVISION:
        if not torchvision_available():
            raise UserError(
                f"model {name!r} needs torchvision, which is not installed "
                "(pip install torchvision, or the package's [vision] extra)"
            )
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        model.feature_layers = _TORCHVISION[name]
        if isinstance(getattr(model, "avgpool", None), nn.AdaptiveAvgPool2d):
            model.pooled_layer = "avgpool"
    else:
        known = ", ".join(list(_CIFAR) + [f"{n} (torchvision)" for n in _TORCHVISION])
        raise UserError(f"unknown model {name!r}; known models: {known}, timm:NAME, tv:NAME")
    model.arch = name
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
