"""Compile the Triton kernels for a GPU architecture on a machine without a GPU.

    python -m dctkd_ext.triton._compile_check [--family dct_at|spectral|local_attention] [--arch 90] [--full] [--batch-invariance]

Runs the Triton ops on small CPU tensors with every kernel launch replaced by a compilation for the
target (frontend, TTIR, TTGIR, LLVM, PTX and ptxas: everything but running it), with the argument
specialisation the JIT itself computes (its binder: integers equal to 1 become constants, pointers
and multiples of 16 get the divisibility hint, except where do_not_specialize says otherwise). The
shapes are the benchmark's (the ResNet-50 -> ResNet-18 levels), so the tile sizes and variants are the
ones a real run compiles. This catches what the interpreter does not check (types, constexpr use,
layouts, resource limits) and prints each variant's registers and stack (spill) bytes.
TRITON_INTERPRET must be unset. --full compiles every dtype, layout and option (many minutes).
"""

import argparse
import os
import re
import sys
import time

import torch

# PTX of approximate fp32 arithmetic: the kernels' divisions, pow and sqrt must be IEEE (as the C++
# kernels'), so these should not appear (the compile check reports them per variant). fp64 math
# (libdevice) uses rcp.approx.ftz.f64 as a first step that it then refines: not listed.
APPROX_PTX = re.compile(r"\b(div\.full|div\.approx|rcp\.approx|ex2\.approx|lg2\.approx|sqrt\.approx)(\.ftz)?\.f32\b")


class Compiler:
    """Stands in for _common.launch: compiles each new kernel variant for the target instead of running
    it. The variant key is the JIT's own (its binder: argument types, the ==1 / divisibility-by-16
    specialisation of integers and pointers, do_not_specialize, annotations; constexprs; options), so
    two launches the JIT would serve with one binary count once. compile=False only records the keys
    (for tests of the specialisation). seen: {key: (registers, stack bytes)}; names: {key: label}."""

    def __init__(self, arch: int, verbose: bool = True, compile: bool = True):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.binders = {}
        self.seen = {}
        self.names = {}
        self.signatures = {}
        self.approx = {}
        self.verbose = verbose
        self.compile = compile

    def specialise(self, kernel, args, kwargs):
        """(key, options, signature, constexprs, attrs) as JITFunction.run computes them."""
        from triton.runtime.jit import create_function_from_signature

        binder = self.binders.get(kernel)
        if binder is None:
            binder = self.binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        key = (kernel.__name__, repr(specialization), repr(sorted(options.items())))
        return key, kernel._pack_args(self.backend, kwargs, bound, specialization, options)

    def launch(self, kernel, grid, *args, **kwargs):
        if grid[0] == 0:
            return
        import triton
        from triton.compiler import ASTSource

        kwargs.setdefault("num_warps", 4)
        kwargs.setdefault("num_stages", 3)
        key, (options, signature, constexprs, attrs) = self.specialise(kernel, args, kwargs)
        if key in self.seen:
            return
        label = _label(kernel, signature, constexprs, kwargs)
        self.names[key] = label
        self.signatures[key] = signature
        if not self.compile:
            self.seen[key] = (None, None)
            return
        t0 = time.time()
        src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=self.target, options=options.__dict__)
        regs, spills = _resources(compiled)
        self.seen[key] = (regs, spills)
        ptx = compiled.asm.get("ptx", "")
        self.approx[key] = sorted({m.group(0) for m in APPROX_PTX.finditer(ptx)})
        if self.verbose:
            print(f"{kernel.__name__:20s} {time.time() - t0:5.1f}s regs={regs} stack={spills}B "
                  f"approx={','.join(self.approx[key]) or '-'} {label}", flush=True)


def _label(kernel, signature, constexprs, kwargs) -> str:
    """The launch's distinguishing parameters: the constexpr keywords (not per-slot sizes), the
    element types of the pointers, warps and stages."""
    keep = {k: v for k, v in kwargs.items() if not re.fullmatch(r"(O|TH|TW)[0-7]", k)}
    ptr = sorted({t for t in signature.values() if isinstance(t, str) and t.startswith("*")})
    return " ".join(f"{k}={v}" for k, v in keep.items()) + " " + ",".join(ptr)


def _resources(compiled):
    """(registers, stack bytes: spills and local arrays) of the cubin, as cuobjdump reports them."""
    meta = compiled.metadata
    regs = getattr(meta, "n_regs", None)
    spills = getattr(meta, "n_spills", None)
    if regs is None:
        import subprocess
        import tempfile

        from triton.backends.nvidia import compiler as nvc

        tool = os.path.join(os.path.dirname(nvc.__file__), "bin", "cuobjdump")
        if os.path.exists(tool) and "cubin" in compiled.asm:
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+)", out)
            if m:
                regs, spills = int(m.group(1)), int(m.group(2))
    return regs, spills


class _Dispatch:
    """What _common.launch becomes during a check: the kernel families bind it at import, so a
    check that swaps compilers (several batch sizes) swaps them here."""

    compiler = None

    @classmethod
    def launch(cls, *args, **kwargs):
        cls.compiler.launch(*args, **kwargs)


def install(compiler) -> None:
    """Route every Triton launch of this process to compiler.launch (call before the ops are loaded)."""
    from . import _common

    if _common.INTERPRET:
        raise SystemExit("unset TRITON_INTERPRET: the compile check needs the compiler, not the interpreter")
    _Dispatch.compiler = compiler
    _common.launch = _Dispatch.launch
    _common.wrap_triton = lambda kernel: kernel


# student / teacher channels and map side of ResNet-50 -> ResNet-18 on 224 x 224 images (the benchmark's
# headline case): every level goes through the launchers, so the variants are the ones it compiles.
RESNET = [(64, 256, 56), (128, 512, 28), (256, 1024, 14), (512, 2048, 7)]


def drive(full: bool = False, batch: int = 2) -> None:
    """Run the launchers of the dct_at family (attention_map, dct2d / idct2d and dct_at_loss) on CPU
    tensors (the launches go to the installed compiler)."""
    from ..presets import resolve_options
    from . import load

    ops = load()
    torch.manual_seed(0)

    def feats(b, c, h, w, dtype, cl):
        x = torch.randn(b, c, h, w).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if cl else x

    dtypes = (torch.float32, torch.float16, torch.bfloat16) if full else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        for cl in (False, True):
            for c, hw in ((64, 56), (3, 7)) if full else ((64, 56),):
                x = feats(batch, c, hw, hw, dtype, cl)
                for p in (2.0, 1.0, 1.5) if full else (2.0, 1.5):
                    ops.attention_map(x, p, "mean")
                    ops.attention_map_backward(torch.randn(batch, hw, hw), x, p, "sum")
    for dtype in dtypes + ((torch.float64,) if full else ()):
        for shape in ((3, 7, 7), (batch, 56, 56), (1, 1)) if full else ((3, 7, 7), (batch, 56, 56)):
            a = torch.randn(shape).to(dtype)
            ops.dct2d(a)
            ops.idct2d(a)
    configs = [dict(preset="dct"), dict(preset="paper"), dict(preset="at")]
    if full:
        configs += [dict(preset="dct", map_norm=n) for n in ("max", "l2", "none")]
        configs += [dict(preset="dct", coef_norm=n) for n in ("max", "l2", "none")]
        configs += [dict(preset="dct", transform="fft_real"), dict(preset="dct", transform="identity")]
        configs += [dict(preset="dct", distance=d) for d in ("mse", "sse")]
        configs += [dict(preset="dct", center=False, coef_abs=False), dict(preset="dct", p=1.5)]
    # quick: the four ResNet levels in one launch, as the benchmark runs them (7 x 7 and 14 x 14 held
    # in registers, 28 x 28 and 56 x 56 through scratch), preset dct, fp32 and bf16 features (one phi
    # variant: the maps are fp32). --full: every preset and option, and fp64 (a testing path).
    for cfg in configs if full else configs[:1]:
        cfg = dict(cfg)
        o = resolve_options(cfg.pop("preset"), cfg)
        for dtype in (torch.float32, torch.bfloat16) + ((torch.float64,) if full else ()):
            for cl in (False, True) if full else (False,):
                s = [feats(batch, cs, hw, hw, dtype, cl) for cs, _, hw in RESNET]
                t = [feats(batch, ct, hw, hw, dtype, cl) for _, ct, hw in RESNET]
                _, gmaps = ops.dct_at_loss(s, t, [1.0] * len(RESNET), o["p"], o["map_norm"], o["center"],
                                           o["transform"], o["coef_abs"], o["coef_norm"], o["distance"], o["eps"])
                gmaps = [torch.randn(g.shape, dtype=g.dtype) for g in gmaps]
                ops.dct_at_loss_backward(torch.randn(batch, dtype=gmaps[0].dtype), gmaps, s, o["p"])


def drive_spectral(full: bool = False, batch: int = 4) -> None:
    """Run every launcher of the spectral family on CPU tensors (the launches go to the installed
    compiler): small shapes for the layouts and options, and the benchmark's spectral_conv shapes (batch
    64 / 128, 32 to 512 channels) for the tile sizes real runs pick. Every variant is in this one set
    (full changes nothing)."""
    from .spectral import (
        fam_filter_fused,
        fam_half_weight,
        fam_half_weight_backward,
        global_filter,
        global_filter_backward,
        spectral_conv,
        spectral_conv_backward,
    )

    torch.manual_seed(0)
    for dt in (torch.complex64, torch.complex128):
        xf = torch.randn(batch, 6, 7, 4, dtype=dt)
        w = torch.randn(6, 7, 4, dtype=dt)
        m = torch.rand(7, 4)
        for x_ in (xf, xf.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):
            for mask in (None, m):
                global_filter(x_, w, mask)
                for need in ((True, True), (True, False), (False, True)):
                    global_filter_backward(x_, x_, w, mask, *need)
        w2 = torch.randn(6, 5, 7, 4, dtype=dt)
        for mask in (None, m):
            spectral_conv(xf, w2, mask)
            spectral_conv_backward(torch.randn(batch, 5, 7, 4, dtype=dt), xf, w2, mask, True, True)
        # benchmark shapes: (batch, in = out channels, S) of the FAM-KD stages (SC_SHAPES of bench/suites/spectral.py)
        for b, c, s in ((64 + batch, 32, 32), (64 + batch, 256, 8), (128 + batch, 128, 28)):
            k = s // 2 + 1
            xf = torch.empty(b, c, s, k, dtype=dt)
            w2 = torch.empty(c, c, s, k, dtype=dt)
            spectral_conv(xf, w2, torch.rand(s, k))
            spectral_conv_backward(torch.empty(b, c, s, k, dtype=dt), xf, w2, torch.rand(s, k), True, True)
        fam_half_weight(torch.randn(3, 2, 8, 8, dtype=dt), 0.3)
        fam_half_weight_backward(torch.randn(3, 2, 8, 5, dtype=dt), 0.3, 8)
    for s in (1, 4, 7, 8, 16, 32):
        k = s // 2 + 1
        for depthwise in (False, True):
            c_in, c_out = (8, 8) if depthwise else (8, 64)
            x = torch.randn(batch, c_in, s, s)
            wh = torch.randn(*((c_in, s, k) if depthwise else (c_in, c_out, s, k)), dtype=torch.complex64)
            fam_filter_fused(x, wh, depthwise, False)
            g = torch.randn(batch, c_out, s, s)
            fam_filter_fused(g, wh, depthwise, True)


def drive_local_attention(full: bool = False, batch: int = 2) -> None:
    """Run the local_attention launchers on CPU tensors (the launches go to the installed compiler):
    FAM-KD's head sizes (64 to 512 channels, 56 x 56 to 7 x 7 maps) with K = 3, NCHW and channels_last,
    fp32 and bf16, the backward with every gradient and with the subsets autograd asks for. --full adds
    fp16, fp64 and K = 5."""
    from .local_attention import local_attention, local_attention_backward

    torch.manual_seed(0)
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float16, torch.float64) if full else ())
    for dtype in dtypes:
        for c, s in ((64, 56), (256, 14), (512, 7)):
            for cl in (False, True):
                for ks in (3, 5) if full else (3,):
                    q, k, v = (torch.empty(batch, c, s, s, dtype=dtype) for _ in range(3))
                    if cl:
                        q = q.contiguous(memory_format=torch.channels_last)
                    rel = torch.empty(c, ks * ks)
                    local_attention(q, k, v, rel, ks)
                    for need in ((True, True, True, True), (False, True, True, True), (True, False, False, False)):
                        local_attention_backward(q, q, k, v, rel, ks, *need)


# family -> the function that runs its launchers
DRIVERS = {"dct_at": drive, "spectral": drive_spectral, "local_attention": drive_local_attention}


def run(arch: int = 90, full: bool = False, verbose: bool = True, family: str = "dct_at") -> dict:
    compiler = Compiler(arch, verbose)
    install(compiler)
    DRIVERS[family](full)
    return compiler.seen


def batch_variants(batches=(16, 17, 5), full: bool = False, family: str = "dct_at") -> list:
    """The set of variant keys the launchers need at each batch size (nothing compiled): equal sets
    mean a new batch size (an odd last batch) compiles nothing new."""
    out = []
    for b in batches:
        compiler = Compiler(90, verbose=False, compile=False)
        install(compiler)
        DRIVERS[family](full, batch=b)
        out.append(set(compiler.seen))
    return out


def report(compiler) -> str:
    """One line per variant: kernel, registers, stack bytes, approximate PTX ops, its parameters."""
    rows = sorted(((k[0], compiler.names.get(k, ""), r, st, ",".join(compiler.approx.get(k, [])) or "-")
                   for k, (r, st) in compiler.seen.items()), key=lambda t: (t[0], t[1]))
    return "\n".join(f"{n:22s} regs={r!s:>4} stack={st!s:>5}B approx={a:<10s} {label}" for n, label, r, st, a in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--family", choices=sorted(DRIVERS), default="dct_at", help="the kernel family to compile")
    ap.add_argument("--full", action="store_true", help="every option of dct_at_loss (slow)")
    ap.add_argument("--batch-invariance", action="store_true",
                    help="only check that batch sizes 16, 17 and 5 need the same kernel variants (no compiling)")
    args = ap.parse_args(argv)
    import triton

    if args.batch_invariance:
        sets = batch_variants(full=args.full, family=args.family)
        extra = sorted({k[0] for s in sets[1:] for k in s - sets[0]})
        print(f"{len(sets[0])} variants at batch 16; new at batch 17 or 5: {len(extra)} {extra}")
        return 1 if extra else 0
    t0 = time.time()
    compiler = Compiler(args.arch, verbose=True)
    install(compiler)
    DRIVERS[args.family](args.full)
    seen = compiler.seen
    print(report(compiler))
    stack = [k[0] for k, (_, s) in seen.items() if s]
    approx = [k[0] for k in seen if compiler.approx.get(k)]
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(seen)} kernel variants compiled in "
          f"{time.time() - t0:.0f}s; {len(stack)} use local memory (stack); {len(approx)} use approximate "
          f"fp32 division / pow / sqrt: {sorted(set(approx))}")


if __name__ == "__main__":
    sys.exit(main())
