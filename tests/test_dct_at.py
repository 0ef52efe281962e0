"""attention_map, dct2d/idct2d and dct_at_loss on the compiled backends (CPU, and CUDA where a GPU
exists) against the float64 reference, an independent DCT oracle and the released-code formula."""


import numpy as np
import pytest
import scipy.fft
import torch

import dctkd_ext
import recipes
from dctkd_ext import reference as ref

from conftest import DEVICES, HALF, assert_close, features, in_layout, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")

SHAPES = [(1, 1), (7, 7), (5, 9), (14, 14), (56, 56)]


# ---------------------------------------------------------------------------------- attention_map
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hw", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_map_matches_reference(device, dtype, hw, channels_last, gen, poison_outputs_warn_only):
    x = features(3, 11, *hw, dtype=dtype, device=device, channels_last=channels_last, generator=gen, requires_grad=True)
    recipes.check_attention_map("auto", x, gen)
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last or hw == (1, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p,reduce", [(1.0, "mean"), (3.0, "sum"), (1.5, "mean"), (2.0, "sum")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_map_p_and_reduce(device, p, reduce, channels_last, gen, poison_outputs_warn_only):
    x = features(2, 13, 6, 5, device=device, channels_last=channels_last, generator=gen, requires_grad=True)
    recipes.check_attention_map("auto", x, gen, p, reduce, what=f"attention_map p={p} {reduce}")


def test_attention_map_strided_input(gen):
    # neither contiguous nor channels_last: a copy is made, the result is the same
    x = features(2, 6, 8, 10, generator=gen)[:, ::2, :, 1:9]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert_close(dctkd_ext.attention_map(x), ref.attention_map(x.double()), torch.float32, "strided")


# ---------------------------------------------------------------------------------------- DCT
@pytest.mark.parametrize("device", DEVICES)
# besides SHAPES: sides whose even / odd halves (ceil(n/2), floor(n/2)) sit on either side of a
# whole vector (8, 9, 16, 17) and single rows / columns
@pytest.mark.parametrize("hw", SHAPES + [(2, 3), (28, 28), (16, 8), (17, 33), (16, 15), (9, 1), (1, 18), (32, 34)])
def test_dct2d_matches_scipy_oracle(device, hw, gen):
    a = torch.randn(2, 3, *hw, generator=gen, dtype=torch.float64)
    oracle = scipy.fft.dctn(a.numpy(), type=2, norm="ortho", axes=(-2, -1))
    c = dctkd_ext.dct2d(a.to(device))
    np.testing.assert_allclose(c.cpu().numpy(), oracle, rtol=0, atol=1e-12)
    inv = scipy.fft.idctn(a.numpy(), type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(dctkd_ext.idct2d(a.to(device)).cpu().numpy(), inv, rtol=0, atol=1e-12)


def test_dct_matrix_matches_numpy_formula():
    # the basis written independently in numpy from the formula of docs/DESIGN.md §3.2
    for n in (1, 5, 7, 56):
        k, m = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        d = np.cos(np.pi * (2 * m + 1) * k / (2 * n)) * np.where(k == 0, np.sqrt(1 / n), np.sqrt(2 / n))
        np.testing.assert_allclose(ref.dct_matrix(n).numpy(), d, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hw", [(1, 1), (7, 7), (5, 9), (56, 56)])
def test_dct2d_dtypes_roundtrip_and_grad(device, dtype, hw, gen, poison_outputs_warn_only):
    a = torch.randn(4, *hw, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    c = dctkd_ext.dct2d(a)
    assert c.dtype == dtype
    assert_close(c, ref.dct2d(a.detach().double()), dtype, "dct2d")
    back = dctkd_ext.idct2d(c.detach().double() if dtype == torch.float64 else c.detach().float())
    # half precision: c itself is rounded, so the round trip is checked on the rounded coefficients
    expect = ref.idct2d(c.detach().double()) if dtype in HALF else a.detach().double()
    assert_close(back, expect, dtype, "idct2d(dct2d(a))", factor=2)
    g = torch.randn(c.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    (da,) = torch.autograd.grad(c, a, g)
    assert_close(da, ref.idct2d(g.double()), dtype, "dct2d backward")


# ------------------------------------------------------------------------------------ dct_at_loss
def level_shapes(kind):
    return {
        "tiny": [((3, 4, 1, 1), (3, 6, 1, 1))],
        "square": [((3, 8, 7, 7), (3, 5, 7, 7)), ((3, 16, 4, 4), (3, 32, 4, 4))],
        "odd": [((2, 5, 5, 9), (2, 3, 5, 9)), ((2, 7, 3, 2), (2, 9, 3, 2))],
        "big": [((2, 4, 56, 56), (2, 6, 56, 56)), ((2, 8, 28, 28), (2, 12, 28, 28)), ((2, 3, 14, 14), (2, 5, 14, 14))],
    }[kind]


def make_levels(kind, dtype, device, channels_last, gen):
    s, t = [], []
    for ss, ts in level_shapes(kind):
        s.append(features(*ss, dtype=dtype, device=device, channels_last=channels_last, generator=gen, requires_grad=True))
        t.append(features(*ts, dtype=dtype, device=device, channels_last=channels_last, generator=gen))
    return s, t


def check_loss_against_reference(s, t, dtype, what, backend="auto", **kwargs):
    """The loss recipe (tests/recipes.py): loss and gradients against the float64 reference, with a
    random upstream gradient (per sample with reduction="none", so that a backward mixing samples fails)."""
    assert s[0].dtype == dtype
    return recipes.check_loss(backend, s, t, torch.Generator().manual_seed(int(torch.randint(2**31, ()))), what,
                              **kwargs)


# The presets, and the options under which the loss depends on the scale of the maps (no
# normalisation: the 1/C of the map and the transform's scale count).
LOSS_OPTIONS = [("dct", {}), ("paper", {}), ("at", {}), ("dct", dict(map_norm="none", coef_norm="none")),
                ("at", dict(map_norm="none"))]
LOSS_OPTION_IDS = [p + "".join(f"-{k}={v}" for k, v in o.items()) for p, o in LOSS_OPTIONS]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset,over", LOSS_OPTIONS, ids=LOSS_OPTION_IDS)
@pytest.mark.parametrize("kind", ["tiny", "square", "odd", "big"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("channels_last", [False, True])
def test_loss_matches_reference(device, preset, over, kind, dtype, channels_last, gen, poison_outputs_warn_only):
    if preset == "paper" and kind == "tiny":
        pytest.skip("1x1 maps: (A - min) / max is 0/0 with the released code's eps = 0 (NaN by design)")
    s, t = recipes.draw_loss_inputs(lambda: make_levels(kind, dtype, device, channels_last, gen), preset=preset,
                                    **over)
    weights = [0.5 + l for l in range(len(s))]
    check_loss_against_reference(s, t, dtype, f"{preset}{over}/{kind}", preset=preset, weights=weights,
                                 reduction="none", **over)


# Map sizes for the folded transforms (csrc/cpu/map_transforms.cpp): 1, 2 and 3 (no or one fold
# pair), odd and even sides (a middle row / column that pairs with itself), H != W both ways.
TRANSFORM_SIZES = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 2), (3, 3), (4, 4), (4, 7), (7, 4), (5, 6),
                   (6, 5), (8, 9), (16, 17), (17, 16), (33, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transform", ["dct", "fft_real"])
@pytest.mark.parametrize("hw", TRANSFORM_SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_loss_transform_at_every_map_size(device, transform, hw, dtype, gen):
    # No normalisation, no centring, no abs: the loss and its gradient are the transform itself.
    h, w = hw
    s = [features(2, 3, h, w, dtype=dtype, device=device, generator=gen, requires_grad=True)]
    t = [features(2, 5, h, w, dtype=dtype, device=device, generator=gen)]
    check_loss_against_reference(s, t, dtype, f"{transform} {h}x{w}", preset="dct", transform=transform,
                                 map_norm="none", center=False, coef_abs=False, coef_norm="none", distance="sse",
                                 reduction="none")


OVERRIDES = [
    dict(map_norm="none"), dict(map_norm="l2"), dict(map_norm="max", eps=1e-6), dict(center=False),
    dict(transform="fft_real"), dict(transform="identity"), dict(coef_abs=False), dict(coef_norm="l2"),
    dict(coef_norm="none"), dict(distance="mse"), dict(distance="sse"), dict(p=1.0), dict(p=3.0),
    dict(p=1.5, map_norm="l2", transform="dct", distance="sse"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("override", OVERRIDES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_loss_overrides(device, override, gen):
    s, t = make_levels("odd", torch.float32, device, False, gen)
    check_loss_against_reference(s, t, torch.float32, str(override), preset="dct", reduction="none", **override)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_weights_sample_weight_reduction(device, reduction, gen):
    s, t = make_levels("square", torch.float32, device, False, gen)
    sw = (torch.rand(3, generator=gen) > 0.4).float().to(device)
    loss = check_loss_against_reference(s, t, torch.float32, "weighted", weights=[0.5, 2.0], sample_weight=sw,
                                         reduction=reduction)
    assert loss.shape == ((3,) if reduction == "none" else ())
    # the per-level weights scale linearly
    parts = [dctkd_ext.dct_at_loss([a], [b], reduction="none") for a, b in zip(s, t)]
    combined = (0.5 * parts[0] + 2.0 * parts[1]) * sw
    expect = {"mean": combined.mean(), "sum": combined.sum(), "none": combined}[reduction]
    assert_close(loss, expect, torch.float32, "weights")


def _half_features(b, c, s, dtype, device, gen):
    # what a conv under autocast hands the loss: half-precision maps
    return (torch.randn(b, c, s, s, generator=gen, dtype=torch.float64) + 0.1).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("preset", ["dct", "paper"])
def test_dct_at_loss_under_autocast_at_7_14_28(preset, dtype, device, gen):
    # three levels as a ResNet-50 -> ResNet-18 pair at 224 px gives them (28, 14, 7), channels differ
    s = [_half_features(4, c, k, dtype, device, gen).requires_grad_(True) for c, k in ((32, 28), (64, 14), (128, 7))]
    t = [_half_features(4, c, k, dtype, device, gen) for c, k in ((64, 28), (128, 14), (256, 7))]
    with torch.autocast(device, dtype=dtype):
        loss = dctkd_ext.dct_at_loss(s, t, preset=preset)
    assert loss.dtype == torch.float32
    ref_loss = ref.dct_at_loss([f.detach().double() for f in s], [f.double() for f in t], preset=preset)
    # the loss accumulates in fp32 from the half features: the fp32 bound against the float64 reference
    assert_close(loss, ref_loss, dtype, f"dct_at_loss {preset} under autocast", factor=2)
    loss.backward()
    s64 = [f.detach().double().requires_grad_(True) for f in s]
    ref.dct_at_loss(s64, [f.double() for f in t], preset=preset).backward()
    for i, (a, b) in enumerate(zip(s, s64)):
        assert a.grad.dtype == dtype
        assert_close(a.grad, b.grad, dtype, f"level {i}: gradient under autocast", factor=20)


def test_paper_preset_equals_released_code(gen):
    # the literal eager re-statement of the authors' formula, in fp32, as they run it
    s, t = make_levels("square", torch.float32, "cpu", False, gen)
    s += [features(3, 6, 14, 10, generator=gen, requires_grad=True)]
    t += [features(3, 9, 14, 10, generator=gen)]
    mask = (torch.rand(3, generator=gen) > 0.3).float()
    ours = dctkd_ext.dct_at_loss(s, t, preset="paper", sample_weight=mask)
    theirs = ref.released_dct_loss(s, t, mask)
    assert rel_err(ours, theirs) < 1e-5
    g1 = torch.autograd.grad(ours, s)
    g2 = torch.autograd.grad(theirs, s)
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-4


def test_at_preset_equals_mdistiller_formula(gen):
    s, t = make_levels("square", torch.float64, "cpu", False, gen)
    ours = dctkd_ext.dct_at_loss(s, t, preset="at")
    assert rel_err(ours, ref.released_at_loss(s, t)) < 1e-9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["dct", "at"])
def test_constant_map_gives_finite_loss_and_grad(device, preset):
    s = [torch.full((2, 3, 5, 5), 0.7, device=device, requires_grad=True), torch.zeros(2, 4, 3, 3, device=device, requires_grad=True)]
    t = [torch.randn(2, 6, 5, 5, device=device), torch.full((2, 2, 3, 3), -1.0, device=device)]
    loss = dctkd_ext.dct_at_loss(s, t, preset=preset)
    assert torch.isfinite(loss)
    for g in torch.autograd.grad(loss, s):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("device", DEVICES)
def test_identical_inputs_give_zero_loss_and_zero_grad(device, gen):
    s, _ = make_levels("square", torch.float32, device, False, gen)
    loss = dctkd_ext.dct_at_loss(s, [x.detach().clone() for x in s])
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, s):
        assert torch.isfinite(g).all() and g.abs().max().item() == 0.0


def test_teacher_gets_no_gradient(gen):
    s, t = make_levels("square", torch.float32, "cpu", False, gen)
    t = [x.requires_grad_() for x in t]
    dctkd_ext.dct_at_loss(s, t).backward()
    assert all(x.grad is None for x in t) and all(x.grad is not None for x in s)


# ------------------------------------------------------------------------ gradcheck, opcheck, compile
def test_gradcheck_float64(gen):
    x = features(2, 3, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: dctkd_ext.attention_map(v, p=2.0), (x,))
    assert torch.autograd.gradcheck(lambda v: dctkd_ext.attention_map(v, p=1.5, reduce="sum"), (x,))
    a = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(dctkd_ext.dct2d, (a,))
    assert torch.autograd.gradcheck(dctkd_ext.idct2d, (a,))
    t = features(2, 4, 4, 5, dtype=torch.float64, generator=gen)
    for preset, over in [("dct", {}), ("paper", {}), ("at", {}), ("dct", dict(map_norm="l2", distance="mse")),
                         ("dct", dict(transform="fft_real", coef_norm="max", map_norm="none"))]:
        assert torch.autograd.gradcheck(
            lambda v: dctkd_ext.dct_at_loss([v], [t], preset=preset, reduction="none", **over), (x,)
        ), (preset, over)


def sample_op_args(gen):
    x = features(2, 3, 5, 4, generator=gen, requires_grad=True)
    s = [features(2, 3, 5, 4, generator=gen, requires_grad=True), features(2, 5, 3, 3, generator=gen, requires_grad=True)]
    t = [features(2, 4, 5, 4, generator=gen), features(2, 2, 3, 3, generator=gen)]
    opts = (2.0, "minmax", True, "dct", True, "minmax", "l2", 1e-8)
    loss, maps = torch.ops.dctkd_ext.dct_at_loss(s, t, [1.0, 0.5], *opts)
    return {
        "attention_map": (x, 2.0, "mean"),
        "attention_map_backward": (torch.randn(2, 5, 4, generator=gen), x.detach(), 2.0, "mean"),
        "dct2d": (torch.randn(3, 5, 4, generator=gen, requires_grad=True),),
        "idct2d": (torch.randn(3, 5, 4, generator=gen, requires_grad=True),),
        "dct_at_loss": (s, t, [1.0, 0.5], *opts),
        "dct_at_loss_backward": (torch.randn(2, generator=gen), [m.detach() for m in maps], [x.detach() for x in s], 2.0),
    }


@pytest.mark.parametrize("op", ["attention_map", "attention_map_backward", "dct2d", "idct2d", "dct_at_loss",
                                "dct_at_loss_backward"])
def test_opcheck(op, gen):
    args = sample_op_args(gen)[op]
    torch.library.opcheck(getattr(torch.ops.dctkd_ext, op), args)


@pytest.mark.slow
def test_torch_compile_training_step_fullgraph(gen):
    torch._dynamo.reset()
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    head = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
    teacher_feats = [features(4, 16, 12, 12, generator=gen), features(4, 32, 6, 6, generator=gen)]
    img = torch.randn(4, 3, 12, 12, generator=gen)

    def step(img, t0, t1):
        # forward of a training step; its backward is traced by AOTAutograd into the same compile
        f0 = student(img)
        f1 = head(f0)
        return dctkd_ext.dct_at_loss([f0, f1], [t0, t1], preset="dct", weights=[1.0, 2.0])

    eager = step(img, *teacher_feats)
    eager.backward()
    eager_grads = [p.grad.clone() for p in student.parameters()]
    for p in list(student.parameters()) + list(head.parameters()):
        p.grad = None
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(img, *teacher_feats)
    got.backward()
    assert rel_err(got, eager) < 1e-6
    for g, e in zip([p.grad for p in student.parameters()], eager_grads):
        assert rel_err(g, e) < 1e-5


@pytest.mark.slow
def test_torch_compile_inductor_forward_backward(gen):
    torch._dynamo.reset()
    s = [features(2, 4, 7, 7, generator=gen, requires_grad=True)]
    t = [features(2, 6, 7, 7, generator=gen)]
    fn = torch.compile(lambda a, b: dctkd_ext.dct_at_loss([a], [b], preset="paper"), fullgraph=True)
    loss = fn(s[0], t[0])
    (g,) = torch.autograd.grad(loss, s)
    lr = ref.dct_at_loss([recipes.ref_leaf(x) for x in s], [recipes.ref_leaf(x) for x in t], preset="paper")
    assert rel_err(loss, lr) < 1e-5 and torch.isfinite(g).all()


# ----------------------------------------------------------------------------------- backend API
def test_reference_backend_and_use_backend(gen, monkeypatch):
    s, t = make_levels("square", torch.float32, "cpu", False, gen)
    ours = dctkd_ext.dct_at_loss(s, t)
    assert dctkd_ext.get_backend() == "auto"
    with dctkd_ext.use_backend("reference"):
        assert dctkd_ext.get_backend() == "reference"
        r = dctkd_ext.dct_at_loss(s, t)
        a = dctkd_ext.attention_map(s[0])
    assert dctkd_ext.get_backend() == "auto"
    assert rel_err(ours, r) < 1e-5
    assert_close(a, ref.attention_map(s[0].double()), torch.float32, "reference attention_map")
    with pytest.raises(ValueError, match="backend"):
        with dctkd_ext.use_backend("tpu"):
            pass
    with pytest.raises(ValueError, match="cuda"):
        with dctkd_ext.use_backend("cuda"):
            dctkd_ext.dct_at_loss(s, t)


def test_env_backend_is_read_and_checked():
    import subprocess
    import sys

    code = "import dctkd_ext; print(dctkd_ext.get_backend())"
    env = {**__import__("os").environ, "DCTKD_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "reference", out.stderr
    env["DCTKD_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "DCTKD_BACKEND" in out.stderr


def test_auto_routes_to_the_cpu_kernels(gen):
    """`auto` on CPU tensors runs the C++ kernels (op names in the profiler), forward and backward,
    not the plain-PyTorch reference."""
    x = features(2, 3, 5, 4, generator=gen, requires_grad=True)
    s, t = make_levels("square", torch.float32, "cpu", False, gen)
    with dctkd_ext.use_backend("auto"), torch.autograd.profiler.profile() as prof:
        dctkd_ext.attention_map(x).sum().backward()
        dctkd_ext.dct2d(x.detach()).sum()
        dctkd_ext.idct2d(x.detach()).sum()
        dctkd_ext.dct_at_loss(s, t, reduction="none").sum().backward()
    names = {e.name for e in prof.function_events}
    ours = sorted(n for n in names if n.startswith("dctkd_ext::"))
    for op in ("attention_map", "attention_map_backward", "dct2d", "idct2d"):
        assert f"dctkd_ext::{op}" in names, f"auto did not run the C++ {op}; dctkd_ext ops that ran: {ours}"
    assert any("dct_at_loss" in n for n in ours), f"auto did not run a C++ dct_at_loss op; ran: {ours}"
    assert x.grad is not None and all(v.grad is not None for v in s)


@pytest.mark.parametrize("layout", ["sliced", "transposed", "channels_last"])
def test_every_op_accepts_strided_inputs(kernel_backend, layout, gen, poison_outputs_warn_only):
    """Views with offsets and strides (slices, transposes) give the results of contiguous copies,
    forward and backward, on every kernel backend."""
    name, device = kernel_backend
    x = in_layout(features(2, 5, 6, 7, device=device, generator=gen), layout).requires_grad_()
    recipes.check_attention_map(name, x, gen, 1.5, what=f"attention_map {layout}")

    m = in_layout(torch.randn(3, 6, 7, generator=gen, dtype=torch.float64).to(device, torch.float32),
                  layout if layout != "channels_last" else "sliced").requires_grad_()
    for fn, rfn in ((dctkd_ext.dct2d, ref.dct2d), (dctkd_ext.idct2d, ref.idct2d)):
        recipes.compare_with_reference(name, fn, rfn, (m,), gen, out_dtype=torch.float32,
                                       what=f"{fn.__name__} {layout}")

    s = [in_layout(features(3, 4, 7, 7, device=device, generator=gen), layout).requires_grad_(),
         in_layout(features(3, 6, 5, 3, device=device, generator=gen), layout).requires_grad_()]
    t = [in_layout(features(3, 8, 7, 7, device=device, generator=gen), layout),
         in_layout(features(3, 2, 5, 3, device=device, generator=gen), layout)]
    check_loss_against_reference(s, t, torch.float32, f"dct_at_loss {layout}", backend=name, reduction="none")


def test_error_bound_rejects_half_precision_accumulation(gen):
    """The half-precision bound is tight enough to fail a kernel that accumulates the attention map in
    bf16, or stores the map in bf16, while the fp32-accumulating kernels pass it (the sweeps above)."""
    x = features(4, 64, 14, 14, dtype=torch.bfloat16, generator=gen)
    xr = x.double()
    ar = ref.attention_map(xr)
    # the map accumulated in bf16
    acc_bf16 = (x * x).mean(1, dtype=torch.bfloat16).float()
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(acc_bf16, ar, torch.bfloat16, "bf16 accumulation")
    assert_close(dctkd_ext.attention_map(x), ar, torch.bfloat16, "fp32 accumulation")
    # the loss with maps rounded to bf16 on the way
    s = [features(4, 16, 14, 14, dtype=torch.bfloat16, generator=gen)]
    t = [features(4, 24, 14, 14, dtype=torch.bfloat16, generator=gen)]
    opts = dict(dctkd_ext.PRESETS["dct"])
    zs = ref.phi(ref.attention_map(s[0].double()).bfloat16().double(), **opts)
    zt = ref.phi(ref.attention_map(t[0].double()).bfloat16().double(), **opts)
    rounded_maps = (zs - zt).pow(2).sum(1).sqrt().float()
    exact = ref.dct_at_loss([v.double() for v in s], [v.double() for v in t], reduction="none")
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(rounded_maps, exact, torch.bfloat16, "maps rounded to bf16")
    assert_close(dctkd_ext.dct_at_loss(s, t, reduction="none"), exact, torch.bfloat16, "loss")


# ------------------------------------------------------------------------------------- nn modules
def test_nn_losses(gen):
    s, t = make_levels("square", torch.float32, "cpu", False, gen)
    m = dctkd_ext.nn.DCTATLoss(preset="paper", weights=[1.0, 3.0])
    assert rel_err(m(s, t), dctkd_ext.dct_at_loss(s, t, preset="paper", weights=[1.0, 3.0])) < 1e-7
    assert "paper" in repr(m)
    at = dctkd_ext.nn.AttentionTransferLoss()
    s2 = [features(3, 8, 8, 8, generator=gen, requires_grad=True)]
    t2 = [features(3, 4, 16, 16, generator=gen)]  # teacher larger: pooled to the student's size
    pooled = [torch.nn.functional.adaptive_avg_pool2d(t2[0], (8, 8))]
    assert rel_err(at(s2, t2), 1000 * ref.released_at_loss(s2, pooled)) < 1e-5
    with pytest.raises(ValueError, match="preset"):
        dctkd_ext.nn.DCTATLoss(preset="nope")


# -------------------------------------------------------------------------------------- bad input
def bad_cases():
    g = torch.Generator().manual_seed(1)
    S = [features(2, 3, 5, 5, generator=g)]
    T = [features(2, 4, 5, 5, generator=g)]
    return [
        ("empty list", dict(student_feats=[], teacher_feats=[]), ValueError, "student_feats: expected a non-empty"),
        ("level count", dict(student_feats=S * 2, teacher_feats=T), ValueError, "teacher_feats: expected 2 levels"),
        ("rank", dict(student_feats=[torch.randn(2, 5, 5)], teacher_feats=T), ValueError, r"student_feats\[0\]: expected a 4-D"),
        ("batch", dict(student_feats=S, teacher_feats=[features(3, 4, 5, 5)]), ValueError, r"teacher_feats\[0\]: expected \(B, H, W\)"),
        ("spatial", dict(student_feats=S, teacher_feats=[features(2, 4, 6, 5)]), ValueError, r"teacher_feats\[0\]: expected \(B, H, W\)"),
        ("int dtype", dict(student_feats=[torch.ones(2, 3, 5, 5, dtype=torch.int64)], teacher_feats=T), TypeError, r"student_feats\[0\]: expected a real floating"),
        ("complex", dict(student_feats=S, teacher_feats=[torch.randn(2, 4, 5, 5, dtype=torch.cfloat)]), TypeError, r"teacher_feats\[0\]: expected a real floating"),
        ("not a tensor", dict(student_feats=[[1.0]], teacher_feats=T), TypeError, r"student_feats\[0\]: expected a torch.Tensor"),
        ("weights", dict(student_feats=S, teacher_feats=T, weights=[1.0, 2.0]), ValueError, "weights: expected 1 values"),
        ("sample_weight", dict(student_feats=S, teacher_feats=T, sample_weight=torch.ones(3)), ValueError, r"sample_weight: expected shape \(2,\)"),
        ("reduction", dict(student_feats=S, teacher_feats=T, reduction="avg"), ValueError, "reduction: expected one of"),
        ("preset", dict(student_feats=S, teacher_feats=T, preset="fft"), ValueError, "preset: expected one of"),
        ("option value", dict(student_feats=S, teacher_feats=T, transform="dst"), ValueError, "transform: expected one of"),
        ("unknown option", dict(student_feats=S, teacher_feats=T, temperature=4), TypeError, "temperature"),
        ("p", dict(student_feats=S, teacher_feats=T, p=0), ValueError, "p: expected a positive"),
        ("eps", dict(student_feats=S, teacher_feats=T, eps=-1.0), ValueError, "eps: expected a non-negative"),
        ("nan student", dict(student_feats=[S[0].clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan")))], teacher_feats=T), ValueError, r"student_feats\[0\]: contains non-finite"),
        ("inf teacher", dict(student_feats=S, teacher_feats=[T[0].clone().fill_(float("inf"))]), ValueError, r"teacher_feats\[0\]: contains non-finite"),
        ("no channels", dict(student_feats=[torch.randn(2, 0, 5, 5)], teacher_feats=T), ValueError, r"student_feats\[0\]: expected at least one channel"),
    ]


def _on(device, value):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_on(device, v) for v in value]
    return value


@pytest.mark.parametrize("name,kwargs,exc,msg", bad_cases(), ids=[c[0] for c in bad_cases()])
def test_loss_bad_input(backend, name, kwargs, exc, msg, monkeypatch):
    # every backend, the reference included; on a GPU the non-finite check is opt-in (a host sync)
    _, device = backend
    monkeypatch.setenv("DCTKD_CHECK_FINITE", "1")
    with pytest.raises(exc, match=msg):
        dctkd_ext.dct_at_loss(**{k: _on(device, v) for k, v in kwargs.items()})


@pytest.mark.parametrize("preset", ["dct", "paper", "at"])
@pytest.mark.parametrize("where", ["student-nan", "student-inf", "teacher-nan", "teacher-inf"])
def test_non_finite_loss_is_never_hidden(backend, preset, where, gen, monkeypatch):
    """A NaN/inf feature gives a non-finite per-sample loss (for that sample) on every backend, and the
    public op reports it by name; never a finite loss such as 0."""
    _, device = backend
    s = [features(3, 4, 5, 6, dtype=torch.float64, generator=gen)]
    t = [features(3, 2, 5, 6, dtype=torch.float64, generator=gen)]
    side, kind = where.split("-")
    bad = (s if side == "student" else t)[0]
    bad[1, 1, 3, 4] = float(kind)
    monkeypatch.setenv("DCTKD_CHECK_FINITE", "0")
    per_sample = dctkd_ext.dct_at_loss(_on(device, s), _on(device, t), preset=preset, reduction="none").cpu()
    assert not torch.isfinite(per_sample[1]), f"{where}: sample 1 got a finite loss {per_sample[1].item()}"
    assert torch.isfinite(per_sample[[0, 2]]).all()
    monkeypatch.setenv("DCTKD_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match=rf"{side}_feats\[0\]: contains non-finite"):
        dctkd_ext.dct_at_loss(_on(device, s), _on(device, t), preset=preset)


def test_other_ops_propagate_non_finite(backend, gen):
    _, device = backend
    x = features(2, 3, 4, 5, generator=gen)
    x[1, 2, 3, 1] = float("nan")
    a = dctkd_ext.attention_map(x.to(device)).cpu()
    expect = torch.zeros_like(a, dtype=torch.bool)
    expect[1, 3, 1] = True
    assert torch.equal(torch.isnan(a), expect)
    m = torch.randn(3, 4, 5, generator=gen)
    m[1, 0, 2] = float("inf")
    for fn in (dctkd_ext.dct2d, dctkd_ext.idct2d):
        c = fn(m.to(device)).cpu()
        assert torch.isfinite(c[[0, 2]]).all() and not torch.isfinite(c[1]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to put tensors on two devices")
def test_loss_mixed_devices():
    with pytest.raises(ValueError, match=r"teacher_feats\[0\]: expected a tensor on"):
        dctkd_ext.dct_at_loss([torch.randn(2, 3, 5, 5)], [torch.randn(2, 3, 5, 5, device="cuda")])


def test_other_ops_bad_input(backend):
    dev = backend[1]
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        dctkd_ext.attention_map(torch.randn(3, 4, 5, device=dev))
    with pytest.raises(TypeError, match="x: expected a real floating"):
        dctkd_ext.attention_map(torch.ones(1, 2, 3, 3, dtype=torch.int32, device=dev))
    with pytest.raises(ValueError, match="p: expected a positive"):
        dctkd_ext.attention_map(torch.randn(1, 2, 3, 3, device=dev), p=-1)
    with pytest.raises(ValueError, match="reduce: expected"):
        dctkd_ext.attention_map(torch.randn(1, 2, 3, 3, device=dev), reduce="max")
    with pytest.raises(ValueError, match="a: expected at least 2 dims"):
        dctkd_ext.dct2d(torch.randn(5, device=dev))
    with pytest.raises(TypeError, match="c: expected a real floating"):
        dctkd_ext.idct2d(torch.randn(3, 3, dtype=torch.cfloat, device=dev))
    with pytest.raises(ValueError, match="a: expected H, W >= 1"):
        dctkd_ext.dct2d(torch.randn(2, 0, 3, device=dev))
    if backend[0] != "cpu":
        return
    # the C++ op checks too when called directly
    with pytest.raises(RuntimeError, match="reduce: expected"):
        torch.ops.dctkd_ext.attention_map(torch.randn(1, 2, 3, 3), 2.0, "max")
    with pytest.raises(RuntimeError, match="map_norm: expected one of"):
        torch.ops.dctkd_ext.dct_at_loss([torch.randn(1, 2, 3, 3)], [torch.randn(1, 2, 3, 3)], [1.0], 2.0, "zscore",
                                        True, "dct", True, "minmax", "l2", 0.0)
