"""Throughput / memory harness of dctkd_ext (docs/DESIGN.md §6).

    python bench/run.py            # the headline cases on the device it finds (CUDA if present, else CPU;
                                   # about 20 minutes on a 2-core CPU)
    python bench/run.py --full     # the whole grid of every suite (much longer)
    python bench/run.py --quick    # the headline cases with short timing loops (CI)

Times forward, backward and forward+backward of every implementation of every case (bench/suites/*.py)
with medians (backward: `loss.backward()` into .grad, set to None before each step), and whole training
steps (suite train_step) in rounds; measures the device's copy bandwidth in the same run, and reports per
record: median
time, GB/s on the case's minimal bytes, that as a fraction of the copy bandwidth, peak extra memory,
and the speed-up of "ours" over every other implementation. Writes JSON (`{"meta": ..., "records": [...]}`),
CSV and a PNG plot under bench/results/ (or --out), and prints a table.
"""

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import dctkd_ext  # noqa: E402

from common import Case, upstream_gradient  # noqa: E402


# ------------------------------------------------------------------------------------------ timing
class Timer:
    """Median wall time of a callable, after two warm-up calls. CPU: perf_counter around each call.
    GPU: CUDA events around each call (run_case rotates input sets larger than L2 between calls)."""

    def __init__(self, device, min_time, min_reps, max_reps):
        self.device, self.min_time, self.min_reps, self.max_reps = device, min_time, min_reps, max_reps

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def once_ms(self, fn, state=None):
        """One call of fn(state), in ms."""
        if self.device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(state)
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        t0 = time.perf_counter()
        fn(state)
        return (time.perf_counter() - t0) * 1e3

    def median_ms(self, fn, setup=None):
        """fn(state) timed; setup() -> state runs untimed before each call (e.g. a forward for bwd)."""
        for _ in range(2):  # warm-up (and compilation)
            fn(setup() if setup else None)
        self.sync()
        times, start = [], time.perf_counter()
        while len(times) < self.max_reps and (len(times) < self.min_reps or time.perf_counter() - start < self.min_time):
            times.append(self.once_ms(fn, setup() if setup else None))
        return statistics.median(times), len(times)

    def medians_in_rounds(self, fns, setups=None, untimed=0):
        """Each of fns timed once per round, round after round (at least min_reps rounds, and min_time per
        callable): a drift of the machine's speed reaches all of them alike. setups[i]() -> state (or None)
        runs untimed before each call of fns[i], as in median_ms; `untimed` more calls of fns[i] run right
        before its timed one in each round. Returns (median ms, reps) each."""
        setups = setups or [None] * len(fns)
        state = lambda setup: setup() if setup else None  # noqa: E731
        for _ in range(2):
            for fn, setup in zip(fns, setups):
                fn(state(setup))
        self.sync()
        times, start = [[] for _ in fns], time.perf_counter()
        while len(times[0]) < self.max_reps and (len(times[0]) < self.min_reps or
                                                 time.perf_counter() - start < self.min_time * len(fns)):
            for fn, setup, t in zip(fns, setups, times):
                if untimed:
                    for _ in range(untimed):
                        fn(state(setup))
                    self.sync()
                t.append(self.once_ms(fn, state(setup)))
        return [(statistics.median(t), len(t)) for t in times]


def copy_bandwidth_gbps(device, timer, nbytes):
    """Device-to-device copy: reads and writes nbytes each, so 2 * nbytes moved per copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms, _ = timer.median_ms(lambda _: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------- memory
def peak_extra_mb(device, run):
    """Peak memory allocated while `run` executes, above what was allocated before it (MiB).
    CUDA: the caching allocator's peak. CPU: the profiler's record of every allocation and free
    (temporaries inside one kernel included) replayed in time order. The profiler sizes a free only
    for memory it saw allocated (a block from before it recorded is missed, or counted with the stale
    size of an earlier block at its address), so what `run` frees must have been allocated under the
    profiler: run_case runs one profiled step before the measured one, whose release of the previous
    step's gradients (as optimizer.zero_grad() does) is then counted."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    records = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    cur = peak = 0
    for _, nbytes in sorted(records, key=lambda r: r[0]):  # stable: records of one instant keep their order
        cur += nbytes
        peak = max(peak, cur)
    return peak / 2**20


class _native_stderr_silenced:
    """The profiler's native library prints trace-stage lines on fd 2 at every start and stop."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        return False


# ------------------------------------------------------------------------------------------ runner
class _Timed:
    """One implementation of a case made ready to time: its input sets (rotated between calls) and the
    callables of the three modes."""

    def __init__(self, case: Case, impl, rotate: int):
        self.sets = [impl.make() for _ in range(rotate)]
        self.i = 0
        self.upstream = impl.upstream or case.upstream
        self.grads = {}

    def nxt(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]

    @staticmethod
    def clear(p):
        # The training-step pattern: loss.backward() accumulates into .grad, which is set to None
        # before each step as optimizer.zero_grad() does.
        for leaf in p.leaves:
            leaf.grad = None

    def backward(self, y):
        # A fresh upstream gradient each step, as a loss's backward makes one (the step's memory
        # counts it); ones and scales are filled, an MSE's is copied from one drawn per output shape.
        if self.upstream != "mse":
            return y.backward(upstream_gradient(self.upstream, y))
        key = (tuple(y.shape), y.dtype, y.device)
        if key not in self.grads:
            self.grads[key] = upstream_gradient(self.upstream, y)
        y.backward(self.grads[key].clone())

    def fwd(self, _):
        return self.nxt().fwd()

    def fwd_bwd(self, _):
        p = self.nxt()
        self.clear(p)
        self.backward(p.fwd())

    def setup_bwd(self):
        p = self.nxt()
        self.clear(p)
        return p, p.fwd()

    def bwd(self, state):
        self.backward(state[1])

    def modes(self):
        """mode -> (fn(state), setup or None)"""
        return {"fwd": (self.fwd, None), "bwd": (self.bwd, self.setup_bwd), "fwd+bwd": (self.fwd_bwd, None)}

    def peak_memory(self, device):
        if device.type == "cpu":  # one profiled step first, so the profiler sizes the release of its grads
            for _ in self.sets:
                peak_extra_mb(device, lambda: self.fwd_bwd(None))
        p = self.sets[0]
        mem = {"fwd": peak_extra_mb(device, lambda: p.fwd()),
               "fwd+bwd": peak_extra_mb(device, lambda: self.fwd_bwd(None))}
        mem["bwd"] = mem["fwd+bwd"]
        return mem


def run_case(case: Case, timer: Timer, device, rotate: int, want_memory: bool):
    """fwd, bwd and fwd+bwd of every implementation of a case: one implementation after another, or, for a
    case with rounds=True, all of them in rounds (Timer.medians_in_rounds) mode by mode."""
    if case.rounds:
        return _run_case_in_rounds(case, timer, device, rotate, want_memory)
    out = []
    for impl in case.impls:
        try:
            timed = _Timed(case, impl, rotate)
            t = {mode: timer.median_ms(fn, setup=setup) for mode, (fn, setup) in timed.modes().items()}
            mem = timed.peak_memory(device) if want_memory else {}
            error = None
        except Exception as exc:  # a baseline that cannot run this case is reported, not fatal
            t, mem, error = {m: (math.nan, 0) for m in case.modes}, {}, _error(exc)
        for mode in case.modes:
            out.append(_record(case, impl, mode, device, *t[mode], mem.get(mode), error))
        timed = None  # frees this impl's inputs before the next impl makes its own
    return out


def _run_case_in_rounds(case: Case, timer: Timer, device, rotate: int, want_memory: bool):
    built = []  # (impl, _Timed or None, error or None)
    for impl in case.impls:
        try:
            built.append((impl, _Timed(case, impl, rotate), None))
        except Exception as exc:  # reported, not fatal
            built.append((impl, None, _error(exc)))
    live = [timed for _, timed, _ in built if timed is not None]
    times = {timed: {} for timed in live}  # _Timed -> mode -> (median ms, reps)
    mems = {timed: {} for timed in live}
    failure = None
    try:
        for mode in case.modes:
            fns, setups = zip(*(timed.modes()[mode] for timed in live)) if live else ((), ())
            # one untimed call before each timed one: an op may carry state from its last call to the next
            # (dct_at_loss guesses its upstream gradient from it), which the other impls' calls in between
            # would upset; in a loop of its own, as in training, the previous call is its own
            for timed, m in zip(live, timer.medians_in_rounds(list(fns), setups=list(setups), untimed=1)):
                times[timed][mode] = m
        if want_memory:
            for timed in live:
                mems[timed] = timed.peak_memory(device)
    except Exception as exc:  # one failing impl stops the rounds: every live implementation reports it
        failure = _error(exc)
        times = {timed: {} for timed in live}
    out = []
    for impl, timed, error in built:
        error = error or (failure if timed is not None else None)
        for mode in case.modes:
            ms, reps = times.get(timed, {}).get(mode, (math.nan, 0))
            out.append(_record(case, impl, mode, device, ms, reps, mems.get(timed, {}).get(mode), error))
    return out


def run_steps(cases: List[Case], timer: Timer, device):
    """Cases of mode "step" (whole training steps): every implementation of every case is built first and
    all are timed in rounds (Timer.medians_in_rounds), since the steps of different methods are compared
    with each other and a step's time drifts with the machine by more than those differences."""
    built = []  # (case, impl, step or None, error or None)
    for case in cases:
        for impl in case.impls:
            try:
                built.append((case, impl, impl.make().step, None))
            except Exception as exc:  # reported, not fatal
                built.append((case, impl, None, _error(exc)))
    live = [b for b in built if b[2] is not None]
    try:
        timed = timer.medians_in_rounds([lambda _, f=b[2]: f() for b in live])
    except Exception as exc:  # one failing step stops the rounds: every live implementation reports it
        err = _error(exc)
        built = [(c, i, None, e or err) for c, i, _, e in built]
        timed = []
    medians = iter(timed)  # in the order of `live`
    return [_record(case, impl, "step", device, *(next(medians) if step is not None else (math.nan, 0)), None, error)
            for case, impl, step, error in built]


def _record(case, impl, mode, device, ms, reps, peak_mem_mb, error):
    """One result record of `impl` on `case` in `mode`."""
    return dict(op=case.op, impl=impl.name, mode=mode, shape_name=case.shape_name, batch=case.batch,
                dtype=str(case.dtype).replace("torch.", ""), device=device_name(device), median_ms=ms, reps=reps,
                min_bytes=case.min_bytes[mode], upstream=impl.upstream or case.upstream, peak_mem_mb=peak_mem_mb, error=error,
                **case.extra)


def _error(exc):
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def finish_records(records, copy_gbps, meta):
    key = lambda r: (r["op"], r["shape_name"], r["batch"], r["dtype"], r["mode"])  # noqa: E731
    by_case = {}
    for r in records:
        by_case.setdefault(key(r), {})[r["impl"]] = r
    for r in records:
        ms = r["median_ms"]
        ok = ms == ms and ms > 0
        r["gbps"] = r["min_bytes"] / (ms * 1e-3) / 1e9 if ok and r["min_bytes"] else None
        r["bw_fraction"] = r["gbps"] / copy_gbps if r["gbps"] else None
        if r["mode"] == "step":
            r["img_per_s"] = r["batch"] / (ms * 1e-3) if ok else None
        r["speedup_vs"] = {}
        if r["impl"] == "ours" and ok:
            for name, other in by_case[key(r)].items():
                if name != "ours" and other["median_ms"] == other["median_ms"]:
                    r["speedup_vs"][name] = other["median_ms"] / ms
        r.update(torch_version=meta["torch"], triton_version=meta["triton"], date=meta["date"])
    return records


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def cpu_model():
    """The host CPU's model name and its widest x86 vector extension (the C++ kernels dispatch on it), from
    /proc/cpuinfo; the platform's processor string elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    return f"{name}, {isa}"


def print_table(records, copy_gbps):
    print(f"\ncopy bandwidth: {copy_gbps:.1f} GB/s")
    head = f"{'op':<14}{'shape':<18}{'B':>5} {'dtype':<9}{'mode':<8}{'impl':<20}{'ms':>10}{'GB/s':>9}{'bw%':>7}{'MiB':>9}  speed-up of ours"
    print(head)
    print("-" * len(head))
    for r in records:
        ms = f"{r['median_ms']:.3f}" if r["median_ms"] == r["median_ms"] else "n/a"
        gb = f"{r['gbps']:.1f}" if r["gbps"] else "-"
        bw = f"{100 * r['bw_fraction']:.0f}" if r["bw_fraction"] else "-"
        mem = f"{r['peak_mem_mb']:.1f}" if r.get("peak_mem_mb") is not None else "-"
        if r["mode"] == "step" and r.get("img_per_s"):
            gb, bw = f"{r['img_per_s']:.1f}", "img/s"
        sp = " ".join(f"{k}={v:.2f}x" for k, v in r["speedup_vs"].items())
        if r.get("error"):
            sp = r["error"][:60]
        print(f"{r['op']:<14}{r['shape_name']:<18}{r['batch']:>5} {r['dtype']:<9}{r['mode']:<8}{r['impl']:<20}{ms:>10}{gb:>9}{bw:>7}{mem:>9}  {sp}")


def plot(records, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["mode"] in ("fwd+bwd", "step")]
    cases = list(dict.fromkeys((r["op"], r["shape_name"], r["batch"], r["dtype"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4.2))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        ys = []
        for c in cases:
            m = [r["median_ms"] for r in rows if (r["op"], r["shape_name"], r["batch"], r["dtype"]) == c and r["impl"] == impl]
            ys.append(m[0] if m and m[0] == m[0] else 0)
        ax.bar([x + i * width for x in range(len(cases))], ys, width, label=impl)
    ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(cases))])
    ax.set_xticklabels([f"{o}\n{s}\nB={b} {d}" for o, s, b, d in cases], fontsize=7)
    ax.set_ylabel("median ms, forward+backward or training step (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"dctkd_ext on {meta['device']} ({meta['date'][:10]})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(records, path):
    import csv

    cols = ["op", "impl", "mode", "shape_name", "batch", "dtype", "device", "upstream", "median_ms", "gbps",
            "bw_fraction", "img_per_s", "peak_mem_mb", "min_bytes", "reps", "error"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols + ["speedup_vs"])
        for r in records:
            w.writerow([r.get(c) for c in cols] + [json.dumps(r["speedup_vs"])])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short timing loops (the headline cases unless --full)")
    ap.add_argument("--full", action="store_true", help="every case of every suite (default: the headline cases)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--suites", default=None, help="comma-separated suites (default: all in bench/suites/)")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--dtypes", type=lambda s: s.split(","), default=None, help="e.g. float32,bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<device>.json); CSV/PNG beside it")
    ap.add_argument("--ops", action="store_true", help="also the single-op cases (attention_map, dct2d) on the GPU without --full (the CPU headline has them)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the compiled baselines (default: max-autotune-no-cudagraphs on "
                         "the GPU; 'default' compiles much faster)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    timer = Timer(device, min_time=(0.2 if args.quick else 1.0), min_reps=(3 if args.quick else 10),
                  max_reps=(20 if args.quick else 200))
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(device=device_name(device), torch=torch.__version__, triton=triton_version,
                dctkd_ext=dctkd_ext.__version__, backend=dctkd_ext.get_backend(), threads=torch.get_num_threads(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                quick=args.quick, python=platform.python_version(), cpu=cpu_model())
    print(f"dctkd_ext bench on {meta['device']} ({meta['cpu']}); torch {meta['torch']}, triton {meta['triton']}",
          flush=True)
    copy_gbps = copy_bandwidth_gbps(device, timer, (1 << 30) if gpu else (256 << 20))
    meta["copy_gbps"] = copy_gbps
    print(f"device copy bandwidth: {copy_gbps:.1f} GB/s", flush=True)

    names = args.suites.split(",") if args.suites else sorted(
        f[:-3] for f in os.listdir(os.path.join(HERE, "suites")) if f.endswith(".py") and not f.startswith("_"))
    cases = []
    for name in names:
        mod = importlib.import_module(f"suites.{name}")
        cases += mod.cases(args, device)
    records = []
    steps = [c for c in cases if c.modes == ("step",)]
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.op} {case.shape_name} B={case.batch} {str(case.dtype)[6:]} "
              f"({', '.join(im.name for im in case.impls)})" + (" (timed below, in rounds)" if case in steps else ""),
              flush=True)
        if case in steps:
            continue
        total = max(case.min_bytes.values())
        # GPU: enough input sets that consecutive calls do not hit in L2 (~50 MB on H100/H200)
        rotate = min(8, max(1, math.ceil(200e6 / max(total, 1)))) if gpu else 1
        t0 = time.perf_counter()
        records += run_case(case, timer, device, rotate, want_memory=not args.no_memory)
        print(f"    done in {time.perf_counter() - t0:.1f} s", flush=True)
    if steps:
        print(f"{len(steps)} training-step cases, every implementation timed in rounds", flush=True)
        t0 = time.perf_counter()
        # more rounds than an op's reps: a step's time scatters by about 10% from one call to the next here
        step_timer = Timer(device, min_time=0.0, min_reps=3 if args.quick else 20, max_reps=200)
        records += run_steps(steps, step_timer, device)
        print(f"    done in {time.perf_counter() - t0:.1f} s", flush=True)
    finish_records(records, copy_gbps, meta)
    print_table(records, copy_gbps)

    out = args.out or os.path.join(HERE, "results", (
        ("quick-" if args.quick else "") + ("cuda-" + torch.cuda.get_device_name(device) if gpu else "cpu")
    ).replace(" ", "_").lower() + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    os.replace(out + ".tmp", out)
    stem = out[:-5] if out.endswith(".json") else out
    write_csv(records, stem + ".csv")
    try:
        plot(records, stem + ".png", meta)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    print(f"\nwrote {out}, {stem}.csv, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
