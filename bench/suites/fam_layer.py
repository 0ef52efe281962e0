"""Benchmark suite of the FAM layer, the fam_layer family (docs/DESIGN.md §3.4, §6).

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
  The Fourier-domain filter ops it is built on are timed by bench/suites/spectral.py.

Minimal bytes: forward reads x and the weights and writes y; backward reads dy, x and the weights and
writes dx and the weight gradients; fwd+bwd is their sum. All fp32 (the FFTs of the module run in fp32
by design). The headline cases run twice: with ones as the upstream gradient and with the gradient of a
mean-squared-error loss ("/grad=mse": values near 1e-7, where subnormal intermediates would show).
"""

from typing import List

import torch

from dctkd_ext import reference as R
from dctkd_ext._shapes import FUSED_MAX_SIZE
from dctkd_ext.nn import FrequencyAttention
from dctkd_ext.ops import spectral
from dctkd_ext.ops.fam_layer import resolve_backend as fam_layer_backend

try:  # bench/run.py puts bench/ on sys.path
    from common import Case, Impl, Prepared, grid_batches, has_triton, on_backend, wants_fp32
except ImportError:  # pragma: no cover  (imported as bench.suites.fam_layer from the repository root)
    from bench.common import Case, Impl, Prepared, grid_batches, has_triton, on_backend, wants_fp32

# (name, batch of the recipe, [(in_channels, out_channels, size), ...]) — from the FAM-KD configs
FAM_SHAPES = [
    ("cifar_wrn40_2_wrn16_2", 64, [(32, 32, 32), (64, 64, 16), (128, 128, 8), (128, 128, 1)]),
    ("cifar_r32x4_r8x4", 64, [(64, 64, 32), (128, 128, 16), (256, 256, 8), (256, 256, 1)]),
    ("imagenet_r34_r18", 128, [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7), (512, 512, 1)]),
]
# The headline cases (`python bench/run.py`): two wide stages and a narrow one, (name, stage, CPU batch),
# on the GPU at the recipe's batch. --full runs every stage (CPU batch 8 unless --batches).
HEADLINE_FAM = [("cifar_r32x4_r8x4", (256, 256, 8), 64), ("imagenet_r34_r18", (256, 256, 14), 32),
                ("cifar_wrn40_2_wrn16_2", (32, 32, 32), 64)]

F32, C64 = 4, 8  # bytes per element


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
        fwd = (lambda: module(x)) if backend is None else on_backend(backend, lambda: module(x))
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
    fused_ok = (s <= FUSED_MAX_SIZE and spectral.fused_available(x0.device)
                and fam_layer_backend(x0.device) in ("cuda", "triton"))
    if fused_ok:  # both paths forced (on the CPU there is only the FFT path, which "ours" is)
        impls += [Impl("ours_fft", ours("fft")), Impl("ours_fused", ours("fused"))]
    if device.type == "cuda" and has_triton():
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


def cases(args, device: torch.device) -> List[Case]:
    device = torch.device(device)
    if not wants_fp32(args):
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
        return out
    for name, batch, stages in FAM_SHAPES:
        for cin, cout, s in stages:
            for b in grid_batches(args, batch, device):
                out.append(_fam_case(name, b, cin, cout, s, device))
    return out
