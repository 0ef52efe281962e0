"""Small calls of every CUDA kernel of dctkd_ext, for compute-sanitizer (memcheck, racecheck,
synccheck); bench/gpu_check.sh runs it under each tool. Small shapes: the tools slow kernels down by
orders of magnitude. Every call's result is checked for finiteness, so a kernel that reads garbage
also fails here; exit status 0 when all calls ran.

    compute-sanitizer --tool memcheck python tests/gpu/sanitize_cases.py [--backend cuda|triton]
"""

import argparse
import sys

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cuda", choices=["cuda", "triton"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: nothing to sanitize")
        return 0
    import dctkd_ext

    dev = "cuda"
    torch.manual_seed(0)
    calls = 0

    def done(what, *tensors):
        nonlocal calls
        torch.cuda.synchronize()
        for t in tensors:
            t = torch.view_as_real(t) if t.is_complex() else t
            if not torch.isfinite(t).all():
                raise SystemExit(f"{what}: non-finite output")
        calls += 1
        print("ok", what, flush=True)

    with dctkd_ext.use_backend(args.backend):
        # attention_map: packed (56x56, 14x14) and scalar (7x7) loads, both layouts, p = 2 and the
        # general-p path, fp64 accumulation; a channel slice (copied to NCHW)
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for shape in ((2, 64, 56, 56), (2, 33, 14, 14), (3, 5, 7, 7)):
                for cl in (False, True):
                    x = torch.randn(shape, device=dev).to(dtype)
                    if cl:
                        x = x.contiguous(memory_format=torch.channels_last)
                    x.requires_grad_()
                    for p in (2.0, 1.5):
                        a = dctkd_ext.attention_map(x, p)
                        (g,) = torch.autograd.grad(a.sum(), x)
                        done(f"attention_map {shape} {dtype} cl={cl} p={p}", a, g)
        x = torch.randn(2, 9, 7, 7, device=dev)[:, 1:].requires_grad_()
        a = dctkd_ext.attention_map(x)
        done("attention_map channel slice", a, *torch.autograd.grad(a.sum(), x))
        # dct2d / idct2d: shared-memory and global-scratch sizes
        for shape in ((3, 7, 7), (2, 56, 56), (1, 5, 9), (1, 130, 130)):
            for dtype in (torch.float32, torch.float64):
                a = torch.randn(shape, device=dev, dtype=dtype)
                done(f"dct2d {shape} {dtype}", dctkd_ext.dct2d(a), dctkd_ext.idct2d(a))
        # dct_at_loss: every transform, a map past shared memory (phi's global scratch), fp64, bf16
        levels = [(8, 16, 56), (16, 32, 14), (32, 64, 7), (3, 5, 13)]
        for preset in ("dct", "paper", "at"):
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                s = [torch.randn(2, cs, h, h, device=dev).to(dtype).requires_grad_() for cs, _, h in levels]
                t = [torch.randn(2, ct, h, h, device=dev).to(dtype) for _, ct, h in levels]
                loss = dctkd_ext.dct_at_loss(s, t, preset=preset)
                grads = torch.autograd.grad(loss, s)
                done(f"dct_at_loss {preset} {dtype}", loss, *grads)
        s = [torch.randn(1, 4, 100, 100, device=dev).requires_grad_()]
        t = [torch.randn(1, 6, 100, 100, device=dev)]
        loss = dctkd_ext.dct_at_loss(s, t, preset="paper")
        done("dct_at_loss 100x100 (global scratch)", loss, *torch.autograd.grad(loss, s))
        # spectral filters
        for dt in (torch.complex64, torch.complex128):
            xf = torch.randn(3, 6, 7, 4, device=dev, dtype=dt)
            for cl in (False, True):
                x_ = (xf.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if cl else xf.clone()).requires_grad_()
                w = torch.randn(6, 7, 4, device=dev, dtype=dt, requires_grad=True)
                for mask in (None, torch.rand(7, 4, device=dev)):
                    y = dctkd_ext.global_filter(x_, w, mask)
                    gx, gw = torch.autograd.grad(torch.view_as_real(y).sum(), (x_, w))
                    done(f"global_filter {dt} cl={cl} mask={mask is not None}", y, gx, gw)
            xs = xf.clone().requires_grad_()
            w2 = torch.randn(6, 37, 7, 4, device=dev, dtype=dt, requires_grad=True)
            y = dctkd_ext.spectral_conv(xs, w2, torch.rand(7, 4, device=dev))
            gx, gw = torch.autograd.grad(torch.view_as_real(y).sum(), (xs, w2))
            done(f"spectral_conv {dt}", y, gx, gw)
        for mix in ("channel", "depthwise"):
            fam = dctkd_ext.nn.FrequencyAttention(8, 8, 12, mix=mix).to(dev)
            x = torch.randn(2, 8, 12, 12, device=dev, requires_grad=True)
            y = fam(x)
            grads = torch.autograd.grad(y.sum(), [x] + list(fam.parameters()))
            done(f"FrequencyAttention {mix}", y, *grads)
    print(f"{calls} calls ran on backend {args.backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
