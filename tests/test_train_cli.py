"""Trainer command line: bad input gets a clear message and a non-zero exit, never a traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from dctkd_train.cli import main  # noqa: E402
from dctkd_train.models import build_model  # noqa: E402

TINY = "synthetic-scenes:size=16,classes=4,train=32,val=16"


def cli(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    sd = build_model("resnet8", 4).state_dict()
    torch.save({"arch": "resnet8", "num_classes": 4, "model": sd}, d / "ours.pt")
    torch.save({"model": sd, "epoch": 240}, d / "repdistiller.pt")  # RepDistiller-style: no architecture name
    return d


def train_args(tmp_path, *extra, data=TINY, model="resnet8"):
    return ["train", "--data", data, "--model", model, "--epochs", "1", "--batch-size", "16", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--no-progress", *extra]


def test_missing_data_folder(capsys, tmp_path):
    for spec in ("cifar100:/no/such/dir", "imagefolder:/no/such/dir"):
        rc, _, err = cli(capsys, *train_args(tmp_path, data=spec))
        assert rc == 2 and "error: data folder '/no/such/dir' does not exist" in err


def test_unknown_model_and_method(capsys, tmp_path):
    rc, _, err = cli(capsys, *train_args(tmp_path, model="resnet9000"))
    assert rc == 2 and "unknown model 'resnet9000'" in err and "resnet8x4" in err
    rc, _, err = cli(capsys, *train_args(tmp_path, "--method", "crd"))
    assert rc == 2 and "unknown method 'crd'" in err and "dct+kd" in err
    rc, _, err = cli(capsys, *train_args(tmp_path, data="svhn:/x"))
    assert rc == 2 and "unknown data spec" in err


def test_teacher_that_does_not_fit(capsys, tmp_path, ckpts):
    # architecture named in the checkpoint differs from --teacher-model
    rc, _, err = cli(capsys, *train_args(tmp_path, "--method", "kd", "--teacher", str(ckpts / "ours.pt"),
                                         "--teacher-model", "resnet20"))
    assert rc == 2 and "is a resnet8, not the --teacher-model resnet20" in err
    # a foreign state dict that is not the architecture given
    rc, _, err = cli(capsys, *train_args(tmp_path, "--method", "kd", "--teacher", str(ckpts / "repdistiller.pt"),
                                         "--teacher-model", "wrn16_2"))
    assert rc == 2 and "does not fit a wrn16_2" in err
    # a foreign state dict without --teacher-model
    rc, _, err = cli(capsys, *train_args(tmp_path, "--method", "kd", "--teacher", str(ckpts / "repdistiller.pt")))
    assert rc == 2 and "pass --teacher-model" in err
    # class count: ours records it; a foreign one shows it in the classifier's shape
    six = "synthetic-scenes:size=16,classes=6,train=32,val=16"
    rc, _, err = cli(capsys, *train_args(tmp_path, "--method", "dct", "--teacher", str(ckpts / "ours.pt"), data=six))
    assert rc == 2 and "has 4 classes but the data has 6" in err
    rc, _, err = cli(capsys, *train_args(tmp_path, "--method", "dct", "--teacher", str(ckpts / "repdistiller.pt"),
                                         "--teacher-model", "resnet8", data=six))
    assert rc == 2 and "does not fit a resnet8 with 6 classes" in err and "fc.weight" in err
    # missing, unreadable, or no teacher at all
    rc, _, err = cli(capsys, *train_args(tmp_path, "--method", "kd", "--teacher", str(tmp_path / "nope.pt")))
    assert rc == 2 and "does not exist" in err
    (tmp_path / "junk.pt").write_text("junk")
    rc, _, err = cli(capsys, *train_args(tmp_path, "--method", "kd", "--teacher", str(tmp_path / "junk.pt")))
    assert rc == 2 and "could not be read" in err
    rc, _, err = cli(capsys, *train_args(tmp_path, "--method", "at"))
    assert rc == 2 and "needs a teacher" in err


def test_foreign_teacher_with_its_architecture_works(capsys, tmp_path, ckpts):
    rc, out, err = cli(capsys, *train_args(tmp_path, "--method", "kd", "--teacher", str(ckpts / "repdistiller.pt"),
                                           "--teacher-model", "resnet8"))
    assert rc == 0, err
    assert "best val top-1" in out


def test_bad_layer_names_and_options(capsys, tmp_path, ckpts):
    rc, _, err = cli(capsys, *train_args(tmp_path, "--method", "dct", "--teacher", str(ckpts / "ours.pt"),
                                         "--student-layers", "layer1,layer7"))
    assert rc == 2 and "no layer named 'layer7'" in err
    rc, _, err = cli(capsys, *train_args(tmp_path, "--method", "dct", "--teacher", str(ckpts / "ours.pt"),
                                         "--student-layers", "layer1,layer2"))
    assert rc == 2 and "2 feature levels and the teacher 3" in err
    rc, _, err = cli(capsys, "train", "--data", TINY, "--model", "resnet8", "--out", str(tmp_path), "--epochs", "0")
    assert rc == 2 and "--epochs" in err
    rc, _, err = cli(capsys, *train_args(tmp_path, "--device", "tpu"))
    assert rc == 2 and "--device" in err
    if not torch.cuda.is_available():
        rc, _, err = cli(capsys, *train_args(tmp_path, "--device", "cuda"))
        assert rc == 2 and "CUDA is not available" in err


def test_amp_bf16_and_channels_last_on_the_cpu(capsys, tmp_path, ckpts, monkeypatch):
    """--amp bf16 --channels-last on the CPU: the loss gets the bf16 channels-last features of the
    autocast forward, the run trains (finite, close to the same run in fp32) and records its settings."""
    import json

    import dctkd_ext

    seen = []
    real = dctkd_ext.dct_at_loss

    def recording(s, t, **kw):
        seen.append([(x.dtype, x.is_contiguous(memory_format=torch.channels_last), x.shape[-1] > 1) for x in s + t])
        return real(s, t, **kw)

    monkeypatch.setattr(dctkd_ext, "dct_at_loss", recording)
    args = train_args(tmp_path, "--method", "dct", "--teacher", str(ckpts / "ours.pt"), "--lr", "0.05")
    rc, _, err = cli(capsys, *args, "--amp", "bf16", "--channels-last")
    assert rc == 0, err
    assert seen and all(dt == torch.bfloat16 for call in seen for dt, _, _ in call)
    assert all(cl for call in seen for _, cl, big in call if big), "features reached the loss not channels_last"
    out = tmp_path / "out"
    env = json.loads((out / "config.json").read_text())["environment"]
    assert env["amp"] == "bfloat16" and env["channels_last"] is True
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    ck = torch.load(out / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    # the same run in fp32: the bf16 forward changes the loss by bf16 rounding, not more
    rc, _, err = cli(capsys, *train_args(tmp_path / "fp32", "--method", "dct", "--teacher", str(ckpts / "ours.pt"),
                                         "--lr", "0.05"), "--amp", "none", "--no-channels-last")
    assert rc == 0, err
    row32 = json.loads((tmp_path / "fp32" / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    for k in ("train_loss_ce", "train_loss_dct"):
        assert row[k] == pytest.approx(row32[k], rel=5e-2), k
        assert row[k] != row32[k], f"{k}: bf16 autocast had no effect"


def test_evaluate_errors(capsys, tmp_path, ckpts):
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", str(tmp_path / "x.pt"), "--data", TINY)
    assert rc == 2 and "does not exist" in err
    rc, _, err = cli(capsys, "evaluate", "--checkpoint", str(ckpts / "ours.pt"), "--data",
                     "synthetic-scenes:size=16,classes=6,val=12")
    assert rc == 2 and "has 4 classes" in err
    rc, out, err = cli(capsys, "evaluate", "--checkpoint", str(ckpts / "ours.pt"), "--data", TINY, "--device", "cpu",
                       "--json", str(tmp_path / "res.json"))
    assert rc == 0 and "top-1" in out and "MCA" in out and (tmp_path / "res.json").is_file()


def test_the_real_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "dctkd_train", "train", "--data", "imagefolder:/no/such/dir",
                        "--model", "resnet8", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 2
    assert "error: data folder '/no/such/dir' does not exist" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "dctkd_train", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0 and "train" in p.stdout and "evaluate" in p.stdout and "demo" in p.stdout


def test_progress_bar():
    import io

    from dctkd_train.progress import Progress

    class TTY(io.StringIO):
        def isatty(self):
            return True

    s = TTY()
    bar = Progress(3, "epoch 1/2", stream=s)
    for _ in range(3):
        bar.update(64, loss=1.5)
    bar.close()
    text = s.getvalue()
    assert "\r" in text and "img/s" in text and "3/3" in text and "loss 1.5" in text
    log = io.StringIO()  # not a terminal: quiet until the interval passes
    bar = Progress(3, "e", stream=log, interval=0.0)
    bar.update(8)
    bar.update(8)
    bar.update(8)
    assert log.getvalue().count("\n") == 2 and "img/s" in log.getvalue()
