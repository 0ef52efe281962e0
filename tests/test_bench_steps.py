"""bench/run.py's training-step timing: every implementation of every step case built first and timed
in rounds, one call each per round, so that a drift of the machine's speed reaches all alike; a case
whose implementation cannot be built is reported with its error, not fatal."""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import run as bench_run  # noqa: E402

from common import Case, Impl, Prepared  # noqa: E402

CPU = torch.device("cpu")


def test_steps_are_timed_in_rounds_and_failures_reported():
    calls = []

    def impl(name):
        return Impl(name, lambda: Prepared(fwd=None, leaves=[], step=lambda: calls.append(name)))

    def broken():
        raise RuntimeError("no such method here")

    cases = [Case(op="train_step", shape_name=f"s:{m}", batch=4, dtype=torch.float32, min_bytes={"step": 0},
                  impls=[impl(f"{m}/ours"), impl(f"{m}/released")] if m != "c" else [Impl("ours", broken)],
                  modes=("step",)) for m in ("a", "b", "c")]
    timer = bench_run.Timer(CPU, min_time=0.0, min_reps=5, max_reps=5)
    recs = bench_run.run_steps(cases, timer, CPU)
    live = ["a/ours", "a/released", "b/ours", "b/released"]
    assert calls == live * 7  # two warm-up rounds, then five timed ones, each one call per implementation
    assert [(r["shape_name"], r["impl"], r["mode"]) for r in recs] == [
        ("s:a", "a/ours", "step"), ("s:a", "a/released", "step"), ("s:b", "b/ours", "step"),
        ("s:b", "b/released", "step"), ("s:c", "ours", "step")]
    assert all(r["reps"] == 5 and r["median_ms"] >= 0 and r["error"] is None for r in recs[:4])
    assert math.isnan(recs[4]["median_ms"]) and recs[4]["error"] == "RuntimeError: no such method here"


def test_a_step_that_fails_in_the_rounds_is_reported_for_every_implementation():
    def fails():
        raise ValueError("diverged")

    ok = Impl("ours", lambda: Prepared(fwd=None, leaves=[], step=lambda: None))
    bad = Impl("released", lambda: Prepared(fwd=None, leaves=[], step=fails))
    case = Case(op="train_step", shape_name="s:a", batch=4, dtype=torch.float32, min_bytes={"step": 0},
                impls=[ok, bad], modes=("step",))
    recs = bench_run.run_steps([case], bench_run.Timer(CPU, min_time=0.0, min_reps=2, max_reps=2), CPU)
    assert [(r["impl"], r["error"], r["reps"]) for r in recs] == [("ours", "ValueError: diverged", 0),
                                                                  ("released", "ValueError: diverged", 0)]
    assert all(math.isnan(r["median_ms"]) for r in recs)


def test_an_op_case_with_rounds_times_its_implementations_in_rounds_each_with_its_upstream():
    calls, seen = [], []

    def impl(name, upstream=None):
        x = torch.ones(3, requires_grad=True)

        def fwd():
            calls.append(name)
            return x * 2.0

        x.register_hook(lambda g: seen.append((name, float(g[0]))))
        return Impl(name, lambda: Prepared(fwd=fwd, leaves=[x]), upstream=upstream)

    def broken():
        raise RuntimeError("cannot build")

    case = Case(op="dct_at_loss", shape_name="s/grad=scale0.5", batch=4, dtype=torch.float32,
                min_bytes={"fwd": 1, "bwd": 1, "fwd+bwd": 1}, upstream="scale=0.5", rounds=True,
                impls=[impl("ours"), impl("ours_upstream1", upstream="ones"), Impl("other", broken)])
    timer = bench_run.Timer(CPU, min_time=0.0, min_reps=3, max_reps=3)
    recs = bench_run.run_case(case, timer, CPU, 1, want_memory=False)
    # per mode: two warm-up rounds, then three rounds of an untimed and a timed call of each live impl
    per_mode = ["ours", "ours_upstream1"] * 2 + ["ours", "ours", "ours_upstream1", "ours_upstream1"] * 3
    assert calls == per_mode * 3
    # the backward of bwd and fwd+bwd carries each impl's own upstream, times the forward's factor 2
    assert set(seen) == {("ours", 1.0), ("ours_upstream1", 2.0)}
    assert len(seen) == 2 * 8 * 2
    assert [(r["impl"], r["mode"], r["upstream"]) for r in recs] == [
        (i, m, u) for i, u in (("ours", "scale=0.5"), ("ours_upstream1", "ones"), ("other", "scale=0.5"))
        for m in ("fwd", "bwd", "fwd+bwd")]
    assert all(r["reps"] == 3 and r["error"] is None for r in recs[:6])
    assert all(math.isnan(r["median_ms"]) and r["error"] == "RuntimeError: cannot build" for r in recs[6:])
