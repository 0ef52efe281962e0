"""Trainer outputs: atomic checkpoints, round trip through `evaluate`, exact resume."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from dctkd_train import checkpoint as C  # noqa: E402
from dctkd_train.errors import UserError  # noqa: E402
from dctkd_train.train import evaluate_checkpoint, lr_at, resolve_config, train  # noqa: E402

from conftest import assert_same_nested as assert_same_tensors  # noqa: E402

TINY = "synthetic-scenes:size=16,classes=4,train=48,val=24"
BASE = {"data": TINY, "model": "resnet8", "batch_size": 16, "device": "cpu", "quiet": True, "progress": False,
        "lr": 0.1, "seed": 3}


def run(out, **kw):
    return train({**BASE, "out": str(out), **kw})


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    target = tmp_path / "last.pt"
    C.save_checkpoint({"epoch": 1}, target)

    def crash(f):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # e.g. the run is stopped mid-write

    with pytest.raises(KeyboardInterrupt):
        C.atomic_write(target, crash)
    assert torch.load(target, weights_only=False) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temp file left behind


def test_a_run_stopped_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(out, epochs=1)
    good = torch.load(out / "last.pt", weights_only=False)
    real_save = torch.save
    calls = []

    def dying_save(obj, f, *a, **k):
        calls.append(1)
        f.write(b"\x00" * 100)  # half a checkpoint ...
        raise KeyboardInterrupt  # ... then the process is stopped

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(out, epochs=2, resume=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert calls
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["epoch"] == 1
    for k, v in good["model"].items():
        assert torch.equal(v, ck["model"][k])
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    # and the run continues from there
    s = run(out, epochs=2, resume=True)
    assert s["final"]["epoch"] == 2


def test_outputs_and_evaluate_round_trip(tmp_path):
    out = tmp_path / "run"
    s = run(out, epochs=2, method="ce")
    for f in ("metrics.jsonl", "best.pt", "last.pt", "config.json", "summary.json", "curves.png"):
        assert (out / f).is_file(), f
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("val_top1", "val_top5", "val_mca", "train_loss", "train_loss_ce", "images_per_sec", "loss_time_s",
                  "lr", "val_images"):
            assert k in r, k
        assert r["val_images"] == 24
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["model"] == "resnet8" and cfg["data"]["num_classes"] == 4
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["format"] == C.FORMAT and ck["arch"] == "resnet8" and ck["epoch"] == 2 and ck["num_classes"] == 4
    # evaluate gives back the numbers logged for the checkpoint's epoch
    res = evaluate_checkpoint(str(out / "last.pt"), TINY, device="cpu", batch_size=7)
    assert res["top1"] == pytest.approx(rows[-1]["val_top1"])
    assert res["mca"] == pytest.approx(rows[-1]["val_mca"])
    assert res["n"] == 24
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["best_top1"] == max(r["val_top1"] for r in rows) == s["best"]["val_top1"]


@pytest.mark.parametrize("method", ["ce", "dct", "fam"])
def test_resume_continues_exactly(tmp_path, method, teacher_ckpt):
    # 2 epochs in one go == 1 epoch, stop, resume to 2: the student, the distiller's head (fam), the
    # optimizer's momentum, the lr step, the data order and the augmentation
    if method == "fam":
        pytest.importorskip("dctkd_ext.nn").FrequencyAttention  # noqa: B018
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(method=method, schedule="step", milestones=[1])
    if method != "ce":
        kw.update(teacher=teacher_ckpt, eval_teacher=False)
    run(a, epochs=2, **kw)
    run(b, epochs=1, **kw)
    run(b, epochs=2, resume=True)
    ka = torch.load(a / "last.pt", weights_only=False)
    kb = torch.load(b / "last.pt", weights_only=False)
    assert (ka["head"] is not None) == (method == "fam")
    for part in ("model", "head", "optimizer", "scaler"):
        assert_same_tensors(ka[part], kb[part], part)
    assert ka["optimizer"]["state"], "the optimizer holds momentum buffers"
    ra = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb):
        for k in [k for k in x if k.startswith("train_loss")] + ["val_top1", "val_loss", "lr"]:
            assert x[k] == y[k], k


def test_resume_and_out_dir_errors(tmp_path):
    with pytest.raises(UserError, match="no .*last.pt to resume"):
        run(tmp_path / "none", epochs=1, resume=True)
    run(tmp_path / "r", epochs=1)
    with pytest.raises(UserError, match="already holds a run"):
        run(tmp_path / "r", epochs=1)
    with pytest.raises(UserError, match="options differ.*model"):
        run(tmp_path / "r", epochs=2, resume=True, model="resnet20")
    run(tmp_path / "r", epochs=1, overwrite=True)


def test_learning_rate_recipes():
    cfg = resolve_config({"data": TINY, "model": "resnet8", "out": "x", "epochs": 240})
    assert cfg["lr"] == 0.05 and cfg["weight_decay"] == 5e-4 and cfg["milestones"] == [150, 180, 210]
    assert cfg["batch_size"] == 64
    assert [lr_at(cfg, e) for e in (1, 150, 151, 181, 211)] == pytest.approx([0.05, 0.05, 0.005, 5e-4, 5e-5])
    short = resolve_config({"data": TINY, "model": "resnet8", "out": "x", "epochs": 8})
    assert short["milestones"] == [5, 6, 7]
    cos = resolve_config({"data": TINY, "model": "resnet8", "out": "x", "epochs": 10, "schedule": "cosine",
                          "warmup_epochs": 2})
    assert lr_at(cos, 1) == pytest.approx(0.025) and lr_at(cos, 3) == pytest.approx(0.05)
    assert lr_at(cos, 10) < 0.005
    img = resolve_config({"data": "imagefolder:/x", "model": "resnet8", "out": "x", "batch_size": 128}, world_size=4)
    assert img["lr"] == pytest.approx(0.2) and img["weight_decay"] == 1e-4 and img["epochs"] == 100
    assert img["milestones"] == [30, 60, 90]
    with pytest.raises(UserError, match="needs a teacher"):
        resolve_config({"data": TINY, "model": "resnet8", "out": "x", "method": "dct"})


def test_extract_state_dict_formats():
    sd = {"a.weight": torch.zeros(1)}
    for ck in (sd, {"model": sd}, {"state_dict": sd}, {"net": {"module.a.weight": torch.zeros(1)}}):
        assert list(C.extract_state_dict(ck)) == ["a.weight"]
    with pytest.raises(UserError, match="no model state dict"):
        C.extract_state_dict({"epoch": 3})


def test_loader_workers_do_not_change_the_run(tmp_path):
    # augmentation is a function of (seed, epoch, index): worker processes draw the same crops
    run(tmp_path / "w0", epochs=1, workers=0)
    run(tmp_path / "w2", epochs=1, workers=2)
    k0 = torch.load(tmp_path / "w0" / "last.pt", weights_only=False)["model"]
    k2 = torch.load(tmp_path / "w2" / "last.pt", weights_only=False)["model"]
    for k, v in k0.items():
        assert torch.equal(v, k2[k]), k
