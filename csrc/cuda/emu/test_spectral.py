# Runs the emulated spectral-filter CUDA ops (global_filter, spectral_conv, fam_half_weight, forward and
# backward) against the CPU kernels. usage: python test_spectral.py LIB.so (with the package importable)
import sys, torch
import dctkd_ext  # noqa: F401
torch.ops.load_library(sys.argv[1])
E, C = torch.ops.dctkd_emu, torch.ops.dctkd_ext
torch.manual_seed(0)
fails = 0
def rel(a, b):
    a, b = torch.view_as_real(a).double() if a.is_complex() else a.double(), torch.view_as_real(b).double() if b.is_complex() else b.double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-6)
def check(name, a, b, tol):
    global fails
    e = rel(a, b) if a.shape == b.shape and a.dtype == b.dtype else float("inf")
    bad = not (e <= tol) or a.stride() != b.stride()
    fails += bad
    print("FAIL" if bad else "ok", name, "%.1e" % e, flush=True)
for dt, tol in ((torch.complex64, 1e-6), (torch.complex128, 1e-13)):
    # spectral_conv: M, N, K not multiples of the 16 x 16 tile / k-chunk, F not a multiple of 32; M, N > 16
    for b, i, o, h, k in ((3, 5, 7, 6, 4), (17, 19, 33, 5, 3), (2, 1, 1, 1, 1)):
        xf = torch.randn(b, i, h, k, dtype=dt)
        w = torch.randn(i, o, h, k, dtype=dt)
        g = torch.randn(b, o, h, k, dtype=dt)
        for mask in (None, torch.rand(h, k).to(xf.real.dtype)):
            check(f"spectral_conv {dt} {(b, i, o, h, k)} mask={mask is not None}", E.spectral_conv(xf, w, mask), C.spectral_conv(xf, w, mask), tol)
            for a, c in zip(E.spectral_conv_backward(g, xf, w, mask, True, True), C.spectral_conv_backward(g, xf, w, mask, True, True)):
                check(f"spectral_conv_backward {dt} {(b, i, o, h, k)}", a, c, tol)
    for cl in (False, True):
        xf = torch.randn(3, 6, 7, 4, dtype=dt)
        if cl:
            xf = xf.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        w = torch.randn(6, 7, 4, dtype=dt)
        for mask in (None, torch.rand(7, 4).to(xf.real.dtype)):
            check(f"global_filter {dt} cl={cl}", E.global_filter(xf, w, mask), C.global_filter(xf, w, mask), tol)
            for a, c in zip(E.global_filter_backward(xf, xf, w, mask, True, True), C.global_filter_backward(xf, xf, w, mask, True, True)):
                check(f"global_filter_backward {dt} cl={cl}", a, c, tol)
    w = torch.randn(3, 2, 8, 7, dtype=dt)
    check(f"fam_half_weight {dt}", E.fam_half_weight(w, 0.3), C.fam_half_weight(w, 0.3), tol)
    g = torch.randn(3, 2, 8, 4, dtype=dt)
    check(f"fam_half_weight_backward {dt}", E.fam_half_weight_backward(g, 0.3, 7), C.fam_half_weight_backward(g, 0.3, 7), tol)
print("launches, blocks", E.stats(), "FAILS", fails)
sys.exit(1 if fails else 0)
