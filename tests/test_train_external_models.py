"""timm and torchvision models in the trainer (timm:NAME / tv:NAME), --stages, --seed/--deterministic:
small models and inputs, random init or local files (nothing is downloaded)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from dctkd_train.cli import main  # noqa: E402
from dctkd_train.errors import UserError  # noqa: E402
from dctkd_train.external_models import adapt_state_dict, build_external, resolve_stage_spec  # noqa: E402
from dctkd_train.models import build_model, model_family  # noqa: E402

timm = pytest.importorskip("timm", reason="needs timm (the [timm] extra)")
torchvision = pytest.importorskip("torchvision")

TINY = "synthetic-scenes:size=16,classes=4,train=32,val=16"


def cli(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    return rc, cap.out, cap.err


def _hooked(model, x):
    from dctkd_ext import StageFeatures

    with StageFeatures(model, model.feature_layers) as sf:
        logits = model(x)
        return logits, sf.pop()


def test_timm_model_gives_logits_and_stages_from_one_forward():
    torch.manual_seed(0)
    m = build_model("timm:resnet18", 5, image_size=32).eval()
    assert model_family("timm:resnet18") == "imagenet"
    assert m.stages == ["layer1", "layer2", "layer3", "layer4"]  # the stem (reduction 2) left out
    x = torch.randn(2, 3, 32, 32)
    logits, feats = _hooked(m, x)
    # the same as the bare timm model's forward, and its stages' outputs
    torch.testing.assert_close(logits, m.net(x))
    ref = {}
    hs = [getattr(m.net, n).register_forward_hook(lambda mod, i, o, n=n: ref.__setitem__(n, o)) for n in m.stages]
    m.net(x)
    for h in hs:
        h.remove()
    for n, f in zip(m.stages, feats):
        torch.testing.assert_close(f, ref[n])
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]


def test_timm_stage_choice_by_index_and_name():
    m = build_external("timm:resnet18", 3, stages="2,layer4")
    assert m.stages == ["layer2", "layer4"] and m.feature_layers == ("taps.layer2", "taps.layer4")
    m = build_external("timm:resnet18", 3, stages=["-1"])
    assert m.stages == ["layer4"]
    with pytest.raises(UserError, match="no stage 'layer9'.*act1, layer1"):
        build_external("timm:resnet18", 3, stages="layer9")
    with pytest.raises(UserError, match="index 7 out of range"):
        build_external("timm:resnet18", 3, stages="7")


def test_torchvision_model_through_feature_extractor():
    torch.manual_seed(0)
    m = build_model("tv:resnet18", 4).eval()
    assert m.stages == ["layer1", "layer2", "layer3", "layer4"]
    ref = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    ref.load_state_dict({k[len("net."):]: v for k, v in m.state_dict().items()})
    x = torch.randn(2, 3, 32, 32)
    logits, feats = _hooked(m, x)
    torch.testing.assert_close(logits, ref(x))
    torch.testing.assert_close(feats[1], ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))))))
    # any graph node by name, the default stages by index
    m = build_model("tv:resnet18", 4, stages="layer2.1.relu_1,-1")
    assert m.stages == ["layer2.1.relu_1", "layer4"]
    # a foreign (bare torchvision) state dict is mapped onto the wrapper
    sd = adapt_state_dict(m, ref.state_dict())
    m.load_state_dict(sd)


def test_no_downloads_and_clear_errors():
    for spec, msg in (("timm:resnet18:pretrained", "nothing is downloaded"), ("timm:hf-hub:timm/x", "nothing is downloaded"),
                      ("timm:no_such_net_xyz", "timm has no model"), ("tv:no_such_net", "torchvision has no")):
        with pytest.raises(UserError, match=msg):
            build_model(spec, 3)


def test_resolve_stage_spec_errors():
    with pytest.raises(UserError, match="repeat"):
        resolve_stage_spec("a,0", ["a", "b"], ["a"], "--stages")
    with pytest.raises(UserError, match="no stages"):
        resolve_stage_spec(" , ", ["a", "b"], ["a"], "--stages")


def _write_image_folder(root: Path, classes=("cat", "dog", "owl"), per_class=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 120, (24, 24, 3), dtype=np.uint8)
                arr[..., k] += 100  # a class colour: learnable
                Image.fromarray(arr).save(d / f"{i}.png")


def test_timm_student_from_timm_teacher_on_an_imagefolder(capsys, tmp_path):
    _write_image_folder(tmp_path / "data")
    torch.manual_seed(0)
    teacher = timm.create_model("resnet50", pretrained=False, num_classes=3)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")  # a bare timm state dict, local file
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, "train", "--data", f"imagefolder:{tmp_path / 'data'}", "--model", "timm:resnet18",
                          "--teacher-model", "timm:resnet50", "--teacher", str(tmp_path / "teacher.pth"),
                          "--method", "dct", "--stages", "2,3,4", "--epochs", "2", "--batch-size", "4",
                          "--image-size", "32", "--device", "cpu", "--workers", "0", "--out", str(out), "--no-progress")
    assert rc == 0, err
    assert "features: student [('taps.layer2', (128, 4, 4)), ('taps.layer3', (256, 2, 2)), ('taps.layer4', (512, 1, 1))]" in stdout
    assert "teacher [('taps.layer2', (512, 4, 4))" in stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["train_loss_dct"]) and r["train_loss_dct"] > 0 for r in rows)
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["arch"] == "timm:resnet18" and ck["feature_layers"] == ["taps.layer2", "taps.layer3", "taps.layer4"]
    # the evaluate command rebuilds the timm model from the checkpoint's name
    rc, stdout, err = cli(capsys, "evaluate", "--checkpoint", str(out / "last.pt"), "--data",
                          f"imagefolder:{tmp_path / 'data'}", "--image-size", "32", "--device", "cpu", "--workers", "0")
    assert rc == 0 and "timm:resnet18 on imagefolder" in stdout, err


def test_tv_student_with_builtin_teacher_stage_indices(capsys, tmp_path):
    torch.manual_seed(0)
    sd = build_model("resnet20", 4).state_dict()
    torch.save({"arch": "resnet20", "num_classes": 4, "model": sd}, tmp_path / "t.pt")
    rc, stdout, err = cli(capsys, "train", "--data", TINY, "--model", "tv:resnet18", "--teacher", str(tmp_path / "t.pt"),
                          "--method", "at", "--stages", "1,2", "--student-layers", "taps.layer2,taps.layer3",
                          "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "o"),
                          "--no-progress")
    assert rc == 0, err
    assert "teacher [('layer2', (32, 8, 8)), ('layer3', (64, 4, 4))]" in stdout


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    rc = main(["train", "--data", TINY, "--model", "resnet8", "--epochs", "2", "--batch-size", "8", "--device", "cpu",
               "--out", str(out), "--no-progress", "--quiet", *extra])
    assert rc == 0
    return torch.load(out / "last.pt", weights_only=True)


def test_seed_and_deterministic_give_the_same_run(tmp_path):
    torch.manual_seed(0)
    sd = build_model("resnet14", 4).state_dict()
    torch.save({"arch": "resnet14", "num_classes": 4, "model": sd}, tmp_path / "t.pt")
    args = ("--method", "dct+kd", "--teacher", str(tmp_path / "t.pt"), "--deterministic")
    a = _run(tmp_path, "a", "--seed", "3", *args)
    b = _run(tmp_path, "b", "--seed", "3", *args)
    c = _run(tmp_path, "c", "--seed", "4", *args)
    assert a["config"]["deterministic"] is True
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [m["train_loss"] for m in a["metrics"]] == [m["train_loss"] for m in b["metrics"]]
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"] if a["model"][k].is_floating_point())


def test_fam_trains_under_fp16_autocast(tmp_path):
    # FrequencyAttention's complex weights under fp16 need dctkd_ext.amp.GradScaler (torch's cannot unscale them)
    torch.manual_seed(0)
    sd = build_model("resnet14", 4).state_dict()
    torch.save({"arch": "resnet14", "num_classes": 4, "model": sd}, tmp_path / "t.pt")
    ck = _run(tmp_path, "fam", "--method", "fam-abf", "--teacher", str(tmp_path / "t.pt"), "--amp", "fp16",
              "--fam-mid-channels", "8")
    assert ck["scaler"]["scale"] > 0 and all(np.isfinite(m["train_loss_fam"]) for m in ck["metrics"])
    assert any(k.endswith("weights1") for k in ck["head"])
