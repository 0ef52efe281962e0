"""Trainer DDP smoke run: 2 CPU processes under torchrun (gloo), a DCT student, then a resume."""
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
