"""Validate and measure dctkd_ext on a GPU machine in one go (driven by bench/gpu_check.sh).

    bash bench/gpu_check.sh [OUT_DIR]            # or OUT=... ; default gpu_check_out/<date>
    python bench/gpu_check.py --dry-run OUT_DIR  # the plan and its commands, nothing run

On a fresh H100/H200 machine with torch, triton, nvcc and ninja installed (no network), the steps run
one after another, each with its own time limit, the whole under --budget seconds (default 470):

  env        nvidia-smi, nvcc, torch / triton versions
  build      pip install --no-build-isolation -e .  (the CUDA kernels for this GPU's architecture)
  gpu_tests  tests/gpu/: every backend against the float64 reference on the GPU (dtypes, layouts,
             sliced inputs, odd channels, NaN-poisoned outputs), tf32x3 accuracy, the large-index
             attention_map case, CUDA-graph capture, bitwise-equal reruns, inputs on cuda:1
  memcheck / racecheck / synccheck
             compute-sanitizer on small shapes of every CUDA kernel (tests/gpu/sanitize_cases.py)
  bench      bench/run.py on the headline grid (dct_at_loss at ResNet-50 -> ResNet-18, B = 16 and
             128, bf16), ours on the CUDA and on the Triton backend, into bench/results/<gpu>.json
  bench_fam  bench/run.py --quick --suites spectral,fam_layer (CUDA and Triton), into bench/results/<gpu>-fam.json
  tests      the rest of the test suite on the GPU, in the time left

A failing or timed-out step is recorded and the next one runs. Everything goes under OUT_DIR:
<step>.log (command, output, exit status, seconds), junit XML of the pytest steps, the benchmark's
JSON / CSV / PNG, and summary.json / summary.md (one row per step). Exit status 0 only when every
step passed.
"""

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_sanitizer():
    """compute-sanitizer from CUDA_HOME, the usual toolkit places or PATH; None if absent."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, homes):
        for sub in ("bin", os.path.join("extras", "compute-sanitizer")):
            path = os.path.join(home, sub, "compute-sanitizer")
            if os.path.exists(path):
                return path
    return shutil.which("compute-sanitizer")


def gpu_name() -> str:
    """cuda-<name of GPU 0> as bench/run.py names its results (from nvidia-smi: no CUDA context here)."""
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=15).stdout.splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired, IndexError):
        name = "gpu"
    return ("cuda-" + name).replace(" ", "_").lower()


def plan(out: str, python: str = sys.executable, sanitizer=None):
    """The steps: (name, budget seconds, argv or None when skipped, why skipped / what it is, env)."""
    py = [python]
    tests_junit = lambda name: ["--junitxml", os.path.join(out, name + ".xml")]  # noqa: E731
    san = sanitizer if sanitizer is not None else find_sanitizer()
    steps = [
        ("env", 20, py + [os.path.join("bench", "gpu_check.py"), "--env"], "machine, driver and versions", {}),
        # MAX_JOBS: ninja's parallel jobs; the arch list defaults to the visible GPUs' in the build
        ("build", 210, py + ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
         "the extension with its CUDA kernels", {"MAX_JOBS": str(os.cpu_count() or 8)}),
        ("gpu_tests", 110, py + ["-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider",
                                 os.path.join("tests", "gpu")] + tests_junit("gpu_tests"),
         "tests/gpu on the GPU", {}),
    ]
    cases = os.path.join("tests", "gpu", "sanitize_cases.py")
    for tool, budget in (("memcheck", 45), ("racecheck", 45), ("synccheck", 30)):
        argv = None
        if san:
            argv = [san, "--tool", tool, "--error-exitcode", "9", "--print-limit", "50",
                    "--launch-timeout", "60"] + (["--racecheck-report", "all"] if tool == "racecheck" else []) + \
                py + [cases, "--backend", "cuda"]
        steps.append((tool, budget, argv, "compute-sanitizer " + tool if san else "compute-sanitizer not found", {}))
    res = os.path.join("bench", "results", gpu_name())
    steps += [
        # --quick's GPU grid, at the target batches: dct_at_loss ResNet-50 -> ResNet-18, B = 16 and 128, bf16
        ("bench", 100, py + [os.path.join("bench", "run.py"), "--quick", "--suites", "dct_at", "--batches", "16,128",
                             "--dtypes", "bfloat16", "--compile-mode", "default", "--out", res + ".json"],
         "bench/run.py: dct_at_loss headline cases, ours on the CUDA and Triton backends vs eager and compiled", {}),
        ("bench_fam", 50, py + [os.path.join("bench", "run.py"), "--quick", "--suites", "spectral,fam_layer",
                                 "--out", res + "-fam.json"],
         "bench/run.py: FAM quick cases (CUDA and Triton)", {}),
        ("tests", 300, py + ["-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider",
                             os.path.join("tests", "test_dct_at.py"), os.path.join("tests", "test_triton_dct_at.py"),
                             os.path.join("tests", "test_spectral.py")] + tests_junit("tests"),
         "the op test files on the GPU, in the time left", {}),
    ]
    return steps


def run_step(name, budget, argv, env_extra, out, deadline):
    """Run one step with a timeout of min(budget, time left); its output and status go to <name>.log."""
    left = deadline - time.monotonic()
    timeout = max(1, int(min(budget, left)))
    log = os.path.join(out, name + ".log")
    row = {"step": name, "command": " ".join(shlex.quote(a) for a in argv), "timeout_s": timeout}
    if left < 5:
        row.update(status="skipped", reason="no time left in the budget", seconds=0.0)
        return row
    env = dict(os.environ, **env_extra, DCTKD_GPU_CHECK_OUT=out, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {row['command']}\n# timeout {timeout} s, started {datetime.datetime.now().isoformat()}\n")
        f.flush()
        # own process group, so that a timeout ends the step's children too (pytest workers, nvcc)
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, status = None, "timeout"
        secs = time.monotonic() - t0
        f.write(f"\n# exit status {rc}, {status}, {secs:.1f} s\n")
    row.update(status=status, returncode=rc, seconds=round(secs, 1))
    return row


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def write_summary(out, rows, started, dry_run):
    summary = {"started": started, "dry_run": dry_run, "root": ROOT, "steps": rows,
               "passed": all(r["status"] == "passed" for r in rows)}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# dctkd_ext GPU check ({started}{', dry run' if dry_run else ''})", "",
             "| step | status | seconds | timeout | command |", "|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['status']}{' (' + r['reason'] + ')' if r.get('reason') else ''} | "
                     f"{r.get('seconds', '')} | {r.get('timeout_s', '')} | `{r['command']}` |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


def collect_bench(out, since):
    """Copy the benchmark files bench/run.py wrote in this run (bench/results/cuda-*) into OUT."""
    res = os.path.join(ROOT, "bench", "results")
    copied = []
    if os.path.isdir(res):
        for name in sorted(os.listdir(res)):
            path = os.path.join(res, name)
            if name.startswith("cuda-") and os.path.getmtime(path) >= since:
                shutil.copy(path, os.path.join(out, name))
                copied.append(name)
    return copied


def print_env():
    """The env step: what machine this is (never fails on a missing tool)."""
    for argv in (["nvidia-smi"], ["nvidia-smi", "topo", "-m"], ["nvcc", "--version"], ["ninja", "--version"]):
        print("$", " ".join(argv), flush=True)
        try:
            print(subprocess.run(argv, capture_output=True, text=True, timeout=15).stdout, flush=True)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"  unavailable: {e}", flush=True)
    import torch

    print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs {p.total_memory / 2**30:.0f} GiB")
    try:
        import triton

        print("triton", triton.__version__)
    except ImportError:
        print("triton not installed")
    print("compute-sanitizer", find_sanitizer())
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT"), help="output folder (default $OUT or gpu_check_out/<date>)")
    ap.add_argument("--dry-run", action="store_true", help="write the plan (summary.json / .md) without running anything")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for all steps together")
    ap.add_argument("--only", default=None, help="comma-separated steps to run (default: all)")
    ap.add_argument("--env", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.env:
        return print_env()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = os.path.abspath(args.out or os.path.join(ROOT, "gpu_check_out", started.replace(":", "")))
    os.makedirs(out, exist_ok=True)
    steps = plan(out)
    if args.only:
        keep = args.only.split(",")
        unknown = sorted(set(keep) - {s[0] for s in steps})
        if unknown:
            ap.error(f"--only: unknown steps {unknown}; steps are {[s[0] for s in steps]}")
        steps = [s for s in steps if s[0] in keep]
    deadline = time.monotonic() + args.budget
    t_start = time.time()
    rows = []
    for name, budget, cmd, what, env_extra in steps:
        if cmd is None:
            rows.append({"step": name, "status": "skipped", "reason": what, "command": "", "seconds": 0.0})
        elif args.dry_run:
            rows.append({"step": name, "status": "planned", "command": " ".join(shlex.quote(a) for a in cmd),
                         "timeout_s": budget, "what": what, "env": env_extra})
        else:
            print(f"[gpu_check] {name}: {what} (up to {int(min(budget, deadline - time.monotonic()))} s)", flush=True)
            row = run_step(name, budget, cmd, env_extra, out, deadline)
            row["what"] = what
            rows.append(row)
            print(f"[gpu_check] {name}: {row['status']} in {row.get('seconds', 0)} s", flush=True)
            if row["status"] != "passed":
                for line in tail(os.path.join(out, name + ".log")):
                    print("    " + line)
            if name.startswith("bench"):
                row["files"] = collect_bench(out, t_start)
        write_summary(out, rows, started, args.dry_run)  # after every step: a killed run keeps its rows
    summary = write_summary(out, rows, started, args.dry_run)
    print(f"[gpu_check] wrote {out}/summary.md: " + ", ".join(f"{r['step']} {r['status']}" for r in rows))
    return 0 if (summary["passed"] or args.dry_run) else 1


if __name__ == "__main__":
    sys.exit(main())
