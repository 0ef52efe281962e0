"""Compile the Triton kernels for a GPU architecture on a machine without a GPU.

    python -m dctkd_ext.triton._compile_check [--arch 90] [--full]

Runs the Triton ops on small CPU tensors with every kernel launch replaced by a compilation for the
target (frontend, TTIR, TTGIR, LLVM, PTX and ptxas: everything but running it), with the argument
specialisation the JIT would use (integers equal to 1 become constants, pointers and multiples of
16 get the divisibility hint). This catches what the interpreter does not check (types, constexpr
use, layouts, resource limits) and prints each variant's registers / spills. TRITON_INTERPRET must be
unset. --full compiles every dtype, layout and option (many minutes); the default is a quick subset.
"""

import argparse
import os
import re
import sys
import time

import torch

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _specialise(fn, args, kwargs):
    names = fn.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in kwargs:
            signature[name] = "constexpr"
            constexprs[name] = kwargs[name]
            continue
        a = args[i]
        if isinstance(a, torch.Tensor):
            signature[name] = "*" + _TY[a.dtype]
            if a.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            signature[name] = "i1"
        elif isinstance(a, int):
            if a == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32" if -(2**31) <= a < 2**31 else "i64"
                if a % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(a).__name__}")
    return signature, constexprs, attrs


class Compiler:
    def __init__(self, arch: int, verbose: bool = True):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.seen = {}
        self.verbose = verbose

    def launch(self, kernel, grid, *args, num_warps=4, num_stages=3, **kwargs):
        if grid[0] == 0:
            return
        import triton
        from triton.compiler import ASTSource

        signature, constexprs, attrs = _specialise(kernel, args, kwargs)
        key = (kernel.__name__, tuple(sorted(signature.items())),
               tuple(sorted((k, str(v)) for k, v in constexprs.items())), tuple(sorted(attrs)), num_warps, num_stages)
        if key in self.seen:
            return
        t0 = time.time()
        src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=self.target, options=dict(num_warps=num_warps, num_stages=num_stages))
        regs, spills = _resources(compiled)
        self.seen[key] = (regs, spills)
        if self.verbose:
            cx = {k: v for k, v in constexprs.items() if not re.fullmatch(r"(O|TH|TW|C|HW)[1-7]|gl_stride|H|W", k)}
            print(f"{kernel.__name__:16s} {time.time() - t0:5.1f}s regs={regs} stack={spills}B warps={num_warps} "
                  f"{cx}", flush=True)


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


def run(arch: int = 90, full: bool = False, verbose: bool = True) -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the compile check needs the compiler, not the interpreter")
    from . import _common

    compiler = Compiler(arch, verbose)
    # before the kernel families import them: launches compile instead of running
    _common.launch = compiler.launch
    _common.wrap_triton = lambda kernel: kernel
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
                x = feats(2, c, hw, hw, dtype, cl)
                for p in (2.0, 1.0, 1.5) if full else (2.0,):
                    ops.attention_map(x, p, "mean")
                    ops.attention_map_backward(torch.randn(2, hw, hw), x, p, "sum")
    for dtype in dtypes + ((torch.float64,) if full else ()):
        for shape in ((3, 7, 7), (2, 56, 56), (1, 1)) if full else ((3, 7, 7), (2, 56, 56)):
            a = torch.randn(shape).to(dtype)
            ops.dct2d(a)
            ops.idct2d(a)
    # student / teacher channels and map side of ResNet-50 -> ResNet-18 on 224 x 224 images
    resnet = [(64, 256, 56), (128, 512, 28), (256, 1024, 14), (512, 2048, 7)]
    configs = [dict(preset="dct"), dict(preset="paper"), dict(preset="at")]
    if full:
        configs += [dict(preset="dct", map_norm=n) for n in ("max", "l2", "none")]
        configs += [dict(preset="dct", coef_norm=n) for n in ("max", "l2", "none")]
        configs += [dict(preset="dct", transform="fft_real"), dict(preset="dct", transform="identity")]
        configs += [dict(preset="dct", distance=d) for d in ("mse", "sse")]
        configs += [dict(preset="dct", center=False, coef_abs=False), dict(preset="dct", p=1.5)]
    # quick: one map held in registers (14 x 14) and one through scratch (28 x 28), preset dct
    for cfg in configs if full else configs[:1]:
        cfg = dict(cfg)
        o = resolve_options(cfg.pop("preset"), cfg)
        for dtype in (torch.float32, torch.bfloat16) if full else (torch.float32,):
            levels = resnet if full else resnet[1:3]
            s = [feats(2, cs, hw, hw, dtype, False) for cs, _, hw in levels]
            t = [feats(2, ct, hw, hw, dtype, False) for _, ct, hw in levels]
            _, gmaps = ops.dct_at_loss(s, t, [1.0] * len(levels), o["p"], o["map_norm"], o["center"],
                                       o["transform"], o["coef_abs"], o["coef_norm"], o["distance"], o["eps"])
            gmaps = [torch.randn(g.shape) for g in gmaps]
            ops.dct_at_loss_backward(torch.randn(2), gmaps, s, o["p"])
    return compiler.seen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--full", action="store_true", help="every option of dct_at_loss (slow)")
    args = ap.parse_args(argv)
    import triton

    t0 = time.time()
    seen = run(args.arch, args.full)
    stack = [k[0] for k, (_, s) in seen.items() if s]
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(seen)} kernel variants compiled in "
          f"{time.time() - t0:.0f}s; {len(stack)} use local memory (stack)")


if __name__ == "__main__":
    sys.exit(main())
