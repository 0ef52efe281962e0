"""Trainer models and feature hooks."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from dctkd_train import models as M  # noqa: E402
from dctkd_train.errors import UserError  # noqa: E402
from dctkd_train.features import FeatureHooks, default_feature_layers, find_stage_outputs, probe_feature_shapes  # noqa: E402

# (name, channels of the three stage outputs)
CIFAR = [
    ("resnet8", (16, 32, 64)), ("resnet20", (16, 32, 64)),
    ("resnet8x4", (64, 128, 256)), ("resnet32x4", (64, 128, 256)),
    ("wrn16_2", (32, 64, 128)), ("wrn40_2", (32, 64, 128)),
]


@pytest.mark.parametrize("name,channels", CIFAR)
def test_cifar_models_and_their_stage_outputs(name, channels):
    torch.manual_seed(0)
    m = M.build_model(name, num_classes=7).eval()
    assert m.arch == name
    layers = default_feature_layers(m)
    assert len(layers) == 3
    shapes = probe_feature_shapes(m, layers, 32, "cpu")
    assert shapes == [(channels[0], 32, 32), (channels[1], 16, 16), (channels[2], 8, 8)]
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
        if name == "resnet8":
            assert m(torch.randn(1, 3, 48, 48)).shape == (1, 7)  # any input size (adaptive pool)


def test_parameter_counts_match_the_literature():
    # RepDistiller's table: resnet8x4 1.23M, resnet32x4 7.43M, wrn40_2 2.25M, wrn16_2 0.70M, resnet56 0.86M
    # (CIFAR-100 heads).
    counts = {n: M.count_parameters(M.build_model(n, 100)) / 1e6 for n in ("resnet8x4", "resnet32x4", "wrn40_2",
                                                                           "wrn16_2", "resnet56", "resnet20",
                                                                           "resnet110")}
    assert counts["resnet8x4"] == pytest.approx(1.23, abs=0.01)
    assert counts["resnet32x4"] == pytest.approx(7.43, abs=0.01)
    assert counts["wrn40_2"] == pytest.approx(2.25, abs=0.01)
    assert counts["wrn16_2"] == pytest.approx(0.70, abs=0.01)
    assert counts["resnet56"] == pytest.approx(0.86, abs=0.01)
    assert counts["resnet20"] == pytest.approx(0.28, abs=0.01)
    assert counts["resnet110"] == pytest.approx(1.74, abs=0.01)


def test_repdistiller_state_dict_names():
    # RepDistiller/mdistiller teacher checkpoints ({"model": state_dict}) load by name.
    r = M.build_model("resnet32x4", 100).state_dict()
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn2.weight",
              "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer3.4.conv2.weight",
              "fc.weight", "fc.bias"):
        assert k in r, k
    w = M.build_model("wrn40_2", 100).state_dict()
    for k in ("conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight",
              "block3.layer.5.conv2.weight", "bn1.weight", "fc.weight"):
        assert k in w, k


def test_unknown_model():
    with pytest.raises(UserError, match="unknown model 'resnet9000'.*resnet8x4"):
        M.build_model("resnet9000", 10)


@pytest.mark.skipif(M.torchvision_available(), reason="torchvision is installed")
def test_torchvision_models_need_torchvision():
    with pytest.raises(UserError, match="needs torchvision"):
        M.build_model("resnet18", 10)
    assert "resnet18" not in M.available_models()


@pytest.mark.skipif(not M.torchvision_available(), reason="torchvision is not installed")
@pytest.mark.parametrize("name,channels", [("resnet18", (64, 128, 256, 512)), ("mobilenet_v2", (24, 32, 96, 1280))])
def test_torchvision_models(name, channels):
    m = M.build_model(name, 5)
    shapes = probe_feature_shapes(m, default_feature_layers(m), 64, "cpu")
    assert [s[0] for s in shapes] == list(channels)
    assert [s[1] for s in shapes] == [16, 8, 4, 2]


# ----------------------------------------------------------------------------- hooks


def test_hooks_capture_the_stage_outputs():
    torch.manual_seed(0)
    m = M.build_model("resnet8", 5).eval()
    hooks = FeatureHooks(m, ["layer1", "layer2", "layer3"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = m(x)
        feats = hooks.pop()
        assert hooks._store == {}  # pop clears
        # the same features computed by hand (this forward fires the hooks again)
        h = m.relu(m.bn1(m.conv1(x)))
        f1 = m.layer1(h)
        f2 = m.layer2(f1)
        f3 = m.layer3(f2)
    for a, b in zip(feats, (f1, f2, f3)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(logits, m.fc(f3.mean((2, 3))))
    hooks.pop()
    with pytest.raises(RuntimeError, match="did not run"):
        hooks.pop()
    hooks.remove()
    with torch.no_grad():
        m(x)
    assert hooks._store == {}  # removed hooks capture nothing


def test_hooks_keep_the_graph_for_the_student():
    m = M.build_model("resnet8", 5)
    hooks = FeatureHooks(m, ["layer2", "layer1.0.conv1"])  # any named (dotted) module, in the order given
    m(torch.randn(2, 3, 16, 16))
    f2, c1 = hooks.pop()
    assert c1.shape == (2, 16, 16, 16) and f2.shape == (2, 32, 8, 8)
    f2.pow(2).mean().backward()
    assert m.layer1[0].conv1.weight.grad is not None
    assert m.layer3[0].conv1.weight.grad is None


def test_hooks_bad_layer_names():
    m = M.build_model("resnet8", 5)
    with pytest.raises(UserError, match="no layer named 'layer9'.*layer1, layer2, layer3"):
        FeatureHooks(m, ["layer1", "layer9"])
    with pytest.raises(UserError, match="repeat"):
        FeatureHooks(m, ["layer1", "layer1"])
    with pytest.raises(UserError, match="must give"):
        probe_feature_shapes(m, ["fc"], 16, "cpu")


def test_stage_outputs_are_found_for_any_model():
    # a model that declares nothing: the last module at each resolution, pools and heads excluded
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),          # "3": end of the 16x16 stage
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),  # "5": end of the 8x8 stage
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # "7": end of the 4x4 stage
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )
    assert find_stage_outputs(net, 16) == ["3", "5", "7"]
    assert default_feature_layers(net, 16) == ["3", "5", "7"]
    m = M.build_model("resnet8", 5)
    assert find_stage_outputs(m, 32) == ["layer1", "layer2", "layer3"]
