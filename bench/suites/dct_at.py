"""DCT-KD cases: the multi-level dct_at_loss at real stage shapes, plus its ops alone.

Impls: ours (dctkd_ext; on the CPU the single pass that writes the student's gradient in the
forward), ours_two_pass (fused_grad=False), eager_paper (the authors' released formulation, eager and
unfused), eager_reference (dctkd_ext.reference: the DFT written as matmuls), compiled_reference
(torch.compile of that reference). All compute preset="paper" (the released code's math), so the
comparison is like for like. The op "at_loss" is preset="at" against the attention-transfer formula
of RepDistiller / mdistiller / torchdistill, eager (eager_at) and compiled (compiled_at). The case
"<shape>/grad=scale0.37" times ours with a loss weight applied outside the op (upstream 0.37) beside
ours_upstream1 (the same op with upstream 1), in rounds, so that the two are compared in one stretch of time.
"""

import torch

import dctkd_ext
from dctkd_ext import reference

from common import Case, Impl, Prepared

# (channels, H) per stage; H == W. Student and teacher share B/H/W, channels may differ.
SHAPES = {
    # ResNet32x4 -> ResNet8x4 (CIFAR): both networks have these stage shapes
    "cifar_r32x4_r8x4": dict(student=[(64, 32), (128, 16), (256, 8)], teacher=[(64, 32), (128, 16), (256, 8)]),
    # ResNet-50 -> ResNet-18 on 224x224 images
    "r50_r18": dict(student=[(64, 56), (128, 28), (256, 14), (512, 7)],
                    teacher=[(256, 56), (512, 28), (1024, 14), (2048, 7)]),
}


def _feature_bytes(batch, levels, dtype):
    return sum(batch * c * h * h for c, h in levels) * torch.tensor([], dtype=dtype).element_size()


def loss_min_bytes(batch, shape, dtype):
    s = _feature_bytes(batch, shape["student"], dtype)
    t = _feature_bytes(batch, shape["teacher"], dtype)
    # fwd: read S and T; bwd: read S, write dS. fwd+bwd: the single pass reads T and S once and
    # writes dS once (T + 2S); a forward and a separate backward read S twice (T + 3S).
    return {"fwd": s + t, "bwd": 2 * s, "fwd+bwd": t + 2 * s}


def _make_features(batch, shape, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda c, h: torch.randn(batch, c, h, h, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    s = [mk(c, h).requires_grad_() for c, h in shape["student"]]
    t = [mk(c, h) for c, h in shape["teacher"]]
    return s, t


_compiled = {}


def _compiled_fn(key, fn, mode):
    if (key, mode) not in _compiled:
        _compiled[key, mode] = torch.compile(fn, mode=mode) if mode else torch.compile(fn)
    return _compiled[key, mode]


def _compiled_reference(mode):
    return _compiled_fn("paper", lambda s, t: reference.dct_at_loss(s, t, preset="paper"), mode)


def _prep(batch, shape, dtype, device):
    def prep(fn):
        def make():
            s, t = _make_features(batch, shape, dtype, device, seed=len(_compiled) + batch)
            return Prepared(fwd=lambda: fn(s, t), leaves=s)
        return make
    return prep


def loss_impls(batch, shape, dtype, device, compile_mode):
    prep = _prep(batch, shape, dtype, device)
    ours = lambda s, t: dctkd_ext.dct_at_loss(s, t, preset="paper")  # noqa: E731
    two_pass = lambda s, t: dctkd_ext.dct_at_loss(s, t, preset="paper", fused_grad=False)  # noqa: E731
    # The released code runs in fp32 (torch.fft has no bf16): half inputs are cast first, as it must.
    eager_paper = lambda s, t: reference.released_dct_loss(  # noqa: E731
        [x.float() for x in s], [x.float() for x in t])
    eager_ref = lambda s, t: reference.dct_at_loss(s, t, preset="paper")  # noqa: E731
    compiled = lambda s, t: _compiled_reference(compile_mode)(s, t)  # noqa: E731
    impls = [Impl("ours", prep(ours))]
    if device.type == "cuda":  # each GPU backend by name, to set the default from measurements
        for backend in gpu_backends():
            impls.append(Impl(f"ours_{backend}", prep(_on_backend(backend, ours))))
    return impls + [Impl("ours_two_pass", prep(two_pass)), Impl("eager_paper", prep(eager_paper)),
                    Impl("eager_reference", prep(eager_ref)), Impl("compiled_reference", prep(compiled))]


def gpu_backends():
    """The GPU backends this build can run: cuda (if compiled in) and triton (if installed)."""
    out = ["cuda"] if dctkd_ext.BUILD_INFO.get("with_cuda") else []
    try:
        import triton  # noqa: F401

        out.append("triton")
    except ImportError:
        pass
    return out


def _on_backend(backend, fn):
    def run(*args):
        with dctkd_ext.use_backend(backend):
            return fn(*args)
    return run


def at_impls(batch, shape, dtype, device, compile_mode):
    """preset="at" against the AT formula as the distillation libraries write it (their weight aside)."""
    prep = _prep(batch, shape, dtype, device)
    ours = lambda s, t: dctkd_ext.dct_at_loss(s, t, preset="at")  # noqa: E731
    eager_at = lambda s, t: reference.released_at_loss(s, t)  # noqa: E731
    compiled_at = lambda s, t: _compiled_fn("at", reference.released_at_loss, compile_mode)(s, t)  # noqa: E731
    return [Impl("ours", prep(ours)), Impl("eager_at", prep(eager_at)), Impl("compiled_at", prep(compiled_at))]


def op_cases(batch, dtype, device):
    """attention_map and dct2d alone at the largest student stage of r50_r18 (56x56, 64 channels)."""
    c, h = 64, 56
    esize = torch.tensor([], dtype=dtype).element_size()

    def am_make(fn):
        def make():
            x = torch.randn(batch, c, h, h, device=device).to(dtype).requires_grad_()
            return Prepared(fwd=lambda: fn(x), leaves=[x])
        return make

    def dct_make(fn):
        def make():
            a = torch.randn(batch, h, h, device=device).requires_grad_()
            return Prepared(fwd=lambda: fn(a), leaves=[a])
        return make

    xb = batch * c * h * h * esize
    ab = batch * h * h * 4
    # attention_map: fwd reads x, writes A; bwd reads dA and x again, writes dx (two separate ops,
    # so fwd+bwd is their sum: 3x + 2A).
    return [
        Case("attention_map", "r18_stage1", batch, dtype,
             {"fwd": xb + ab, "bwd": 2 * xb + ab, "fwd+bwd": 3 * xb + 2 * ab},
             [Impl("ours", am_make(dctkd_ext.attention_map)),
              Impl("eager_paper", am_make(lambda x: x.float().pow(2).mean(1))),
              Impl("eager_reference", am_make(reference.attention_map))]),
        Case("dct2d", "r18_stage1_maps", batch, torch.float32,
             {"fwd": 2 * ab, "bwd": 2 * ab, "fwd+bwd": 4 * ab},
             [Impl("ours", dct_make(dctkd_ext.dct2d)),
              Impl("eager_reference", dct_make(reference.dct2d))]),
    ]


# The headline cases (`python bench/run.py`; on the CPU also the single ops); --full runs the whole grid.
HEADLINE = {
    "cpu": [("cifar_r32x4_r8x4", 64, torch.float32), ("cifar_r32x4_r8x4", 64, torch.bfloat16),
            ("r50_r18", 16, torch.float32)],
    "cuda": [("cifar_r32x4_r8x4", 64, torch.float32), ("r50_r18", 128, torch.bfloat16)],
}


def cases(args, device):
    gpu = device.type == "cuda"
    compile_mode = getattr(args, "compile_mode", None) or ("max-autotune-no-cudagraphs" if gpu else None)
    full = getattr(args, "full", False)
    if not full:
        grid = list(HEADLINE["cuda" if gpu else "cpu"])
    elif gpu:
        grid = [("r50_r18", b, dt) for dt in (torch.float32, torch.bfloat16) for b in (16, 32, 64, 128, 256)]
        grid += [("cifar_r32x4_r8x4", b, dt) for dt in (torch.float32, torch.bfloat16) for b in (64, 128)]
    else:
        grid = [("cifar_r32x4_r8x4", 64, torch.float32), ("cifar_r32x4_r8x4", 64, torch.bfloat16),
                ("r50_r18", 16, torch.float32)]
    if args.batches:
        grid = [(n, b, dt) for n, _, dt in grid for b in args.batches]
        grid = list(dict.fromkeys(grid))
    if args.dtypes:
        grid = [g for g in grid if str(g[2]).replace("torch.", "") in args.dtypes]
    out = []
    for name, batch, dtype in grid:
        shape = SHAPES[name]
        out.append(Case("dct_at_loss", name, batch, dtype, loss_min_bytes(batch, shape, dtype),
                        loss_impls(batch, shape, dtype, device, compile_mode), extra={"preset": "paper"}))
    # The first case again with a loss weight applied outside the op, `(0.37 * loss).backward()`
    # (as `ce + w * loss` or a GradScaler does), against ours with upstream 1 timed in the same rounds.
    for name, batch, dtype in grid[:1]:
        shape = SHAPES[name]
        impls = [i for i in loss_impls(batch, shape, dtype, device, compile_mode) if i.name.startswith("ours")]
        impls.append(Impl("ours_upstream1", impls[0].make, upstream="ones"))
        out.append(Case("dct_at_loss", f"{name}/grad=scale0.37", batch, dtype, loss_min_bytes(batch, shape, dtype),
                        impls, extra={"preset": "paper"}, upstream="scale=0.37", rounds=True))
    # the at preset against the AT formula: every case of the grid with --full, the first otherwise
    for name, batch, dtype in grid if full else grid[:1]:
        shape = SHAPES[name]
        out.append(Case("at_loss", name, batch, dtype, loss_min_bytes(batch, shape, dtype),
                        at_impls(batch, shape, dtype, device, compile_mode), extra={"preset": "at"}))
    if full or getattr(args, "ops", False) or not gpu:
        out += op_cases(16 if not gpu else 128, torch.float32, device)
    return out
