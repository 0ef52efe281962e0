"""bench/gpu_check.sh without a GPU: its plan (dry run), and that a failing or hanging step is
recorded while the next steps still run. The GPU tests it drives (tests/gpu/) skip here."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402

STEPS = ["env", "build", "gpu_tests", "memcheck", "racecheck", "synccheck", "bench", "bench_fam", "tests"]


def test_dry_run_plan(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["steps"]
    assert [row["step"] for row in rows] == STEPS
    assert all(row["status"] in ("planned", "skipped") for row in rows)
    assert "build" in (tmp_path / "summary.md").read_text()
    planned = {row["step"]: row for row in rows if row["status"] == "planned"}
    assert "pip install --no-build-isolation" in planned["build"]["command"]
    assert "bench/run.py" in planned["bench"]["command"] and "--out bench/results/cuda-" in planned["bench"]["command"]
    # every file a step runs exists
    for rel in ("tests/gpu", "tests/gpu/sanitize_cases.py", "bench/run.py"):
        assert os.path.exists(os.path.join(ROOT, rel)), rel
    # the budgets of the steps that decide the run fit in 8 minutes with the default total
    assert sum(planned[s]["timeout_s"] for s in ("env", "build", "gpu_tests")) < 480


def test_sanitizer_steps_with_a_sanitizer(tmp_path):
    steps = {s[0]: s for s in gpu_check.plan(str(tmp_path), python="python", sanitizer="/opt/cs")}
    for tool in ("memcheck", "racecheck", "synccheck"):
        argv = steps[tool][2]
        assert argv[:3] == ["/opt/cs", "--tool", tool] and argv[-3:] == ["tests/gpu/sanitize_cases.py", "--backend", "cuda"]


def test_failures_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    py = sys.executable
    fake = [
        ("first", 30, [py, "-c", "print('hello')"], "passes", {}),
        ("broken", 30, [py, "-c", "import sys; print('boom'); sys.exit(3)"], "fails", {}),
        ("hangs", 2, [py, "-c", "import time; time.sleep(60)"], "times out", {}),
        ("missing", 30, None, "tool not found", {}),
        ("last", 30, [py, "-c", "import os; print(os.environ['DCTKD_GPU_CHECK_OUT'])"], "still runs", {}),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda out: fake)
    rc = gpu_check.main([str(tmp_path), "--budget", "60"])
    assert rc == 1
    rows = {r["step"]: r for r in json.loads((tmp_path / "summary.json").read_text())["steps"]}
    assert [rows[s]["status"] for s in ("first", "broken", "hangs", "missing", "last")] == \
        ["passed", "failed", "timeout", "skipped", "passed"]
    assert rows["broken"]["returncode"] == 3
    assert rows["hangs"]["seconds"] < 20
    assert "boom" in (tmp_path / "broken.log").read_text()
    assert str(tmp_path) in (tmp_path / "last.log").read_text()


def test_budget_skips_what_does_not_fit(tmp_path, monkeypatch):
    py = sys.executable
    fake = [("slow", 30, [py, "-c", "import time; time.sleep(60)"], "", {}), ("after", 30, [py, "-c", "pass"], "", {})]
    monkeypatch.setattr(gpu_check, "plan", lambda out: fake)
    assert gpu_check.main([str(tmp_path), "--budget", "6"]) == 1
    rows = {r["step"]: r for r in json.loads((tmp_path / "summary.json").read_text())["steps"]}
    assert rows["slow"]["status"] == "timeout" and rows["after"]["status"] == "skipped"


def test_gpu_parts_skip_cleanly_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu_check.sh runs these for real")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu", "sanitize_cases.py")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "no GPU" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "gpu")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode in (0, 5) and "skipped" in r.stdout, r.stdout + r.stderr
