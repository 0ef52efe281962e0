"""local_attention (docs/DESIGN.md §3.5). The family's standard tests come from its spec,
recipes.LOCAL_ATTENTION (tests/recipes.py): every kernel backend against the float64 reference over shapes
(1x1, odd, non-square, K = 1..7, K larger than the image, the FAM-KD heads' sizes), dtypes and layouts,
with poisoned outputs; the reference against the released head's formulation; gradcheck in float64;
opcheck; torch.compile; bad input. Here besides: the heads' real sizes, mixed layouts, rel's dtypes, large
logits, the backward op's need_* flags, double backward, autocast, determinism, the C++ invariants, NaN
propagation."""

import re

import pytest
import torch

import dctkd_ext
import recipes
from dctkd_ext import _backend
from dctkd_ext import reference as R

from conftest import ACC_TOL, BACKEND_IDS, HALF, assert_close, in_layout, rel_err

OPS = torch.ops.dctkd_ext
SPEC = recipes.LOCAL_ATTENTION
dtype_id = recipes.dtype_id
inputs = recipes.local_attention_inputs

# test_matches_reference, test_layouts, test_reference_matches_oracle, test_gradcheck_float64, test_opcheck,
# test_torch_compile_fullgraph, test_bad_input
globals().update(recipes.family_tests(SPEC))


@pytest.fixture
def la_backend(kernel_backend):
    """(name, device) of each kernel backend (the reference is what they are compared with), skipping the
    Triton backend while it has no local_attention kernels."""
    reason = SPEC.skip_backend(kernel_backend[0])
    if reason:
        pytest.skip(reason)
    return kernel_backend


@pytest.mark.parametrize("hw", [(32, 32), (16, 16), (56, 56), (7, 7)], ids=lambda s: "x".join(map(str, s)))
def test_real_sizes(la_backend, hw, gen):
    # the FAM-KD heads' levels (CIFAR 32/16/8, ImageNet 56/28/14/7) at a few channels
    name, dev = la_backend
    q, k, v, rel = (t.detach().to(dev).requires_grad_() for t in inputs(2, 4, *hw, 3, gen))
    recipes.check_local_attention(name, q, k, v, rel, 3, gen)


def test_mixed_layouts(la_backend, gen, poison_outputs):
    # each input in its own layout; the outputs follow q's
    name, dev = la_backend
    q, k, v, rel = inputs(2, 5, 7, 6, 3, gen)
    q, k, v = (in_layout(t, lay).to(dev).requires_grad_()
               for t, lay in zip((q, k, v), ("channels_last", "sliced", "transposed")))
    recipes.check_local_attention(name, q, k, v, rel.detach().to(dev).requires_grad_(), 3, gen)


@pytest.mark.parametrize("rel_dtype", [torch.float64, "like_q"])
def test_rel_dtypes(la_backend, rel_dtype, gen):
    # rel in float64 with float32 features (float64 accumulation), and rel in q's half dtype
    name, dev = la_backend
    dtype = torch.float32 if rel_dtype == torch.float64 else torch.bfloat16
    q, k, v, rel = inputs(2, 3, 5, 6, 3, gen, dtype, rel_dtype=dtype if rel_dtype == "like_q" else rel_dtype)
    q, k, v, rel = (t.detach().to(dev).requires_grad_() for t in (q, k, v, rel))
    recipes.check_local_attention(name, q, k, v, rel, 3, gen)


def test_large_logits(la_backend, gen):
    # logits of tens: the softmax's max subtraction and exp range matter, attention nearly one-hot
    name, dev = la_backend
    q, k, v, rel = (t.detach().to(dev).requires_grad_() for t in inputs(2, 3, 6, 7, 3, gen, scale=6.0))
    recipes.check_local_attention(name, q, k, v, rel, 3, gen)


# ------------------------------------------------------------------------------------ independent oracle
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_released_formulation(kernel_size, gen):
    # the head's stacking code, in float64: outputs and all four gradients of the CPU kernels
    q, k, v, rel = inputs(2, 4, 7, 9, kernel_size, gen, torch.float64)
    out = dctkd_ext.local_attention(q, k, v, rel, kernel_size)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, rel)]
    ref = R.released_local_attention(*leaves, kernel_size)
    assert rel_err(out, ref) <= ACC_TOL[torch.float64]
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for name, d, dr in zip("qkv", torch.autograd.grad(out, (q, k, v, rel), g),
                           torch.autograd.grad(ref, leaves, g)):
        assert rel_err(d, dr) <= ACC_TOL[torch.float64], name
    # and the reference against it (the two plain-PyTorch formulations agree)
    assert rel_err(R.local_attention(*leaves, kernel_size), ref) <= ACC_TOL[torch.float64]


# ------------------------------------------------------------------------------------ the backward op
@pytest.mark.parametrize("need", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 1, 1, 1), (0, 0, 0, 0)],
                         ids=lambda n: "".join(map(str, n)))
def test_backward_needs(need, gen, poison_outputs):
    q, k, v, rel = (t.detach() for t in inputs(2, 3, 5, 6, 3, gen, layout="channels_last"))
    grad = torch.randn(q.shape, generator=gen)
    full = OPS.local_attention_backward(grad, q, k, v, rel, 3, True, True, True, True)
    part = OPS.local_attention_backward(grad, q, k, v, rel, 3, *map(bool, need))
    for n, f, p, like in zip(need, full, part, (q, k, v, rel)):
        if n:
            assert torch.equal(p, f)
        else:
            assert p.shape == (0,) and p.dtype == like.dtype


def test_partial_requires_grad(gen):
    # autograd asks only for what requires grad; the rest are None
    q, k, v, rel = (t.detach() for t in inputs(1, 2, 4, 5, 3, gen))
    k.requires_grad_()
    (dk,) = torch.autograd.grad(dctkd_ext.local_attention(q, k, v, rel).sum(), (k,))
    leaves = [t.double().requires_grad_(t is k) for t in (q, k, v, rel)]
    (dkr,) = torch.autograd.grad(R.local_attention(*leaves).sum(), (leaves[1],))
    assert_close(dk, dkr, torch.float32, "dk")


def test_empty_batch():
    q = torch.empty(0, 3, 4, 4, requires_grad=True)
    rel = torch.randn(3, 9, requires_grad=True)
    out = dctkd_ext.local_attention(q, q, q, rel)
    assert out.shape == q.shape
    dq, drel = torch.autograd.grad(out.sum(), (q, rel))
    assert dq.shape == q.shape and torch.equal(drel, torch.zeros_like(rel))


def test_deterministic_across_threads(gen):
    q, k, v, rel = inputs(3, 5, 9, 11, 3, gen)
    g = torch.randn(q.shape, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = dctkd_ext.local_attention(q, k, v, rel)
            results.append((out, *torch.autograd.grad(out, (q, k, v, rel), g)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# ------------------------------------------------------------------------ gradcheck, opcheck, compile
def test_double_backward(gen):
    q, k, v, rel = inputs(1, 2, 3, 4, 3, gen, torch.float64)
    assert torch.autograd.gradgradcheck(lambda *a: dctkd_ext.local_attention(*a, 3), (q, k, v, rel))


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
def test_autocast(dtype, gen):
    # under autocast the op runs on q, k, v in the autocast dtype (rel stays float32)
    q, k, v, rel = inputs(2, 3, 6, 5, 3, gen)
    with torch.autocast("cpu", dtype=dtype):
        out = dctkd_ext.local_attention(q, k, v, rel)
    assert out.dtype == dtype
    leaves = [t.detach().to(dtype).double() for t in (q, k, v)] + [rel.detach().double()]
    assert_close(out, R.local_attention(*leaves), dtype, "autocast")
    dq, drel = torch.autograd.grad(out.float().sum(), (q, rel))
    assert dq.dtype == torch.float32 and drel.dtype == torch.float32


def test_triton_without_kernels_leaves_other_families(gen):
    # a triton backend with no local_attention kernels: selected by name it says so; the other families load
    if "triton" not in BACKEND_IDS:
        pytest.skip("triton cannot run here")
    ops = _backend.triton_ops()
    assert hasattr(ops, "global_filter")
    if hasattr(ops, "local_attention"):
        pytest.skip("the triton backend has local_attention kernels")
    q, k, v, rel = (t.detach() for t in inputs(1, 2, 4, 4, 3, gen))
    with dctkd_ext.use_backend("triton"), pytest.raises(NotImplementedError, match="local_attention"):
        dctkd_ext.local_attention(q, k, v, rel)


# ------------------------------------------------------------------------------------------- bad input
BAD_OP = [  # the C++ invariants (direct torch.ops calls skip the Python checks)
    (lambda a: a.update(q=a["q"][0]), r"q: expected a 4-D"),
    (lambda a: a.update(q=a["q"].int()), r"q: expected float32, float64, float16 or bfloat16"),
    (lambda a: [a.update({n: torch.empty(2, 4, 5, 0)}) for n in "qkv"], r"q: expected H, W >= 1"),
    (lambda a: a.update(k=a["k"][:, :, :, None, 0]), r"k: expected shape"),
    (lambda a: a.update(k=a["k"][None]), r"k: expected a 4-D"),
    (lambda a: a.update(v=a["v"].double()), r"v: expected dtype Float like q"),
    (lambda a: a.update(kernel_size=2), r"kernel_size: expected an odd integer >= 1, got 2"),
    (lambda a: a.update(rel=a["rel"].half()), r"rel: expected float32, float64 or q's dtype"),
    (lambda a: a.update(rel=a["rel"][:3]), r"rel: expected shape \(4, 9\)"),
]


@pytest.mark.parametrize("case", range(len(BAD_OP)))
def test_bad_input_op(case, gen):
    change, msg = BAD_OP[case]
    args = SPEC.bad_args(gen)
    change(args)
    a = [args[n] for n in ("q", "k", "v", "rel", "kernel_size")]
    with pytest.raises(RuntimeError, match=msg):
        OPS.local_attention(*a)
    with pytest.raises(RuntimeError, match=msg):
        OPS.local_attention_backward(torch.zeros(2, 4, 5, 5), *a, True, True, True, True)


@pytest.mark.parametrize("grad", ["shape", "dtype"])
def test_bad_grad_op(grad, gen):
    a = SPEC.bad_args(gen)
    g = torch.zeros(2, 4, 5, 4) if grad == "shape" else torch.zeros(2, 4, 5, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=re.escape("grad: expected ") + ("shape" if grad == "shape" else "dtype")):
        OPS.local_attention_backward(g, a["q"], a["k"], a["v"], a["rel"], 3, True, True, True, True)


def test_meta_tensors_follow_the_layout_rule(gen):
    # the fake kernels (torch.compile, meta tensors) give the kernels' layouts
    for layout in ("contiguous", "channels_last", "sliced"):
        q, k, v, rel = (t.detach() for t in inputs(2, 3, 4, 5, 3, gen, layout=layout))
        real = dctkd_ext.local_attention(q, k, v, rel)
        meta = dctkd_ext.local_attention(*(t.to("meta") for t in (q, k, v)), rel.to("meta"))
        assert meta.shape == real.shape and meta.stride() == real.stride() == recipes.local_attention_layout(q)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_propagates_like_the_reference(la_backend, where, gen):
    # a NaN input is never dropped by the softmax's max or its exponential: the same outputs are NaN
    name, dev = la_backend
    q, k, v, rel = (t.detach() for t in inputs(1, 2, 5, 6, 3, gen))
    {"q": q, "k": k, "v": v}[where][0, 1, 2, 3] = float("nan")
    with dctkd_ext.use_backend(name):
        out = dctkd_ext.local_attention(*(t.to(dev) for t in (q, k, v, rel)))
    ref = R.local_attention(q.double(), k.double(), v.double(), rel.double())
    assert ref.isnan().any()
    assert torch.equal(out.cpu().isnan(), ref.isnan())
