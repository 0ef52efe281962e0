"""Spectral-filter modules (docs/DESIGN.md §3.4): FrequencyAttention (FAM-KD's Frequency Attention Module) and
GlobalFilter (GFNet's global filter), on the dctkd_ext spectral ops."""

import math
import os
from typing import Optional

import torch
from torch import Tensor, nn

from .._shapes import FUSED_MAX_SIZE, fused_tiles
from ..ops import spectral as _sp
from ..ops._checks import check_cuton
from ..ops.fam_layer import fam_layer as _fam_layer
from ..ops.fam_layer import resolve_backend as _fam_layer_backend

PATHS = ("auto", "fft", "fused")

# When path="auto" picks the fused small-map kernel (Triton) over rfft2 -> spectral op -> irfft2 on the
# GPU. The fused kernel recomputes the DFT of each input map once per tile of output channels and mixes
# channels with elementwise FMAs, while the FFT path uses cuFFT plus tensor-core GEMMs but pays ~5
# launches and the (B, C, S, S//2+1) complex intermediates; so the rule takes the fused kernel only where
# its estimated work is small (launch-bound layers). FUSED_MAX_FLOPS is that estimate's threshold, to be
# set from the crossover bench/suites/fam_layer.py records on a GPU ("ours_fft" and "ours_fused" side by side).
# Override per module with path=..., or globally with DCTKD_FAM_PATH=fft|fused|auto.
# On the CPU "auto" is always the rfft path (pocketfft + the tiled C++ spectral_conv); there is no fused
# C++ kernel: on 2 CPU threads the forward DFT alone done as matmuls (x @ [cos|sin], then the complex
# column DFT; torch/MKL) took 2.8-6x the time of torch.fft.rfft2 at the CIFAR shapes (B=64: 32ch@32,
# 64ch@16, 128ch@8, 256ch@8), and a fused chain has to do those DFT flops (twice, forward and inverse),
# so it cannot beat the rfft path there.
FUSED_MAX_FLOPS = 1e9


def fused_flops_estimate(batch: int, in_channels: int, out_channels: int, size: int, depthwise: bool) -> float:
    """Floating-point work of the fused kernel, padded tiles included (see dctkd_ext/triton/spectral.py)."""
    sp, kp, ot = fused_tiles(size, out_channels)
    dft = 2 * 6 * sp * sp * kp  # forward DFT of one map: six real (SP x SP) @ (SP x KP)-sized products
    inv = 2 * 6 * ot * sp * sp * kp  # inverse DFTs of a tile of OT maps
    if depthwise:
        return batch * math.ceil(in_channels / ot) * (ot * dft + 8 * ot * sp * kp + inv)
    per_program = in_channels * (dft + 8 * ot * sp * kp) + inv
    return batch * math.ceil(out_channels / ot) * per_program


def _default_path() -> str:
    p = os.environ.get("DCTKD_FAM_PATH", "auto") or "auto"
    if p not in PATHS:
        raise ValueError(f"DCTKD_FAM_PATH: expected one of {', '.join(PATHS)}, got {p!r}")
    return p


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _check_positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


def _check_features(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a real floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")


def _autocast_on(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type) if device_type in ("cuda", "cpu") else False


class FrequencyAttention(nn.Module):
    """FAM-KD's Frequency Attention Module (Pham et al., WACV 2024): a learnable filter in the Fourier
    domain (global branch) plus a 1x1 conv (local branch), out = rate1 * global + rate2 * local.

    The same function, gradients and parameters as the authors' FAM_Module
    (dctkd_ext.reference.ReleasedFAM): weights1 (in, out, S, S) complex64 initialised
    (1/(in*out)) * rand, w0 = Conv2d(in, out, 1) with bias, rate1 = rate2 = 0.5 (shape (1,));
    their state_dict loads as is. global = Re(ifft2(M * einsum(fft2(x, ortho), weights1), ortho)) with
    M the high-pass box of `cuton`, computed exactly as irfft2(W' rfft2(x)) with the symmetrised
    half-plane weight W' (docs/DESIGN.md §3.4): half the FFT work and memory. Any S, odd included. The 1x1
    branch and both rates fold into the frequency weight (a 1x1 conv is the same matrix at every
    frequency): forward = irfft2((rate1 W' + rate2 w0^T) rfft2(x)) + rate2 b, one spectral GEMM for the
    whole layer (dctkd_ext.ops.fam_layer).

    mix="depthwise": the paper's own description (a GFNet-style per-channel filter, in == out):
    weights1 (in, S, S) complex64, initialised (1/in) * rand (so the global branch has the scale of
    the channel-mixing one), filtered with global_filter.

    forward(x, cuton=None): x (B, in, S, S) real; cuton defaults to the constructor's (the released
    module also accepts forward((x, cuton))). The FFTs run in fp32 (fp64 for fp64 input) with autocast
    disabled; under autocast the global branch stays fp32 (as the released module's), otherwise it is
    returned in x's dtype. path: "auto" (default, see FUSED_MAX_FLOPS), "fft" (rfft2 -> spectral op ->
    irfft2) or "fused" (the fused small-map Triton kernel, S <= 32, float32, CUDA or TRITON_INTERPRET=1).
    """

    def __init__(self, in_channels: int, out_channels: int, size: int, cuton: float = 0.1, mix: str = "channel",
                 path: Optional[str] = None):
        super().__init__()
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        self.out_channels = _check_positive_int(out_channels, "out_channels")
        self.size = _check_positive_int(size, "size")
        self.cuton = check_cuton(cuton)
        if mix not in ("channel", "depthwise"):
            raise ValueError(f"mix: expected 'channel' or 'depthwise', got {mix!r}")
        if mix == "depthwise" and in_channels != out_channels:
            raise ValueError(
                f"mix='depthwise' filters each channel on its own and needs in_channels == out_channels, "
                f"got {in_channels} and {out_channels}"
            )
        if path is not None and path not in PATHS:
            raise ValueError(f"path: expected one of {', '.join(PATHS)} or None, got {path!r}")
        self.mix, self.path = mix, path
        # The released module's order of registration (and of random draws): rate1, rate2, weights1, w0.
        self.rate1 = nn.Parameter(torch.full((1,), 0.5))
        self.rate2 = nn.Parameter(torch.full((1,), 0.5))
        if mix == "channel":
            self.scale = 1 / (in_channels * out_channels)
            self.weights1 = nn.Parameter(self.scale * torch.rand(in_channels, out_channels, size, size, dtype=torch.cfloat))
        else:
            self.scale = 1 / in_channels
            self.weights1 = nn.Parameter(self.scale * torch.rand(in_channels, size, size, dtype=torch.cfloat))
        self.w0 = nn.Conv2d(in_channels, out_channels, 1)
        self._register_load_state_dict_pre_hook(self._accept_scalar_rates)

    @staticmethod
    def _accept_scalar_rates(state_dict, prefix, *args, **kwargs):
        # rate1 / rate2 saved as 0-dim tensors (nn.Parameter(torch.tensor(0.5))) load into the (1,) parameters
        for name in ("rate1", "rate2"):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.dim() == 0:
                state_dict[prefix + name] = t.reshape(1)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, size={self.size}, "
                f"cuton={self.cuton}, mix={self.mix!r}" + (f", path={self.path!r}" if self.path else ""))

    def _check_input(self, x: Tensor) -> None:
        _check_features(x)
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels (in_channels), got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(
                f"x: expected spatial size ({self.size}, {self.size}) (the module's size), got "
                f"{tuple(x.shape[-2:])}; interpolate the features or build the module with size={x.shape[-1]}"
            )

    def choose_path(self, x: Tensor) -> str:
        """"fft" or "fused" for this input (see the class docstring and FUSED_MAX_FLOPS)."""
        path = self.path or _default_path()
        # the backend of the op this module runs: fam_global (depthwise) or fam_layer (channel mixing)
        backend = (_sp.resolve_backend if self.mix == "depthwise" else _fam_layer_backend)(x.device)
        fused_ok = (x.dtype in (torch.float32, torch.float16, torch.bfloat16) and self.size <= FUSED_MAX_SIZE
                    and _sp.fused_available(x.device) and backend in ("cuda", "triton"))
        if path == "fused":
            if not fused_ok:
                raise ValueError(
                    f"path='fused' needs size <= {FUSED_MAX_SIZE}, float32 (or half) features and Triton on a "
                    f"CUDA device (or TRITON_INTERPRET=1) with the cuda/triton backend; got size {self.size}, "
                    f"{x.dtype} on {x.device}, backend {backend!r}"
                )
            return "fused"
        if path == "fft" or not fused_ok or x.device.type != "cuda":
            # CPU: the rfft path (pocketfft plus the tiled C++ spectral_conv) is the documented choice
            return "fft"
        return "fused" if self.fused_pays(x.shape[0]) else "fft"

    def fused_pays(self, batch: int) -> bool:
        """The size rule of path="auto" on a GPU: the fused kernel for launch-bound layers, whose estimated
        work at this batch is at most FUSED_MAX_FLOPS."""
        depthwise = self.mix == "depthwise"
        return fused_flops_estimate(batch, self.in_channels, self.out_channels, self.size, depthwise) <= FUSED_MAX_FLOPS

    def global_branch(self, x: Tensor, cuton: Optional[float] = None) -> Tensor:
        """Re(ifft2(M * mix(fft2(x, ortho), weights1), ortho)): (B, in, S, S) -> (B, out, S, S)."""
        depthwise = self.mix == "depthwise"
        return self._in_full_precision(x, cuton, lambda xg, w, c, fused: _sp.fam_global(xg, w, c, depthwise, fused))

    def forward(self, x, cuton: Optional[float] = None) -> Tensor:
        if isinstance(x, tuple):  # the released module's forward((x, cuton))
            if len(x) != 2:
                raise ValueError(f"x: expected a tensor or a (x, cuton) tuple, got a tuple of {len(x)}")
            x, cuton = x
        if self.mix == "depthwise":
            if x.dtype in (torch.float16, torch.bfloat16) and not _autocast_on(x.device.type):
                # half input outside autocast: the layer in fp32 (as under autocast), output in x's dtype
                return self.forward(x.float(), cuton).to(x.dtype)
            g = self.global_branch(x, cuton)
            return self.rate1 * g + self.rate2 * self.w0(x)
        return self._folded(x, cuton)

    def _folded(self, x: Tensor, cuton: Optional[float]) -> Tensor:
        # Channel mixing: the 1x1 branch and both rates fold into the frequency weight, one spectral GEMM
        # (dctkd_ext/ops/fam_layer.py).
        def layer(xg, w, c, fused):
            rdt, bias = xg.dtype, self.w0.bias
            return _fam_layer(xg, w, self.w0.weight.to(rdt), None if bias is None else bias.to(rdt),
                              self.rate1.to(rdt), self.rate2.to(rdt), c, fused)

        return self._in_full_precision(x, cuton, layer)

    def _in_full_precision(self, x: Tensor, cuton: Optional[float], run) -> Tensor:
        """run(xg, w, cuton, fused) with autocast disabled, on x in fp32 (fp64 for fp64 input) and weights1 in
        the matching complex dtype, like the released module's global branch; the result stays fp32 under
        autocast and is returned in x's dtype otherwise."""
        self._check_input(x)
        cuton = self.cuton if cuton is None else check_cuton(cuton)
        dev = x.device.type
        autocast_on = _autocast_on(dev)
        with torch.autocast(device_type=dev, enabled=False):
            xg = x if x.dtype in (torch.float32, torch.float64) else x.float()
            w = self.weights1
            if w.dtype != _complex_of(xg.dtype):
                w = w.to(_complex_of(xg.dtype))
            fused = xg.dtype == torch.float32 and self.choose_path(x) == "fused"
            y = run(xg, w, cuton, fused)
        if not autocast_on and y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y


class GlobalFilter(nn.Module):
    """GFNet's global filter layer (Rao et al., NeurIPS 2021) on dctkd_ext.global_filter:
    y = irfft2(rfft2(x, ortho) * complex_weight, s=(h, w), ortho) over the spatial dims.

    GlobalFilter(dim, h, w): h, w are the spatial size of the input; the parameter is
    complex_weight (h, w//2+1, dim, 2) float32 (real and imaginary parts), initialised randn * 0.02,
    the layout of GFNet's, so its checkpoints load as is (GFNet's own constructor takes the weight's
    size, GlobalFilter(dim, h=14, w=8) for 14 x 14 maps: that is GlobalFilter(dim, 14, 14) here).
    forward(x, spatial_size=None): x (B, h, w, dim) channels-last, or GFNet's (B, N, dim) token layout
    with N = h*w. Computed in float32 with autocast disabled and returned in float32, as GFNet's.
    The filter runs channels-last in place of GFNet's broadcast multiply (no layout copies).
    """

    def __init__(self, dim: int, h: int, w: int):
        super().__init__()
        self.dim = _check_positive_int(dim, "dim")
        self.h = _check_positive_int(h, "h")
        self.w = _check_positive_int(w, "w")
        self.complex_weight = nn.Parameter(torch.randn(h, w // 2 + 1, dim, 2, dtype=torch.float32) * 0.02)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, h={self.h}, w={self.w}"

    def forward(self, x: Tensor, spatial_size=None) -> Tensor:
        _check_features(x)
        if x.dim() == 3:
            b, n, c = x.shape
            a, bb = (self.h, self.w) if spatial_size is None else tuple(spatial_size)
            if a * bb != n:
                raise ValueError(f"x: expected N = {a}*{bb} = {a * bb} tokens (spatial_size), got shape {tuple(x.shape)}")
            x4 = x.reshape(b, a, bb, c)
        elif x.dim() == 4:
            x4 = x
        else:
            raise ValueError(f"x: expected (B, H, W, C) or (B, N, C), got shape {tuple(x.shape)}")
        b, a, bb, c = x4.shape
        if (a, bb) != (self.h, self.w):
            raise ValueError(f"x: expected spatial size ({self.h}, {self.w}) (the module's h, w), got ({a}, {bb})")
        if c != self.dim:
            raise ValueError(f"x: expected {self.dim} channels (dim) in the last dim, got shape {tuple(x.shape)}")
        dev = x.device.type
        with torch.autocast(device_type=dev, enabled=False):
            xf = torch.fft.rfft2(x4.to(torch.float32), dim=(1, 2), norm="ortho")  # (B, h, K, C)
            wc = torch.view_as_complex(self.complex_weight.float())  # (h, K, C)
            yf = _sp.global_filter(xf.permute(0, 3, 1, 2), wc.permute(2, 0, 1))  # channels-last kernels
            y = torch.fft.irfft2(yf.permute(0, 2, 3, 1), s=(a, bb), dim=(1, 2), norm="ortho")
        return y.reshape(x.shape)
