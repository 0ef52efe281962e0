"""The single-pass CPU loss that writes the student's gradient in its forward (fused_grad, the
default on the CPU): values and gradients against the float64 reference and against the two-pass
form, the backward's no-pass path and its fallback, retained graphs, when no gradient is made,
gradcheck, opcheck and torch.compile. Values and gradients are held to conftest's error bounds
(assert_close) times LOSS_FACTOR / GRAD_FACTOR."""

import pytest
import torch

import dctkd_ext
from dctkd_ext import _backend
from dctkd_ext import reference as ref
from dctkd_ext.ops import dct_at as dct_at_ops

from conftest import assert_close, features, rel_err

OPS = torch.ops.dctkd_ext
# The loss sums levels, and its gradient goes through the normalisations' backward as well: with
# conftest's bounds alone, 2 seeds in 12 failed (gradient errors up to 1.4x the bound).
LOSS_FACTOR, GRAD_FACTOR = 2, 20
PRESET_OPTS = {
    "dct": (2.0, "minmax", True, "dct", True, "minmax", "l2", 1e-8),
    "paper": (2.0, "max", True, "fft_real", True, "max", "l2", 0.0),
}


def feats(gen, shape, dtype, layout="contiguous", requires_grad=False):
    """conftest.features in a conftest.LAYOUTS layout (transposed: H and W strides swapped, neither NCHW
    nor channels_last)."""
    return features(*shape, dtype=dtype, generator=gen, layout=layout, requires_grad=requires_grad)


# (student (B, C, H, W), teacher channels): channels differ, square and odd maps
SHAPES = [((3, 5, 8, 6), 7), ((3, 9, 4, 4), 3), ((3, 7, 3, 2), 9), ((3, 4, 5, 9), 3)]


def levels(gen, dtype, layout="contiguous", t_dtype=None):
    s = [feats(gen, sh, dtype, layout, requires_grad=True) for sh, _ in SHAPES]
    t = [feats(gen, (sh[0], ct, sh[2], sh[3]), t_dtype or dtype, layout) for sh, ct in SHAPES]
    return s, t


def reference_loss_and_grads(s, t, **kwargs):
    sr = [x.detach().double().requires_grad_() for x in s]
    loss = ref.dct_at_loss(sr, [x.double() for x in t], **kwargs)
    return loss, torch.autograd.grad(loss, sr)


class CountingOps:
    """Stands in for torch.ops.dctkd_ext inside dctkd_ext.ops.dct_at: records the ops called."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        op = getattr(OPS, name)

        def call(*args):
            self.calls.append((name, args))
            return op(*args)

        return call

    def names(self):
        return [n for n, _ in self.calls]


@pytest.fixture
def counting_ops(monkeypatch):
    spy = CountingOps()
    run_on = _backend.run_on

    def counted(device, family):
        name, ops = run_on(device, family)
        return (name, spy) if family == dct_at_ops._FAMILY else (name, ops)

    monkeypatch.setattr(dct_at_ops, "_ops", spy)
    monkeypatch.setattr(_backend, "run_on", counted)
    return spy


# ------------------------------------------------------------------------------ values, gradients
@pytest.mark.parametrize("preset", ["dct", "paper", "at"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_fused_matches_reference_and_two_pass(preset, dtype, layout, gen, poison_outputs):
    s, t = levels(gen, dtype, layout)
    w = [1.0, 0.5, 2.0, 1.5]
    loss = dctkd_ext.dct_at_loss(s, t, preset=preset, weights=w)
    loss.backward()
    fused = [x.grad for x in s]
    for x in s:
        x.grad = None
    loss2 = dctkd_ext.dct_at_loss(s, t, preset=preset, weights=w, fused_grad=False)
    loss2.backward()
    two_pass = [x.grad for x in s]
    lr, gr = reference_loss_and_grads(s, t, preset=preset, weights=w)
    assert_close(loss, lr, dtype, "loss", factor=LOSS_FACTOR)
    assert torch.equal(loss, loss2)
    for l, (g, g2, want, x) in enumerate(zip(fused, two_pass, gr, s)):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert torch.isfinite(g).all()
        # same products in the same order as the two-pass backward: bitwise equal
        assert torch.equal(g, g2), f"level {l}: fused and two-pass gradients differ"
        assert_close(g, want, dtype, f"level {l}: gradient", factor=GRAD_FACTOR)
        if layout != "transposed":
            assert g.stride() == x.stride(), f"level {l}: gradient layout {g.stride()} != {x.stride()}"


def test_mixed_dtypes_per_level(gen, poison_outputs):
    s, t = levels(gen, torch.bfloat16, t_dtype=torch.float32)
    s[1] = feats(gen, SHAPES[1][0], torch.float16, requires_grad=True)
    loss = dctkd_ext.dct_at_loss(s, t, preset="dct")
    loss.backward()
    lr, gr = reference_loss_and_grads(s, t, preset="dct")
    assert_close(loss, lr, torch.float32, "loss", factor=LOSS_FACTOR)
    for x, want in zip(s, gr):
        assert x.grad.dtype == x.dtype
        assert_close(x.grad, want, x.dtype, "gradient", factor=GRAD_FACTOR)


# --------------------------------------------------------------------- backward: no pass / fallback
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_sample_weight", [False, True])
def test_backward_hands_over_the_forward_gradient(reduction, with_sample_weight, counting_ops, gen):
    s, t = levels(gen, torch.float32)
    sw = (torch.rand(3, generator=gen) > 0.3).float() if with_sample_weight else None
    loss = dctkd_ext.dct_at_loss(s, t, preset="paper", sample_weight=sw, reduction=reduction)
    assert counting_ops.names() == ["dct_at_loss_fused"]
    d_student = OPS.dct_at_loss_fused(*counting_ops.calls[0][1])[2]  # what the forward wrote
    loss.backward()
    assert "dct_at_loss_backward" not in counting_ops.names()  # no second pass over S
    for x, d in zip(s, d_student):
        assert torch.equal(x.grad, d)
    lr, gr = reference_loss_and_grads(s, t, preset="paper", sample_weight=sw, reduction=reduction)
    for x, want in zip(s, gr):
        assert_close(x.grad, want, torch.float32, "gradient", factor=GRAD_FACTOR)


def test_gradient_storage_is_handed_over_without_a_copy(gen):
    s, t = levels(gen, torch.float32)
    loss, _maps, d_student = OPS.dct_at_loss_fused(s, t, [1.0] * 4, *PRESET_OPTS["paper"], torch.ones(3))
    loss.sum().backward()
    for x, d in zip(s, d_student):
        assert x.grad.data_ptr() == d.data_ptr()


@pytest.fixture(autouse=True)
def fresh_upstream_memory(monkeypatch):
    """Each test starts with no upstream gradient remembered (the forward's first guess is 1)."""
    monkeypatch.setattr(dct_at_ops, "_UPSTREAM_SEEN", {})


def reference_grads_for(s, t, upstream, **kw):
    sr = [x.detach().double().requires_grad_() for x in s]
    lr = ref.dct_at_loss(sr, [x.double() for x in t], **kw)
    return torch.autograd.grad(lr, sr, upstream.double())


@pytest.mark.parametrize("upstream", ["scaled", "random", "sample_weight_times_scale"])
def test_other_upstream_gradients_scale_the_written_gradient(upstream, counting_ops, gen, poison_outputs):
    s, t = levels(gen, torch.float32)
    sw = torch.rand(3, generator=gen) + 0.1 if upstream == "sample_weight_times_scale" else None
    kw = dict(preset="dct", sample_weight=sw, reduction="none" if upstream == "random" else "mean")
    loss = dctkd_ext.dct_at_loss(s, t, **kw)
    d_student = OPS.dct_at_loss_fused(*counting_ops.calls[0][1])[2]  # what the forward wrote
    g = torch.randn(3, generator=gen) if upstream == "random" else torch.tensor(2.5)
    loss.backward(g)
    assert "dct_at_loss_backward" not in counting_ops.names()  # scaled, not a second pass over S
    for x, d in zip(s, d_student):
        assert not torch.equal(x.grad, d)
    for x, want in zip(s, reference_grads_for(s, t, g, **kw)):
        assert_close(x.grad, want, torch.float32, "gradient", factor=GRAD_FACTOR)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_sample_weight", [False, True])
def test_a_constant_loss_weight_is_written_in_the_forward_from_the_second_step(reduction, with_sample_weight,
                                                                              counting_ops, gen):
    """`(w * loss).backward()` step after step: the first backward scales; from then on the forward
    writes dS for w and the backward hands it over untouched."""
    w = torch.tensor(0.37)
    for step in range(3):
        s, t = levels(gen, torch.float32)
        sw = (torch.rand(3, generator=gen) > 0.3).float() if with_sample_weight else None
        counting_ops.calls.clear()
        loss = dctkd_ext.dct_at_loss(s, t, preset="paper", sample_weight=sw, reduction=reduction)
        d_student = OPS.dct_at_loss_fused(*counting_ops.calls[0][1])[2]
        (w * loss).backward()
        assert "dct_at_loss_backward" not in counting_ops.names()
        for x, d in zip(s, d_student):
            assert torch.equal(x.grad, d) == (step > 0), f"step {step}"
        kw = dict(preset="paper", sample_weight=sw, reduction=reduction)
        for x, want in zip(s, reference_grads_for(s, t, w, **kw)):
            assert_close(x.grad, want, torch.float32, "gradient", factor=GRAD_FACTOR)


def test_upstream_guess_is_kept_per_call_signature(gen):
    """Two losses of different shapes in one step keep their own weights (no thrashing)."""
    for step in range(2):
        s, t = levels(gen, torch.float32)
        loss_a = dctkd_ext.dct_at_loss(s, t, preset="dct")
        loss_b = dctkd_ext.dct_at_loss(s[:2], t[:2], preset="dct")
        (3.0 * loss_a + 0.25 * loss_b).backward()
    assert sorted(dct_at_ops._UPSTREAM_SEEN.values()) == [0.25, 3.0]


@pytest.mark.parametrize("case", ["half_precision_non_power_of_two", "zero_then_nonzero", "zero_sample_weight"])
def test_upstream_gradients_that_cannot_be_scaled_exactly_take_the_pass_over_s(case, counting_ops, gen):
    dtype = torch.bfloat16 if case == "half_precision_non_power_of_two" else torch.float32
    kw = dict(preset="dct")
    if case == "zero_then_nonzero":  # the forward wrote dS for 0: nothing to scale
        s, t = levels(gen, dtype)
        (0.0 * dctkd_ext.dct_at_loss(s, t, **kw)).backward()
        counting_ops.calls.clear()
    s, t = levels(gen, dtype)
    if case == "zero_sample_weight":  # samples written as zero, asked for a non-zero gradient
        kw.update(sample_weight=torch.tensor([1.0, 0.0, 1.0]), reduction="none")
        g = torch.randn(3, generator=gen)
    else:
        g = torch.tensor(0.3)
    loss = dctkd_ext.dct_at_loss(s, t, **kw)
    loss.backward(g)
    assert "dct_at_loss_backward" in counting_ops.names()
    for x, want in zip(s, reference_grads_for(s, t, g, **kw)):
        assert_close(x.grad, want, dtype, "gradient", factor=GRAD_FACTOR)


def test_half_precision_gradient_scaled_by_a_power_of_two(counting_ops, gen):
    s, t = levels(gen, torch.bfloat16)
    loss = dctkd_ext.dct_at_loss(s, t, preset="dct")
    d_student = [d.clone() for d in OPS.dct_at_loss_fused(*counting_ops.calls[0][1])[2]]
    loss.backward(torch.tensor(0.25))
    assert "dct_at_loss_backward" not in counting_ops.names()
    for x, d in zip(s, d_student):
        assert torch.equal(x.grad, d * 0.25)


def test_retain_graph_backward_twice_and_more(gen):
    s, t = levels(gen, torch.float32)
    loss = dctkd_ext.dct_at_loss(s, t, preset="dct")
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in s]
    loss.backward(retain_graph=True)
    for x, g in zip(s, first):
        assert torch.allclose(x.grad, 2 * g, rtol=1e-6, atol=0)
    loss.backward(retain_graph=True)
    for x, g in zip(s, first):
        assert torch.allclose(x.grad, 3 * g, rtol=1e-6, atol=0)
    # the saved gradient was not changed by the accumulations into .grad
    again = torch.autograd.grad(loss, s, retain_graph=True)
    for a, g in zip(again, first):
        assert torch.equal(a, g)
    # and a retained graph also serves another upstream gradient
    scaled = torch.autograd.grad(loss, s, torch.tensor(-3.0))
    for a, g in zip(scaled, first):
        assert torch.allclose(a, -3 * g, rtol=1e-5, atol=1e-12)


# ------------------------------------------------------------------------ when no gradient is made
def test_no_student_gradient_under_no_grad_teacher_only_or_two_pass(counting_ops, gen):
    s, t = levels(gen, torch.float32)
    with torch.no_grad():
        dctkd_ext.dct_at_loss(s, t, preset="dct")
    assert counting_ops.names() == ["dct_at_loss"]
    counting_ops.calls.clear()
    dctkd_ext.dct_at_loss([x.detach() for x in s], [x.requires_grad_() for x in t], preset="dct")
    assert counting_ops.names() == ["dct_at_loss"]
    counting_ops.calls.clear()
    dctkd_ext.dct_at_loss(s, t, preset="dct", fused_grad=False).backward()
    assert counting_ops.names() == ["dct_at_loss"]
    counting_ops.calls.clear()
    dctkd_ext.dct_at_loss(s, t, preset="dct")
    (name, args), = counting_ops.calls
    assert name == "dct_at_loss_fused" and args[-1] is not None


def test_op_without_grad_scale_returns_no_gradient(gen):
    s, t = levels(gen, torch.float32)
    loss, maps, d_student = OPS.dct_at_loss_fused(s, t, [1.0] * 4, *PRESET_OPTS["dct"], None)
    assert d_student == [] and len(maps) == 4
    loss2, maps2 = OPS.dct_at_loss(s, t, [1.0] * 4, *PRESET_OPTS["dct"])
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(maps, maps2))


def test_bad_arguments(gen):
    s, t = levels(gen, torch.float32)
    with pytest.raises(RuntimeError, match="grad_scale"):
        OPS.dct_at_loss_fused(s, t, [1.0] * 4, *PRESET_OPTS["dct"], torch.ones(4))
    with pytest.raises(RuntimeError, match="grad_scale"):
        OPS.dct_at_loss_fused(s, t, [1.0] * 4, *PRESET_OPTS["dct"], torch.ones(3, 1))
    with pytest.raises(TypeError, match="fused_grad"):
        dctkd_ext.dct_at_loss(s, t, fused_grad=1)


# ----------------------------------------------------------------------- gradcheck, opcheck, compile
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_fused(reduction, gen):
    x = feats(gen, (2, 3, 4, 5), torch.float64, requires_grad=True)
    x2 = feats(gen, (2, 2, 3, 3), torch.float64, "channels_last", requires_grad=True)
    t = [feats(gen, (2, 4, 4, 5), torch.float64), feats(gen, (2, 5, 3, 3), torch.float64)]
    sw = torch.rand(2, generator=gen, dtype=torch.float64)
    for preset in ["dct", "paper", "at"]:
        assert torch.autograd.gradcheck(
            lambda a, b: dctkd_ext.dct_at_loss([a, b], t, preset=preset, reduction=reduction, sample_weight=sw,
                                               weights=[1.0, 0.5]),
            (x, x2),
        ), preset


@pytest.mark.parametrize("with_grad_scale", [True, False])
def test_opcheck_fused(with_grad_scale, gen):
    s = [feats(gen, (2, 3, 5, 4), torch.float32, requires_grad=True),
         feats(gen, (2, 5, 3, 3), torch.float32, "channels_last", requires_grad=True)]
    t = [feats(gen, (2, 4, 5, 4), torch.float32), feats(gen, (2, 2, 3, 3), torch.float32)]
    grad_scale = torch.full((2,), 0.5) if with_grad_scale else None
    torch.library.opcheck(OPS.dct_at_loss_fused, (s, t, [1.0, 0.5], *PRESET_OPTS["dct"], grad_scale))


def test_torch_compile_fullgraph_fused_op_and_face(gen):
    torch._dynamo.reset()
    s, t = levels(gen, torch.float32)

    def with_op(*s):
        loss, _maps, _d = OPS.dct_at_loss_fused(list(s), t, [1.0] * 4, *PRESET_OPTS["paper"], torch.ones(3))
        return loss.sum()

    def with_face(*s):
        return dctkd_ext.dct_at_loss(list(s), t, preset="paper", reduction="sum")

    want = torch.autograd.grad(with_face(*s), s)
    for fn in (with_op, with_face):
        compiled = torch.compile(fn, fullgraph=True)
        got = torch.autograd.grad(compiled(*s), s)
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-6


# ------------------------------------------------------------- gradient buffers reused across steps
@pytest.mark.parametrize("fused_grad", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_gradients_from_reused_buffers(fused_grad, layout, gen):
    # Student gradients of 1 MiB and more come from buffers that are reused once their tensor dies
    # (csrc/cpu/grad_buffers.cpp): a gradient still alive never shares memory with a new one, a
    # reused buffer is fully rewritten, and the layout is the student's. Each case has a byte size of
    # its own (1.28 to 1.38 MiB), so the cache holds no buffer of that size when it starts. The preset
    # is fft-real-minmax: the paper preset's min of |Re FFT2| over 4096 coefficients can meet one within
    # fp32 rounding of the centred DC's zero, and fp32 then takes the minimum's gradient elsewhere.
    c = {("contiguous", True): 41, ("contiguous", False): 42, ("channels_last", True): 43, ("channels_last", False): 44}
    s = [feats(gen, (2, c[layout, fused_grad], 64, 64), torch.float32, layout, requires_grad=True)]
    t = [feats(gen, (2, 24, 64, 64), torch.float32, layout)]
    _, (want,) = reference_loss_and_grads(s, t, preset="fft-real-minmax")

    def step():
        s[0].grad = None
        dctkd_ext.dct_at_loss(s, t, preset="fft-real-minmax", fused_grad=fused_grad).backward()
        return s[0].grad

    g1 = step()
    g2 = step()  # g1 is alive: g2 must have its own memory
    assert g1.data_ptr() != g2.data_ptr()
    ptr1 = g1.data_ptr()
    g1.fill_(float("nan"))  # a buffer handed out again must not show old contents
    del g1
    g3 = step()
    assert g3.data_ptr() == ptr1  # g1's buffer, handed out again
    g4 = step()  # g2 and g3 alive, g3's a reused buffer: g4 must have memory of its own
    assert g4.data_ptr() not in (g2.data_ptr(), g3.data_ptr())
    for g in (g2, g3, g4):
        assert g.stride() == s[0].stride()
        assert torch.equal(g, g2)
        assert_close(g, want, torch.float32, "gradient", factor=GRAD_FACTOR)


def test_reused_gradient_buffers_show_in_the_memory_profile(gen):
    # torch.profiler's memory view (what bench/run.py's peak memory replays) counts a gradient from
    # the buffer cache as allocated while it lives, as it counts one from the default allocator.
    s = [feats(gen, (2, 40, 64, 64), torch.float32, requires_grad=True)]
    t = [feats(gen, (2, 24, 64, 64), torch.float32)]
    dctkd_ext.dct_at_loss(s, t, preset="paper").backward()  # a buffer goes into the cache
    s[0].grad = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        dctkd_ext.dct_at_loss(s, t, preset="paper").backward()
    own = [e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage for e in prof.events()]
    assert sum(m for m in own if m > 0) >= s[0].numel() * 4
