"""The Triton kernels of local_attention (dctkd_ext/triton/local_attention.py) through their ops
torch.ops.dctkd_ext_triton.local_attention / local_attention_backward, against a float64 formula of
the op written here with unfold (and checked against the released module's formulation).

Runs on CUDA tensors where a GPU exists, else on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1).
Every output a kernel allocates is poisoned (NaN until written: conftest.nan_poisoned_empty).
"""


import pytest
import torch
import torch.nn.functional as F

from recipes import local_attention_layout, ref_leaf

from conftest import BACKEND_FACTOR, INTERPRET, TRITON_DEVICE, assert_close, features, in_layout, require_triton_kernels

require_triton_kernels()
# against the float64 reference within conftest's bounds (assert_close) times the Triton factor
TRITON = BACKEND_FACTOR["triton"]
DEVICE = TRITON_DEVICE

pytestmark = pytest.mark.usefixtures("poison_outputs")


def formula(q, k, v, rel, kernel_size):
    """The op's definition: per channel, softmax over the K*K window offsets j = a*K + b of
    q[p] * (k[p + j - pad] + rel[c, j]), weights on v[p + j - pad]; k and v zero-padded."""
    b, c, h, w = q.shape
    kk, pad = kernel_size * kernel_size, kernel_size // 2
    ku = F.unfold(k, kernel_size, padding=pad).view(b, c, kk, h, w)
    vu = F.unfold(v, kernel_size, padding=pad).view(b, c, kk, h, w)
    attn = torch.softmax(q[:, :, None] * (ku + rel[None, :, :, None, None]), dim=2)
    return (attn * vu).sum(2)


def inputs(gen, shape, kernel_size, dtype, layout="contiguous", rel_dtype=None):
    q, k, v = (features(*shape, dtype=dtype, device=DEVICE, generator=gen, layout=layout) for _ in range(3))
    rel = torch.randn(shape[1], kernel_size * kernel_size, dtype=torch.float64, generator=gen)
    return q, k, v, rel.to(device=DEVICE, dtype=rel_dtype or dtype)


def run_and_check(tops, gen, q, k, v, rel, kernel_size, need=(True, True, True, True)):
    """Forward and the asked-for gradients (random upstream gradient) against the float64 formula."""
    dtype = q.dtype
    out = tops.local_attention(q, k, v, rel, kernel_size)
    refs = [ref_leaf(t).requires_grad_() for t in (q, k, v, rel)]
    ref = formula(*refs, kernel_size)
    assert out.dtype == dtype and out.stride() == local_attention_layout(q)
    assert_close(out, ref, dtype, "out", factor=TRITON)
    g = in_layout(torch.randn(q.shape, dtype=torch.float64, generator=gen).to(device=DEVICE, dtype=dtype), "transposed")
    grads = tops.local_attention_backward(g, q, k, v, rel, kernel_size, *need)
    ref_grads = torch.autograd.grad(ref, refs, g.to("cpu", torch.float64))
    for name, got, want, inp, asked in zip("qkv", grads[:3], ref_grads[:3], (q, k, v), need[:3]):
        if not asked:
            assert got.shape == (0,) and got.dtype == dtype, f"d{name}: expected an empty tensor"
            continue
        assert got.dtype == dtype and got.stride() == local_attention_layout(q), f"d{name}: dtype / layout"
        assert_close(got, want, dtype, f"d{name}", factor=TRITON)
    drel = grads[3]
    if not need[3]:
        assert drel.shape == (0,) and drel.dtype == rel.dtype
    else:
        assert drel.shape == rel.shape and drel.dtype == rel.dtype
        assert_close(drel, ref_grads[3], dtype, "drel", factor=TRITON)


# (shape, kernel_size): 1x1, odd, non-square, K = 1, 3, 5, K larger than the map, a map wider than a tile
CASES = [
    ((1, 2, 1, 1), 3),
    ((2, 3, 5, 7), 3),
    ((1, 4, 6, 5), 5),
    ((2, 2, 3, 4), 7),
    ((1, 3, 4, 6), 1),
    ((1, 2, 17, 19), 3),
]
# the float64 cases run by default in the (slow) interpreter; the rest are marked long
FP64_DEFAULT = [((1, 2, 1, 1), 3), ((2, 3, 5, 7), 3), ((1, 4, 6, 5), 5)]


def sweep_cases():
    for dtype, name in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        for shape, kernel_size in CASES:
            marks = [pytest.mark.long] if INTERPRET and dtype == torch.float64 and (shape, kernel_size) not in \
                FP64_DEFAULT else []
            yield pytest.param(shape, kernel_size, dtype, marks=marks,
                               id=f"{name}-{'x'.join(map(str, shape))}-K{kernel_size}")


@pytest.mark.parametrize("shape,kernel_size,dtype", list(sweep_cases()))
def test_local_attention(tops, gen, shape, kernel_size, dtype):
    run_and_check(tops, gen, *inputs(gen, shape, kernel_size, dtype), kernel_size)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("shape", [(2, 6, 9, 8), (1, 70, 2, 3)], ids=["2x6x9x8", "1x70x2x3"])
def test_layouts(tops, gen, layout, shape):
    # channels_last: 72 pixels are two pixel tiles of the per-pixel backward; 70 channels, two or three
    # channel tiles
    run_and_check(tops, gen, *inputs(gen, shape, 3, torch.float32, layout), 3)


def test_mixed_layouts_and_rel_dtype(tops, gen):
    # each tensor read through its own strides; rel in float64 for float32 data
    q, k, v, rel = inputs(gen, (2, 4, 6, 5), 3, torch.float32, rel_dtype=torch.float64)
    q = in_layout(q, "channels_last")
    v = in_layout(v, "sliced")
    k = in_layout(k, "transposed")
    run_and_check(tops, gen, q, k, v, rel, 3)


@pytest.mark.parametrize("rel_dtype", [torch.float32, torch.bfloat16], ids=["rel_fp32", "rel_bf16"])
def test_bfloat16(tops, gen, rel_dtype):
    q, k, v, rel = inputs(gen, (2, 3, 5, 6), 3, torch.bfloat16, rel_dtype=rel_dtype)
    run_and_check(tops, gen, q, k, v, rel, 3)
    run_and_check(tops, gen, in_layout(q, "channels_last"), k, v, rel, 3)


@pytest.mark.parametrize("need", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True),
                                  (False, True, True, True), (False, False, False, False)])
def test_need_flags(tops, gen, need):
    run_and_check(tops, gen, *inputs(gen, (1, 3, 4, 5), 3, torch.float32), 3, need)


def test_empty_batch(tops, gen):
    q, k, v, rel = inputs(gen, (0, 3, 4, 5), 3, torch.float32)
    assert tops.local_attention(q, k, v, rel, 3).shape == q.shape
    dq, dk, dv, drel = tops.local_attention_backward(q, q, k, v, rel, 3, True, True, True, True)
    assert dq.shape == dk.shape == dv.shape == q.shape
    assert torch.equal(drel, torch.zeros_like(rel))


def test_formula_matches_released_module(gen):
    """The test's formula against FAM-KD's released LocalSelfAttention (identity 1x1 convs: k = v = x,
    q = guide, rel from its row / column terms)."""
    from dctkd_train.fam_head import LocalSelfAttention

    for kernel_size in (3, 5):
        m = LocalSelfAttention(4, kernel_size).double()
        with torch.no_grad():
            for conv in (m.key, m.value, m.query):
                conv.weight.copy_(torch.eye(4, dtype=torch.float64)[:, :, None, None])
            m.rel_row.normal_(generator=gen)
            m.rel_col.normal_(generator=gen)
            x = torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=gen)
            guide = torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=gen)
            want = m(x, guide)
            got = formula(guide, x, x, m.relative_terms(), kernel_size)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fake_kernels_match(tops, gen):
    """The ops' fake kernels (the launchers' bodies on fake tensors) give the real outputs' metadata."""
    q, k, v, rel = inputs(gen, (1, 3, 4, 5), 3, torch.float32)
    for x in (q, in_layout(q, "channels_last")):
        args = (x, k, v, rel, 3)
        torch.library.opcheck(tops.local_attention, args, test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(tops.local_attention_backward, (x,) + args + (True, True, True, True),
                              test_utils=("test_schema", "test_faketensor"))


def test_bad_input(tops, gen):
    q, k, v, rel = inputs(gen, (1, 2, 4, 5), 3, torch.float32)
    la, bwd = tops.local_attention, tops.local_attention_backward
    bad = [
        ((q[0], k, v, rel, 3), ValueError, "q: expected a 4-D"),
        ((q.int(), k, v, rel, 3), TypeError, "q: expected a float16/bfloat16/float32/float64"),
        ((q, k[:, :1], v, rel, 3), ValueError, "k: expected shape"),
        ((q, k, v.double(), rel, 3), TypeError, "v: expected dtype"),
        ((q, k, v.to("meta"), rel, 3), ValueError, "v: expected a tensor on"),
        ((q, k, v, rel[:, :4], 3), ValueError, r"rel: expected shape \(2, 9\)"),
        ((q, k, v, rel[None], 3), ValueError, "rel: expected shape"),
        ((q, k, v, rel.half(), 3), TypeError, "rel: expected a float32/float64"),
        ((q, k, v, rel.to("meta"), 3), ValueError, "rel: expected a tensor on"),
        ((q, k, v, rel, 2), ValueError, "kernel_size: expected an odd integer"),
        ((q, k, v, rel, -1), ValueError, "kernel_size: expected an odd integer"),
    ]
    for args, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            la(*args)
        with pytest.raises(exc, match=msg):
            bwd(q, *args, True, True, True, True)
    for g, exc, msg in ((q[:, :1], ValueError, "grad: expected shape"),
                        (q.double(), TypeError, "grad: expected dtype")):
        with pytest.raises(exc, match=msg):
            bwd(g, q, k, v, rel, 3, True, True, True, True)
