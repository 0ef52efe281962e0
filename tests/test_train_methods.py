"""Trainer methods: the wiring of every loss (weights, presets, guide, pooling, FAM distiller)."""
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

ext = pytest.importorskip("dctkd_ext")
if not hasattr(ext, "dct_at_loss"):
    pytest.skip("dctkd_ext is not built", allow_module_level=True)

TINY = "synthetic-scenes:size=16,classes=4,train=32,val=16"


class StandInFAM(nn.Module):
    """Local stand-in for dctkd_ext.nn.FrequencyAttention with its interface: (B, in, S, S) -> (B, out, S, S)."""

    def __init__(self, in_channels, out_channels, size, cuton=0.1, mix="channel"):
        super().__init__()
        self.size = size
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        assert x.shape[-2:] == (self.size, self.size)
        return self.proj(x)


@pytest.fixture
def fam_available(monkeypatch):
    import dctkd_ext.nn as ext_nn

    if getattr(ext_nn, "FrequencyAttention", None) is None:
        monkeypatch.setattr(ext_nn, "FrequencyAttention", StandInFAM, raising=False)
    return ext_nn.FrequencyAttention


@pytest.fixture
def fam_missing(monkeypatch):
    import dctkd_ext.nn as ext_nn

    monkeypatch.delattr(ext_nn, "FrequencyAttention", raising=False)


class Recorder:
    """Stands in for the dctkd_ext module: records each dct_at_loss call, returns a known value."""

    def __init__(self, value=0.5):
        self.calls = []
        self.value = value

    def dct_at_loss(self, s, t, **kw):
        self.calls.append((s, t, kw))
        return sum(x.float().mean() * 0 for x in s) + self.value


def feats(b=4, shapes=((8, 8, 8), (16, 4, 4)), grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *s, generator=g).requires_grad_(grad) for s in shapes]


# ----------------------------------------------------------------------------- configuration


def test_default_weights_per_method():
    expect = {"ce": (1, 0, 0), "kd": (0.1, 0.9, 0), "at": (1, 0, 1000), "dct": (1, 0, 1), "dct-paper": (1, 0, 1),
              "dct+kd": (0.1, 1, 1), "dct-paper+kd": (0.1, 1, 1), "fam": (1, 0, 1), "fam-abf": (1, 0, 1)}
    assert set(expect) == set(Mth.METHODS)
    for name, (ce, kd, ft) in expect.items():
        c = Mth.MethodConfig.make(name)
        assert (c.ce_weight, c.kd_weight, c.feat_weight) == (ce, kd, ft), name
        assert c.temperature == 4.0
        assert c.needs_teacher == (name != "ce")
    c = Mth.MethodConfig.make("dct", ce_weight=0.5, feat_weight=2.0)
    assert (c.ce_weight, c.kd_weight, c.feat_weight) == (0.5, 0, 2.0)
    with pytest.raises(UserError, match="unknown method 'dkd'"):
        Mth.MethodConfig.make("dkd")


def test_loss_options_parsing():
    assert Mth.parse_loss_options(["distance=mse", "eps=1e-6", "p=2", "center=false"]) == {
        "distance": "mse", "eps": 1e-6, "p": 2, "center": False}
    with pytest.raises(UserError, match="key=value"):
        Mth.parse_loss_options(["distance"])


# ----------------------------------------------------------------------------- KD


def test_kd_loss_is_hinton_with_t_squared():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    T = 4.0
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    manual = (pt * (pt.log() - ps.log())).sum(1).mean() * T * T
    torch.testing.assert_close(Mth.kd_loss(s, t, T), manual)
    assert Mth.kd_loss(s, s, T).abs() < 1e-5


# ----------------------------------------------------------------------------- DCT / AT wiring


@pytest.mark.parametrize("name,preset,term", [("at", "at", "at"), ("dct", "dct", "dct"), ("dct-paper", "paper", "dct"),
                                              ("dct+kd", "dct", "dct")])
def test_feature_methods_call_dct_at_loss_with_their_preset_and_weights(name, preset, term):
    m = Mth.Method(Mth.MethodConfig.make(name, level_weights=[1.0, 2.0], loss_options={"eps": 1e-6}, guide=False))
    rec = m.ext = Recorder(0.5)
    y = torch.tensor([0, 1, 2, 3])
    s_logits, t_logits = torch.randn(4, 5), torch.randn(4, 5)
    s, t = feats(grad=True), feats(seed=1, grad=True)  # a teacher that requires grad: the method detaches it
    terms = m.distill_terms(y, s_logits, s, None, t_logits, t, epoch=1)
    (s_in, t_in, kw) = rec.calls[0]
    fw = 1000.0 if name == "at" else 1.0  # the feature weight goes into the op's level weights
    assert kw["preset"] == preset and kw["weights"] == [fw, 2 * fw] and kw["sample_weight"] is None
    assert kw["eps"] == 1e-6
    assert all(a is b for a, b in zip(s_in, s))  # same sizes: passed through
    assert not any(x.requires_grad for x in t_in)  # the teacher is a constant
    assert set(terms) == ({term, "kd"} if name == "dct+kd" else {term})
    ce = torch.tensor(2.0)
    total = m.total(ce, terms, epoch=1)
    # the recorder's 0.5 stands for the weighted loss: the total adds it as it is
    expect = {"at": 2.0 + 0.5, "dct": 2.0 + 0.5, "dct-paper": 2.0 + 0.5,
              "dct+kd": 0.1 * 2.0 + 0.5 + float(Mth.kd_loss(s_logits, t_logits, 4.0))}[name]
    assert float(total.detach()) == pytest.approx(expect, rel=1e-6)
    assert float(m.unweighted(terms, 1)[term]) == pytest.approx(0.5 / fw, rel=1e-6)


def test_feature_weight_and_warmup_reach_the_op_so_its_upstream_gradient_is_one():
    m = Mth.Method(Mth.MethodConfig.make("dct", feat_weight=3.0, level_weights=[1.0, 0.5], guide=False))
    m.cfg.feat_warmup = 4
    s, t = feats(grad=True), feats(seed=1)
    terms = m.distill_terms(torch.zeros(4, dtype=torch.long), torch.randn(4, 5), s, None, torch.randn(4, 5), t, 2)
    unweighted = m.ext.dct_at_loss(s, t, preset="dct", weights=[1.0, 0.5])
    assert float(terms["dct"].detach()) == pytest.approx(3.0 * 0.5 * float(unweighted.detach()), rel=1e-6)
    total = m.total(torch.tensor(0.0, requires_grad=True), terms, 2)
    (g,) = torch.autograd.grad(total, terms["dct"])
    assert float(g) == 1.0


def test_teacher_prediction_guide_masks_samples():
    m = Mth.Method(Mth.MethodConfig.make("dct", guide=True))
    rec = m.ext = Recorder()
    y = torch.tensor([0, 1, 2, 3])
    t_logits = F.one_hot(torch.tensor([0, 2, 2, 1]), 5).float()  # right, wrong, right, wrong
    m.distill_terms(y, torch.randn(4, 5), feats(), None, t_logits, feats(seed=1), epoch=1)
    torch.testing.assert_close(rec.calls[0][2]["sample_weight"], torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_mismatched_spatial_sizes_are_pooled_like_mdistiller():
    s = torch.randn(2, 4, 8, 8)
    t = torch.randn(2, 6, 4, 4)
    s2, t2 = Mth.match_spatial(s, t)
    assert t2 is t and s2.shape == (2, 4, 4, 4)
    torch.testing.assert_close(s2, F.adaptive_avg_pool2d(s, 4))
    t3, s3 = Mth.match_spatial(t, s)
    assert t3 is t and s3.shape == (2, 4, 4, 4)
    m = Mth.Method(Mth.MethodConfig.make("at"))
    rec = m.ext = Recorder()
    m.distill_terms(torch.zeros(2, dtype=torch.long), torch.randn(2, 3), [s], None, torch.randn(2, 3), [t], 1)
    assert rec.calls[0][0][0].shape == (2, 4, 4, 4)


def test_at_is_mdistillers_attention_transfer_and_trains_only_the_student():
    s, t = feats(grad=True), feats(seed=1)
    m = Mth.Method(Mth.MethodConfig.make("at"))
    y = torch.zeros(4, dtype=torch.long)
    terms = m.distill_terms(y, torch.randn(4, 5), s, None, torch.randn(4, 5), [x.requires_grad_() for x in t], 1)

    def at(f):
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    ref = sum((at(a) - at(b)).pow(2).mean() for a, b in zip(s, t))  # mdistiller's single_stage_at_loss summed
    assert float(m.unweighted(terms, 1)["at"]) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert float(terms["at"].detach()) == pytest.approx(1000 * float(ref.detach()), rel=1e-5)  # weight inside
    m.total(torch.tensor(0.0), terms, 1).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)


@pytest.mark.parametrize("name", ["dct", "dct-paper", "dct+kd"])
def test_real_dct_losses_give_student_gradients(name):
    s, t = feats(grad=True), feats(seed=1)
    # without the teacher-prediction guide (on by default for dct-paper): a random teacher is wrong
    m = Mth.Method(Mth.MethodConfig.make(name, guide=False))
    s_logits = torch.randn(4, 5, requires_grad=True)
    terms = m.distill_terms(torch.zeros(4, dtype=torch.long), s_logits, s, None, torch.randn(4, 5), t, 1)
    total = m.total(F.cross_entropy(s_logits, torch.zeros(4, dtype=torch.long)), terms, 1)
    assert torch.isfinite(total)
    total.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in s)


def test_level_count_mismatch_is_a_clear_error():
    m = Mth.Method(Mth.MethodConfig.make("dct"))
    with pytest.raises(UserError, match="3 feature levels and the teacher 4.*--student-layers"):
        m.build_head([(8, 8, 8)] * 3, [(8, 8, 8)] * 4)
    m = Mth.Method(Mth.MethodConfig.make("dct", level_weights=[1.0]))
    with pytest.raises(UserError, match="--level-weights"):
        m.build_head([(8, 8, 8)] * 2, [(8, 8, 8)] * 2)


# ----------------------------------------------------------------------------- FAM


def test_fam_without_frequency_attention_says_so(fam_missing):
    with pytest.raises(UserError) as e:
        Mth.Method(Mth.MethodConfig.make("fam"))
    assert str(e.value) == "fam needs dctkd_ext.nn.FrequencyAttention, which the installed dctkd_ext does not provide"
    assert not Mth.method_available("fam")


def test_fam_review_distiller(fam_available):
    torch.manual_seed(0)
    cfg = Mth.MethodConfig.make("fam-abf", feat_warmup=4)
    m = Mth.Method(cfg)
    s_shapes = [(16, 16, 16), (32, 8, 8), (64, 4, 4)]
    t_shapes = [(32, 16, 16), (64, 8, 8), (128, 4, 4)]
    head = m.build_head(s_shapes, t_shapes)
    assert isinstance(head, Mth.ReviewFusionHead)
    fams = [mod for mod in head.modules() if isinstance(mod, fam_available)]
    assert len(fams) == 3  # one FrequencyAttention output conv per level
    assert head.abfs[0].att_conv is None and all(a.att_conv is not None for a in head.abfs[1:])  # deepest: no fusion
    s = [torch.randn(2, *sh, requires_grad=True) for sh in s_shapes]
    t = [torch.randn(2, *sh).relu() for sh in t_shapes]
    out = head(s)
    assert [tuple(o.shape[1:]) for o in out] == t_shapes
    terms = m.distill_terms(torch.zeros(2, dtype=torch.long), torch.randn(2, 3), s, out, torch.randn(2, 3), t, 1)
    ref = sum(F.mse_loss(o, x) for o, x in zip(out, t))
    assert float(terms["fam"].detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    # the feature weight warms up linearly over feat_warmup epochs
    assert [m.feat_scale(e) for e in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    total = m.total(torch.tensor(0.0), terms, epoch=2)
    assert float(total.detach()) == pytest.approx(0.5 * float(ref.detach()), rel=1e-6)
    total.backward()
    assert all(x.grad is not None for x in s)
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)


def test_abf_fusion_gate_formula():
    """ReviewKD's attention-based fusion, written out: x = BN(conv1x1(student)); y = nearest-upsampled
    deeper fused map; z = sigmoid(conv1x1([x, y])) with 2 channels; fused = x * z[:, 0] + y * z[:, 1]
    (the first gate weighs the student's own feature); then the output conv at the teacher's size."""
    torch.manual_seed(0)
    abf = Mth.ABF(6, 4, 5, 8, fuse=True, fam_cls=StandInFAM).eval()
    with torch.no_grad():  # a gate far from 1/2 - 1/2, so that swapped weights show
        abf.att_conv[0].weight.normal_(0, 1.0)
        abf.att_conv[0].bias.copy_(torch.tensor([2.0, -1.0]))
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    residual = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    abf.double()
    out, fused = abf(x, residual)
    with torch.no_grad():
        xs = abf.conv1(x)
        y = residual.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest, x2
        wgt, bias = abf.att_conv[0].weight[:, :, 0, 0], abf.att_conv[0].bias
        logits = torch.einsum("oc,bchw->bohw", wgt, torch.cat([xs, y], 1)) + bias[None, :, None, None]
        z = 1 / (1 + torch.exp(-logits))
        expect = xs * z[:, 0:1] + y * z[:, 1:2]
    torch.testing.assert_close(fused, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, abf.conv2(expect), rtol=1e-12, atol=1e-12)
    # the deepest level has no gate: its output is the output conv of x
    deepest = Mth.ABF(6, 4, 5, 8, fuse=False, fam_cls=StandInFAM).eval().double()
    out0, x0 = deepest(x)
    torch.testing.assert_close(out0, deepest.conv2(deepest.conv1(x)), rtol=1e-12, atol=1e-12)


def test_fam_deepest_level_sets_the_fusion_path(fam_available):
    # the student's features are at other sizes than the teacher's: the ABF resizes to the teacher
    m = Mth.Method(Mth.MethodConfig.make("fam-abf"))
    head = m.build_head([(8, 8, 8), (16, 4, 4)], [(12, 16, 16), (24, 8, 8)])
    out = head([torch.randn(3, 8, 8, 8), torch.randn(3, 16, 4, 4)])
    assert [tuple(o.shape) for o in out] == [(3, 12, 16, 16), (3, 24, 8, 8)]


# ----------------------------------------------------------------------------- every method in the loop


@pytest.mark.parametrize("method", list(Mth.METHODS) + ["dct+guide"])
def test_every_method_trains_in_the_loop(method, teacher_ckpt, tmp_path, fam_available):
    from dctkd_train.train import train

    name = "dct" if method == "dct+guide" else method
    summary = train({"data": TINY, "model": "resnet8", "method": name, "teacher": teacher_ckpt, "epochs": 1,
                     "batch_size": 16, "device": "cpu", "out": str(tmp_path / "run"), "quiet": True,
                     "progress": False, "guide": method == "dct+guide" or None})
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    expect_terms = {"ce": set(), "kd": {"kd"}, "at": {"at"}, "dct": {"dct"}, "dct-paper": {"dct"},
                    "dct+kd": {"dct", "kd"}, "dct-paper+kd": {"dct", "kd"}, "fam": {"fam"},
                    "fam-abf": {"fam"}}[name]
    terms = {k[len("train_loss_"):] for k in row if k.startswith("train_loss_")}
    assert terms == expect_terms | {"ce"}
    assert row["epoch"] == 1 and 0 <= row["val_top1"] <= 100 and math.isfinite(row["train_loss"])
    assert row["steps"] == 2 and row["loss_time_s"] >= 0
    if name != "ce":
        assert row["loss_time_s"] > 0
    assert summary["best"]["val_top1"] == row["val_top1"]
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert (ck["head"] is not None) == (name in ("fam", "fam-abf"))


def test_compile_keeps_the_hooks(teacher_ckpt, tmp_path, monkeypatch):
    # --compile wraps student and teacher in torch.compile; the hooks must still deliver the features.
    # (aot_eager traces exactly what inductor would compile, without the C++ build time.)
    from dctkd_train.train import train

    real = torch.compile
    compiled = []

    def compile_aot_eager(model, **kw):
        compiled.append(model)
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    torch._dynamo.reset()
    base = {"data": TINY, "model": "resnet8", "method": "dct", "teacher": teacher_ckpt, "epochs": 1,
            "batch_size": 16, "device": "cpu", "quiet": True, "eval_teacher": False}
    s1 = train({**base, "out": str(tmp_path / "c"), "compile": True})
    assert len(compiled) == 2
    s2 = train({**base, "out": str(tmp_path / "e")})
    assert s1["final"]["train_loss_dct"] == pytest.approx(s2["final"]["train_loss_dct"], rel=1e-4)
    assert s1["final"]["train_loss"] == pytest.approx(s2["final"]["train_loss"], rel=1e-4)
