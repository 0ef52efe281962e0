"""Shape arithmetic shared by the kernels' launchers and the code that plans around them (the nn modules'
path choice, the benchmark): one copy of each rule. Plain Python, no torch or triton (the layout rule
only calls methods of the tensor it is given)."""

# The fused small-map FAM filter (dctkd_ext/triton/spectral.py): the largest map side S it takes, and the
# complex accumulator elements one program holds in registers.
FUSED_MAX_SIZE = 32
FUSED_ACC_ELEMS = 4096


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def fused_tiles(size: int, out_channels: int):
    """(SP, KP, OT) of the fused FAM filter: padded map size, padded half-plane width (both >= 16 for
    tl.dot) and the output channels per program (the complex accumulator OT x KP x SP stays within
    FUSED_ACC_ELEMS)."""
    sp = max(16, next_pow2(size))
    kp = max(16, next_pow2(size // 2 + 1))
    ot = max(1, min(next_pow2(out_channels), FUSED_ACC_ELEMS // (sp * kp)))
    return sp, kp, ot


def fam_mask_radius(n: int, cuton: float) -> int:
    """r of the FAM high-pass box for one dim of size n: int(cuton * int(n / 2)), as the released code
    (docs/DESIGN.md §3.4)."""
    return int(cuton * int(n / 2))


def spectrum_channels_last(xf) -> bool:
    """Whether the spectral kernels read a (B, C, H, K) tensor as channels-last (GFNet's layout) and write
    their outputs so: a permuted (B, H, K, C)-contiguous tensor that is not also NCHW-contiguous. The rule
    of reads_channels_last in csrc/layout.h; the fake kernels (dctkd_ext/ops/spectral.py) and the Triton
    launchers (dctkd_ext/triton/spectral.py) both use this one copy."""
    return xf.dim() == 4 and not xf.is_contiguous() and xf.permute(0, 2, 3, 1).is_contiguous()
