"""Trainer under DDP: 2 CPU processes under torchrun (gloo): a DCT student and a resume; the ranks'
models against each other and against one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from dctkd_train.models import build_model  # noqa: E402
from dctkd_train.train import evaluate_checkpoint  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
]

DATA = "synthetic-scenes:size=16,classes=4,train=64,val=30"


def torchrun(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dctkd_train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_ddp_two_processes_on_cpu(tmp_path):
    pytest.importorskip("dctkd_ext")
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    torch.save({"arch": "resnet8", "num_classes": 4, "model": build_model("resnet8", 4).state_dict()}, teacher)
    out = tmp_path / "ddp"
    common = ["train", "--data", DATA, "--model", "resnet8", "--method", "dct", "--teacher", str(teacher),
              "--batch-size", "8", "--device", "cpu", "--out", str(out), "--no-progress"]
    p = torchrun(*common, "--epochs", "1")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    p = torchrun(*common, "--epochs", "2", "--resume")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resuming" in p.stdout

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["environment"]["world_size"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["val_images"] == 30  # each rank evaluates its own shard: no duplicates, none left out
        assert r["steps"] == 4  # 64 images / 2 processes / batch 8
        assert "train_loss_dct" in r
    # the model is the same on every rank: one process evaluating last.pt gets the logged numbers
    res = evaluate_checkpoint(str(out / "last.pt"), DATA, device="cpu")
    assert res["top1"] == pytest.approx(rows[-1]["val_top1"])
    assert res["n"] == 30


def _student_params(path):
    return torch.load(path, weights_only=False)


def test_ddp_ranks_agree_and_equal_one_process_with_the_global_batch(tmp_path):
    """2 processes x batch 8 == 1 process x batch 16: the ranks hold the same model, and it is the
    one-process model (the models have no batch statistics, see tests/ddp_train.py)."""
    pytest.importorskip("dctkd_ext")
    driver = str(ROOT / "tests" / "ddp_train.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    teacher = tmp_path / "teacher.pt"
    subprocess.run([sys.executable, driver, "--teacher", str(teacher), "resnet8", "4"], check=True, env=env, timeout=300)
    base = {"data": DATA, "model": "resnet8", "method": "dct", "teacher": str(teacher), "epochs": 1, "lr": 0.1,
            "device": "cpu", "quiet": True, "progress": False, "eval_teacher": False}
    ddp = dict(base, out=str(tmp_path / "ddp"), batch_size=8)
    one = dict(base, out=str(tmp_path / "one"), batch_size=16)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", driver,
                        json.dumps(ddp)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = subprocess.run([sys.executable, driver, json.dumps(one)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0, r1 = _student_params(tmp_path / "ddp" / "rank0.pt"), _student_params(tmp_path / "ddp" / "rank1.pt")
    single = _student_params(tmp_path / "one" / "rank0.pt")
    assert set(r0) == set(r1) == set(single)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k}: rank 0 and rank 1 differ"
    rows_ddp = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    rows_one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert rows_ddp[-1]["steps"] == rows_one[-1]["steps"] == 4  # 64 images, global batch 16
    # Summation order alone (e.g. one thread or two in the one-process run) moves the parameters by up
    # to ~2e-4 of their size after these 4 steps; a sharding or averaging bug moves them by O(1).
    for k in r0:
        diff = (r0[k] - single[k]).abs().max().item()
        scale = single[k].abs().max().item()
        assert diff <= 2e-3 * max(scale, 1e-3), f"{k}: DDP and one process differ by {diff:.2e} (scale {scale:.2e})"
    for k in ("train_loss", "train_loss_dct", "train_loss_ce"):
        assert rows_ddp[-1][k] == pytest.approx(rows_one[-1][k], rel=1e-4), k
    assert rows_ddp[-1]["val_top1"] == pytest.approx(rows_one[-1]["val_top1"], abs=100 / 30 + 1e-9)
