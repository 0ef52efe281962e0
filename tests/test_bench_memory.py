"""bench/run.py's CPU peak-memory measure: every allocation and free replayed in order, and the same
figure on every run of a training step that releases the previous step's gradients."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import run as bench_run  # noqa: E402

from common import Case, Impl, Prepared  # noqa: E402

MIB = 1 << 20
CPU = torch.device("cpu")


def test_peak_replays_allocations_and_frees_in_order():
    def step():
        a = torch.empty(8 * MIB, dtype=torch.uint8)
        del a
        kept = torch.empty(2 * MIB, dtype=torch.uint8)
        b = torch.empty(3 * MIB, dtype=torch.uint8)
        del b
        return kept

    assert abs(bench_run.peak_extra_mb(CPU, step) - 8.0) < 0.1


def test_run_case_memory_is_the_same_on_every_run():
    # y = 2 x on 1 MiB: the step releases the previous dx (1 MiB), then holds y, dy and the new dx
    def make():
        x = torch.randn(MIB // 4, requires_grad=True)
        return Prepared(fwd=lambda: x * 2, leaves=[x])

    case = Case(op="toy", shape_name="s", batch=1, dtype=torch.float32, min_bytes={"fwd": 1, "bwd": 1, "fwd+bwd": 1},
                impls=[Impl("ours", make)])
    timer = bench_run.Timer(CPU, min_time=0.0, min_reps=1, max_reps=1)
    figures = []
    for _ in range(3):
        recs = bench_run.run_case(case, timer, CPU, 1, True)
        figures.append({r["mode"]: r["peak_mem_mb"] for r in recs})
    assert all(f == figures[0] for f in figures), figures
    assert abs(figures[0]["fwd+bwd"] - 2.0) < 0.1, figures[0]
