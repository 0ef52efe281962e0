"""The method registry: a method defined outside the package (here, in the test) is one class, and
the trainer runs it by name with nothing else changed."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from dctkd_train import methods as Mth  # noqa: E402
from dctkd_train.errors import UserError  # noqa: E402

TINY = "synthetic-scenes:size=16,classes=4,train=32,val=16"


class HintHead(nn.Module):
    """FitNets' regressor: a 1x1 conv per level from the student's channels to the teacher's."""

    def __init__(self, student_shapes, teacher_shapes):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(s[0], t[0], 1) for s, t in zip(student_shapes, teacher_shapes))

    def forward(self, feats):
        return [conv(f) for conv, f in zip(self.convs, feats)]


class Hint(Mth.Method):
    """A FitNets-style hint loss: the whole method."""

    name = "hint-test"
    weights = (1.0, 0.0, 2.0)
    feature_kind = "maps"

    def make_head(self, student_shapes, teacher_shapes):
        return HintHead(student_shapes, teacher_shapes)

    def feature_terms(self, labels, s_logits, s_feats, head_out, t_logits, t_feats, epoch):
        pairs = [Mth.match_spatial(h, t.detach()) for h, t in zip(head_out, t_feats)]
        return {"hint": sum(F.mse_loss(h.float(), t.float()) for h, t in pairs)}


@pytest.fixture
def hint():
    Mth.register(Hint)
    yield Hint
    del Mth.REGISTRY[Hint.name]


def test_a_registered_method_is_built_by_name(hint):
    cfg = Mth.MethodConfig.make("hint-test", kd_weight=0.5)
    assert (cfg.ce_weight, cfg.kd_weight, cfg.feat_weight) == (1.0, 0.5, 2.0)
    assert cfg.feature_kind == "maps" and cfg.needs_teacher and not cfg.guide and cfg.preset is None
    m = Mth.Method(cfg)
    assert type(m) is Hint and m.uses_features and Mth.method_available("hint-test")
    s, t = [torch.randn(2, 8, 4, 4, requires_grad=True)], [torch.randn(2, 16, 4, 4)]
    head = m.build_head([(8, 4, 4)], [(16, 4, 4)])
    logits = torch.randn(2, 4)
    terms = m.distill_terms(torch.tensor([0, 1]), logits, s, head(s), logits.flip(0), t, epoch=1)
    assert set(terms) == {"kd", "hint"}
    total = m.total(torch.tensor(1.0), terms, epoch=1)
    expect = 1.0 + 0.5 * terms["kd"] + 2.0 * terms["hint"]
    torch.testing.assert_close(total, expect)
    total.backward()
    assert s[0].grad is not None and head.convs[0].weight.grad is not None


def test_register_refuses_a_second_class_of_the_same_name(hint):
    class Other(Hint):
        pass

    with pytest.raises(ValueError, match="registered already"):
        Mth.register(Other)
    with pytest.raises(UserError, match="unknown method 'nope'; methods: ce, kd, at"):
        Mth.MethodConfig.make("nope")


def test_a_registered_method_trains_in_the_loop(hint, teacher_ckpt, tmp_path):
    from dctkd_train.train import train

    out = tmp_path / "run"
    train({"data": TINY, "model": "resnet8", "method": "hint-test", "teacher": teacher_ckpt, "epochs": 1,
           "batch_size": 16, "device": "cpu", "out": str(out), "quiet": True, "progress": False})
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k for k in row if k.startswith("train_loss_")} == {"train_loss_ce", "train_loss_hint"}
    assert math.isfinite(row["train_loss"]) and row["train_loss_hint"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["method"] == "hint-test" and cfg["config"]["feat_weight"] == 2.0
    assert cfg["head_params"] > 0
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["head"] is not None and any(k.startswith("convs.") for k in ckpt["head"])
