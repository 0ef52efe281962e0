"""dctkd_ext.StageFeatures: forward hooks that collect named stage outputs for a plain training loop."""
import pytest
import torch
from torch import nn

import dctkd_ext
from dctkd_ext.features import StageFeatures, unwrap_model


class Net(nn.Module):
    feature_layers = ("block1", "block2")

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def test_collects_the_named_outputs_of_the_same_forward():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 3, 8, 8)
    with StageFeatures(net, ["block2", "block1.0"]) as sf:
        logits = net(x)
        f2, f1 = sf.pop()
    h = net.stem(x)
    torch.testing.assert_close(f1, net.block1[0](h))
    torch.testing.assert_close(f2, net.block2(net.block1(h)))
    torch.testing.assert_close(logits, net(x))
    assert not net.block1[0]._forward_hooks  # removed on leaving the with-block


def test_default_stages_detach_and_gradients():
    torch.manual_seed(0)
    student, teacher = Net(), Net()
    s, t = StageFeatures(student), StageFeatures(teacher, detach=True)
    assert s.stages == ["block1", "block2"]
    x = torch.randn(4, 3, 8, 8)
    teacher(x)  # outside no_grad: detach keeps no graph anyway
    student(x)
    tf, sf = t.pop(), s.pop()
    assert all(not f.requires_grad for f in tf) and all(f.requires_grad for f in sf)
    loss = dctkd_ext.dct_at_loss(sf, tf)
    loss.backward()
    assert student.block1[0].weight.grad is not None and teacher.block1[0].weight.grad is None


def test_wrappers_are_unwrapped():
    net = Net()
    compiled = torch.compile(net)
    assert unwrap_model(compiled) is net
    sf = StageFeatures(compiled, ["block1"])
    net(torch.randn(1, 3, 8, 8))
    assert sf.pop()[0].shape == (1, 8, 8, 8)


def test_bad_input():
    net = Net()
    with pytest.raises(ValueError, match=r"stages: no module named 'block9'.*stem, block1, block2, head"):
        StageFeatures(net, ["block9"])
    with pytest.raises(ValueError, match="repeat"):
        StageFeatures(net, ["block1", "block1"])
    with pytest.raises(ValueError, match="empty"):
        StageFeatures(net, [])
    with pytest.raises(TypeError, match="sequence of module names"):
        StageFeatures(net, "block1")
    with pytest.raises(TypeError, match="model"):
        StageFeatures(object(), ["a"])
    with pytest.raises(ValueError, match="declares no feature_layers"):
        StageFeatures(nn.Sequential(nn.Conv2d(3, 3, 1)))
    sf = StageFeatures(net, ["block1"])
    with pytest.raises(RuntimeError, match="did not run"):
        sf.pop()
    net(torch.randn(1, 3, 8, 8))
    sf.pop()
    with pytest.raises(RuntimeError, match="did not run"):
        sf.pop()  # cleared by the first pop
