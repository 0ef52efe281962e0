"""dctkd_ext.integrations.torchdistill: the registered losses against dctkd_ext on the same io dicts, and
torchdistill's own pipeline (YAML -> dependencies -> DistillationBox -> forward_process /
post_forward_process) run from the example configs on a small synthetic CIFAR-100 stand-in, on the CPU."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dctkd_ext

torchdistill = pytest.importorskip("torchdistill", reason="needs torchdistill (the [torchdistill] extra)")
torchvision = pytest.importorskip("torchvision")

from torchdistill.common import yaml_util  # noqa: E402
from torchdistill.common.main_util import import_dependencies, load_ckpt  # noqa: E402
from torchdistill.core.distillation import get_distillation_box  # noqa: E402
from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT, get_mid_level_loss  # noqa: E402
from torchdistill.models.registry import AUXILIARY_MODEL_WRAPPER_DICT, get_model  # noqa: E402

import dctkd_ext.integrations.torchdistill as td  # noqa: E402

from conftest import features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "torchdistill"


def test_importing_dctkd_ext_does_not_import_torchdistill():
    code = ("import sys, dctkd_ext, dctkd_ext.features; "
            "assert 'torchdistill' not in sys.modules, 'torchdistill imported'; "
            "assert 'dctkd_ext.integrations.torchdistill' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}"})
    assert r.returncode == 0, r.stderr


def test_registered_under_torchdistill_keys():
    assert MIDDLE_LEVEL_LOSS_DICT["DCTATLoss"] is td.DCTATLoss
    assert MIDDLE_LEVEL_LOSS_DICT["FAMKDLoss"] is td.FAMKDLoss
    assert AUXILIARY_MODEL_WRAPPER_DICT["Student4FAMKD"] is td.Student4FAMKD


def _io(paths, feats):
    d = {p: {"output": f} for p, f in zip(paths, feats)}
    d["."] = {}
    return d


@pytest.mark.parametrize("preset", ["dct", "paper", "at"])
def test_dctat_loss_equals_dct_at_loss_on_the_same_io_dict(preset, gen):
    # teacher 2x the student's channels; level 2 of the teacher is larger (pooled to the student's)
    s = [features(4, 8, 16, 16, generator=gen, requires_grad=True), features(4, 16, 8, 8, generator=gen, requires_grad=True)]
    t = [features(4, 16, 16, 16, generator=gen), features(4, 32, 16, 16, generator=gen)]
    cfg = {"key": "DCTATLoss", "kwargs": {"preset": preset, "distance": "mse", "pairs": {
        "a": {"teacher": {"io": "output", "path": "layer1"}, "student": {"io": "output", "path": "layer1"}, "weight": 0.5},
        "b": {"teacher": {"io": "output", "path": "layer2"}, "student": {"io": "output", "path": "layer2"}, "weight": 2.0},
    }}}
    crit = get_mid_level_loss(cfg)
    got = crit(_io(["layer1", "layer2"], s), _io(["layer1", "layer2"], t))
    t_pooled = [t[0], torch.nn.functional.adaptive_avg_pool2d(t[1], (8, 8))]
    want = dctkd_ext.dct_at_loss(s, t_pooled, preset=preset, weights=[0.5, 2.0], distance="mse")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    g_got = torch.autograd.grad(got, s)
    g_want = torch.autograd.grad(want, s)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_dctat_loss_guide_and_errors(gen):
    s = [features(6, 8, 8, 8, generator=gen)]
    t = [features(6, 8, 8, 8, generator=gen)]
    logits = torch.randn(6, 5, generator=gen)
    targets = logits.argmax(1).clone()
    targets[:3] = (targets[:3] + 1) % 5  # the teacher is wrong on the first three
    pairs = [{"teacher": {"path": "l1"}, "student": {"path": "l1"}}]
    crit = td.DCTATLoss(pairs=pairs, guide=True)
    tio = _io(["l1"], t)
    tio["."] = {"output": logits}
    got = crit(_io(["l1"], s), tio, targets)
    want = dctkd_ext.dct_at_loss(s, t, sample_weight=(logits.argmax(1) == targets).float())
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="targets"):
        crit(_io(["l1"], s), tio)
    with pytest.raises(KeyError, match="forward_hook"):
        td.DCTATLoss(pairs=pairs)(_io(["l2"], s), tio)
    with pytest.raises(TypeError, match="unexpected keyword"):
        td.DCTATLoss(pairs=pairs, colour="red")
    with pytest.raises(ValueError, match="pairs"):
        td.DCTATLoss(pairs={})
    with pytest.raises(ValueError, match="teacher"):
        td.DCTATLoss(pairs=[{"student": {"path": "l1"}}])
    with pytest.raises(ValueError, match=r"\.io"):
        td.DCTATLoss(pairs=[{"teacher": {"path": "l1", "io": "out"}, "student": {"path": "l1"}}])


def test_famkd_wrapper_and_loss_shapes_and_errors(gen):
    student = get_model("resnet20", num_classes=10)  # torchdistill's own CIFAR ResNet (16/32/64 channels)
    feats_cfg = [{"io": "output", "path": "student_model.layer1", "in_channels": 16, "out_channels": 32, "size": 32},
                 {"io": "output", "path": "student_model.layer2", "in_channels": 32, "out_channels": 64, "size": 16},
                 {"io": "output", "path": "student_model.layer3", "in_channels": 64, "out_channels": 128, "size": 8}]
    w = td.Student4FAMKD(student, features=feats_cfg, mid_channels=16)
    fam_params = [n for n, _ in w.named_parameters() if "fam.weights1" in n]
    assert len(fam_params) == 3
    s_feats = [features(2, 16, 32, 32, generator=gen), features(2, 32, 16, 16, generator=gen), features(2, 64, 8, 8, generator=gen)]
    io = _io(["student_model.layer1", "student_model.layer2", "student_model.layer3"], s_feats)
    w.secondary_forward(io)
    fused = io["fam_head"]["output"]
    assert [tuple(f.shape) for f in fused] == [(2, 32, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8)]
    t_feats = [features(2, 32, 32, 32, generator=gen), features(2, 64, 16, 16, generator=gen), features(2, 128, 8, 8, generator=gen)]
    loss = td.FAMKDLoss(teacher_features=[{"path": "t1"}, {"path": "t2"}, {"path": "t3"}], weights=[1, 2, 3])
    got = loss(io, _io(["t1", "t2", "t3"], t_feats))
    want = sum(k * torch.nn.functional.mse_loss(f, t) for k, f, t in zip([1, 2, 3], fused, t_feats))
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="size"):
        td.Student4FAMKD(student, features=[{"path": "student_model.layer1", "in_channels": 16}])
    with pytest.raises(ValueError, match="weights"):
        td.FAMKDLoss(teacher_features=[{"path": "t1"}], weights=[1, 2])
    bad = td.FAMKDLoss(teacher_features=[{"path": "t1"}, {"path": "t2"}, {"path": "t3"}])
    with pytest.raises(ValueError, match="out_channels"):
        bad(io, _io(["t1", "t2", "t3"], [t_feats[1], t_feats[1], t_feats[2]]))


# ---------------------------------------------------------------------------------------------
# torchdistill's own pipeline, from the example YAMLs
# ---------------------------------------------------------------------------------------------


class SyntheticCIFAR100(torch.utils.data.Dataset):
    """Stands in for torchvision.datasets.CIFAR100 (same constructor): 32x32 RGB PIL images whose
    class (8 of the 100) sets a colour and the position of a bright square; made on the fly."""

    def __init__(self, root=None, train=True, transform=None, target_transform=None, download=False, n=32):
        rng = np.random.default_rng(0 if train else 1)
        self.labels = (np.arange(n) % 8).astype(np.int64)
        imgs = rng.integers(0, 60, size=(n, 32, 32, 3), dtype=np.uint8)
        for i, c in enumerate(self.labels):
            imgs[i, :, :, c % 3] += 80
            y, x = 4 + 6 * (c // 3), 4 + 8 * (c % 3)
            imgs[i, y:y + 8, x:x + 8, :] = 250
        self.imgs, self.transform = imgs, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(self.imgs[i])  # what torchvision's CIFAR100 hands its transform
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def _run_pipeline(yaml_name, tmp_path, monkeypatch, epochs=3):
    """torchdistill's image_classification.py flow, minus evaluation: load the YAML (its datasets are
    built by !import_call of torchvision.datasets.CIFAR100, here the synthetic stand-in), import the
    dependencies, build the models from the registry, a DistillationBox, and train.

    The teacher is swapped for resnet8x4, which has resnet32x4's stage shapes (64/128/256 channels at
    32/16/8) at a fifth of its cost, so the YAML's pairs and FAM levels apply unchanged."""
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", SyntheticCIFAR100)
    torch.manual_seed(0)
    config = yaml_util.load_yaml_file(str(EXAMPLES / yaml_name))
    import_dependencies(config.get("dependencies", None))
    device = torch.device("cpu")
    models_cfg = config["models"]
    assert models_cfg["teacher_model"]["key"] == "resnet32x4"
    models_cfg["teacher_model"]["key"] = "resnet8x4"
    teacher = get_model(models_cfg["teacher_model"]["key"], **models_cfg["teacher_model"]["kwargs"])
    ckpt = tmp_path / "teacher.pt"  # a local teacher checkpoint (random init), loaded the way the script does
    torch.save({"model": teacher.state_dict()}, ckpt)
    teacher = get_model(models_cfg["teacher_model"]["key"], **models_cfg["teacher_model"]["kwargs"])
    load_ckpt(str(ckpt), model=teacher, strict=True)
    student = get_model(models_cfg["student_model"]["key"], **models_cfg["student_model"]["kwargs"])
    train_cfg = copy.deepcopy(config["train"])
    for loader in ("train_data_loader", "val_data_loader"):
        train_cfg[loader]["kwargs"].update(batch_size=8, num_workers=0, pin_memory=False)
    box = get_distillation_box(teacher, student, config["datasets"], train_cfg, device, None, False, 1)
    box.teacher_model.eval()
    losses = []
    for epoch in range(epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch.to(device), targets.to(device), supp_dict)
            box.post_forward_process(loss=loss)
            losses.append(loss.item())
        box.post_epoch_process()
    return box, losses


@pytest.mark.parametrize("yaml_name", ["resnet8x4_from_resnet32x4-dct.yaml", "resnet8x4_from_resnet32x4-dct_kd.yaml"])
def test_torchdistill_pipeline_trains_with_dctat_loss(yaml_name, tmp_path, monkeypatch):
    box, losses = _run_pipeline(yaml_name, tmp_path, monkeypatch)
    terms = box.criterion.term_dict
    assert isinstance(terms["dct"][0], td.DCTATLoss) and terms["dct"][0].weights == [1.0, 1.0, 1.0]
    assert len(losses) == 12 and all(np.isfinite(losses))
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.9 * first, f"loss did not decrease: first epoch {first:.4f}, last {last:.4f} ({losses})"


def test_torchdistill_pipeline_trains_fam_parameters(tmp_path, monkeypatch):
    box, losses = _run_pipeline("resnet8x4_from_resnet32x4-famkd.yaml", tmp_path, monkeypatch, epochs=3)
    wrapper = box.student_model
    assert isinstance(wrapper, td.Student4FAMKD)
    # the optimizer torchdistill built holds every FAM parameter
    opt_ids = {id(p) for g in box.optimizer.param_groups for p in g["params"]}
    fam = {n: p for n, p in wrapper.named_parameters() if ".fam." in n}
    assert len(fam) == 3 * 5  # per level: weights1, rate1, rate2, w0.weight, w0.bias
    assert all(id(p) in opt_ids for p in fam.values())
    assert len(losses) == 12 and all(np.isfinite(losses))
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.9 * first, f"loss did not decrease: first epoch {first:.4f}, last {last:.4f} ({losses})"


def test_torchdistill_fam_parameters_receive_gradients_and_change(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", SyntheticCIFAR100)
    torch.manual_seed(0)
    config = yaml_util.load_yaml_file(str(EXAMPLES / "resnet8x4_from_resnet32x4-famkd.yaml"))
    import_dependencies(config.get("dependencies", None))
    m = config["models"]
    teacher = get_model("resnet8x4", **m["teacher_model"]["kwargs"])  # resnet32x4's stage shapes, cheaper
    student = get_model(m["student_model"]["key"], **m["student_model"]["kwargs"])
    train_cfg = copy.deepcopy(config["train"])
    for loader in ("train_data_loader", "val_data_loader"):
        train_cfg[loader]["kwargs"].update(batch_size=8, num_workers=0, pin_memory=False)
    box = get_distillation_box(teacher, student, config["datasets"], train_cfg, torch.device("cpu"), None, False, 1)
    fam = {n: p for n, p in box.student_model.named_parameters() if ".fam." in n}
    before = {n: p.detach().clone() for n, p in fam.items()}
    box.pre_epoch_process(epoch=0)
    sample_batch, targets, supp_dict = next(iter(box.train_data_loader))
    loss = box.forward_process(sample_batch, targets, supp_dict)
    loss.backward()
    for n, p in fam.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{n}: no gradient"
        assert p.grad.abs().sum() > 0, f"{n}: zero gradient"
    box.optimizer.step()
    for n, p in fam.items():
        assert not torch.equal(p.detach(), before[n]), f"{n}: unchanged by the optimizer step"
