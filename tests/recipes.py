"""The test recipe of each op family, shared by the tests of every backend.

The core (compare_with_reference): run the public op on the backend given (use_backend) and compare its
output and its gradients, for a random upstream gradient, with the float64 reference on the same inputs
(float64 CPU leaf copies), within conftest's error bounds (assert_close / error_bound) times the backend's
BACKEND_FACTOR; on the kernels' backends it also checks the output's and the gradients' dtype and layout.
check_family applies it with a family's dtype and layout rules, from the family's spec: the loss family's
ATTENTION_MAP and DCT_AT_LOSS (check_attention_map, check_loss; check_dct2d is the core on dct2d and
idct2d), LOCAL_ATTENTION (check_local_attention; tests/test_local_attention.py), the spectral family's
GLOBAL_FILTER, SPECTRAL_CONV and FAM_HALF_WEIGHT (tests/test_spectral.py, prefixes global_filter_,
spectral_conv_ and fam_half_weight_) and FAM_LAYER (tests/test_fam_layer.py). Complex ops: the reference
gets complex128 copies and a complex upstream gradient, and conftest's bounds measure the (re, im) pairs.

A family's standard tests come from a small spec, Family, through family_tests(spec), whose result a
test module adds to its globals (`globals().update(recipes.family_tests(SPEC))`):

    test_matches_reference[backend-dtype-case]   every kernel backend present (cpu; triton, in Triton's
                                                 interpreter without a GPU; cuda where there is one) x
                                                 spec.dtypes x spec.cases, fresh random data, outputs
                                                 poisoned (conftest.poison_outputs: NaN until written)
    test_layouts[backend-dtype-layout]           spec.layout_case in each of spec.layouts, for spec.layout_dtypes
    test_reference_matches_oracle[case]          the reference against spec.oracle, an independent float64
                                                 formulation (the `reference` backend is never compared
                                                 with itself), where the family has one
    test_gradcheck_float64[i]                    torch.autograd.gradcheck of the op on spec.gradcheck_cases
    test_opcheck[i]                              torch.library.opcheck on spec.opcheck_args(gen)
    test_torch_compile_fullgraph                 torch.compile(fullgraph=True, aot_eager) of a step through the
                                                 op: the same output and gradients as eager
    test_bad_input[id]                           each of spec.bad_inputs raises its exception, whose message
                                                 names the argument

The spec (all callables take plain tensors; `case` is whatever spec.cases holds):

    name            the op's name, for messages
    op              op(*args, **kwargs): the public op
    reference       reference(*args, **kwargs) on float64 CPU copies of the tensors (dctkd_ext.reference)
    make_args       make_args(case, dtype, layout, device, gen) -> (args, kwargs): fresh random inputs,
                    differentiable tensors as leaves with requires_grad
    cases, dtypes   the sweep of test_matches_reference (pytest.param values keep their marks)
    case_id         case -> test id
    layouts, layout_case, layout_dtypes   the sweep of test_layouts (conftest.LAYOUTS names)
    out_dtype       args -> the output's dtype (default: the first tensor's)
    out_layout      args -> the output's stride on the kernels' backends, or None for no check
    grad_layout     (i, tensor, args) -> the stride of the i-th gradient, or None for no check
    grad_names      names of the differentiable inputs (or args -> names), for messages
    wrt             args -> the tensors to differentiate (default: every tensor in args that requires grad)
    rounded_upstream  the reference gets the upstream gradient rounded to the op's dtype (an op whose
                    gradients take differences of it, which would amplify that rounding)
    oracle          an independent float64 formulation (same signature as reference), or None
    gradcheck_cases (case, layout) pairs for gradcheck, in float64
    opcheck_args    gen -> [(torch.ops overload, args)]
    compile_case    (case, layout) of the torch.compile test, or None
    bad_args        gen -> the keyword arguments of a good call; bad_call(kwargs) makes the call
    bad_inputs      [(id, change(kwargs) in place, exception type, message regex)]
    skip_backend    backend name -> a reason to skip it, or None
    factor, grad_factor  the factor on the bound of the output and of the gradients (grad_factor: default
                    factor), for an op that sums more terms
    grad_terms      (ref_args, ref_kwargs, upstream) -> {gradient name: the sum of its summands'
                    magnitudes}, for gradients that are one sum with cancellation (bounded relative to that)
    backend_factor  backend name -> factor on the bound (default: conftest's BACKEND_FACTOR; {} for kernels
                    that sum in the same order on every backend)
    gradcheck_dtype, gradcheck_kwargs   the dtype of gradcheck's inputs (complex128 for a complex op) and
                    gradcheck's tolerances
    compile_dtype   the dtype of the torch.compile test's inputs

Special cases of a family (the backward op's flags, autocast, determinism, NaN propagation) stay plain
tests in the family's file.
"""

import dataclasses
import importlib
import warnings
from typing import Any, Callable, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

import dctkd_ext
from dctkd_ext import reference
from dctkd_ext.ops.dct_at import kernel_layout_like

from conftest import ACC_TOL, BACKEND_FACTOR, KERNEL_BACKENDS, assert_close, crandn, features, in_layout, rel_err


def ref_leaf(x):
    """float64 (complex128 for a complex x) CPU leaf copy of x for the reference."""
    dtype = torch.complex128 if x.is_complex() else torch.float64
    return x.detach().to("cpu", dtype).requires_grad_(x.requires_grad)


def _ref_arg(v):
    # tensor arguments (sample_weight) go to the reference on the CPU
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


def _upstream(shape, gen, like):
    if like.is_complex():  # real and imaginary parts both random
        g = torch.view_as_complex(torch.randn(*shape, 2, generator=gen, dtype=torch.float64))
    else:
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
    return g, g.to(device=like.device, dtype=like.dtype)


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


# ------------------------------------------------------------------------------------------ the core
def compare_with_reference(backend, op, ref_op, args, gen, kwargs=None, *, dtype=None, out_dtype=None,
                           out_layout=None, grad_layout=None, grad_names=None, rounded_upstream=False,
                           factor=1.0, what="op", wrt=None, backend_factor=None, grad_factor=None,
                           grad_terms=None, out_terms=None):
    """op(*args, **kwargs) on `backend` against ref_op on float64 CPU leaf copies of the tensors in args
    (nested lists included), and the gradients of every tensor in args that requires grad, for a random
    upstream gradient. dtype: the inputs' dtype that sets the bound (default: the first tensor's);
    out_dtype: the output's expected dtype; out_layout: its expected stride on the kernels' backends;
    grad_layout(i, tensor): the i-th gradient's expected stride there (None: not checked); wrt: the
    tensors to differentiate (default: those in args that require grad); backend_factor: the factor per
    backend on the bound (default: conftest's BACKEND_FACTOR); grad_factor: the gradients' factor in
    place of factor; grad_terms(ref_args, ref_kwargs, upstream) -> {name: the sum of the magnitudes of
    the summands} for gradients that are one sum with cancellation (conftest.assert_close's terms);
    out_terms(ref_args, ref_kwargs) -> the same for the output."""
    kwargs = kwargs or {}
    per_backend = (BACKEND_FACTOR if backend_factor is None else backend_factor).get(backend, 1.0)
    grad_factor = (factor if grad_factor is None else grad_factor) * per_backend
    factor *= per_backend
    tensors = _tensors(args)
    dtype = dtype or tensors[0].dtype
    leaves = {}

    def leaf(t):
        leaves[id(t)] = ref_leaf(t)
        return leaves[id(t)]

    ref_args = _map_tensors(args, leaf)
    with dctkd_ext.use_backend(backend):
        out = op(*args, **kwargs)
    ref_kwargs = {k: _map_tensors(v, _ref_arg) for k, v in kwargs.items()}
    ref = ref_op(*ref_args, **ref_kwargs)
    kernels = backend != "reference"
    if out_dtype is not None:
        assert out.dtype == out_dtype, f"{what}: dtype {out.dtype}, expected {out_dtype}"
    if kernels and out_layout is not None:
        assert out.stride() == out_layout, f"{what}: layout {out.stride()}, expected {out_layout}"
    assert_close(out, ref, dtype, what, factor, out_terms(ref_args, ref_kwargs) if out_terms else None)
    g64, g = _upstream(ref.shape, gen, out)
    if rounded_upstream:
        g64 = g.detach().to("cpu", torch.float64)
    wrt = [t for t in tensors if t.requires_grad] if wrt is None else list(wrt)
    if not wrt:
        return out
    grads = torch.autograd.grad(out, wrt, g)
    grads_ref = torch.autograd.grad(ref, [leaves[id(t)] for t in wrt], g64)
    names = grad_names or [f"[{i}]" for i in range(len(wrt))]
    terms = grad_terms(ref_args, ref_kwargs, g64) if grad_terms else {}
    for i, (name, d, dr, t) in enumerate(zip(names, grads, grads_ref, wrt)):
        assert d.dtype == t.dtype and d.shape == t.shape, f"{what} d{name}: {d.dtype} {tuple(d.shape)}"
        if kernels and grad_layout is not None:
            want = grad_layout(i, t)
            assert want is None or d.stride() == want, f"{what} d{name}: layout {d.stride()}"
        assert_close(d, dr, dtype, f"{what} d{name}", grad_factor, terms.get(name))
    return out


# ------------------------------------------------------------------------------ a family's standard tests
@dataclasses.dataclass
class Family:
    """The spec of an op family's standard tests (see the module docstring)."""

    name: str
    op: Callable
    reference: Callable
    make_args: Callable
    cases: Sequence
    dtypes: Sequence
    case_id: Callable = str
    layouts: Sequence = ("contiguous",)
    layout_case: Any = None
    layout_dtypes: Sequence = (torch.float32,)
    out_dtype: Optional[Callable] = None
    out_layout: Optional[Callable] = None
    grad_layout: Optional[Callable] = None
    grad_names: Sequence = ()
    rounded_upstream: bool = False
    oracle: Optional[Callable] = None
    gradcheck_cases: Sequence = ()
    opcheck_args: Optional[Callable] = None
    compile_case: Any = None
    bad_args: Optional[Callable] = None
    bad_call: Optional[Callable] = None
    bad_inputs: Sequence = ()
    skip_backend: Optional[Callable] = None
    wrt: Optional[Callable] = None
    factor: float = 1.0
    grad_factor: Optional[float] = None
    grad_terms: Optional[Callable] = None
    out_terms: Optional[Callable] = None
    backend_factor: Optional[dict] = None
    gradcheck_dtype: torch.dtype = torch.float64
    gradcheck_kwargs: dict = dataclasses.field(default_factory=dict)
    compile_dtype: torch.dtype = torch.float32


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def _on_device(args, device):
    return _map_tensors(args, lambda t: t.detach().to(device).requires_grad_(t.requires_grad))


def check_family(spec, backend, args, gen, kwargs=None, factor=1.0, what=None):
    """The core on one call of a family's op, with the spec's dtype and layout rules."""
    return compare_with_reference(
        backend, spec.op, spec.reference, args, gen, kwargs,
        out_dtype=spec.out_dtype(args) if spec.out_dtype else _tensors(args)[0].dtype,
        out_layout=spec.out_layout(args) if spec.out_layout else None,
        grad_layout=(lambda i, t: spec.grad_layout(i, t, args)) if spec.grad_layout else None,
        grad_names=spec.grad_names(args) if callable(spec.grad_names) else (spec.grad_names or None),
        rounded_upstream=spec.rounded_upstream, factor=factor * spec.factor, what=what or spec.name,
        wrt=spec.wrt(args) if spec.wrt else None, backend_factor=spec.backend_factor,
        grad_factor=None if spec.grad_factor is None else factor * spec.grad_factor,
        grad_terms=spec.grad_terms, out_terms=spec.out_terms)


def _param_values(values, ids):
    out = []
    for v in values:
        if isinstance(v, type(pytest.param(None))):
            out.append(pytest.param(*v.values, marks=v.marks, id=v.id or ids(v.values[0])))
        else:
            out.append(pytest.param(v, id=ids(v)))
    return out


def family_tests(spec: Family, prefix: str = "") -> dict:
    """The standard tests of a family, by name, for a test module's globals; with a prefix (a module with
    several families), test_<prefix>matches_reference and so on."""
    backends = [pytest.param(b, id=b[0]) for b in KERNEL_BACKENDS]
    tests = {}

    def use(backend):
        name, device = backend
        reason = spec.skip_backend(name) if spec.skip_backend else None
        if reason:
            pytest.skip(reason)
        return name, device

    @pytest.mark.parametrize("case", _param_values(spec.cases, spec.case_id))
    @pytest.mark.parametrize("dtype", spec.dtypes, ids=dtype_id)
    @pytest.mark.parametrize("backend", backends)
    def test_matches_reference(backend, dtype, case, gen, poison_outputs):
        name, device = use(backend)
        args, kwargs = spec.make_args(case, dtype, "contiguous", device, gen)
        check_family(spec, name, args, gen, kwargs, what=f"{spec.name} {spec.case_id(case)}")

    tests["test_matches_reference"] = test_matches_reference

    if len(spec.layouts) > 1 or spec.layout_case is not None:
        layout_case = spec.layout_case if spec.layout_case is not None else spec.cases[0]

        @pytest.mark.parametrize("layout", spec.layouts)
        @pytest.mark.parametrize("dtype", spec.layout_dtypes, ids=dtype_id)
        @pytest.mark.parametrize("backend", backends)
        def test_layouts(backend, dtype, layout, gen, poison_outputs):
            name, device = use(backend)
            args, kwargs = spec.make_args(layout_case, dtype, layout, device, gen)
            check_family(spec, name, args, gen, kwargs, what=f"{spec.name} {layout}")

        tests["test_layouts"] = test_layouts

    if spec.oracle is not None:
        @pytest.mark.parametrize("case", _param_values(spec.cases, spec.case_id))
        def test_reference_matches_oracle(case, gen):
            # the reference (what every backend is compared with) against an independent formulation
            args, kwargs = spec.make_args(case, torch.float64, "contiguous", "cpu", gen)
            compare_with_reference("reference", spec.oracle, spec.reference, args, gen, kwargs,
                                   out_dtype=torch.float64, grad_names=spec.grad_names or None,
                                   what=f"{spec.name} oracle {spec.case_id(case)}")
            with dctkd_ext.use_backend("reference"):
                out = spec.op(*args, **kwargs)  # the `reference` backend is the reference module
            assert rel_err(out, spec.reference(*args, **kwargs)) <= ACC_TOL[torch.float64]

        tests["test_reference_matches_oracle"] = test_reference_matches_oracle

    if spec.gradcheck_cases:
        @pytest.mark.parametrize("i", range(len(spec.gradcheck_cases)))
        def test_gradcheck_float64(i, gen):
            case, layout = spec.gradcheck_cases[i]
            args, kwargs = spec.make_args(case, spec.gradcheck_dtype, layout, "cpu", gen)
            tensors = _tensors(args)
            wrt = [t for t in tensors if t.requires_grad]

            def fn(*xs):
                swap = dict(zip(map(id, wrt), xs))
                return spec.op(*_map_tensors(args, lambda t: swap.get(id(t), t)), **kwargs)

            assert torch.autograd.gradcheck(fn, wrt, **spec.gradcheck_kwargs)

        tests["test_gradcheck_float64"] = test_gradcheck_float64

    if spec.opcheck_args is not None:
        def test_opcheck(gen, poison_outputs):
            for op, args in spec.opcheck_args(gen):
                torch.library.opcheck(op, args)

        tests["test_opcheck"] = test_opcheck

    if spec.compile_case is not None:
        def test_torch_compile_fullgraph(gen):
            torch._dynamo.reset()
            case, layout = spec.compile_case
            args, kwargs = spec.make_args(case, spec.compile_dtype, layout, "cpu", gen)
            wrt = [t for t in _tensors(args) if t.requires_grad]

            def step(*xs):
                swap = dict(zip(map(id, wrt), xs))
                y = spec.op(*_map_tensors(args, lambda t: swap.get(id(t), t)), **kwargs) * 1.5
                return (torch.view_as_real(y) if y.is_complex() else y).sum()

            compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
            got = torch.autograd.grad(compiled(*wrt), wrt)
            want = torch.autograd.grad(step(*wrt), wrt)
            assert all(torch.equal(a, b) for a, b in zip(got, want))

        tests["test_torch_compile_fullgraph"] = test_torch_compile_fullgraph

    if spec.bad_inputs:
        @pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in spec.bad_inputs])
        def test_bad_input(case, gen):
            _, change, exc, msg = case
            kwargs = spec.bad_args(gen)
            change(kwargs)
            with pytest.raises(exc, match=msg):
                spec.bad_call(kwargs)

        tests["test_bad_input"] = test_bad_input

    named = {}
    for name, fn in tests.items():
        name = "test_" + prefix + name[len("test_"):]
        fn.__name__ = fn.__qualname__ = name
        named[name] = fn
    return named


# ------------------------------------------------------------------------------------- dct_at family
def _acc_out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _map_make_args(case, dtype, layout, device, gen):
    b, c, h, w, p, reduce = case
    return (features(b, c, h, w, dtype, device, generator=gen, layout=layout, requires_grad=True), p, reduce), {}


ATTENTION_MAP = Family(
    name="attention_map",
    op=dctkd_ext.attention_map,
    reference=reference.attention_map,
    make_args=_map_make_args,
    cases=[(3, 11, 1, 1, 2.0, "mean"), (3, 11, 5, 9, 2.0, "mean"), (2, 13, 6, 5, 1.5, "sum"),
           (3, 11, 56, 56, 2.0, "mean")],  # (B, C, H, W, p, reduce)
    case_id=lambda c: "x".join(map(str, c[:4])) + f"-p{c[4]}-{c[5]}",
    dtypes=[torch.float32, torch.float16, torch.bfloat16, torch.float64],
    layouts=["contiguous", "channels_last", "sliced", "transposed"],
    out_dtype=lambda args: _acc_out_dtype(args[0].dtype),
    grad_layout=lambda i, t, args: kernel_layout_like(t).stride(),
    grad_names=["x"],
)


def check_attention_map(backend, x, gen, p=2.0, reduce="mean", factor=1.0, what="attention_map"):
    """attention_map(x) and its gradient; the gradient in the kernels' layout (kernel_layout_like)."""
    return check_family(ATTENTION_MAP, backend, (x, p, reduce), gen, factor=factor, what=what)


def check_dct2d(backend, a, gen, factor=1.0):
    """dct2d(a) and idct2d(a) in a's dtype, and dct2d's gradient (idct2d of the upstream gradient)."""
    y = compare_with_reference(backend, dctkd_ext.dct2d, reference.dct2d, (a,), gen, out_dtype=a.dtype,
                               grad_names=["a"], factor=factor, what="dct2d")
    compare_with_reference(backend, dctkd_ext.idct2d, reference.idct2d, (a.detach(),), gen, out_dtype=a.dtype,
                           factor=factor, what="idct2d")
    return y


def _loss_make_args(case, dtype, layout, device, gen):
    """case: ((B, Cs, H, W), Ct) per level -> (student (requires grad), teacher), with the case's options."""
    levels, options = case

    def draw():
        s = [features(*sh, dtype, device, generator=gen, layout=layout, requires_grad=True) for sh, _ in levels]
        t = [features(sh[0], ct, sh[2], sh[3], dtype, device, generator=gen, layout=layout) for sh, ct in levels]
        return s, t

    return draw_loss_inputs(draw, **options), dict(reduction="none", **options)


def _loss_options(kwargs):
    """The resolved options of a dct_at_loss call's keyword arguments, and its weights, sample_weight and
    reduction."""
    kw = dict(kwargs)
    preset, weights = kw.pop("preset", "dct"), kw.pop("weights", None)
    sample_weight, reduction = kw.pop("sample_weight", None), kw.pop("reduction", "mean")
    return dctkd_ext.presets.resolve_options(preset, kw), weights, sample_weight, reduction


def _loss_coefficients(x, opts):
    """A level's coefficients (B, H*W) in float64, as the reference computes them under opts."""
    return reference.phi(reference.attention_map(x.detach().double().cpu(), opts["p"]), **opts)


def dct_at_loss_terms(args, kwargs):
    """The scale of the loss's rounding error, for conftest.assert_close's terms: a level's distance of
    the coefficients zs - zt is computed from zs and zt, each with a rounding error relative to its own
    norm, so where the two nearly cancel (1x1 maps without normalisation: two channel means of like size)
    the error scales with ||zs|| + ||zt||, not with the loss. Per sample and level, from the float64
    reference's coefficients: l2 ||zs|| + ||zt||; sse 2 ||zs - zt|| (||zs|| + ||zt||); mse that over
    the coefficients' count. Weighted and reduced as the loss; the norm over samples."""
    student, teacher = args
    opts, weights, sample_weight, reduction = _loss_options(kwargs)
    weights = [1.0] * len(student) if weights is None else weights
    total = 0.0
    for s, t, w in zip(student, teacher, weights):
        zs, zt = _loss_coefficients(s, opts), _loss_coefficients(t, opts)
        size = zs.norm(dim=1) + zt.norm(dim=1)
        level = {"l2": size, "sse": 2 * (zs - zt).norm(dim=1) * size,
                 "mse": 2 * (zs - zt).norm(dim=1) * size / zs.shape[1]}[opts["distance"]]
        total = total + abs(float(w)) * level
    if sample_weight is not None:
        total = total * sample_weight.detach().double().abs()
    total = {"mean": total.mean(), "sum": total.sum()}.get(reduction, total)
    return float(total.norm())


def dct_at_loss_sign_ambiguous(student, teacher, tol=1e-6, **kwargs):
    """Whether a student coefficient before the absolute value is within tol of 0 (relative to its sample's
    norm, float64) where the teacher's is not. The loss's gradient jumps there by about the teacher's
    coefficient when the student's changes sign, and within rounding of 0 that sign is not defined by fp32
    arithmetic (seen: a coefficient of 1e-8 against a norm of 30 made dS 6% off the float64 one). Where
    both are near 0 (the DC term of centred maps) the jump is near 0 too. False where the options take no
    absolute value."""
    opts = _loss_options(kwargs)[0]
    if not opts["coef_abs"]:
        return False
    before_abs = dict(opts, coef_abs=False, coef_norm="none")
    for x, y in zip(student, teacher):
        cs, ct = _loss_coefficients(x, before_abs), _loss_coefficients(y, before_abs)
        near = cs.abs() <= tol * cs.norm(dim=1, keepdim=True)
        weighty = ct.abs() > tol * ct.norm(dim=1, keepdim=True)
        if (near & weighty).any():
            return True
    return False


def draw_loss_inputs(draw, **kwargs):
    """draw() -> (student, teacher), drawn again (up to 10 times) while the loss's gradient is not defined
    in fp32 for them under kwargs (dct_at_loss_sign_ambiguous)."""
    s, t = draw()
    for _ in range(9):
        if not dct_at_loss_sign_ambiguous(s, t, **kwargs):
            break
        s, t = draw()
    return s, t


DCT_AT_LOSS = Family(
    name="dct_at_loss",
    op=dctkd_ext.dct_at_loss,
    reference=reference.dct_at_loss,
    make_args=_loss_make_args,
    cases=[([((3, 8, 7, 7), 5), ((3, 16, 4, 4), 32)], dict(preset=p)) for p in ("dct", "paper", "at")],
    case_id=lambda c: "-".join(f"{k}={v}" for k, v in c[1].items()),
    dtypes=[torch.float32, torch.float16, torch.bfloat16, torch.float64],
    layouts=["contiguous", "channels_last", "sliced", "transposed"],
    out_dtype=lambda args: _acc_out_dtype(args[0][0].dtype),
    grad_layout=lambda i, t, args: kernel_layout_like(t).stride(),
    grad_names=lambda args: [f"S[{l}]" for l in range(len(args[0]))],
    # the students only: a teacher that requires grad gets none
    wrt=lambda args: args[0],
    out_terms=dct_at_loss_terms,
)


def check_loss(backend, student, teacher, gen, what="dct_at_loss", factor=1.0, reduction="none", **kwargs):
    """The loss (per sample by default) and the students' gradients for a random upstream gradient (per
    sample with reduction="none": a backward that mixes samples fails)."""
    return check_family(DCT_AT_LOSS, backend, (student, teacher), gen, dict(reduction=reduction, **kwargs),
                        factor=factor, what=what)


# ---------------------------------------------------------------------------------- local_attention family
def local_attention_layout(q):
    """The layout the kernels give out, dq, dk and dv: channels_last when q is (and is not also NCHW), else NCHW."""
    cl = not q.is_contiguous() and q.is_contiguous(memory_format=torch.channels_last)
    return torch.empty(q.shape, memory_format=torch.channels_last if cl else torch.contiguous_format).stride()


def local_attention_inputs(b, c, h, w, kernel_size, gen, dtype=torch.float32, layout=None, rel_dtype=None,
                           scale=1.0, device="cpu"):
    """q, k, v (B, C, H, W) in dtype and layout, rel (C, K*K) (float32 unless q is float64), as leaves
    on `device`; q and k scaled by `scale` (larger logits)."""
    q, k, v = (features(b, c, h, w, dtype, generator=gen, layout=layout) for _ in range(3))
    if scale != 1.0:
        q, k = (t.mul(scale).to(dtype) for t in (q, k))
        if layout is not None:
            q, k = in_layout(q, layout), in_layout(k, layout)
    if rel_dtype is None:
        rel_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rel = torch.randn(c, kernel_size * kernel_size, generator=gen, dtype=torch.float64).to(rel_dtype)
    return [t.to(device).requires_grad_() for t in (q, k, v, rel)]


def _la_grad_layout(i, t, args):
    return local_attention_layout(args[0]) if i < 3 else None


def check_local_attention(backend, q, k, v, rel, kernel_size, gen, factor=1.0, what="local_attention"):
    """local_attention(q, k, v, rel) in q's dtype and its four gradients for a random upstream gradient,
    against the float64 reference; on the kernels' backends, the layout of the output and of dq, dk, dv."""
    return check_family(LOCAL_ATTENTION, backend, (q, k, v, rel, kernel_size), gen, factor=factor, what=what)


def _la_make_args(case, dtype, layout, device, gen):
    *bchw, kernel_size = case
    q, k, v, rel = local_attention_inputs(*bchw, kernel_size, gen, dtype, layout=layout, device=device)
    return (q, k, v, rel, kernel_size), {}


def _la_skip(name):
    from dctkd_ext import _backend

    if name == "triton" and not hasattr(_backend.triton_ops(), "local_attention"):
        return "the triton backend has no local_attention kernels in this checkout"
    return None


def _la_opcheck_args(gen):
    ops = torch.ops.dctkd_ext
    q, k, v, rel = local_attention_inputs(2, 3, 5, 4, 3, gen)
    qc, kc, vc = (in_layout(t, "channels_last") for t in (q, k, v))
    grad = torch.randn(q.shape, generator=gen)
    cases = [
        (ops.local_attention.default, (q, k, v, rel, 3)),
        (ops.local_attention.default, (qc.requires_grad_(), kc, vc, rel.detach(), 3)),
        (ops.local_attention.default, (q.detach().half(), k.detach().half(), v.detach().half(), rel.detach()[:, :1], 1)),
    ]
    d = [t.detach() for t in (q, k, v, rel)]
    for need in ((True, True, True, True), (False, True, False, True), (True, False, True, False)):
        cases.append((ops.local_attention_backward.default, (grad, *d, 3, *need)))
        cases.append((ops.local_attention_backward.default,
                      (in_layout(grad, "channels_last"), qc.detach(), kc, vc, d[3], 3, *need)))
    return cases


def _la_bad_args(gen):
    q, k, v, rel = (t.detach() for t in local_attention_inputs(2, 4, 5, 5, 3, gen))
    return dict(q=q, k=k, v=v, rel=rel, kernel_size=3)


def _set(**new):
    return lambda a: a.update({n: (f(a[n]) if callable(f) else f) for n, f in new.items()})


LOCAL_ATTENTION = Family(
    name="local_attention",
    op=dctkd_ext.local_attention,
    reference=reference.local_attention,
    oracle=reference.released_local_attention,  # the FAM-KD head's stacking code, written independently
    make_args=_la_make_args,
    cases=[  # (B, C, H, W, K)
        (1, 1, 1, 1, 3),  # 1x1: every neighbour is padding
        (2, 3, 5, 7, 1),  # K = 1: softmax of one logit, out = v
        (2, 3, 5, 7, 3),  # odd, non-square
        (1, 2, 6, 4, 5),
        (1, 2, 3, 2, 7),  # K larger than the image
        (2, 4, 8, 8, 3),  # the CIFAR head's deepest level size
        (1, 3, 9, 20, 5),  # wider than one vector step per row
    ],
    case_id=lambda s: "x".join(map(str, s)),
    dtypes=[torch.float32, torch.float64, torch.bfloat16, torch.float16],
    layouts=["contiguous", "channels_last", "sliced", "transposed"],
    layout_case=(2, 5, 6, 9, 3),
    layout_dtypes=[torch.float32, torch.bfloat16],
    out_dtype=lambda args: args[0].dtype,
    out_layout=lambda args: local_attention_layout(args[0]),
    grad_layout=_la_grad_layout,
    grad_names=["q", "k", "v", "rel"],
    # dq, dk and drel take differences (v_j - out) of the upstream gradient, which would amplify its
    # rounding (to a half dtype) beyond the bound of one final rounding: the reference gets the op's
    rounded_upstream=True,
    gradcheck_cases=[((1, 2, 4, 5, 3), "contiguous"), ((1, 1, 3, 2, 5), "contiguous"),
                     ((1, 2, 4, 5, 3), "channels_last"), ((1, 1, 3, 2, 5), "channels_last")],
    opcheck_args=_la_opcheck_args,
    compile_case=((2, 4, 6, 5, 3), "channels_last"),
    bad_args=_la_bad_args,
    bad_call=lambda a: dctkd_ext.local_attention(**a),
    bad_inputs=[  # (id, change, exception, message)
        ("q-numpy", _set(q=lambda t: t.numpy()), TypeError, r"q: expected a torch.Tensor"),
        ("q-int", _set(q=lambda t: t.int()), TypeError, r"q: expected a real floating"),
        ("q-3d", _set(q=lambda t: t[0]), ValueError, r"q: expected a 4-D"),
        ("k-shape", _set(k=lambda t: t[..., :3]), ValueError, r"k: expected shape \(2, 4, 5, 5\) like q"),
        ("k-dtype", _set(k=lambda t: t.double()), TypeError, r"k: expected dtype torch.float32 like q"),
        ("v-meta", _set(v=lambda t: t.to("meta")), ValueError, r"v: expected a tensor on cpu"),
        ("v-5d", _set(v=lambda t: t[:, :, :, :, None]), ValueError, r"v: expected a 4-D"),
        ("rel-shape", _set(rel=lambda t: t[:, :4]), ValueError, r"rel: expected shape \(4, 9\)"),
        ("rel-half", _set(rel=lambda t: t.half()), TypeError, r"rel: expected float32, float64 or q's dtype"),
        ("rel-long", _set(rel=lambda t: t.long()), TypeError, r"rel: expected a real floating"),
        ("rel-3d", _set(rel=lambda t: t[None]), ValueError, r"rel: expected a 2-D"),
        ("K-even", _set(kernel_size=4), ValueError, r"kernel_size: expected an odd int >= 1, got 4"),
        ("K-zero", _set(kernel_size=0), ValueError, r"kernel_size: expected an odd int"),
        ("K-float", _set(kernel_size=3.0), ValueError, r"kernel_size: expected an odd int"),
        ("K-bool", _set(kernel_size=True), ValueError, r"kernel_size: expected an odd int"),
        ("empty-map", _set(**{n: torch.empty(2, 4, 0, 5) for n in "qkv"}), ValueError, r"q: expected H, W >= 1"),
    ],
    skip_backend=_la_skip,
)


# ------------------------------------------------------------------------------------- spectral family
def _real_of(cdtype):
    return torch.float64 if cdtype == torch.complex128 else torch.float32


def _channels_last_stride(shape):
    return torch.empty(shape, memory_format=torch.channels_last).stride()


def _spectral_make_args(depthwise):
    """case (B, C, O, H, K, mask, xf's layout) -> (xf, w, mask): xf (B, C, H, K) and w ((C, H, K) for
    global_filter, (C, O, H, K) for spectral_conv) random complex of dtype, mask (H, K) in [0, 1) real
    (or None); all leaves that require grad. xf takes `layout`, or the case's for the `contiguous` sweep;
    w and mask take it too, but sliced where xf is channels_last (3-D w has no channels_last)."""
    def make_args(case, dtype, layout, device, gen):
        b, c, o, h, k, use_mask, case_layout = case
        layout = case_layout if layout == "contiguous" else layout
        wl = "sliced" if layout == "channels_last" else layout
        xf = in_layout(crandn(b, c, h, k, dtype=dtype, generator=gen).to(device), layout)
        w = crandn(*((c, h, k) if depthwise else (c, o, h, k)), dtype=dtype, generator=gen).to(device)
        w = in_layout(w, wl)
        mask = None
        if use_mask:
            mask = in_layout(torch.rand(h, k, generator=gen, dtype=torch.float64).to(device, _real_of(dtype)), wl)
        return tuple(t.requires_grad_() if t is not None else None for t in (xf, w, mask)), {}

    return make_args


def _spectral_case_id(c):
    b, ch, o, h, k, use_mask, layout = c
    return "x".join(map(str, (b, ch, o, h, k))) + ("-mask" if use_mask else "") + ("-cl" if layout != "contiguous" else "")


def _gf_out_layout(args):
    """global_filter keeps a channels-last xf's layout (GFNet's (B, H, K, C) storage); other layouts
    are not checked."""
    xf = args[0]
    if not xf.is_contiguous() and xf.is_contiguous(memory_format=torch.channels_last):
        return _channels_last_stride(xf.shape)
    return None


def _spectral_grad_names(args):
    return ["xf", "w", "mask"][:sum(t is not None for t in args)]


def _gf_opcheck_args(gen):
    ops = torch.ops.dctkd_ext
    xf, w = crandn(2, 3, 4, 3, generator=gen), crandn(3, 4, 3, generator=gen)
    mask = torch.rand(4, 3, generator=gen)
    cl = in_layout(xf, "channels_last")
    cases = [(ops.global_filter.default, a) for a in [
        (xf, w, mask), (xf, w, None), (cl, w, mask),
        (xf.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(), None)]]
    g = crandn(2, 3, 4, 3, generator=gen)
    for need in [(True, True), (True, False), (False, True)]:
        cases.append((ops.global_filter_backward.default, (g, xf, w, mask, *need)))
        cases.append((ops.global_filter_backward.default, (in_layout(g, "channels_last"), cl, w, None, *need)))
    return cases


def _sc_opcheck_args(gen):
    ops = torch.ops.dctkd_ext
    xf, w = crandn(2, 3, 4, 3, generator=gen), crandn(3, 5, 4, 3, generator=gen)
    mask = torch.rand(4, 3, generator=gen)
    cases = [(ops.spectral_conv.default, (xf, w, mask)),
             (ops.spectral_conv.default, (xf.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(),
                                          None))]
    g = crandn(2, 5, 4, 3, generator=gen)
    for need in [(True, True), (True, False), (False, True)]:
        cases.append((ops.spectral_conv_backward.default, (g, xf, w, mask, *need)))
    return cases


def _spectral_bad_args(gen):
    return dict(xf=crandn(2, 3, 4, 3, generator=gen), w=crandn(3, 4, 3, generator=gen), mask=None)


def _complex32(t):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
        return t.to(torch.complex32)


def _spectral_sweep(shapes, layouts=("contiguous",)):
    return [(*s, m, lay) for lay in layouts for s in shapes for m in (False, True)]


SPECTRAL_DTYPES = [torch.complex64, torch.complex128]

GLOBAL_FILTER = Family(
    name="global_filter",
    op=dctkd_ext.global_filter,
    reference=reference.global_filter,
    make_args=_spectral_make_args(depthwise=True),
    # (B, C, O (unused), H, K, mask, xf's layout)
    cases=_spectral_sweep([(3, 5, 0, 7, 4)], ("contiguous", "channels_last")),
    case_id=_spectral_case_id,
    dtypes=SPECTRAL_DTYPES,
    layouts=["contiguous", "channels_last", "sliced", "transposed"],
    layout_case=(4, 6, 0, 5, 3, True, "contiguous"),
    layout_dtypes=SPECTRAL_DTYPES,
    out_layout=_gf_out_layout,
    grad_names=_spectral_grad_names,
    # one product per element (dw, dmask: sums over a few samples): the same bound on every backend
    backend_factor={},
    gradcheck_dtype=torch.complex128,
    gradcheck_cases=[((2, 3, 0, 3, 2, True, "contiguous"), "contiguous"),
                     ((2, 3, 0, 3, 2, False, "contiguous"), "contiguous"),
                     ((2, 3, 0, 3, 2, True, "contiguous"), "channels_last")],
    opcheck_args=_gf_opcheck_args,
    compile_dtype=torch.complex64,
    compile_case=((2, 3, 0, 7, 4, True, "contiguous"), "channels_last"),
    bad_args=_spectral_bad_args,
    bad_call=lambda a: dctkd_ext.global_filter(**a),
    bad_inputs=[  # (id, change, exception, message)
        ("xf-real", _set(xf=lambda t: t.real.contiguous()), TypeError, r"xf: expected a complex64.*float32.*rfft2"),
        ("xf-complex32", _set(xf=_complex32), TypeError, r"xf: expected a complex64"),
        ("xf-3d", _set(xf=lambda t: t[0]), ValueError, r"xf: expected a 4-D"),
        ("xf-list", _set(xf=[1.0]), TypeError, r"xf: expected a .*got list"),
        ("w-shape", _set(w=lambda t: t[..., :2]), ValueError, r"w: expected shape \(3, 4, 3\)"),
        ("w-complex128", _set(w=lambda t: t.to(torch.complex128)), TypeError, r"w: expected dtype torch.complex64"),
        ("w-real", _set(w=lambda t: t.real.contiguous()), TypeError, r"w: expected a complex64"),
        ("w-meta", _set(w=lambda t: t.to("meta")), ValueError, r"w: expected a tensor on cpu like xf, got one on meta"),
        ("mask-shape", _set(mask=torch.ones(4, 4)), ValueError, r"mask: expected shape \(4, 3\)"),
        ("mask-complex", _set(mask=torch.ones(4, 3, dtype=torch.complex64)), TypeError, r"mask: expected a real"),
    ],
)

SPECTRAL_CONV = Family(
    name="spectral_conv",
    op=dctkd_ext.spectral_conv,
    reference=reference.spectral_conv,
    make_args=_spectral_make_args(depthwise=False),
    # (B, C, O, H, K, mask, xf's layout): small; odd counts past the vector tails; 1x1
    cases=_spectral_sweep([(3, 5, 6, 7, 4), (9, 17, 10, 5, 3), (1, 1, 1, 1, 1)]),
    case_id=_spectral_case_id,
    dtypes=SPECTRAL_DTYPES,
    layouts=["contiguous", "channels_last", "sliced", "transposed"],
    layout_case=(4, 6, 5, 5, 3, True, "contiguous"),
    layout_dtypes=SPECTRAL_DTYPES,
    grad_names=_spectral_grad_names,
    # a sum over C per output (tiles and tl.dot on Triton): twice the bound, on every backend
    factor=2.0,
    backend_factor={},
    gradcheck_dtype=torch.complex128,
    gradcheck_cases=[((2, 3, 2, 3, 2, True, "contiguous"), "contiguous"),
                     ((2, 3, 2, 3, 2, False, "contiguous"), "contiguous")],
    opcheck_args=_sc_opcheck_args,
    compile_dtype=torch.complex64,
    compile_case=((2, 3, 4, 7, 4, True, "contiguous"), "contiguous"),
    bad_args=lambda gen: dict(_spectral_bad_args(gen), w=crandn(3, 5, 4, 3, generator=gen)),
    bad_call=lambda a: dctkd_ext.spectral_conv(**a),
    bad_inputs=[
        ("xf-real", _set(xf=lambda t: t.real.contiguous()), TypeError, r"xf: expected a complex64"),
        ("w-shape", _set(w=lambda t: t[:2]), ValueError, r"w: expected shape \(3, \*, 4, 3\)"),
        ("w-3d", _set(w=lambda t: t[:, 0]), ValueError, r"w: expected a 4-D"),
        ("mask-shape", _set(mask=torch.ones(3)), ValueError, r"mask: expected shape \(4, 3\)"),
        ("mask-meta", _set(mask=torch.ones(4, 3, device="meta")), ValueError,
         r"mask: expected a tensor on cpu like xf, got one on meta"),
    ],
)


# ------------------------------------------------------------------------------------- fam_layer family
# the family's module (the attribute dctkd_ext.ops.fam_layer is the function it exports)
fam_layer_ops = importlib.import_module("dctkd_ext.ops.fam_layer")
FAM_LAYER_PARAMS = ("x", "weights1", "w0_weight", "w0_bias", "rate1", "rate2")


def fam_layer_inputs(b, cin, cout, h, w, gen, dtype=torch.float64, bias=True, device="cpu"):
    """x (B, I, H, W), weights1 (I, O, H, W) complex, w0_weight (O, I, 1, 1), w0_bias (O,) (or None),
    rate1, rate2 (1,): random, in dtype (its complex for weights1), leaves that require grad."""
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    x = torch.randn(b, cin, h, w, dtype=torch.float64, generator=gen).to(dtype)
    w1 = torch.view_as_complex(torch.randn(cin, cout, h, w, 2, dtype=torch.float64, generator=gen)).to(cdt)
    w0 = torch.randn(cout, cin, 1, 1, dtype=torch.float64, generator=gen).to(dtype)
    b0 = torch.randn(cout, dtype=torch.float64, generator=gen).to(dtype) if bias else None
    r1 = torch.randn(1, dtype=torch.float64, generator=gen).to(dtype)
    r2 = torch.randn(1, dtype=torch.float64, generator=gen).to(dtype)
    return [t.to(device).requires_grad_() if t is not None else None for t in (x, w1, w0, b0, r1, r2)]


def fam_layer_authors(x, w1, w0, b0, r1, r2, cuton):
    """The authors' formulation: their module's code for square maps; for rectangular ones the same
    full-plane function (fft2 -> einsum -> high-pass mask -> ifft2 real, plus the 1x1 conv)."""
    if x.shape[-2] == x.shape[-1] and b0 is not None:
        return reference.released_fam_forward(x, w1, w0, b0, r1, r2, cuton)
    return r1 * reference.fam_global(x, w1, cuton) + r2 * F.conv2d(x, w0, b0)


def fam_layer_rate_terms(x, w1, w0, b0, r1, r2, cuton, upstream):
    """The rates' gradients are sums over every output element of upstream * branch, with cancellation:
    {name: sum |upstream * branch|}, the scale of their rounding error (float64 CPU tensors)."""
    with torch.no_grad():
        return {"rate1": (upstream * reference.fam_global(x, w1, cuton)).abs().sum().item(),
                "rate2": (upstream * F.conv2d(x, w0, b0)).abs().sum().item()}


def _fl_make_args(case, dtype, layout, device, gen):
    b, cin, cout, h, w, cuton, bias = case
    return (*fam_layer_inputs(b, cin, cout, h, w, gen, dtype, bias, device), cuton), {}


def _fl_grad_names(args):
    return [n for n, t in zip(FAM_LAYER_PARAMS, args) if t is not None]


def _fl_skip(name):
    from dctkd_ext import _backend

    if name == "triton" and not _backend.triton_installed():
        return "triton is not installed"
    return None


def _fl_opcheck_args(gen):
    ops = torch.ops.dctkd_ext
    cases = []
    for bias in (True, False):
        args = fam_layer_inputs(2, 3, 2, 6, 5, gen, dtype=torch.float32, bias=bias)
        cases.append((ops.fam_layer.default, (*args, 0.5, False)))
        d = [t.detach() if t is not None else None for t in args]
        cases.append((ops.fam_layer_forward.default, (*d, 0.5)))
        g = torch.randn(2, 2, 6, 5, generator=gen)
        cases.append((ops.fam_layer_backward.default, (g, *d, 0.5, [True, True, True, bias, True, True])))
        cases.append((ops.fam_layer_backward.default, (g, *d, 0.5, [False, True, False, False, True, False])))
    return cases


def _fl_bad_args(gen):
    names = ("x", "weights1", "w0_weight", "w0_bias", "rate1", "rate2")
    return dict(zip(names, (t.detach() for t in fam_layer_inputs(2, 3, 4, 6, 6, gen, dtype=torch.float32))))


FAM_LAYER = Family(
    name="fam_layer",
    op=fam_layer_ops.fam_layer,
    reference=fam_layer_authors,
    make_args=_fl_make_args,
    # (B, I, O, H, W, cuton, bias): square (the authors' module) and rectangular maps (their function),
    # odd and even sizes, a mask that cuts frequencies, no bias
    cases=[(3, 4, 3, 8, 8, 0.5, True), (3, 4, 3, 7, 7, 0.25, True), (2, 3, 5, 6, 5, 0.5, True),
           (2, 3, 5, 8, 8, 0.5, False), (1, 2, 2, 1, 1, 1.0, True)],
    case_id=lambda c: "x".join(map(str, c[:5])) + f"-c{c[5]}" + ("" if c[6] else "-nobias"),
    dtypes=[torch.float32, torch.float64],
    grad_names=_fl_grad_names,
    # a spectral GEMM over I and 2-D transforms: 5 times the bound on the output; the parameters'
    # gradients are sums over the batch and every frequency or pixel: 50; the rates' are one sum each,
    # with cancellation, held also to SUM_TOL of their summands' magnitudes (grad_terms)
    factor=5.0,
    grad_factor=50.0,
    grad_terms=lambda args, kwargs, upstream: fam_layer_rate_terms(*args, upstream),
    backend_factor={},
    gradcheck_cases=[((2, 2, 3, 5, 4, 0.5, True), "contiguous")],
    gradcheck_kwargs=dict(eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=False),
    opcheck_args=_fl_opcheck_args,
    compile_case=((2, 3, 4, 8, 8, 0.5, True), "contiguous"),
    bad_args=_fl_bad_args,
    bad_call=lambda a: fam_layer_ops.fam_layer(**a),
    bad_inputs=[  # (id, change, exception, message)
        ("x-int", _set(x=lambda t: t.to(torch.int32)), TypeError, r"x"),
        ("x-3d", _set(x=lambda t: t[0]), ValueError, r"x"),
        ("weights1-real", _set(weights1=lambda t: t.real), TypeError, r"weights1"),
        ("weights1-shape", _set(weights1=lambda t: t[:, :, :5]), ValueError, r"weights1"),
        ("w0_weight-shape", _set(w0_weight=lambda t: t[:3]), ValueError, r"w0_weight"),
        ("w0_bias-shape", _set(w0_bias=lambda t: t[:2]), ValueError, r"w0_bias"),
        ("rate1-shape", _set(rate1=lambda t: t.expand(2)), ValueError, r"rate1"),
        ("cuton-1.5", _set(cuton=1.5), ValueError, r"cuton"),
    ],
    skip_backend=_fl_skip,
)


# the half-plane weight of the FAM layer: each output one sum of two products (exact to about one
# rounding), held to 1e-14 in complex128
spectral_ops = importlib.import_module("dctkd_ext.ops.spectral")
FAM_HALF_WEIGHT_SHAPES = [(1, 1), (2, 2), (7, 7), (8, 8), (20, 20), (21, 21), (6, 9)]


def _fhw_make_args(case, dtype, layout, device, gen):
    (h, w), cuton = case
    t = in_layout(crandn(3, 2, h, w, dtype=dtype, generator=gen).to(device), layout)
    return (t.requires_grad_(), cuton), {}


def _fhw_opcheck_args(gen):
    ops = torch.ops.dctkd_ext
    cases = []
    for h, w in FAM_HALF_WEIGHT_SHAPES:
        t = crandn(3, 2, h, w, dtype=torch.complex128, generator=gen).requires_grad_()
        cases.append((ops.fam_half_weight.default, (t, 0.3)))
        cases.append((ops.fam_half_weight_backward.default, (crandn(2, h, w // 2 + 1, generator=gen), 0.3, w)))
    return cases


FAM_HALF_WEIGHT = Family(
    name="fam_half_weight",
    op=spectral_ops.fam_half_weight,
    reference=reference.fam_half_weight,
    make_args=_fhw_make_args,
    cases=[(s, c) for s in FAM_HALF_WEIGHT_SHAPES for c in (0.0, 0.1, 0.5, 1.0)],  # ((H, W), cuton)
    case_id=lambda c: "x".join(map(str, c[0])) + f"-c{c[1]}",
    dtypes=[torch.complex128],
    layouts=["contiguous", "sliced", "transposed"],
    layout_case=((8, 8), 0.5),
    layout_dtypes=[torch.complex128],
    grad_names=["weights"],
    factor=1e-4,  # ACC_TOL[float64] * 1e-4 = 1e-14
    backend_factor={},
    gradcheck_dtype=torch.complex128,
    gradcheck_cases=[(((5, 5), 0.5), "contiguous")],
    opcheck_args=_fhw_opcheck_args,
    compile_dtype=torch.complex64,
    compile_case=(((8, 8), 0.5), "contiguous"),
    bad_args=lambda gen: dict(weights=crandn(3, 4, 4, generator=gen), cuton=0.5),
    bad_call=lambda a: spectral_ops.fam_half_weight(**a),
    bad_inputs=[("cuton-negative", _set(cuton=-0.1), ValueError, r"cuton: expected a number in \[0, 1\]"),
                ("cuton-above-1", _set(cuton=1.5), ValueError, r"cuton: expected a number in \[0, 1\]")],
)
