# Run with EMU_SMEM=4000 to force the global-scratch fallback; checks phi / dct against the CPU kernels.
# Built with EMU_CFLAGS=-DDCTKD_PHI_SCRATCH_BYTES=200000, phi runs its blocks in several waves.
# usage: EMU_SMEM=4000 python test_global.py LIB.so
import os, sys, torch
import dctkd_ext
torch.ops.load_library(sys.argv[1])
E, C = torch.ops.dctkd_emu, torch.ops.dctkd_ext
def rel(a, b): return (a.double() - b.double()).norm().item() / max(b.double().norm().item(), 1e-6)
fails = 0
for dtype in [torch.float32, torch.float64]:
    for opts in [(2.0, "minmax", True, "dct", True, "minmax", "l2", 1e-8), (2.0, "max", True, "fft_real", True, "max", "l2", 0.0),
                 (2.0, "l2", False, "identity", False, "none", "mse", 1e-12)]:
        # batch 24: 48 (level, sample) blocks, several waves when built with a small DCTKD_PHI_SCRATCH_BYTES
        S = [torch.randn(24, 3, 13, 17, dtype=dtype) + .1, torch.randn(24, 4, 5, 6, dtype=dtype) + .1]
        T = [torch.randn(24, 5, 13, 17, dtype=dtype) + .1, torch.randn(24, 2, 5, 6, dtype=dtype) + .1]
        l1, m1 = E.dct_at_loss(S, T, [1.0, 2.0], *opts); l2, m2 = C.dct_at_loss(S, T, [1.0, 2.0], *opts)
        errs = [rel(l1, l2)] + [rel(a, b) for a, b in zip(m1, m2)]
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        print(dtype, opts[3], ["%.1e" % e for e in errs]); fails += max(errs) > tol
    a = torch.randn(3, 13, 17, dtype=dtype)
    e = rel(E.dct2d(a), C.dct2d(a)), rel(E.idct2d(a), C.idct2d(a)); print("dct", e); fails += max(e) > (1e-12 if dtype == torch.float64 else 1e-6)
print("launches, blocks", E.stats(), "FAILS", fails)
