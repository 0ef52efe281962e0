"""The Triton backend (dctkd_ext/triton/) of attention_map, dct2d / idct2d and dct_at_loss against the
float64 reference, its op registrations (opcheck, autograd, torch.compile) and the backend wiring.

Runs on CUDA tensors where a GPU exists (fp32, fp16, bf16), and in CI on CPU tensors in Triton's
interpreter (TRITON_INTERPRET=1; fp32 and fp64 only: the interpreter has no bf16 arithmetic).
Every output a kernel allocates is poisoned: torch.empty fills with NaN here (deterministic mode),
so an element a kernel leaves unwritten fails the finiteness checks.
"""

import os
import subprocess
import sys

import pytest
import torch

import dctkd_ext
import recipes
from dctkd_ext import reference

from conftest import BACKEND_FACTOR, INTERPRET, TRITON_DEVICE, assert_close, features, rel_err, require_triton_kernels

require_triton_kernels()
# against the float64 reference within conftest's bounds (assert_close) times the Triton factor
TRITON = BACKEND_FACTOR["triton"]
DEVICE = TRITON_DEVICE
# fp32 everywhere; half precision on the GPU only
DTYPES = [torch.float32] + ([] if INTERPRET else [torch.float16, torch.bfloat16])


def sweep(values, default):
    """The cases of a parametrised sweep: on a GPU all of them; in the (slow) interpreter the
    representative `default` ones, the rest marked long (DCTKD_LONG_TESTS=1 runs them)."""
    return [v if (not INTERPRET or v in default) else pytest.param(v, marks=pytest.mark.long) for v in values]


# every output a kernel allocates is NaN until written (conftest.nan_poisoned_empty)
pytestmark = pytest.mark.usefixtures("poison_outputs")


# ----------------------------------------------------------------------------------- attention_map
SHAPES = [(2, 3, 1, 1), (2, 5, 7, 7), (1, 4, 5, 9), (2, 3, 14, 14), (1, 2, 56, 56)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", sweep(SHAPES, [(2, 5, 7, 7), (1, 4, 5, 9), (1, 2, 56, 56)]))
def test_attention_map(gen, shape, channels_last, dtype):
    x = features(*shape, dtype=dtype, device=DEVICE, channels_last=channels_last, generator=gen, requires_grad=True)
    for p, reduce in ((2.0, "mean"), (1.5, "sum")):
        recipes.check_attention_map("triton", x, gen, p, reduce, what=f"attention_map p={p}")


def test_attention_map_p1_and_strided(gen, tops):
    # p = 1 (|x|, sign gradient) and a layout that is neither NCHW nor channels_last (copied)
    x = features(2, 6, 5, 4, device=DEVICE, generator=gen).permute(0, 1, 3, 2).requires_grad_()
    xr = recipes.ref_leaf(x)
    out = tops.attention_map(x, 1.0, "mean")
    ref = reference.attention_map(xr, 1.0, "mean")
    assert_close(out, ref, torch.float32, "attention_map p=1", factor=TRITON)
    out.backward(torch.ones_like(out))
    ref.backward(torch.ones_like(ref))
    assert_close(x.grad, xr.grad, torch.float32, "attention_map p=1 backward", factor=TRITON)


def test_attention_map_float64(gen, tops):
    if not INTERPRET:
        pytest.skip("fp64 is checked in the interpreter")
    x = features(2, 7, 5, 9, dtype=torch.float64, generator=gen)
    out = tops.attention_map(x, 2.0, "mean")
    assert out.dtype == torch.float64
    assert rel_err(out, reference.attention_map(x, 2.0)) < 1e-12


# ----------------------------------------------------------------------------------- dct2d, idct2d
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", sweep([(1, 1), (7, 7), (5, 9), (3, 14, 14), (2, 56, 56), (2, 1, 40, 70)],
                                        [(1, 1), (5, 9), (2, 1, 40, 70)]))
def test_dct2d(gen, shape, dtype):
    a = torch.randn(shape, generator=gen, dtype=torch.float64)
    recipes.check_dct2d("triton", a.to(DEVICE, dtype).requires_grad_(), gen)


def test_dct2d_scipy_and_roundtrip(gen, tops):
    scipy_fft = pytest.importorskip("scipy.fft")
    a = torch.randn(3, 5, 9, generator=gen, dtype=torch.float64)
    y = tops.dct2d(a.to(DEVICE, torch.float32))
    ref = torch.from_numpy(scipy_fft.dctn(a.numpy(), type=2, norm="ortho", axes=(-2, -1)))
    assert_close(y, ref, torch.float32, "dct2d vs scipy", factor=TRITON)
    assert_close(tops.idct2d(y), a, torch.float32, "idct2d(dct2d(a))", factor=TRITON)


# ------------------------------------------------------------------------------------- dct_at_loss
def level_feats(gen, levels, dtype=torch.float32, channels_last=False, batch=2):
    """levels: (Cs, Ct, H, W) per level -> student (requires grad), teacher."""
    s = [features(batch, cs, h, w, dtype, DEVICE, channels_last, gen, requires_grad=True) for cs, _, h, w in levels]
    t = [features(batch, ct, h, w, dtype, DEVICE, channels_last, gen) for _, ct, h, w in levels]
    return s, t


def check_loss(gen, student, teacher, dtype=None, weights=None, **kwargs):
    """Per-sample loss and its gradient for a random upstream gradient, Triton vs reference (the recipe)."""
    recipes.check_loss("triton", student, teacher, gen, what=f"dct_at_loss {kwargs}", weights=weights, **kwargs)


TWO_LEVELS = [(3, 5, 7, 7), (4, 2, 14, 14)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("preset", ["dct", "paper", "at"])
def test_loss_presets(gen, preset, channels_last, dtype):
    s, t = level_feats(gen, TWO_LEVELS + [(2, 3, 5, 9)], dtype, channels_last)
    check_loss(gen, s, t, dtype, preset=preset, weights=[1.0, 0.5, 2.0])


OVERRIDES = (
    [dict(map_norm=n) for n in ("minmax", "max", "l2", "none")]
    + [dict(coef_norm=n) for n in ("max", "l2", "none")]
    + [dict(transform=t) for t in ("fft_real", "identity")]
    + [dict(distance=d) for d in ("mse", "sse")]
    + [dict(center=False), dict(coef_abs=False), dict(center=False, coef_abs=False, transform="fft_real"), dict(p=1.5)]
)


@pytest.mark.parametrize("overrides", sweep(OVERRIDES, [dict(map_norm="none"), dict(coef_norm="none"),
                                                    dict(transform="fft_real"), dict(distance="sse"), dict(p=1.5),
                                                    dict(center=False, coef_abs=False, transform="fft_real")]),
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_loss_overrides(gen, overrides):
    s, t = level_feats(gen, [(3, 5, 5, 9), (2, 3, 7, 7)])
    check_loss(gen, s, t, preset="dct", **overrides)


@pytest.mark.parametrize("preset", sweep(["dct", "paper"], ["dct"]))
def test_loss_56x56(gen, preset):
    # 56 x 56: two by two tiles of 32, the transform through scratch with K in chunks
    s, t = level_feats(gen, [(2, 3, 56, 56)], batch=1)
    check_loss(gen, s, t, preset=preset)


LONG_IN_INTERPRETER = pytest.mark.long if INTERPRET else pytest.mark.skipif(False, reason="runs everywhere")


@LONG_IN_INTERPRETER
def test_loss_large_non_square(gen):
    # 40 x 70: 2 x 3 tiles of 32; 24 x 20: one tile, too large to be held in registers
    s, t = level_feats(gen, [(2, 2, 40, 70), (3, 2, 24, 20)], batch=1, channels_last=True)
    check_loss(gen, s, t, preset="dct", transform="fft_real")


def test_loss_1x1(gen, tops):
    # a 1 x 1 map normalises to a constant: phi is 0 for both, the loss and its gradient are 0
    s, t = level_feats(gen, [(2, 3, 1, 1)])
    with dctkd_ext.use_backend("triton"):
        loss = dctkd_ext.dct_at_loss(s, t, reduction="none")
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(s[0].grad, torch.zeros_like(s[0]))


def test_loss_many_levels(gen):
    # more levels than one launch serves (MAX_SLOTS = 8): two launches of each kernel
    levels = [(2 + l % 3, 1 + l % 4, 3 + l % 2, 4 + l % 3) for l in range(10)]
    s, t = level_feats(gen, levels, batch=1)
    check_loss(gen, s, t, preset="dct", weights=[0.5 + 0.1 * l for l in range(10)])


def test_loss_float64_exact(gen, tops):
    """fp64 kernels follow the reference to rounding: the hand-written reverse mode is the math."""
    if not INTERPRET:
        pytest.skip("fp64 is checked in the interpreter")
    for kwargs in (dict(preset="dct"), dict(preset="paper"), dict(preset="at"), dict(map_norm="l2", coef_norm="max")):
        s, t = level_feats(gen, [(3, 2, 5, 9), (2, 2, 36, 20)], dtype=torch.float64, batch=1)
        sr = [x.detach().clone().requires_grad_() for x in s]
        with dctkd_ext.use_backend("triton"):
            out = dctkd_ext.dct_at_loss(s, t, reduction="sum", **kwargs)
        ref = reference.dct_at_loss(sr, t, reduction="sum", **kwargs)
        assert abs(out.item() - ref.item()) <= 1e-10 * abs(ref.item())
        out.backward()
        ref.backward()
        for a, b in zip(s, sr):
            assert_close(a.grad, b.grad, torch.float64, f"{kwargs} grad", factor=TRITON)


def test_loss_sample_weight_and_reductions(gen):
    s, t = level_feats(gen, TWO_LEVELS, batch=3)
    sw = torch.tensor([1.0, 0.0, 1.0], device=DEVICE)
    sr, tr = [recipes.ref_leaf(x) for x in s], [recipes.ref_leaf(x) for x in t]
    for reduction in ("mean", "sum"):
        with dctkd_ext.use_backend("triton"):
            out = dctkd_ext.dct_at_loss(s, t, preset="paper", sample_weight=sw, reduction=reduction)
        ref = reference.dct_at_loss(sr, tr, preset="paper", sample_weight=sw.cpu(), reduction=reduction)
        assert_close(out, ref, torch.float32, reduction, factor=TRITON)
        # the upstream gradient of a mean is an expanded (stride 0) tensor
        grads = torch.autograd.grad(out, s)
        refs = torch.autograd.grad(ref, sr)
        for gs, gr in zip(grads, refs):
            assert_close(gs, gr, torch.float32, f"{reduction} backward", factor=TRITON)


def test_loss_empty_level(gen, tops):
    # a level with an empty map contributes 0, as in the CPU kernel
    s, t = level_feats(gen, [(3, 2, 5, 9)], batch=2)
    s0 = torch.randn(2, 3, 0, 4, device=DEVICE)
    opts = (2.0, "minmax", True, "dct", True, "minmax", "l2", 1e-8)
    loss, gmaps = tops.dct_at_loss([s0] + s, [s0] + t, [1.0, 1.0], *opts)
    ref, _ = tops.dct_at_loss(s, t, [1.0], *opts)
    assert torch.equal(loss, ref) and gmaps[0].shape == (2, 0, 4)


# ---------------------------------------------------------------------------- registration, wiring
def test_opcheck(gen, tops):
    x = features(2, 3, 5, 9, device=DEVICE, generator=gen, requires_grad=True)
    torch.library.opcheck(tops.attention_map.default, (x, 2.0, "mean"))
    grad = torch.randn(2, 5, 9, device=DEVICE)
    torch.library.opcheck(tops.attention_map_backward.default, (grad, x.detach(), 1.5, "sum"))
    a = torch.randn(3, 5, 9, device=DEVICE, requires_grad=True)
    torch.library.opcheck(tops.dct2d.default, (a,))
    torch.library.opcheck(tops.idct2d.default, (a,))
    s, t = level_feats(gen, [(3, 2, 3, 4), (2, 4, 2, 2)])
    args = ([1.0, 0.5], 2.0, "minmax", True, "dct", True, "minmax", "l2", 1e-8)
    torch.library.opcheck(tops.dct_at_loss.default, (s, t) + args)
    _, gmaps = tops.dct_at_loss(s, t, *args)
    gmaps = [g.detach() for g in gmaps]  # no double backward (as the C++ ops)
    torch.library.opcheck(
        tops.dct_at_loss_backward.default, (torch.randn(2, device=DEVICE), gmaps, [x.detach() for x in s], 2.0)
    )


@pytest.mark.parametrize("backend", sweep(["aot_eager", "inductor"], ["aot_eager"]))
def test_compile_fullgraph(gen, backend):
    # in the interpreter the ops stay opaque custom ops in the graph; on CUDA inductor sees the kernels
    s, t = level_feats(gen, TWO_LEVELS)
    sr = [x.detach().clone().requires_grad_() for x in s]

    def step(student, teacher):
        return dctkd_ext.dct_at_loss(student, teacher, preset="dct") + dctkd_ext.attention_map(student[0]).mean()

    with dctkd_ext.use_backend("triton"):
        torch._dynamo.reset()
        out = torch.compile(step, fullgraph=True, backend=backend)(s, t)
        ref = step(sr, t)
    assert_close(out, ref, torch.float32, "compiled loss", factor=5)
    out.backward()
    ref.backward()
    for a, b in zip(s, sr):
        assert_close(a.grad, b.grad, torch.float32, "compiled gradient", factor=5)


def test_backend_routing(gen):
    x = features(2, 3, 5, 9, device=DEVICE, generator=gen)
    s, t = level_feats(gen, TWO_LEVELS)
    with dctkd_ext.use_backend("triton"), torch.autograd.profiler.profile() as prof:
        dctkd_ext.attention_map(x)
        dctkd_ext.dct2d(x)
        dctkd_ext.dct_at_loss(s, t).backward()
    names = {e.name for e in prof.function_events}
    for op in ("attention_map", "dct2d", "dct_at_loss", "dct_at_loss_backward"):
        assert f"dctkd_ext_triton::{op}" in names, f"{op} did not run on the Triton backend: {sorted(names)}"


def _run(code, **env):
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_env_selects_triton():
    code = (
        "import torch, dctkd_ext\n"
        "x = torch.randn(1, 2, 3, 4, device='%s')\n"
        "with torch.autograd.profiler.profile() as prof:\n"
        "    dctkd_ext.attention_map(x)\n"
        "print(sorted({e.name for e in prof.function_events if 'dctkd' in e.name}))\n" % DEVICE
    )
    r = _run(code, DCTKD_BACKEND="triton")
    assert r.returncode == 0, r.stderr
    assert "dctkd_ext_triton::attention_map" in r.stdout


def test_imports_without_triton():
    # `import dctkd_ext` works where triton is missing; asking for the backend says what to do
    code = (
        "import sys, torch\n"
        "assert not any(m == 'triton' or m.startswith('triton.') for m in sys.modules)\n"
        "sys.modules['triton'] = None  # import triton -> ImportError, as where it is not installed\n"
        "import dctkd_ext\n"
        "x = torch.randn(1, 2, 3, 4)\n"
        "print(float(dctkd_ext.attention_map(x).sum()) > 0)\n"
        "try:\n"
        "    with dctkd_ext.use_backend('triton'):\n"
        "        dctkd_ext.attention_map(x)\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    r = _run(code, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr
    assert "True" in r.stdout and "ImportError:" in r.stdout and "pip install triton" in r.stdout


def test_compiles_for_sm90():
    """The kernels compile for sm_90 (H100/H200) with the installed triton, GPU or not: the
    interpreter does not check types, constexpr use or resources (dctkd_ext/triton/_compile_check.py)."""
    import triton.backends.nvidia as nv

    if not os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    r = subprocess.run([sys.executable, "-m", "dctkd_ext.triton._compile_check", "--arch", "90"],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "kernel variants compiled" in r.stdout


# --------------------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture(gen):
    s, t = level_feats(gen, TWO_LEVELS + [(2, 3, 56, 56)], batch=4)
    with dctkd_ext.use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: compiles the kernels, fills the basis cache
                for x in s:
                    x.grad = None
                dctkd_ext.dct_at_loss(s, t).backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        for x in s:
            x.grad = None
        with torch.cuda.graph(graph):
            loss = dctkd_ext.dct_at_loss(s, t)
            loss.backward()
        graph.replay()
        torch.cuda.synchronize()
        want = dctkd_ext.dct_at_loss(s, t)
    assert torch.allclose(loss, want)
