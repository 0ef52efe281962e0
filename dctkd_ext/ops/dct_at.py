"""attention_map, dct2d / idct2d and the multi-level dct_at_loss (docs/DESIGN.md §3.1-3.3): argument checks,
fake kernels, autograd, backend choice. The kernels are torch.ops.dctkd_ext.* (CPU/CUDA, from csrc/)
and dctkd_ext/triton/; the reference is dctkd_ext/reference.py."""

import math
from typing import Optional, Sequence

import torch

from .. import _backend, reference
from .._dtypes import acc_dtype as _acc_dtype
from ..presets import REDUCTIONS, resolve_options
from ._checks import check_finite_enabled, check_real_float, check_same_device, report_non_finite
from ._higher_order import grads_through, wants_graph

_ops = torch.ops.dctkd_ext
_FAMILY = "dct_at"


# ------------------------------------------------------------------------------ fake (meta) kernels
@torch.library.register_fake("dctkd_ext::attention_map")
def _(x, p, reduce):
    b, _, h, w = x.shape
    return x.new_empty((b, h, w), dtype=_acc_dtype(x))


def kernel_layout_like(x):
    """The layout the kernels write gradients in: channels_last when x is, else NCHW-contiguous
    (any other stride pattern is copied to NCHW first)."""
    cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(x, memory_format=torch.channels_last if cl else torch.contiguous_format)


@torch.library.register_fake("dctkd_ext::attention_map_backward")
def _(grad, x, p, reduce):
    return kernel_layout_like(x)


@torch.library.register_fake("dctkd_ext::dct2d")
def _(a):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


@torch.library.register_fake("dctkd_ext::idct2d")
def _(c):
    return torch.empty_like(c, memory_format=torch.contiguous_format)


@torch.library.register_fake("dctkd_ext::dct_at_loss")
def _(student, teacher, weights, p, map_norm, center, transform, coef_abs, coef_norm, distance, eps):
    acc = _acc_dtype(*student, *teacher)
    b = student[0].shape[0]
    loss = student[0].new_empty((b,), dtype=acc)
    return loss, [s.new_empty((s.shape[0], s.shape[2], s.shape[3]), dtype=acc) for s in student]


@torch.library.register_fake("dctkd_ext::dct_at_loss_fused")
def _(student, teacher, weights, p, map_norm, center, transform, coef_abs, coef_norm, distance, eps, grad_scale):
    acc = _acc_dtype(*student, *teacher)
    b = student[0].shape[0]
    loss = student[0].new_empty((b,), dtype=acc)
    grad_maps = [s.new_empty((s.shape[0], s.shape[2], s.shape[3]), dtype=acc) for s in student]
    d_student = [] if grad_scale is None else [kernel_layout_like(s) for s in student]
    return loss, grad_maps, d_student


@torch.library.register_fake("dctkd_ext::dct_at_loss_backward")
def _(grad_loss, grad_maps, student, p):
    return [kernel_layout_like(s) for s in student]


# ------------------------------------------------------------------------------------------ autograd
_OPTION_NAMES = ("p", "map_norm", "center", "transform", "coef_abs", "coef_norm", "distance", "eps")


def _save_loss_options(ctx, inputs) -> None:
    """What a differentiable backward needs besides the student: the teacher and the options."""
    ctx.teacher, ctx.weights = list(inputs[1]), list(inputs[2])
    ctx.options = dict(zip(_OPTION_NAMES, inputs[3:11]))


def _loss_grads_through_reference(ctx, student, grad_loss):
    """The student's gradient as a graph (create_graph=True), through the float formulation."""

    def formula(*s):
        return reference.dct_at_loss(list(s), ctx.teacher, weights=ctx.weights, reduction="none", **ctx.options)

    return grads_through(formula, student, [True] * len(student), grad_loss)


def register_autograd(ns: str) -> None:
    """Register the backward formulas of the op family on the ops of namespace `ns` (torch.ops.<ns>):
    the C++ ops ("dctkd_ext") and the Triton ops ("dctkd_ext_triton", same schemas) share them."""
    ops = getattr(torch.ops, ns)

    def attention_map_setup(ctx, inputs, output):
        x, p, reduce = inputs
        ctx.save_for_backward(x)
        ctx.p, ctx.reduce = p, reduce

    def attention_map_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if wants_graph():  # create_graph=True: a backward that can be differentiated again
            (dx,) = grads_through(lambda x: reference.attention_map(x, ctx.p, ctx.reduce), [x], [True], grad)
            return dx, None, None
        return ops.attention_map_backward(grad, x, ctx.p, ctx.reduce), None, None

    torch.library.register_autograd(
        f"{ns}::attention_map", attention_map_backward, setup_context=attention_map_setup
    )

    # The orthonormal DCT and its inverse are each other's transpose, hence each other's backward
    # (differentiable again as it is: the op is linear).
    torch.library.register_autograd(
        f"{ns}::dct2d", lambda ctx, g: ops.idct2d(g), setup_context=lambda ctx, inputs, output: None
    )
    torch.library.register_autograd(
        f"{ns}::idct2d", lambda ctx, g: ops.dct2d(g), setup_context=lambda ctx, inputs, output: None
    )

    def loss_setup(ctx, inputs, output):
        student, _teacher, _weights, p = inputs[:4]
        _loss, grad_maps = output
        ctx.save_for_backward(*grad_maps, *student)
        ctx.levels, ctx.p = len(student), p
        _save_loss_options(ctx, inputs)
        # The map-gradient outputs are never differentiated: no zero tensors for their gradients.
        ctx.set_materialize_grads(False)

    def loss_backward(ctx, grad_loss, _grad_of_grad_maps):
        if grad_loss is None:
            return ([None] * ctx.levels, [None] * ctx.levels) + (None,) * 9
        saved = ctx.saved_tensors
        grad_maps, student = list(saved[: ctx.levels]), list(saved[ctx.levels :])
        if wants_graph():  # create_graph=True: a backward that can be differentiated again
            d_student = _loss_grads_through_reference(ctx, student, grad_loss)
        else:
            d_student = ops.dct_at_loss_backward(grad_loss, grad_maps, student, ctx.p)
        # student, teacher (a constant), then the non-tensor options
        return (d_student, [None] * ctx.levels) + (None,) * 9

    torch.library.register_autograd(f"{ns}::dct_at_loss", loss_backward, setup_context=loss_setup)


_backend.register_family(_FAMILY, register_autograd)


def _traced(t: torch.Tensor) -> bool:
    """Whether t is a stand-in of a trace (torch.compile, make_fx, opcheck): no value to look at."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


# Autograd of dctkd_ext::dct_at_loss_fused (CPU): the forward already wrote dS for the upstream
# gradient grad_scale. When the upstream gradient is exactly grad_scale (compared on the host: the
# CPU holds both), the backward hands dS over without touching it; otherwise (another upstream
# gradient, or a trace) it runs the two-pass backward from the saved map gradients.
def _fused_setup(ctx, inputs, output):
    student, p, grad_scale = inputs[0], inputs[3], inputs[11]
    _loss, grad_maps, d_student = output
    ctx.levels, ctx.p, ctx.fused = len(student), p, len(d_student) > 0
    ctx.save_for_backward(*grad_maps, *student, *d_student, grad_scale)
    _save_loss_options(ctx, inputs)
    # The gradient outputs are never differentiated: no zero tensors (as large as S) for them.
    ctx.set_materialize_grads(False)


def _fused_saved(ctx):
    """What _fused_setup saved: (grad_maps, student, d_student, grad_scale)."""
    n, saved = ctx.levels, ctx.saved_tensors
    return list(saved[:n]), list(saved[n : 2 * n]), list(saved[2 * n : -1]), saved[-1]


def _hand_over(d_student, ratio=1.0):
    """The saved dS as the student's gradient, times `ratio` (a float or a (B, 1, 1, 1) tensor). A
    retained graph may run the backward again: then .grad must not share dS's memory (the next
    accumulation into .grad would change the saved dS), and dS must not be scaled in place."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    shared = keep_graph is None or keep_graph()
    if _is_one(ratio):
        return [d.clone() for d in d_student] if shared else d_student
    if shared:
        return [d * _as_factor(ratio, d) for d in d_student]
    return [d.mul_(_as_factor(ratio, d)) for d in d_student]


def _fused_backward(ctx, grad_loss, _grad_of_grad_maps=None, _grad_of_d_student=None):
    n = ctx.levels
    if grad_loss is None:
        return ([None] * n, [None] * n) + (None,) * 10
    grad_maps, student, d_student, grad_scale = _fused_saved(ctx)
    if wants_graph():  # create_graph=True: a backward that can be differentiated again
        d_student = _loss_grads_through_reference(ctx, student, grad_loss)
    elif ctx.fused and not _traced(grad_loss) and torch.equal(grad_loss, grad_scale):
        d_student = _hand_over(d_student)
    else:
        d_student = _ops.dct_at_loss_backward(grad_loss, grad_maps, student, ctx.p)
    # student, teacher (a constant), the non-tensor options, grad_scale
    return (d_student, [None] * n) + (None,) * 10


torch.library.register_autograd("dctkd_ext::dct_at_loss_fused", _fused_backward, setup_context=_fused_setup)


# Eager calls (what training runs) go through these autograd.Functions with the registered
# setup / backward above: torch.library's autograd wrapper flattens the arguments with pytree,
# refills defaults and redispatches in Python on every call, about 0.2 ms a call on a CPU, a
# visible share of a loss that takes a few milliseconds. Traces (torch.compile, make_fx, opcheck)
# see the registered ops.
def _below_autograd():
    return torch._C._AutoDispatchBelowAutograd()


class _FusedLossEager(torch.autograd.Function):
    """The eager fused loss up to its reduced value: op, sample weights, reduction (docs/DESIGN.md §3.3,
    "the upstream gradient"). The forward wrote dS for the upstream gradient `guess` of the returned
    loss; the backward sees the real one and hands dS over (equal), scales it (another scalar, or a
    per-sample factor with reduction="none"), or runs the pass over S (where scaling cannot be exact)."""

    @staticmethod
    def forward(ctx, rest, tail, *student):
        sample_weight, reduction, key, guess, check_finite = tail
        inputs = (list(student), *rest)
        with _below_autograd():
            output = _ops.dct_at_loss_fused(*inputs)
        _fused_setup(ctx, inputs, output)
        ctx.sample_weight, ctx.reduction, ctx.key, ctx.guess = sample_weight, reduction, key, guess
        per_sample = output[0]
        if check_finite:
            _check_loss_finite(per_sample, student, inputs[1])
        return _weight_and_reduce(per_sample, sample_weight, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        n = ctx.levels
        if grad_out is None:
            return (None, None) + (None,) * n
        grad_maps, student, d_student, grad_scale = _fused_saved(ctx)
        sw, b = ctx.sample_weight, student[0].shape[0]
        if ctx.reduction == "none":
            upstream = grad_out if sw is None else grad_out * sw.to(grad_out.dtype)
            ratio = None
            if torch.equal(upstream, grad_scale):
                ratio = 1.0
            elif bool((grad_scale != 0).all()):
                ratio = (upstream / grad_scale).view(b, 1, 1, 1)
        else:
            u = float(grad_out)
            _remember_upstream(ctx.key, u)
            upstream = _expected_grad(b, grad_scale.dtype, grad_scale.device, sw, ctx.reduction, u)
            ratio = None
            if u == ctx.guess:
                ratio = 1.0
            elif ctx.guess != 0.0 and math.isfinite(u / ctx.guess):
                ratio = u / ctx.guess
        if wants_graph():  # create_graph=True: a backward that can be differentiated again
            d_student = _loss_grads_through_reference(ctx, student, upstream)
        elif ratio is None or not (_is_one(ratio) or _exact_scaling(ratio, d_student)):
            d_student = _ops.dct_at_loss_backward(upstream, grad_maps, student, ctx.p)
        else:
            d_student = _hand_over(d_student, ratio)
        return (None, None, *d_student)


def _is_one(ratio) -> bool:
    return isinstance(ratio, float) and ratio == 1.0


def _as_factor(ratio, d: torch.Tensor):
    return ratio if isinstance(ratio, float) else ratio.to(d.dtype)


def _exact_scaling(ratio, d_student) -> bool:
    """Whether scaling the written dS by `ratio` is as exact as writing it again: always for float32
    / float64 gradients (one more rounding, at their precision), for half-precision gradients only by
    a power of two."""
    if all(d.dtype in (torch.float32, torch.float64) for d in d_student):
        return True
    if isinstance(ratio, float):
        return math.frexp(ratio)[0] in (0.5, -0.5)
    return False


# The last scalar upstream gradient seen per call signature (shapes, dtypes, options, weights,
# reduction): the next forward writes dS for it, so a constant loss weight applied outside the op
# (`ce + w * loss`) or a GradScaler's scale costs nothing after the first step. Bounded, CPU only.
_UPSTREAM_SEEN: "dict[tuple, float]" = {}
_UPSTREAM_SEEN_MAX = 64


def _remember_upstream(key, u: float) -> None:
    if not math.isfinite(u):
        return
    _UPSTREAM_SEEN.pop(key, None)
    _UPSTREAM_SEEN[key] = u
    while len(_UPSTREAM_SEEN) > _UPSTREAM_SEEN_MAX:
        _UPSTREAM_SEEN.pop(next(iter(_UPSTREAM_SEEN)))


def _upstream_key(student, teacher, weights, opts, sample_weight, reduction) -> tuple:
    return (
        tuple(tuple(s.shape) for s in student), tuple(s.dtype for s in student), tuple(t.dtype for t in teacher),
        tuple(float(w) for w in weights), tuple(sorted(opts.items())), sample_weight is None, reduction,
    )


def _weight_and_reduce(per_sample, sample_weight, reduction):
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(per_sample.dtype)
    if reduction == "mean":
        # an empty batch (e.g. a filtered last batch) adds nothing: 0, not the NaN of an empty mean
        return per_sample.mean() if per_sample.numel() else per_sample.sum()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_loss_finite(per_sample, student, teacher) -> None:
    if not bool(torch.isfinite(per_sample.detach()).all()):
        report_non_finite(
            [(f"student_feats[{l}]", s) for l, s in enumerate(student)]
            + [(f"teacher_feats[{l}]", t) for l, t in enumerate(teacher)]
        )


class _Dct2dEager(torch.autograd.Function):
    """dct2d (inverse=False) or idct2d of a on the kernels `ops`; each is the other's backward."""

    @staticmethod
    def forward(ctx, a, inverse, ops):
        ctx.inverse, ctx.ops = inverse, ops
        with _below_autograd():
            return (ops.idct2d if inverse else ops.dct2d)(a)

    @staticmethod
    def backward(ctx, g):
        op = ctx.ops.dct2d if ctx.inverse else ctx.ops.idct2d
        if wants_graph():  # through the registered op, differentiable again
            return op(g), None, None
        with _below_autograd():
            return op(g), None, None


# --------------------------------------------------------------------------------------- public API
def attention_map(x: torch.Tensor, p: float = 2.0, reduce: str = "mean") -> torch.Tensor:
    """Channel-reduced attention map of features x (B, C, H, W) -> (B, H, W), float32 (float64 for
    float64 x): (1/C) sum_c |x|^p, or the plain sum with reduce="sum". Differentiable in x."""
    check_real_float(x, "x", ndim=4, layout_hint="(B, C, H, W) ")
    if x.shape[1] == 0:
        raise ValueError(f"x: expected at least one channel, got shape {tuple(x.shape)}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        raise ValueError(f"p: expected a positive number, got {p!r}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce: expected 'mean' or 'sum', got {reduce!r}")
    backend, ops = _backend.run_on(x.device, _FAMILY)
    if backend == "reference":
        return reference.attention_map(x, float(p), reduce)
    return ops.attention_map(x, float(p), reduce)


def _check_map(a: torch.Tensor, name: str) -> None:
    check_real_float(a, name, min_ndim=2, layout_hint="(..., H, W)")
    if a.shape[-1] == 0 or a.shape[-2] == 0:
        raise ValueError(f"{name}: expected H, W >= 1, got shape {tuple(a.shape)}")


def dct2d(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2D DCT-II over the last two dims (scipy.fft.dctn(a, type=2, norm="ortho", axes=(-2, -1))).
    Any H, W >= 1; any leading dims; returns a's dtype, computed in fp32 (fp64 for fp64)."""
    _check_map(a, "a")
    backend, ops = _backend.run_on(a.device, _FAMILY)
    if backend == "reference":
        return reference.dct2d(a)
    if _traced(a):
        return ops.dct2d(a)
    return _Dct2dEager.apply(a, False, ops)


def idct2d(c: torch.Tensor) -> torch.Tensor:
    """Inverse of dct2d (orthonormal DCT-III over the last two dims)."""
    _check_map(c, "c")
    backend, ops = _backend.run_on(c.device, _FAMILY)
    if backend == "reference":
        return reference.idct2d(c)
    if _traced(c):
        return ops.idct2d(c)
    return _Dct2dEager.apply(c, True, ops)


def _as_levels(feats, name: str):
    if isinstance(feats, torch.Tensor):
        return [feats]
    if not isinstance(feats, (list, tuple)):
        raise TypeError(f"{name}: expected a list of (B, C, H, W) tensors, got {type(feats).__name__}")
    if len(feats) == 0:
        raise ValueError(f"{name}: expected a non-empty list of (B, C, H, W) tensors, got an empty list")
    return list(feats)


def _check_loss_inputs(student, teacher, weights, sample_weight, reduction):
    student = _as_levels(student, "student_feats")
    teacher = _as_levels(teacher, "teacher_feats")
    if len(student) != len(teacher):
        raise ValueError(
            f"teacher_feats: expected {len(student)} levels to match student_feats, got {len(teacher)}"
        )
    for l, (s, t) in enumerate(zip(student, teacher)):
        check_real_float(s, f"student_feats[{l}]", ndim=4, layout_hint="(B, C, H, W) ")
        check_real_float(t, f"teacher_feats[{l}]", ndim=4, layout_hint="(B, C, H, W) ")
        if s.shape[1] == 0 or t.shape[1] == 0:
            which = "student_feats" if s.shape[1] == 0 else "teacher_feats"
            raise ValueError(f"{which}[{l}]: expected at least one channel")
        if s.shape[0] != student[0].shape[0]:
            raise ValueError(
                f"student_feats[{l}]: expected batch {student[0].shape[0]} like student_feats[0], got {s.shape[0]}"
            )
        if (t.shape[0], t.shape[2], t.shape[3]) != (s.shape[0], s.shape[2], s.shape[3]):
            raise ValueError(
                f"teacher_feats[{l}]: expected (B, H, W) = {(s.shape[0], s.shape[2], s.shape[3])} to match "
                f"student_feats[{l}], got shape {tuple(t.shape)} (channels may differ; pool the larger map "
                f"first if spatial sizes differ)"
            )
    names = [f"student_feats[{l}]" for l in range(len(student))] + [f"teacher_feats[{l}]" for l in range(len(teacher))]
    device = check_same_device(student + teacher, names)
    if weights is None:
        weights = [1.0] * len(student)
    else:
        weights = list(weights.tolist() if isinstance(weights, torch.Tensor) else weights)
        if len(weights) != len(student):
            raise ValueError(f"weights: expected {len(student)} values (one per level), got {len(weights)}")
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in weights):
            raise TypeError(f"weights: expected a sequence of numbers, got {weights!r}")
        weights = [float(w) for w in weights]
    if sample_weight is not None:
        if not isinstance(sample_weight, torch.Tensor):
            raise TypeError(f"sample_weight: expected a (B,) tensor, got {type(sample_weight).__name__}")
        b = student[0].shape[0]
        if sample_weight.shape != (b,):
            raise ValueError(f"sample_weight: expected shape ({b},), got {tuple(sample_weight.shape)}")
        if sample_weight.is_complex():
            raise TypeError(f"sample_weight: expected a real or bool tensor, got {sample_weight.dtype}")
        if sample_weight.device != device:
            raise ValueError(f"sample_weight: expected a tensor on {device}, got one on {sample_weight.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    return student, teacher, weights, device


def _expected_grad(b, dtype, device, sample_weight, reduction, upstream: float = 1.0) -> torch.Tensor:
    """The gradient of the per-sample losses that `loss.backward(upstream)` delivers through the
    sample weights and the reduction below, computed with the same operations autograd uses (mean:
    upstream / B per sample, then times the sample weight), so that the backward can test it for
    equality."""
    g = torch.full((b,), upstream, dtype=dtype, device=device)
    if reduction == "mean":
        g = g / b
    if sample_weight is not None:
        g = g * sample_weight.to(dtype)
    return g


def dct_at_loss(
    student_feats: Sequence[torch.Tensor],
    teacher_feats: Sequence[torch.Tensor],
    *,
    preset: str = "dct",
    weights: Optional[Sequence[float]] = None,
    sample_weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    fused_grad: bool = True,
    **overrides,
) -> torch.Tensor:
    """Multi-level frequency-domain attention distillation loss (docs/DESIGN.md §3.3).

    student_feats / teacher_feats: lists of L feature maps (B, C_l, H_l, W_l); channels may differ
    between student and teacher, B/H/W must match. Gradient flows to the student features only.
    preset: "dct" (default), "fft-abs-max" (the authors' released code, branch dev; also "paper"),
    "fft-real-minmax" (their branch main) or "at" (attention transfer); see dctkd_ext.PRESETS;
    any option (p, map_norm, center, transform, coef_abs, coef_norm, distance, eps) may be overridden.
    weights: per-level weights (default 1). sample_weight: (B,) multiplier of the per-sample losses
    (e.g. (teacher_logits.argmax(1) == labels).float()). reduction: "mean" | "sum" | "none" -> (B,).
    fused_grad: on the CPU, when a student level needs a gradient, write the student's gradient in
    the forward's single pass over the features (T + 2S bytes instead of T + 3S). The forward writes
    it for the upstream gradient the last call with the same shapes and options received (1 at first),
    so `loss.backward()`, `(ce + w * loss).backward()` with a constant w, or a GradScaler's scaled loss
    cost nothing in the backward from the second step on; another scalar (or, with reduction="none",
    per-sample) upstream gradient scales the written gradient in place (half-precision gradients by
    a power of two only, else a pass over S). Weights inside the op (`weights`) keep the upstream at 1
    from the first step. The gradient is held from the forward to the backward (memory of the
    student's features); fused_grad=False
    keeps the two-pass form (map gradients only, a pass over S in the backward). Other backends
    always use the two-pass form.
    """
    opts = resolve_options(preset, overrides)
    student, teacher, weights, device = _check_loss_inputs(
        student_feats, teacher_feats, weights, sample_weight, reduction
    )
    if not isinstance(fused_grad, bool):
        raise TypeError(f"fused_grad: expected a bool, got {fused_grad!r}")
    backend, ops = _backend.run_on(device, _FAMILY)
    if backend == "reference":
        per_sample = reference.dct_at_loss(student, teacher, preset=preset, weights=weights, reduction="none", **overrides)
    else:
        args = (
            student, [t.detach() for t in teacher], weights, opts["p"], opts["map_norm"], opts["center"],
            opts["transform"], opts["coef_abs"], opts["coef_norm"], opts["distance"], opts["eps"],
        )
        need_grad = torch.is_grad_enabled() and any(s.requires_grad for s in student)
        # Under torch.compile the backward cannot look at the upstream gradient: the two-pass form
        # moves the same bytes there without holding dS.
        if fused_grad and need_grad and backend == "cpu" and not torch.compiler.is_compiling():
            if _traced(student[0]):
                grad_scale = _expected_grad(student[0].shape[0], _acc_dtype(*student, *teacher), device,
                                            sample_weight, reduction)
                per_sample, _grad_maps, _d_student = _ops.dct_at_loss_fused(*args, grad_scale)
            elif sample_weight is None or not sample_weight.requires_grad:
                # the upstream gradient of the returned loss is guessed from the last call like this one
                key = _upstream_key(student, teacher, weights, opts, sample_weight, reduction)
                guess = _UPSTREAM_SEEN.get(key, 1.0)
                grad_scale = _expected_grad(student[0].shape[0], _acc_dtype(*student, *teacher), device,
                                            sample_weight, reduction, guess)
                tail = (sample_weight, reduction, key, guess, check_finite_enabled(device))
                return _FusedLossEager.apply((*args[1:], grad_scale), tail, *student)
            else:  # a differentiable sample weight: weighted and reduced by autograd below
                per_sample = ops.dct_at_loss(*args)[0]
        else:
            per_sample, _grad_maps = ops.dct_at_loss(*args)
    if check_finite_enabled(device):
        _check_loss_finite(per_sample, student, teacher)
    return _weight_and_reduce(per_sample, sample_weight, reduction)
