"""Trainer demo at a tiny budget: every run happens and the results table is written."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from dctkd_train.cli import main  # noqa: E402
from dctkd_train.demo import DEFAULT_METHODS, demo_plan, run_demo  # noqa: E402
from dctkd_train.errors import UserError  # noqa: E402
from dctkd_train.methods import method_available  # noqa: E402


def test_demo_plan_scales_with_the_budget():
    p1, p4 = demo_plan(1.0), demo_plan(4.0)
    assert p4["n_train"] == 4 * p1["n_train"]
    assert p1["data"].startswith("synthetic-scenes:")
    assert demo_plan(0.01)["n_train"] >= 4 * p1["classes"]
    with pytest.raises(UserError, match="--budget"):
        demo_plan(0)
    assert set(DEFAULT_METHODS) >= {"ce", "kd", "at", "dct", "dct+kd", "dct-paper+kd", "fam"}


@pytest.mark.skipif(not method_available("dct"), reason="dctkd_ext is not built")
def test_tiny_demo(tmp_path, capsys):
    res = run_demo(out=str(tmp_path), budget=0.02, methods="kd,dct", epochs=1, quiet=True,
                   teacher_model="resnet8", student_model="resnet8")
    printed = capsys.readouterr().out
    assert [(r["run"], r["method"]) for r in res["rows"]] == [("teacher", "ce"), ("student", "kd"),
                                                              ("student", "dct")]
    md = (tmp_path / "results.md").read_text()
    assert "| run | model | method | top-1 | top-5 | MCA | loss time (s)" in md
    assert "python -m dctkd_train demo --budget 0.02 --methods kd,dct --teacher-model resnet8" in md
    assert md.strip().splitlines()[-1] in printed
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["rows"]) == 3
    dct = data["rows"][-1]
    assert dct["loss_time_s"] > 0 and 0 <= dct["top1"] <= 100
    assert dct["images_per_sec"] > 0 and "| img/s |" in md
    for run in ("teacher", "student-kd", "student-dct"):
        assert (tmp_path / run / "best.pt").is_file() and (tmp_path / run / "curves.png").is_file()
    # --resume reuses the finished runs
    res2 = run_demo(out=str(tmp_path), budget=0.02, methods="kd,dct", epochs=1, quiet=True, resume=True,
                    teacher_model="resnet8", student_model="resnet8")
    assert [r["top1"] for r in res2["rows"]] == [r["top1"] for r in res["rows"]]


def test_demo_bad_input(capsys, tmp_path):
    rc = main(["demo", "--out", str(tmp_path), "--methods", "ce,crd"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown method(s) crd" in err
