"""The papers' methods as released: FAM-KD's head (fam), DCT-KD with KD and its guide, the recipes."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from dctkd_train import methods as Mth  # noqa: E402
from dctkd_train.cli import build_parser, main  # noqa: E402
from dctkd_train.errors import UserError  # noqa: E402
from dctkd_train.features import FeatureHooks, probe_feature_shapes  # noqa: E402
from dctkd_train.models import build_model  # noqa: E402

ext = pytest.importorskip("dctkd_ext")
if not hasattr(ext, "dct_at_loss"):
    pytest.skip("dctkd_ext is not built", allow_module_level=True)

from dctkd_ext.nn import FrequencyAttention  # noqa: E402
from dctkd_train.fam_head import FamHead, LocalSelfAttention, count_real_parameters, use_released_attention  # noqa: E402
from dctkd_train.recipes import FAM_PAIRS, RECIPES  # noqa: E402
from dctkd_train.train import resolve_config  # noqa: E402

TINY = "synthetic-scenes:size=16,classes=4,train=32,val=16"


def fam_head_for(teacher: str, student: str, image_size: int = 32, num_classes: int = 100, **kw):
    """The fam head the trainer builds for a pair, with the pair's released settings."""
    pair = FAM_PAIRS[(teacher, student)]
    cfg = Mth.MethodConfig.make("fam", fam_student_preact=pair["fam_student_preact"],
                                fam_pooled_target=pair["fam_pooled_target"], **kw)
    m = Mth.Method(cfg)
    s_model, t_model = build_model(student, num_classes), build_model(teacher, num_classes)
    s_layers = m.default_layers(s_model, image_size, "student")
    t_layers = m.default_layers(t_model, image_size, "teacher")
    s_shapes = probe_feature_shapes(s_model, s_layers, image_size, "cpu")
    t_shapes = probe_feature_shapes(t_model, t_layers, image_size, "cpu")
    return m, m.build_head(s_shapes, t_shapes), (s_model, s_layers, s_shapes), (t_model, t_layers, t_shapes)


# ----------------------------------------------------------------------------- FAM-KD head


def test_fam_head_resnet32x4_to_resnet8x4_has_the_released_size():
    m, head, (_, s_layers, s_shapes), (_, t_layers, t_shapes) = fam_head_for("resnet32x4", "resnet8x4")
    assert isinstance(head, FamHead)
    # pre-activation student stage outputs (STU_PREACT) and the pooled feature as the 4th level
    assert s_layers == ["layer1.0.preact", "layer2.0.preact", "layer3.0.preact", "avgpool"]
    assert t_layers == ["layer1", "layer2", "layer3", "avgpool"]
    assert s_shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1)]
    assert count_real_parameters(head) == 25_752_072
    # per-level mid channels = the student's widths: 64/128/256/256 (levels are stored deepest first)
    fams = [lv.project[0] for lv in head.levels]
    assert [(f.in_channels, f.out_channels, f.size) for f in fams] == [(256, 256, 1), (256, 256, 8),
                                                                      (128, 128, 16), (64, 64, 32)]
    assert [lv.attend is None for lv in head.levels] == [True, False, False, False]
    assert [lv.reduce_guide is not None for lv in head.levels] == [False, False, True, True]
    # only the released, never-run 1 -> 256 reduction of the deepest level is frozen (768 parameters)
    frozen = sum(p.numel() for p in head.parameters() if not p.requires_grad)
    assert frozen == 768


def test_cifar_resnet_preact_tap_is_the_sum_before_the_relu(gen):
    net = build_model("resnet8x4", 10).eval()
    hooks = FeatureHooks(net, ["layer2.0.preact", "layer2"])
    net(torch.randn(2, 3, 32, 32, generator=gen))
    pre, post = hooks.pop()
    assert (pre < 0).any()
    torch.testing.assert_close(post, pre.relu(), rtol=0, atol=0)


def _bn(y, bn):
    mean = y.mean((0, 2, 3), keepdim=True)
    var = y.var((0, 2, 3), unbiased=False, keepdim=True)
    return (y - mean) / torch.sqrt(var + bn.eps) * bn.weight[:, None, None] + bn.bias[:, None, None]


def _conv_bn_relu(x, seq):
    return _bn(torch.einsum("oi,bihw->bohw", seq[0].weight[:, :, 0, 0], x), seq[1]).clamp_min(0)


def _released_attention(x, g, att: LocalSelfAttention, groups=4):
    """The released AttentionConv's equations: zero-pad x, 1x1 convs, unfold 3x3 windows, add the
    relative terms to the keys (rows for the first half of the channels, columns for the second),
    split into groups, softmax over the window of q*k, weighted sum of the values."""
    b, c, h, w = x.shape
    xp = F.pad(x, [1, 1, 1, 1])
    q = torch.einsum("oi,bihw->bohw", att.query.weight[:, :, 0, 0], g)
    k = torch.einsum("oi,bihw->bohw", att.key.weight[:, :, 0, 0], xp).unfold(2, 3, 1).unfold(3, 3, 1)
    v = torch.einsum("oi,bihw->bohw", att.value.weight[:, :, 0, 0], xp).unfold(2, 3, 1).unfold(3, 3, 1)
    kh, kw = k.split(c // 2, dim=1)
    k = torch.cat((kh + att.rel_row.view(c // 2, 1, 1, 3, 1), kw + att.rel_col.view(c // 2, 1, 1, 1, 3)), dim=1)
    k = k.contiguous().view(b, groups, c // groups, h, w, -1)
    v = v.contiguous().view(b, groups, c // groups, h, w, -1)
    q = q.view(b, groups, c // groups, h, w, 1)
    a = F.softmax(q * k, dim=-1)
    return torch.einsum("bnchwk,bnchwk->bnchw", a, v).reshape(b, c, h, w)


def _released_fam(x, fam: FrequencyAttention, cuton=0.1):
    """FAM_Module: fft2 (ortho), channel mixing by the complex weight, a centred box of the shifted
    spectrum zeroed (cy = int(h/2), rh = int(cuton*cy)), ifft2, real part; plus the 1x1 conv.
    (The released shift also rolls the channel axis and rolls it back, which changes nothing.)"""
    xf = torch.fft.fft2(x, norm="ortho")
    of = torch.einsum("bixy,ioxy->boxy", xf, fam.weights1.to(torch.complex128))
    s = torch.fft.fftshift(of, dim=(-2, -1))
    h, w = s.shape[-2:]
    cy, cx = int(h / 2), int(w / 2)
    rh, rw = int(cuton * cy), int(cuton * cx)
    s[:, :, cy - rh:cy + rh, cx - rw:cx + rw] = 0
    glob = torch.fft.ifft2(torch.fft.ifftshift(s, dim=(-2, -1)), norm="ortho").real
    local = torch.einsum("oi,bihw->bohw", fam.w0.weight[:, :, 0, 0], x) + fam.w0.bias[:, None, None]
    return fam.rate1 * glob + fam.rate2 * local


def _released_head(feats, head: FamHead):
    """FAM_KD.forward_train's fusion chain over CROSSATF levels, deepest first."""
    x = feats[::-1]
    results = []
    fused = None
    for i, (f, lv) in enumerate(zip(x, head.levels)):
        if lv.reduce_x is not None:
            f = _conv_bn_relu(f, lv.reduce_x)
        if i > 0:
            y = fused if lv.reduce_guide is None else _conv_bn_relu(fused, lv.reduce_guide)
            y = F.interpolate(y, f.shape[-2:], mode="nearest")
            f = _released_attention(f, y, lv.attend)
        if f.shape[-1] != lv.out_size:
            f = F.interpolate(f, (lv.out_size, lv.out_size), mode="nearest")
        fam, bn = lv.project[0], lv.project[1]
        results.insert(0, _bn(_released_fam(f, fam), bn).clamp_min(0) if lv.compare else None)
        fused = f
    return results


@pytest.mark.parametrize("s_shapes,t_shapes", [
    # a CIFAR-like layout: stages and the pooled feature, channels growing with depth (at 32x32 the
    # high-pass box of FrequencyAttention is 2x2; smaller maps have none)
    ([(8, 32, 32), (16, 16, 16), (32, 8, 8), (32, 1, 1)], [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 1, 1)]),
    # teacher maps larger than the student's (nearest resize before the projection), odd sizes
    ([(8, 7, 7), (16, 4, 4), (16, 1, 1)], [(12, 14, 14), (24, 7, 7), (24, 1, 1)]),
])
def test_fam_head_matches_the_released_equations_in_float64(s_shapes, t_shapes, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = Mth.Method(Mth.MethodConfig.make("fam"))
    head = m.build_head(s_shapes, t_shapes).double()
    with torch.no_grad():  # random values everywhere (BN affine, rates, biases), complex weights in complex128
        for mod in head.modules():
            if isinstance(mod, FrequencyAttention):
                mod.weights1.data = mod.weights1.data.to(torch.complex128) * 50
                mod.rate1.uniform_(0.2, 1.0)
                mod.rate2.uniform_(0.2, 1.0)
            elif isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    feats = [torch.randn(3, *s, dtype=torch.float64, generator=gen) for s in s_shapes]
    out = head(feats)
    ref = _released_head(feats, head)
    assert len(out) == len(ref) == len(s_shapes)
    for o, r, t in zip(out, ref, t_shapes):
        assert o.shape == (3, *t) and o.dtype == torch.float64
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
    # and the training signal reaches every trainable parameter of the head
    sum(o.pow(2).sum() for o in out).backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)


def test_fused_attention_head_equals_the_released_formulation_in_float64(gen):
    # the head on the fused op (keys and values in one GEMM) against the same head with the released eager
    # attention: outputs and every parameter's gradient, and the student features' gradients
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    s_shapes = [(8, 9, 9), (16, 5, 5), (16, 1, 1)]
    t_shapes = [(12, 9, 9), (24, 5, 5), (24, 1, 1)]
    head = Mth.Method(Mth.MethodConfig.make("fam")).build_head(s_shapes, t_shapes).double()
    released = Mth.Method(Mth.MethodConfig.make("fam")).build_head(s_shapes, t_shapes).double()
    released.load_state_dict(head.state_dict())
    use_released_attention(released)
    assert set(head.state_dict()) == set(released.state_dict())
    feats = [torch.randn(3, *s, dtype=torch.float64, generator=gen) for s in s_shapes]
    grads_out = None
    results = []
    for model in (head, released):
        xs = [f.clone().requires_grad_() for f in feats]
        outs = [o for o in model(xs) if o is not None]
        if grads_out is None:
            grads_out = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in outs]
        torch.autograd.backward(outs, grads_out)
        results.append((outs, [x.grad for x in xs], {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (o1, x1, p1), (o2, x2, p2) = results
    for a, b in zip(o1 + x1, o2 + x2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert p1.keys() == p2.keys() and any("rel_row" in n for n in p1)
    for n in p1:
        assert p1[n] is not None and p2[n] is not None, n
        torch.testing.assert_close(p1[n], p2[n], rtol=1e-10, atol=1e-10, msg=n)


def test_local_attention_channels_must_split_in_halves():
    with pytest.raises(UserError, match="halves"):
        LocalSelfAttention(7)


@pytest.mark.parametrize("guide_shape", [(2, 6, 4, 4), (3, 4, 4, 4), (2, 4, 4)])
def test_local_attention_guide_must_match_batch_and_channels(guide_shape):
    with pytest.raises(ValueError, match=r"guide: expected a \(B, C, h, w\) tensor with x's B and C \(2, 4\)"):
        LocalSelfAttention(4)(torch.randn(2, 4, 8, 8), torch.randn(guide_shape))


@pytest.mark.parametrize("guide_size", [4, 8, 16])
def test_local_attention_projects_the_guide_on_either_side_of_its_resize_alike(guide_size, gen):
    # the query conv runs before the nearest resize of a smaller guide, after that of a larger one: the same
    # output and gradients as the released order (resize, then conv) in float64
    att = LocalSelfAttention(4).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=gen)
    g = torch.randn(2, 4, guide_size, guide_size, dtype=torch.float64, generator=gen)
    outs = []
    for released in (False, True):
        att.released = released
        xs, gs = x.clone().requires_grad_(), g.clone().requires_grad_()
        y = att(xs, gs)
        y.backward(torch.ones_like(y))
        outs.append((y, xs.grad, gs.grad, att.query.weight.grad.clone()))
        att.zero_grad()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("teacher,student", [("wrn40_2", "wrn16_2"), ("wrn40_2", "wrn40_1")])
def test_fam_wrn_pairs_tap_the_pooled_feature(teacher, student):
    m, head, (s_model, s_layers, s_shapes), (t_model, t_layers, t_shapes) = fam_head_for(teacher, student)
    assert s_layers == ["block1", "block2", "block3", "avgpool"] and t_layers == s_layers
    assert s_shapes[-1][1:] == (1, 1) and t_shapes[-1] == (128, 1, 1)
    # the pooled tap is the pool of relu(bn1(block3)), what the classifier sees
    t_model.eval()
    x = torch.randn(2, 3, 32, 32)
    hooks = FeatureHooks(t_model, ["block3", "avgpool"])
    logits = t_model(x)
    b3, pooled = hooks.pop()
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(t_model.relu(t_model.bn1(b3)), 1))
    torch.testing.assert_close(logits, t_model.fc(pooled.flatten(1)))
    out = head([torch.randn(2, *s) for s in s_shapes])
    assert [tuple(o.shape[1:]) for o in out] == t_shapes


def test_fam_imagenet_pair_leaves_the_pooled_level_out_of_the_loss():
    pytest.importorskip("torchvision")
    m, head, (_, s_layers, s_shapes), (_, t_layers, t_shapes) = fam_head_for("resnet34", "resnet18", image_size=64,
                                                                             num_classes=10)
    assert s_layers == ["layer1", "layer2", "layer3", "layer4", "avgpool"]
    out = head([torch.randn(2, *s) for s in s_shapes])
    assert [o is None for o in out] == [False, False, False, False, True]
    t = [torch.randn(2, *s) for s in t_shapes]
    terms = m.distill_terms(torch.zeros(2, dtype=torch.long), torch.randn(2, 10), None, out, torch.randn(2, 10), t, 1)
    ref = sum(F.mse_loss(o, x) for o, x in zip(out[:4], t[:4]))
    assert float(terms["fam"].detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert all(not p.requires_grad for p in head.levels[0].project.parameters())


class NoPoolNet(torch.nn.Module):
    feature_layers = ("conv",)

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_fam_needs_a_pooled_layer_or_explicit_layers():
    m = Mth.Method(Mth.MethodConfig.make("fam"))
    with pytest.raises(UserError, match="pooled feature.*--student-layers"):
        m.default_layers(NoPoolNet(), 32, "student")
    wrn = build_model("wrn16_1", 10)
    with pytest.raises(UserError, match="pre-activation.*--no-fam-student-preact"):
        Mth.Method(Mth.MethodConfig.make("fam", fam_student_preact=True)).default_layers(wrn, 32, "student")


# ----------------------------------------------------------------------------- DCT-KD with KD, the guide


class Recorder:
    def __init__(self):
        self.calls = []

    def dct_at_loss(self, s, t, **kw):
        self.calls.append(kw)
        return sum(x.float().mean() * 0 for x in s) + 0.5


def test_dct_paper_plus_kd_is_the_released_loss_with_kd_and_the_guide():
    c = Mth.MethodConfig.make("dct-paper+kd")
    assert (c.ce_weight, c.kd_weight, c.feat_weight) == (0.1, 1.0, 1.0) and c.guide
    m = Mth.Method(c)
    rec = m.ext = Recorder()
    y = torch.tensor([0, 1, 2, 3])
    t_logits = F.one_hot(torch.tensor([0, 2, 2, 3]), 5).float() * 3
    s_logits = torch.randn(4, 5)
    s = [torch.randn(4, 8, 4, 4)]
    terms = m.distill_terms(y, s_logits, s, None, t_logits, [torch.randn(4, 8, 4, 4)], 1)
    assert rec.calls[0]["preset"] == "paper"
    torch.testing.assert_close(rec.calls[0]["sample_weight"], torch.tensor([1.0, 0.0, 1.0, 1.0]))
    total = m.total(torch.tensor(2.0), terms, 1)
    expect = 0.1 * 2.0 + 0.5 + float(Mth.kd_loss(s_logits, t_logits, 4.0))
    assert float(total) == pytest.approx(expect, rel=1e-6)


def test_dct_paper_plus_kd_matches_the_released_formula_per_sample():
    # the real op: (mean over the batch of) guide * sum over levels of ||DCT_s - DCT_t||_2, DFTOurs' maps
    def released(fs, ft):
        def am(f):
            cam = f.pow(2).mean(1).flatten(1)
            cam = (cam - cam.min(1)[0][:, None]) / cam.max(1)[0][:, None]
            return cam.view(f.shape[0], *f.shape[-2:])

        def dct(a):
            a = a - a.flatten(1).mean(1)[:, None, None]
            d = torch.fft.fft(torch.fft.fft(a, dim=1), dim=2).real.abs()
            mn, mx = d.flatten(1).min(1)[0], d.flatten(1).max(1)[0]
            return ((d - mn[:, None, None]) / mx[:, None, None]).flatten(1)

        return sum(torch.sqrt(((dct(am(s)) - dct(am(t))) ** 2).sum(1)) for s, t in zip(fs, ft))

    g = torch.Generator().manual_seed(3)
    fs = [torch.randn(4, 8, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 16, 4, 4, generator=g, dtype=torch.float64)]
    ft = [torch.randn(4, 12, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 24, 4, 4, generator=g, dtype=torch.float64)]
    y = torch.tensor([0, 1, 2, 3])
    t_logits = F.one_hot(torch.tensor([0, 1, 0, 3]), 5).double()
    m = Mth.Method(Mth.MethodConfig.make("dct-paper+kd"))
    terms = m.distill_terms(y, torch.randn(4, 5, dtype=torch.float64), fs, None, t_logits, ft, 1)
    ref = (released(fs, ft) * torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)).mean()
    assert float(terms["dct"]) == pytest.approx(float(ref), rel=1e-9)


def test_loss_preset_trains_the_main_branch_dct_loss():
    from dctkd_ext import reference as ref
    from dctkd_train.train import make_method_config

    assert _resolve(method="dct-paper", teacher="t.pt")["loss_preset"] == "paper"
    assert _resolve(method="kd", teacher="t.pt")["loss_preset"] is None
    args = build_parser().parse_args(["train", "--data", TINY, "--model", "resnet8", "--out", "o", "--method",
                                      "dct-paper", "--teacher", "t.pt", "--loss-preset", "fft-real-minmax"])
    cfg = resolve_config({k: v for k, v in vars(args).items() if k != "command"})
    assert cfg["loss_preset"] == "fft-real-minmax" and cfg["guide"] is True
    g = torch.Generator().manual_seed(5)
    fs = [torch.randn(4, 8, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 16, 4, 4, generator=g, dtype=torch.float64)]
    ft = [torch.randn(4, 12, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 24, 4, 4, generator=g, dtype=torch.float64)]
    y = torch.tensor([0, 1, 2, 3])
    t_logits = F.one_hot(torch.tensor([0, 1, 0, 3]), 5).double()
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    for preset, released in (("fft-real-minmax", ref.released_dct_loss_main), ("paper", ref.released_dct_loss)):
        m = Mth.Method(make_method_config(dict(cfg, loss_preset=preset)))
        terms = m.distill_terms(y, torch.randn(4, 5, dtype=torch.float64), fs, None, t_logits, ft, 1)
        assert float(terms["dct"]) == pytest.approx(float(released(fs, ft, mask)), rel=1e-9)
    with pytest.raises(UserError, match="method 'fam' does not use dct_at_loss"):
        _resolve(method="fam", teacher="t.pt", loss_preset="paper")
    with pytest.raises(UserError, match="unknown preset 'dev'"):
        _resolve(method="dct-paper", teacher="t.pt", loss_preset="dev")


@pytest.mark.parametrize("method,guide", [("dct-paper", True), ("dct-paper+kd", True), ("dct", False),
                                          ("dct+kd", False), ("at", False), ("kd", False)])
def test_guide_defaults(method, guide):
    cfg = resolve_config({"data": TINY, "model": "resnet8", "method": method, "teacher": "t.pt", "out": "o"})
    assert cfg["guide"] is guide
    if guide:
        off = build_parser().parse_args(["train", "--data", TINY, "--model", "resnet8", "--out", "o",
                                         "--method", method, "--teacher", "t.pt", "--no-guide"])
        assert off.guide is False
        cfg = resolve_config({k: v for k, v in vars(off).items() if k != "command"})
        assert cfg["guide"] is False


# ----------------------------------------------------------------------------- recipes


def _resolve(**kw):
    raw = {"data": TINY, "model": "resnet8", "out": "o", **kw}
    return resolve_config(raw)


def test_recipes_set_every_hyperparameter():
    c = _resolve(recipe="dctkd-scenes", method="dct-paper", teacher="t.pt")
    assert (c["lr"], c["batch_size"], c["epochs"], c["weight_decay"], c["momentum"]) == (0.1, 128, 70, 1e-4, 0.9)
    assert (c["schedule"], c["milestones"], c["lr_decay"], c["amp"], c["image_size"]) == ("step", [25, 50], 0.1, "none", 224)
    assert c["guide"] is True and c["recipe"] == "dctkd-scenes"
    assert (c["ce_weight"], c["kd_weight"], c["feat_weight"]) == (1.0, 0.0, 1.0)
    c = _resolve(recipe="dctkd-scenes", method="dct-paper+kd", teacher="t.pt")
    assert (c["ce_weight"], c["kd_weight"], c["feat_weight"], c["guide"]) == (0.1, 1.0, 1.0, True)
    c = _resolve(recipe="dctkd-cifar", method="dct-paper", teacher="t.pt")
    assert (c["lr"], c["batch_size"], c["epochs"], c["weight_decay"], c["milestones"]) == (0.05, 128, 240, 5e-4, [150, 180, 210])
    assert c["guide"] is False and c["amp"] == "none" and c["image_size"] is None
    c = _resolve(recipe="famkd-cifar", method="fam", teacher="t.pt", teacher_model="resnet32x4", model="resnet8x4")
    assert (c["lr"], c["batch_size"], c["epochs"], c["weight_decay"], c["milestones"]) == (0.05, 64, 240, 5e-4, [150, 180, 210])
    assert (c["feat_weight"], c["feat_warmup"], c["fam_student_preact"], c["fam_pooled_target"]) == (20.0, 20, True, True)
    assert (c["ce_weight"], c["kd_weight"], c["amp"]) == (1.0, 0.0, "none")
    c = _resolve(recipe="famkd-imagenet", method="fam", teacher="t.pt", teacher_model="resnet34", model="resnet18")
    assert (c["lr"], c["batch_size"], c["epochs"], c["weight_decay"], c["milestones"]) == (0.1, 128, 100, 1e-4, [30, 60, 90])
    assert (c["feat_weight"], c["feat_warmup"], c["fam_pooled_target"], c["image_size"]) == (1.0, 1, False, 224)


@pytest.mark.parametrize("pair,weight", [(("resnet56", "resnet20"), 0.8), (("wrn40_2", "wrn16_2"), 5.0),
                                         (("wrn40_2", "wrn40_1"), 5.0), (("resnet110", "resnet32"), 1.0),
                                         (("resnet20", "resnet8"), 1.0)])
def test_fam_per_pair_weights(pair, weight):
    c = _resolve(recipe="famkd-cifar", method="fam", teacher="t.pt", teacher_model=pair[0], model=pair[1])
    assert c["feat_weight"] == weight and c["feat_warmup"] == 20 and c["fam_student_preact"] is False


def test_explicit_flags_override_the_recipe_and_short_runs_keep_its_shape():
    c = _resolve(recipe="famkd-cifar", method="fam", teacher="t.pt", teacher_model="resnet32x4", model="resnet8x4",
                 lr=0.01, batch_size=32, feat_weight=3.0, amp="bf16", fam_student_preact=False)
    assert (c["lr"], c["batch_size"], c["feat_weight"], c["amp"], c["fam_student_preact"]) == (0.01, 32, 3.0, "bf16", False)
    c = _resolve(recipe="famkd-cifar", method="fam", teacher="t.pt", teacher_model="resnet32x4", model="resnet8x4",
                 epochs=24)
    assert c["milestones"] == [15, 18, 21] and c["feat_warmup"] == 2
    c = _resolve(recipe="dctkd-scenes", method="dct-paper", teacher="t.pt", epochs=7, milestones=[3])
    assert c["milestones"] == [3]
    # a recipe's batch is global: under torchrun each process gets its share
    raw = {"data": TINY, "model": "resnet8", "out": "o", "recipe": "dctkd-cifar", "method": "dct", "teacher": "t.pt"}
    assert resolve_config(raw, world_size=4)["batch_size"] == 32
    with pytest.raises(UserError, match="does not split over 3"):
        resolve_config(raw, world_size=3)
    with pytest.raises(UserError, match="unknown recipe 'rkd'"):
        _resolve(recipe="rkd")
    with pytest.raises(UserError, match="--fam-mid-channels sets the fusion width of fam-abf"):
        _resolve(method="fam", teacher="t.pt", fam_mid_channels=32)
    assert _resolve(method="fam-abf", teacher="t.pt", fam_mid_channels=32)["fam_mid_channels"] == 32


def test_the_famkd_cifar_command_records_the_released_settings(tmp_path, capsys):
    torch.manual_seed(0)
    t = tmp_path / "t.pt"
    torch.save({"arch": "resnet32x4", "num_classes": 4, "model": build_model("resnet32x4", 4).state_dict()}, t)
    out = tmp_path / "run"
    rc = main(["train", "--data", "synthetic-scenes:size=32,classes=4,train=16,val=8", "--model", "resnet8x4",
               "--teacher", str(t), "--method", "fam", "--recipe", "famkd-cifar", "--epochs", "1",
               "--batch-size", "8", "--device", "cpu", "--out", str(out), "--no-progress", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    c = cfg["config"]
    assert c["recipe"] == "famkd-cifar" and c["method"] == "fam"
    assert (c["lr"], c["weight_decay"], c["momentum"], c["amp"], c["feat_weight"]) == (0.05, 5e-4, 0.9, "none", 20.0)
    assert c["fam_student_preact"] is True and c["fam_pooled_target"] is True
    assert c["student_layers"] == ["layer1.0.preact", "layer2.0.preact", "layer3.0.preact", "avgpool"]
    assert cfg["environment"]["amp"] == "none"
    assert cfg["head_params"] == 25_752_072
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(row["train_loss"]) and row["train_loss_fam"] > 0


def test_every_recipe_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "TRAINER.md").read_text()
    for name, r in RECIPES.items():
        assert f"`{name}`" in doc, name
    for m in Mth.METHODS:
        assert f"`{m}`" in doc, m
