"""Benchmark suite of the FAM-KD spectral filters (docs/DESIGN.md §3.4, §6).

Cases:
- "fam_layer": the Frequency Attention Module (global + local branch) at each stage of the FAM-KD
  recipes' distillers (the FAM_Module(mid_channel, out_channel, out_shape) of every ABF level):
  CIFAR-100 WRN-40-2 -> WRN-16-2 (32@32, 64@16, 128@8, 128@1), ResNet32x4 -> ResNet8x4 (64@32, 128@16,
  256@8, 256@1), ImageNet ResNet34 -> ResNet18 (64@56, 128@28, 256@14, 512@7, 512@1).
  Impls: "ours" (dctkd_ext.nn.FrequencyAttention, path="auto": the whole layer as one spectral GEMM with
  the 1x1 conv and the rates folded into the frequency weight), "ours_fft" / "ours_fused" (where the
  fused kernel exists: the two paths of ours forced, so that the switch of nn/spectral.py can be set),
  on GPU also "ours_fft_triton" (the FFT path on the Triton kernels instead of the CUDA ones),
  "eager_module" (the authors' formulation, dctkd_ext.reference.ReleasedFAM) and "compiled_module"
  (torch.compile of it); identical parameters (loaded from one state_dict) and inputs.
- "global_filter": the depthwise filter op (ours: dctkd_ext.global_filter) against the eager
  `xf * w * mask` multiply, at GFNet and FAM sizes.
- "spectral_conv": the channel-mixing op (ours: dctkd_ext.spectral_conv) against the eager einsum.
  On GPU both ops also time "ours_triton" (backend "triton"; "ours" is the default backend, CUDA), to
  set DEFAULT_GPU_BACKEND["spectral"] in dctkd_ext/_backend.py from measurements.

Minimal bytes: forward reads x (and the weights) and writes y; backward reads dy, x and the weights
and writes dx and the weight gradient; fwd+bwd is their sum. All fp32 (the FFTs of the module run in
fp32 by design; complex64 for the ops). The headline cases run twice: with ones as the upstream
gradient and with the gradient of a mean-squared-error loss ("/grad=mse": values near 1e-7, where
subnormal intermediates would show).
"""

from typing import List

import torch

import dctkd_ext
from dctkd_ext import reference as R
from dctkd_ext._shapes import FUSED_MAX_SIZE
from dctkd_ext.nn import FrequencyAttention
from dctkd_ext.ops import fam_global as fg

try:  # bench/run.py puts bench/ on sys.path
    from common import Case, Impl, Prepared
except ImportError:  # pragma: no cover  (imported as bench.suites.fam from the repository root)
    from bench.common import Case, Impl, Prepared

# (name, batch of the recipe, [(in_channels, out_channels, size), ...]) — from the FAM-KD configs
FAM_SHAPES = [
    ("cifar_wrn40_2_wrn16_2", 64, [(32, 32, 32), (64, 64, 16), (128, 128, 8), (128, 128, 1)]),
    ("cifar_r32x4_r8x4", 64, [(64, 64, 32), (128, 128, 16), (256, 256, 8), (256, 256, 1)]),
    ("imagenet_r34_r18", 128, [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7), (512, 512, 1)]),
]
# The headline cases (`python bench/run.py`): two wide stages and a narrow one, (name, stage, CPU batch),
# on the GPU at the recipe's batch, and one global_filter case. --full runs every stage (CPU batch 8
# unless --batches) and the ops.
HEADLINE_FAM = [("cifar_r32x4_r8x4", (256, 256, 8), 64), ("imagenet_r34_r18", (256, 256, 14), 32),
                ("cifar_wrn40_2_wrn16_2", (32, 32, 32), 64)]
HEADLINE_GF = ("fam_cifar_64ch_32", 64, 64, 32, 32)
# global_filter / spectral_conv op shapes: (name, batch, channels, H, W) on the rfft half plane of W
GF_SHAPES = [("gfnet_h14_384ch", 128, 384, 14, 14), ("fam_cifar_64ch_32", 64, 64, 32, 32),
             ("fam_imagenet_64ch_56", 128, 64, 56, 56)]
SC_SHAPES = [("fam_cifar_32ch_32", 64, 32, 32, 32), ("fam_cifar_256ch_8", 64, 256, 8, 8),
             ("fam_imagenet_128ch_28", 128, 128, 28, 28)]
CPU_BATCH = 8

F32, C64 = 4, 8  # bytes per element


def _wants_fp32(args) -> bool:
    dtypes = getattr(args, "dtypes", None)
    if not dtypes:
        return True
    names = {str(d).replace("torch.", "") for d in dtypes}
    return bool(names & {"float32", "fp32", "f32"})


def _batches(args, default: int, device: torch.device) -> List[int]:
    batches = getattr(args, "batches", None)
    if batches:
        return [int(b) for b in batches]
    # The recipe's batch on the GPU; on the CPU the small batch, so a full run stays minutes long.
    return [CPU_BATCH] if device.type == "cpu" else [default]


def _fam_bytes(b, cin, cout, s):
    x, y = b * cin * s * s * F32, b * cout * s * s * F32
    weights = cin * cout * s * s * C64 + (cin * cout + cout + 2) * F32
    fwd = x + y + weights
    bwd = y + x + weights + x + weights  # read dy, x, weights; write dx and the weight gradients
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _fam_case(shape_name, b, cin, cout, s, device, allow_compile=True, upstream="ones") -> Case:
    torch.manual_seed(0)
    released = R.ReleasedFAM(cin, cout, s).to(device)
    state = released.state_dict()
    x0 = torch.randn(b, cin, s, s, device=device)

    def prepare(module, backend=None):
        x = x0.detach().clone().requires_grad_()
        fwd = (lambda: module(x)) if backend is None else _with_backend(backend, lambda: module(x))
        return Prepared(fwd=fwd, leaves=[x] + list(module.parameters()))

    def ours(path=None, backend=None):
        def make():
            m = FrequencyAttention(cin, cout, s, path=path).to(device)
            m.load_state_dict(state)
            return prepare(m, backend)

        return make

    def eager():
        m = R.ReleasedFAM(cin, cout, s).to(device)
        m.load_state_dict(state)
        return prepare(m)

    # one compiled function per case, shared by the rotated input sets (parameters passed as inputs)
    compiled_forward = torch.compile(R.released_fam_forward)

    def compiled():
        m = R.ReleasedFAM(cin, cout, s).to(device)
        m.load_state_dict(state)
        p = prepare(m)
        x = p.leaves[0]
        return Prepared(fwd=lambda: compiled_forward(x, m.weights1, m.w0.weight, m.w0.bias, m.rate1, m.rate2, 0.1),
                        leaves=p.leaves)

    impls = [Impl("ours", ours())]
    with torch.device("meta"):
        probe = FrequencyAttention(cin, cout, s)
    fused_ok = (s <= FUSED_MAX_SIZE and fg.fused_available(x0.device)
                and fg.resolve_backend(x0.device) in ("cuda", "triton"))
    if fused_ok:  # both paths forced (on the CPU there is only the FFT path, which "ours" is)
        impls += [Impl("ours_fft", ours("fft")), Impl("ours_fused", ours("fused"))]
    if device.type == "cuda" and _has_triton():
        impls.append(Impl("ours_fft_triton", ours("fft", "triton")))
    impls.append(Impl("eager_module", eager))
    if allow_compile:
        impls.append(Impl("compiled_module", compiled))
    auto_path = probe.choose_path(x0)
    return Case(
        op="fam_layer",
        shape_name=f"{shape_name}:{cin}x{cout}@{s}" + ("" if upstream == "ones" else f"/grad={upstream}"),
        upstream=upstream,
        batch=b,
        dtype=torch.float32,
        min_bytes=_fam_bytes(b, cin, cout, s),
        impls=impls,
        notes="FAM module fwd/bwd: global (FFT filter) + local (1x1 conv) branches; x and all parameters differentiated",
        extra={"in_channels": cin, "out_channels": cout, "size": s, "cuton": 0.1, "ours_path": auto_path},
    )


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _with_backend(name, fn):
    # the backend is chosen when the forward runs; the backward follows the op the forward used
    def run():
        with dctkd_ext.use_backend(name):
            return fn()

    return run


def _with_backend_fn(name, op):
    def run(*args):
        with dctkd_ext.use_backend(name):
            return op(*args)

    return run


def _crandn(*shape, device):
    return torch.randn(*shape, dtype=torch.complex64, device=device)


def _gf_case(name, b, c, h, w, device, upstream="ones") -> Case:
    k = w // 2 + 1
    torch.manual_seed(0)
    xf0, w0 = _crandn(b, c, h, k, device=device), _crandn(c, h, k, device=device)
    mask = R.fam_highpass_mask(h, w, 0.1, torch.float32, device)[:, :k].contiguous()
    n, nw = b * c * h * k * C64, c * h * k * C64

    def make(fn):
        def build():
            xf, wt = xf0.clone().requires_grad_(), w0.clone().requires_grad_()
            return Prepared(fwd=lambda: torch.view_as_real(fn(xf, wt, mask)), leaves=[xf, wt])

        return build

    return Case(
        op="global_filter",
        shape_name=name + ("" if upstream == "ones" else f"/grad={upstream}"),
        upstream=upstream,
        batch=b,
        dtype=torch.complex64,
        min_bytes={"fwd": 2 * n + nw, "bwd": 3 * n + 2 * nw, "fwd+bwd": 5 * n + 3 * nw},
        impls=[Impl("ours", make(dctkd_ext.global_filter)), Impl("eager", make(lambda a, b_, m: a * b_ * m))]
        + ([Impl("ours_triton", make(_with_backend_fn("triton", dctkd_ext.global_filter)))]
           if device.type == "cuda" and _has_triton() else []),
        notes="y = xf * w * mask on the rfft half plane, complex64; bwd: dxf and dw",
        extra={"channels": c, "h": h, "k": k},
    )


def _sc_case(name, b, c, h, w, device) -> Case:
    k = w // 2 + 1
    torch.manual_seed(0)
    xf0, w0 = _crandn(b, c, h, k, device=device), _crandn(c, c, h, k, device=device)
    nx, nw = b * c * h * k * C64, c * c * h * k * C64

    def make(fn):
        def build():
            xf, wt = xf0.clone().requires_grad_(), w0.clone().requires_grad_()
            return Prepared(fwd=lambda: torch.view_as_real(fn(xf, wt)), leaves=[xf, wt])

        return build

    return Case(
        op="spectral_conv",
        shape_name=name,
        batch=b,
        dtype=torch.complex64,
        min_bytes={"fwd": 2 * nx + nw, "bwd": 3 * nx + 2 * nw, "fwd+bwd": 5 * nx + 3 * nw},
        impls=[Impl("ours", make(dctkd_ext.spectral_conv)),
               Impl("eager", make(lambda a, b_: torch.einsum("bihk,iohk->bohk", a, b_)))]
        + ([Impl("ours_triton", make(_with_backend_fn("triton", dctkd_ext.spectral_conv)))]
           if device.type == "cuda" and _has_triton() else []),
        notes="per-frequency channel mixing (batched complex GEMM), complex64",
        extra={"in_channels": c, "out_channels": c, "h": h, "k": k,
               "gflop": 8 * b * c * c * h * k / 1e9},
    )


def cases(args, device: torch.device) -> List[Case]:
    device = torch.device(device)
    if not _wants_fp32(args):
        return []
    out: List[Case] = []
    if not getattr(args, "full", False):
        recipe_batch = {name: batch for name, batch, _ in FAM_SHAPES}
        # each with the upstream gradient of a mean-squared-error loss too (values near 1e-7)
        for upstream in ("ones", "mse"):
            for name, (cin, cout, s), cpu_batch in HEADLINE_FAM:
                default = recipe_batch[name] if device.type == "cuda" else cpu_batch
                for b in getattr(args, "batches", None) or [default]:
                    out.append(_fam_case(name, b, cin, cout, s, device, upstream=upstream))
        name, batch, c, h, w = HEADLINE_GF
        return out + [_gf_case(name, b, c, h, w, device, upstream) for upstream in ("ones", "mse")
                      for b in getattr(args, "batches", None) or [batch]]
    for name, batch, stages in FAM_SHAPES:
        for cin, cout, s in stages:
            for b in _batches(args, batch, device):
                out.append(_fam_case(name, b, cin, cout, s, device))
    for name, batch, c, h, w in GF_SHAPES:
        for b in _batches(args, batch, device):
            out.append(_gf_case(name, b, c, h, w, device))
    for name, batch, c, h, w in SC_SHAPES:
        for b in _batches(args, batch, device):
            out.append(_sc_case(name, b, c, h, w, device))
    return out
