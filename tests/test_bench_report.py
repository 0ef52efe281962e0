"""bench/report.py's target check: each target read from the right record, met or not, and
reported as missing when the run lacks its case."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import report  # noqa: E402
import targets  # noqa: E402


def _record(impl, speedups=None, bw=0.5, mem=10.0, dtype="float32", mode="fwd+bwd"):
    return {"op": "dct_at_loss", "shape_name": "s", "batch": 4, "dtype": dtype, "mode": mode, "impl": impl,
            "speedup_vs": speedups or {}, "bw_fraction": bw, "peak_mem_mb": mem}


def _target(metric, goal, vs=None):
    return dict(op="dct_at_loss", shape="s", batch=4, dtype="float32", metric=metric, goal=goal, vs=vs)


def test_targets_are_read_from_the_matching_forward_backward_record():
    data = {"records": [
        _record("ours", {"compiled": 1.4}, bw=0.6, mem=5.0, mode="fwd"),  # another mode: ignored
        _record("ours", {"compiled": 1.2}, bw=0.85, mem=5.0),
        _record("eager", mem=20.0),
        _record("ours", {"compiled": 9.0}, dtype="bfloat16"),  # another dtype: ignored
    ]}
    targets = [_target("speedup", 1.3, "compiled"), _target("speedup", 1.1, "compiled"), _target("bw", 0.8),
               _target("mem", 0.5, "eager"), _target("mem", 0.2, "eager"), _target("speedup", 2.0, "absent")]
    got = [(value, met) for _, value, met in report.check_targets(data, targets)]
    assert got == [(1.2, False), (1.2, True), (0.85, True), (0.25, True), (0.25, False), (None, None)]


def test_the_target_table_has_one_row_per_target():
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "results", "cpu.json")
    text = report.render_targets(path)
    assert text.count("\n| ") == len(targets.CPU_TARGETS) + 1  # header row + one per target


def test_step_table_pairs_each_method_with_its_released_step_and_the_kd_step(tmp_path):
    def step(method, impl, ms):
        return {"op": "train_step", "shape_name": f"c:{method}", "batch": 64, "dtype": "float32", "mode": "step",
                "impl": impl, "median_ms": ms, "img_per_s": 64 / (ms * 1e-3), "speedup_vs": {}, "error": None}

    meta = {"device": "cpu", "torch": "t", "date": "2026-01-01", "copy_gbps": 1.0}
    records = [step("kd", "ours", 200.0), step("fam", "ours", 250.0), step("fam", "eager_released", 500.0),
               step("ce", "ours", 100.0)]
    path = tmp_path / "r.json"
    path.write_text(__import__("json").dumps({"meta": meta, "records": records}))
    rows = [r for r in report.render_steps(str(path)).splitlines() if r.startswith("| c |")]
    assert rows == ["| c | 64 | kd | 200 | 320.0 | - | - | 1.00 |",
                    "| c | 64 | fam | 250 | 256.0 | 500 | 2.00x | 1.25 |",
                    "| c | 64 | ce | 100 | 640.0 | - | - | 0.50 |"]
    assert report.render_steps(str(path)) in report.render_all(str(path))


def test_a_ratio_is_taken_against_an_implementation_of_the_same_case_or_ours_at_another_shape():
    def timed(impl, ms, shape="s"):
        return dict(_record(impl), shape_name=shape, median_ms=ms)

    data = {"records": [timed("ours", 10.5), timed("ours_upstream1", 10.0), timed("ours", 7.0, shape="t")]}
    against_impl = _target("ratio", 1.1, "ours_upstream1")
    against_shape = dict(_target("ratio", 1.3), of="t")
    got = [(round(value, 6), met) for _, value, met in report.check_targets(data, [against_impl, against_shape])]
    assert got == [(1.05, True), (1.5, False)]
