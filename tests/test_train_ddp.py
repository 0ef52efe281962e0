"""Trainer under DDP: 2 CPU processes under torchrun (gloo): a DCT student and a resume; for every
distillation method the ranks' models against each other and against one process with the same global
batch; workers killed or stopped mid-epoch that torchrun restarts resume exactly."""
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from dctkd_train.train import evaluate_checkpoint  # noqa: E402

from conftest import assert_same_nested as assert_same  # noqa: E402

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


def test_ddp_two_processes_on_cpu(tmp_path, teacher_ckpt):
    pytest.importorskip("dctkd_ext")
    out = tmp_path / "ddp"
    common = ["train", "--data", DATA, "--model", "resnet8", "--method", "dct", "--teacher", teacher_ckpt,
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


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}
DRIVER = str(ROOT / "tests" / "ddp_train.py")


def driver(configs, nproc=1, max_restarts=None, timeout=900):
    """tests/ddp_train.py on ``configs``, in one process or under torchrun with ``nproc`` processes."""
    if nproc == 1:
        cmd = [sys.executable, DRIVER, json.dumps(configs)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *(["--max-restarts", str(max_restarts)] if max_restarts is not None else []), DRIVER,
               json.dumps(configs)]
    # its own process group, so that a timeout ends torchrun's workers too
    # Restarts: each attempt's workers get a store of their own. With the agent's store shared across
    # attempts, the gloo rendezvous after a killed worker could read the dead attempt's addresses and
    # fail ("connectFullMesh ... Connection refused") or hang.
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if max_restarts else ENV
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain_teacher(tmp_path_factory):
    """A teacher checkpoint of the driver's models without batch statistics."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    subprocess.run([sys.executable, DRIVER, "--teacher", str(path), "resnet8", "4"], check=True, env=ENV, timeout=300)
    return str(path)


EQUIVALENCE_METHODS = ["dct", "fam", "kd", "at", "dct+kd"]


def test_ddp_ranks_agree_and_equal_one_process_with_the_global_batch(tmp_path, plain_teacher):
    """2 processes x batch 8 == 1 process x batch 16, for every distillation method: the ranks hold
    the same student and distiller head (fam: complex FrequencyAttention weights, all-reduced by DDP),
    and they are the one-process ones. The driver's models and head have no batch statistics (see
    tests/ddp_train.py): with BatchNorm each process would normalise by its own shard."""
    pytest.importorskip("dctkd_ext")
    pytest.importorskip("dctkd_ext.nn").FrequencyAttention  # noqa: B018
    base = {"data": DATA, "model": "resnet8", "teacher": plain_teacher, "epochs": 1, "lr": 0.1,
            "device": "cpu", "quiet": True, "progress": False, "eval_teacher": False}
    ddp = [dict(base, method=m, out=str(tmp_path / "ddp" / m), batch_size=8) for m in EQUIVALENCE_METHODS]
    one = [dict(base, method=m, out=str(tmp_path / "one" / m), batch_size=16) for m in EQUIVALENCE_METHODS]
    p = driver(ddp, nproc=2)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = driver(one)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for m in EQUIVALENCE_METHODS:
        d, o = tmp_path / "ddp" / m, tmp_path / "one" / m
        r0, r1 = torch.load(d / "rank0.pt", weights_only=True), torch.load(d / "rank1.pt", weights_only=True)
        single = torch.load(o / "rank0.pt", weights_only=True)
        assert (single["head"] is not None) == (m == "fam"), m
        if m == "fam":
            assert any(v.is_complex() for v in single["head"].values()), "fam's head has complex weights"
        for part in ("student", "head"):
            if single[part] is None:
                continue
            assert set(r0[part]) == set(r1[part]) == set(single[part]), (m, part)
            for k in r0[part]:
                assert torch.equal(r0[part][k], r1[part][k]), f"{m} {part}.{k}: rank 0 and rank 1 differ"
            # Summation order alone (e.g. one thread or two in the one-process run) moves the parameters by up
            # to ~2e-4 of their size after these 4 steps; a sharding or averaging bug moves them by O(1).
            for k in r0[part]:
                diff = (r0[part][k] - single[part][k]).abs().max().item()
                scale = single[part][k].abs().max().item()
                assert diff <= 2e-3 * max(scale, 1e-3), \
                    f"{m} {part}.{k}: DDP and one process differ by {diff:.2e} (scale {scale:.2e})"
        rows_ddp, rows_one = rows(d), rows(o)
        assert rows_ddp[-1]["steps"] == rows_one[-1]["steps"] == 4  # 64 images, global batch 16
        # the terms are float32 sums over the batch; KD (a KL of near-equal distributions, ~1e-3 here) is a
        # small difference of O(1) log-probabilities, so it gets an absolute bound too
        for k in [k for k in rows_one[-1] if k.startswith("train_loss")]:
            assert rows_ddp[-1][k] == pytest.approx(rows_one[-1][k], rel=1e-4, abs=1e-6), (m, k)
        assert rows_ddp[-1]["val_top1"] == pytest.approx(rows_one[-1]["val_top1"], abs=100 / 30 + 1e-9), m


def assert_same_checkpoint(a: Path, b: Path, what: str):
    ka, kb = torch.load(a / "last.pt", weights_only=True), torch.load(b / "last.pt", weights_only=True)
    assert ka["epoch"] == kb["epoch"] and not kb.get("position"), what
    for part in ("model", "head", "optimizer", "scaler"):
        assert_same(ka[part], kb[part], f"{what}: {part}")
    ra, rb = rows(a), rows(b)
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb], what
    for x, y in zip(ra, rb):
        for k in [k for k in x if k.startswith("train_loss")] + ["train_top1", "val_top1", "val_loss", "lr"]:
            assert x[k] == y[k], f"{what}: epoch {x['epoch']} {k}"


def test_ddp_workers_killed_or_stopped_restart_under_torchrun_and_resume_exactly(tmp_path, teacher_ckpt):
    """torchrun --max-restarts, three runs in turn (ce, dct, fam; BatchNorm kept): rank 1 of the ce run is
    SIGKILLed, rank 1 of the dct run gets SIGTERM (both ranks finish the step, save and exit 75), rank 0
    of the fam run is SIGKILLed, each at a random step; every restarted worker resumes its job's last.pt
    by itself. The final checkpoints equal those of uninterrupted runs, bit for bit."""
    pytest.importorskip("dctkd_ext.nn").FrequencyAttention  # noqa: B018
    steps = 8  # 64 images / 2 processes / batch 8 = 4 steps an epoch, 2 epochs
    plan = {"ce": ("SIGKILL", 1), "dct": ("SIGTERM", 1), "fam": ("SIGKILL", 0)}
    at = {m: random.randint(1, steps - 1) for m in plan}  # conftest seeds random: replayable
    base = {"data": DATA, "model": "resnet8", "teacher": teacher_ckpt, "epochs": 2, "lr": 0.1, "batch_size": 8,
            "device": "cpu", "quiet": True, "progress": False, "eval_teacher": False, "seed": 5,
            "deterministic": True, "save_every": 3, "schedule": "step", "milestones": [1]}
    ref = [dict(base, method=m, out=str(tmp_path / "ref" / m), _driver={"batch_norm": True}) for m in plan]
    cut = [dict(base, method=m, out=str(tmp_path / "cut" / m),
                _driver={"batch_norm": True, "interrupt": {"step": at[m], "signal": sig, "rank": rank}})
           for m, (sig, rank) in plan.items()]
    p = driver(ref, nproc=2)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = driver(cut, nproc=2, max_restarts=3)
    assert p.returncode == 0, f"steps {at}\n" + p.stdout[-3000:] + p.stderr[-3000:]
    stopped = [(tmp_path / "cut" / "dct" / f"stopped-rank{r}.txt").read_text() for r in (0, 1)]
    where = [re.search(r"after (step \d+ of \d+ in epoch \d+|epoch \d+);", t) for t in stopped]
    assert all(where) and where[0].group(1) == where[1].group(1), stopped  # both ranks stopped after one step
    assert "stopped by SIGTERM" in stopped[1], stopped
    for m in plan:
        assert_same_checkpoint(tmp_path / "ref" / m, tmp_path / "cut" / m, f"{m} (interrupted at step {at[m]})")
