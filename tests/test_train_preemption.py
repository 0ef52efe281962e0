"""Trainer: checkpoints inside an epoch (--save-every), the graceful stop on SIGTERM/SIGINT, resuming
after SIGKILL, --resume auto and torchrun restarts, and a save that fails (full disk, unwritable
folder). Multi-process runs are in test_train_ddp.py."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from dctkd_train import cli  # noqa: E402
from dctkd_train import preemption as P  # noqa: E402
from dctkd_train.errors import EXIT_STOPPED, TrainingStopped, UserError  # noqa: E402
from dctkd_train.train import train  # noqa: E402

from conftest import assert_same_nested as assert_same  # noqa: E402

TINY = "synthetic-scenes:size=16,classes=4,train=48,val=24"
BASE = {"data": TINY, "model": "resnet8", "batch_size": 16, "device": "cpu", "quiet": True, "progress": False,
        "lr": 0.1, "seed": 3, "deterministic": True, "epochs": 2, "schedule": "step", "milestones": [1]}
STEPS = 6  # 48 images / batch 16 = 3 steps an epoch, 2 epochs
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}
DRIVER = str(ROOT / "tests" / "ddp_train.py")


@pytest.fixture(autouse=True)
def restore_determinism():
    """--deterministic switches torch to deterministic algorithms for the process; switch it back."""
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def load(path):
    return torch.load(path, weights_only=True)


def rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, what):
    """Two finished runs hold the same final checkpoint and the same history of losses and accuracies."""
    ka, kb = load(Path(a) / "last.pt"), load(Path(b) / "last.pt")
    assert ka["epoch"] == kb["epoch"] == 2 and kb.get("position") is None, what
    for part in ("model", "head", "optimizer", "scaler", "rng"):
        assert_same(ka[part], kb[part], f"{what}: {part}")
    assert ka["optimizer"]["state"], "the optimizer holds momentum buffers"
    ra, rb = rows(a), rows(b)
    assert [r["epoch"] for r in rb] == [1, 2], what
    for x, y in zip(ra, rb):
        for k in [k for k in x if k.startswith("train_loss")] + ["train_top1", "val_top1", "val_loss", "lr", "steps"]:
            assert x[k] == y[k], f"{what}: epoch {x['epoch']} {k}"


def interrupt_in_process(monkeypatch, at_step: int, sig=signal.SIGTERM):
    """Send ``sig`` to this process right after optimiser step ``at_step``."""
    real = torch.optim.SGD.step
    count = [0]

    def step(self, *a, **k):
        out = real(self, *a, **k)
        count[0] += 1
        if count[0] == at_step:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return lambda: monkeypatch.setattr(torch.optim.SGD, "step", real)


# ----------------------------------------------------------------------------- SIGKILL, then resume


def test_sigkill_at_a_random_step_then_resume_auto_finishes_as_an_uninterrupted_run(tmp_path, teacher_ckpt):
    """ce, dct and fam, each run SIGKILLed at a random step in its own process (the driver runs them in
    turn and kills each once), then the same command again: `--resume auto` takes up each run from
    its last.pt (written every 2 steps) or starts it afresh if none was written yet. The final weights,
    head, optimizer state, RNG states and losses equal those of uninterrupted runs."""
    pytest.importorskip("dctkd_ext.nn").FrequencyAttention  # noqa: B018
    methods = ["ce", "dct", "fam"]
    at = {m: random.randint(1, STEPS - 1) for m in methods}
    cfg = {**BASE, "save_every": 2, "teacher": teacher_ckpt, "eval_teacher": False}

    def configs(root, interrupt):
        out = []
        for m in methods:
            drv = {"batch_norm": True}
            if interrupt:
                drv["interrupt"] = {"step": at[m], "signal": "SIGKILL"}
            out.append({**cfg, "method": m, "out": str(tmp_path / root / m), "resume": "auto", "_driver": drv})
        return json.dumps(out)

    def run(root, interrupt):
        return subprocess.run([sys.executable, DRIVER, configs(root, interrupt)], capture_output=True, text=True,
                              env=ENV, timeout=300)

    p = run("ref", False)
    assert p.returncode == 0, p.stderr[-3000:]
    for attempt in range(len(methods)):
        p = run("cut", True)
        assert p.returncode == -signal.SIGKILL, f"attempt {attempt}, steps {at}: {p.returncode} {p.stderr[-3000:]}"
        m = methods[attempt]
        # killed inside step at[m], before its save: last.pt holds the last save point before it (steps 2
        # and 4 by --save-every, 3 at the epoch's end), or there is none yet; never a partial file
        assert not [f for f in os.listdir(tmp_path / "cut" / m) if f.endswith(".tmp")]
        saved = max([s for s in (2, 3, 4) if s < at[m]], default=None)
        last = tmp_path / "cut" / m / "last.pt"
        assert last.is_file() == (saved is not None), (m, at[m])
        if saved is not None:
            ck = load(last)
            assert 3 * ck["epoch"] + (ck["position"]["step"] if ck.get("position") else 0) == saved, (m, at[m])
    p = run("cut", True)
    assert p.returncode == 0, f"steps {at}: {p.stderr[-3000:]}"
    for m in methods:
        assert_same_run(tmp_path / "ref" / m, tmp_path / "cut" / m, f"{m} killed after step {at[m]}")


# ----------------------------------------------------------------------------- SIGTERM / SIGINT


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_saves_exits_75_and_resume_is_exact(tmp_path, monkeypatch, capsys, sig):
    """The CLI: a signal in the middle of epoch 1 (after step 2 of 3) or 2 finishes the step, writes
    last.pt with the position and exits with status 75; `--resume` finishes the run as if it had not
    stopped."""
    args = ["train", "--data", TINY, "--model", "resnet8", "--batch-size", "16", "--device", "cpu", "--lr", "0.1",
            "--seed", "3", "--deterministic", "--epochs", "2", "--schedule", "step", "--milestones", "1",
            "--no-progress", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "ref")]) == 0
    at = random.choice([1, 2, 4, 5])  # inside an epoch
    handler = signal.getsignal(sig)
    undo = interrupt_in_process(monkeypatch, at, sig)
    assert cli.main([*args, "--out", str(tmp_path / "cut")]) == EXIT_STOPPED
    undo()
    err = capsys.readouterr().err
    assert f"stopped by {sig.name} after step {(at - 1) % 3 + 1} of 3 in epoch {(at - 1) // 3 + 1}" in err, err
    assert "--resume" in err and "Traceback" not in err
    ck = load(tmp_path / "cut" / "last.pt")
    assert ck["epoch"] == (at - 1) // 3 and ck["position"]["step"] == (at - 1) % 3 + 1
    assert signal.getsignal(sig) is handler  # the run's handler is gone after it
    assert cli.main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_run(tmp_path / "ref", tmp_path / "cut", f"{sig.name} after step {at}")


def test_a_signal_at_an_epoch_end_stops_after_that_epoch(tmp_path, monkeypatch):
    undo = interrupt_in_process(monkeypatch, 3)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after epoch 1;"):
        train({**BASE, "out": str(tmp_path / "r")})
    undo()
    ck = load(tmp_path / "r" / "last.pt")
    assert ck["epoch"] == 1 and ck.get("position") is None
    assert [r["epoch"] for r in rows(tmp_path / "r")] == [1]


def _send(sig):
    os.kill(os.getpid(), sig)  # Python runs the handler when this function returns


def test_a_second_sigint_stops_at_once(tmp_path, monkeypatch):
    real = torch.optim.SGD.step

    def step(self, *a, **k):
        out = real(self, *a, **k)
        _send(signal.SIGINT)  # the second one arrives before the step has ended
        _send(signal.SIGINT)
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(KeyboardInterrupt):
        train({**BASE, "out": str(tmp_path / "r"), "save_every": 1})
    assert not (tmp_path / "r" / "last.pt").exists()  # stopped before any checkpoint was written


# ----------------------------------------------------------------------------- a save that fails


@pytest.mark.parametrize("failure", ["ENOSPC", "EACCES"])
def test_a_failed_save_keeps_the_previous_last_pt_and_is_one_line(tmp_path, monkeypatch, capsys, failure):
    """The disk fills up (the write raises ENOSPC) or the folder turns read-only (creating the temporary
    file raises EACCES) at the save after step 4: the run ends with one line naming last.pt, and the
    last.pt of step 2 is still there and readable."""
    out = tmp_path / "r"
    args = ["train", "--data", TINY, "--model", "resnet8", "--batch-size", "16", "--device", "cpu", "--lr", "0.1",
            "--epochs", "2", "--save-every", "2", "--no-progress", "--quiet", "--out", str(out)]
    import tempfile

    real_save, real_mkstemp = torch.save, tempfile.mkstemp
    epoch_saved = []

    def saving(obj, f, *a, **k):
        pos = obj.get("position")
        if pos and pos["epoch"] == 2 and failure == "ENOSPC":  # the save after step 4 (1 of epoch 2)
            f.write(b"\0" * 64)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if obj.get("epoch") == 1 and not pos:
            epoch_saved.append(1)
        return real_save(obj, f, *a, **k)

    def mkstemp(*a, **k):
        if epoch_saved and failure == "EACCES" and k.get("prefix", "").startswith(".last.pt"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out))
        return real_mkstemp(*a, **k)

    monkeypatch.setattr(torch, "save", saving)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"could not write {out / 'last.pt'}: {os.strerror(getattr(errno, failure))}" in err, err
    monkeypatch.setattr(torch, "save", real_save)
    ck = load(out / "last.pt")  # the epoch-end checkpoint written before
    assert ck["epoch"] == 1 and ck.get("position") is None
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------- when to resume


def test_resume_auto_and_torchrun_restarts(tmp_path, monkeypatch):
    out = tmp_path / "r"
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert P.decide_resume(out, "auto", False) == (False, None)  # nothing to resume: start
    with pytest.raises(UserError, match="no .*last.pt to resume"):
        P.decide_resume(out, True, False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    train({**BASE, "out": str(out), "epochs": 1})
    assert load(out / "last.pt")["elastic_run_id"] == "job-1"
    assert P.decide_resume(out, "auto", False)[0] is True
    assert P.decide_resume(out, None, False) == (False, None)  # a new start: the flags decide
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    resume, ck = P.decide_resume(out, None, True)  # a restart of job-1 resumes, even under --overwrite
    assert resume and ck["epoch"] == 1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")  # another job's last.pt: the flags decide
    assert P.decide_resume(out, None, True) == (False, None)
    # a whole restarted run: it resumes and extends to 2 epochs without --resume
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    s = train({**BASE, "out": str(out), "epochs": 2})
    assert [r["epoch"] for r in rows(out)] == [1, 2] and s["final"]["epoch"] == 2


def test_a_position_from_another_world_size_is_refused(tmp_path, monkeypatch):
    undo = interrupt_in_process(monkeypatch, 2)
    with pytest.raises(TrainingStopped):
        train({**BASE, "out": str(tmp_path / "r")})
    undo()
    ck = load(tmp_path / "r" / "last.pt")
    ck["position"]["world_size"] = 2
    torch.save(ck, tmp_path / "r" / "last.pt")
    with pytest.raises(UserError, match="written inside epoch 1 by 2 process.*as many"):
        train({**BASE, "out": str(tmp_path / "r"), "resume": True})


def test_save_every_flag():
    ns = cli.build_parser().parse_args(["train", "--data", "x", "--model", "m", "--out", "o", "--save-every", "50",
                                        "--resume", "auto"])
    assert ns.save_every == 50 and ns.resume == "auto"
    ns = cli.build_parser().parse_args(["train", "--data", "x", "--model", "m", "--out", "o", "--resume"])
    assert ns.resume is True
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--data", "x", "--model", "m", "--out", "o", "--resume", "yes"])
