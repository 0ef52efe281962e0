"""Trainer data per recipe: each recipe's transforms pinned (type and parameters, as the released
loaders state them), the pixels against torchvision's transforms of the same names, and the
training loader visiting every image once per epoch (no dropped last batch)."""
import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from dctkd_train import data as D  # noqa: E402
from dctkd_train.recipes import RECIPES, paper_recipe_note, recipe_transform  # noqa: E402
from dctkd_train.train import resolve_config  # noqa: E402

# The released loaders' transforms, written out from the files (not from the trainer's tables).
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # FAM-KD dataset/imagenet.py
# DCT-KD Config/Dataset/config_ADE20K.yaml (MIT67, SUN397 the same)
SCENES = {"mean": [0.43216, 0.394666, 0.37645], "std": [0.22803, 0.22145, 0.216989]}
# FAM-KD dataset/cifar100.py; DCT-KD Config/Dataset/config_CIFAR100.yaml
CIFAR100 = {"mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]}
FLIP = ["RandomHorizontalFlip", {"p": 0.5}]
EVAL_224 = [["Resize", {"size": 256}], ["CenterCrop", {"size": 224}], ["ToTensor", {}]]
RRC_224 = ["RandomResizedCrop", {"size": 224, "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3]}]
CIFAR_TRAIN = [["RandomCrop", {"size": 32, "padding": 4}], FLIP, ["ToTensor", {}]]

EXPECTED = {
    # FAM-KD dataset/imagenet.py: RandomResizedCrop(224), flip; Resize(256), CenterCrop(224)
    ("famkd-imagenet", "imagefolder"): ([RRC_224, FLIP, ["ToTensor", {}]], EVAL_224, IMAGENET),
    # DCT-KD Libs/Datasets/SceneRecognitionDataset.py with RESIZE 256, CROP 224
    ("dctkd-scenes", "imagefolder"): ([["Resize", {"size": 256}], ["RandomCrop", {"size": 224}], FLIP, ["ToTensor", {}]],
                                      EVAL_224, SCENES),
    ("dctkd-cifar", "cifar100"): (CIFAR_TRAIN, [["ToTensor", {}]], CIFAR100),
    ("famkd-cifar", "cifar100"): (CIFAR_TRAIN, [["ToTensor", {}]], CIFAR100),
    # without --recipe: ImageNet-style runs take the ImageNet loaders' transform
    (None, "imagefolder"): ([RRC_224, FLIP, ["ToTensor", {}]], EVAL_224, IMAGENET),
    (None, "cifar100"): (CIFAR_TRAIN, [["ToTensor", {}]],
                         {"mean": list(D.CIFAR100_MEAN), "std": list(D.CIFAR100_STD)}),
}


def _write_fake_cifar100(root: Path, n_train=200, n_test=50):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": [i % 100 for i in range(n)]}
        (root / name).write_bytes(pickle.dumps(d))
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))


def _write_image_folder(root: Path, sizes=((300, 260), (257, 400), (224, 224), (640, 230))):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def _bundle_as_trained(spec: str, recipe):
    """The data of a run, built as state.setup builds it from the resolved configuration."""
    cfg = resolve_config({"data": spec, "model": "resnet8", "out": "o", "recipe": recipe})
    b = D.build_data(cfg["data"], image_size=cfg.get("image_size"), seed=3,
                     transform=recipe_transform(cfg["recipe"], cfg["data"]))
    return cfg, b


def _approx(tree):
    """Floats compared to 1e-12 (the mean/std go through float32 tensors)."""
    if isinstance(tree, list):
        return [_approx(v) for v in tree]
    if isinstance(tree, dict):
        return {k: _approx(v) for k, v in tree.items()}
    return pytest.approx(tree, rel=1e-6) if isinstance(tree, float) else tree


@pytest.mark.parametrize("recipe,kind", list(EXPECTED), ids=[f"{r or 'no-recipe'}-{k}" for r, k in EXPECTED])
def test_each_recipe_transforms_as_released(tmp_path, recipe, kind):
    if kind == "cifar100":
        _write_fake_cifar100(tmp_path)
    else:
        _write_image_folder(tmp_path)
    train, val, norm = EXPECTED[recipe, kind]
    cfg, b = _bundle_as_trained(f"{kind}:{tmp_path}", recipe)
    got = b.transforms()
    normalize = ["Normalize", norm]
    assert got["train"] == _approx(train + [normalize])
    assert got["val"] == _approx(val + [normalize])
    assert list(b.mean) == _approx(norm["mean"]) and list(b.std) == _approx(norm["std"])
    x, _ = b.train[0]
    assert x.shape == ((3, 224, 224) if kind == "imagefolder" else (3, 32, 32))


def test_every_recipe_with_released_loaders_is_pinned():
    for name, r in RECIPES.items():
        for kind in r.get("data", {}):
            assert (name, kind) in EXPECTED, (name, kind)


# ----------------------------------------------------------------------------- pixels vs torchvision


def _torchvision_pipeline(path, ds, index, tv):
    """What torchvision's transforms give for the crop and flip the data set drew for ``index``."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    TF = tv.transforms.functional
    img = Image.open(path).convert("RGB")
    s = ds.size
    if not ds.train:
        img = TF.center_crop(TF.resize(img, 256), s)
    else:
        rng = ds._rng(index)
        if ds.augment == "random-resized-crop":
            top, left, h, w = D.random_resized_crop_params(img.size[0], img.size[1], rng)
            img = TF.resized_crop(img, top, left, h, w, [s, s], InterpolationMode.BILINEAR)
        else:
            img = TF.resize(img, 256)
            top, left = int(rng.integers(0, img.size[1] - s + 1)), int(rng.integers(0, img.size[0] - s + 1))
            img = TF.crop(img, top, left, s, s)
        if rng.random() < 0.5:
            img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), ds.mean.flatten().tolist(), ds.std.flatten().tolist())


@pytest.mark.parametrize("recipe", ["famkd-imagenet", "dctkd-scenes", None])
def test_image_folder_pixels_equal_torchvision(tmp_path, recipe):
    tv = pytest.importorskip("torchvision")
    _write_image_folder(tmp_path)
    _, b = _bundle_as_trained(f"imagefolder:{tmp_path}", recipe)
    for ds in (b.train, b.val):
        for epoch in (0, 5):
            ds.set_epoch(epoch)
            for i, (path, _) in enumerate(ds.samples):
                x, _ = ds[i]
                torch.testing.assert_close(x, _torchvision_pipeline(path, ds, i, tv), rtol=0, atol=1e-6)


def test_random_resized_crop_params_follow_torchvision():
    tv = pytest.importorskip("torchvision")
    from PIL import Image

    get_params = tv.transforms.RandomResizedCrop.get_params
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    ours, theirs = [], []
    img = Image.new("RGB", (400, 300))
    for _ in range(4000):
        ours.append(D.random_resized_crop_params(400, 300, rng))
        theirs.append(get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]))
    for params in (ours, theirs):
        a = np.array(params, dtype=np.float64)
        assert ((a[:, 0] >= 0) & (a[:, 0] + a[:, 2] <= 300) & (a[:, 1] >= 0) & (a[:, 1] + a[:, 3] <= 400)).all()
    o, t = np.array(ours, dtype=np.float64), np.array(theirs, dtype=np.float64)
    area_o = o[:, 2] * o[:, 3] / 120000
    assert area_o.min() < 0.1 and area_o.max() > 0.95
    # the same distribution: area fraction and log aspect ratio, mean and spread (4000 draws each)
    for f in (lambda p: p[:, 2] * p[:, 3] / 120000, lambda p: np.log(p[:, 3] / p[:, 2])):
        assert abs(f(o).mean() - f(t).mean()) < 0.03 and abs(f(o).std() - f(t).std()) < 0.03
    assert np.abs(np.log(o[:, 3] / o[:, 2])).max() <= math.log(4 / 3) + 0.05
    # an image no try fits (every crop of the area range is too wide): the same central fallback
    tall = Image.new("RGB", (1000, 10))
    assert D.random_resized_crop_params(1000, 10, rng) == get_params(tall, [0.08, 1.0], [3 / 4, 4 / 3]) == (0, 493, 10, 13)
    assert D.random_resized_crop_params(10, 1000, rng) == get_params(Image.new("RGB", (10, 1000)), [0.08, 1.0],
                                                                     [3 / 4, 4 / 3])


# ----------------------------------------------------------------------------- every image, every epoch


class Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def _epoch(n, batch, world=1, rank=0, epoch=1):
    sampler, loader = D.make_train_loader(Indices(n), batch, world=world, rank=rank, seed=0)
    sampler.set_epoch(epoch)
    batches = [b.tolist() for b in loader]
    assert len(batches) == len(loader)
    return batches


def test_one_cifar_epoch_visits_every_training_image_once():
    batches = _epoch(50000, 64)
    seen = [i for b in batches for i in b]
    assert sorted(seen) == list(range(50000))  # the 16 of the last partial batch too
    assert len(batches) == 782 and [len(b) for b in batches[-2:]] == [64, 16]
    assert sorted(i for b in _epoch(50000, 64, epoch=2) for i in b) == list(range(50000))
    assert seen != [i for b in _epoch(50000, 64, epoch=2) for i in b]  # reshuffled each epoch


@pytest.mark.parametrize("n,batch", [(129, 64), (1, 8), (2, 8), (7, 7), (8, 7), (15, 7), (100, 1)])
def test_every_index_once_and_no_batch_of_one(n, batch):
    batches = _epoch(n, batch)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(len(b) >= 2 for b in batches) or n == 1 or batch == 1
    if n % batch == 1 and n > batch and batch > 1:  # a single left-over image joins the batch before it
        assert len(batches[-1]) == batch + 1
    elif n % batch:
        assert len(batches[-1]) == n % batch


def test_under_ddp_every_image_once_plus_the_samplers_padding():
    n, world = 1000, 3  # DistributedSampler pads 1000 to 1002 (two images twice), 334 a process
    per_rank = [[i for b in _epoch(n, 64, world, r) for i in b] for r in range(world)]
    assert all(len(p) == 334 for p in per_rank)
    counts = np.bincount(np.concatenate(per_rank), minlength=n)
    assert counts.min() == 1 and counts.sum() == 1002 and (counts == 2).sum() == 2


def test_a_cifar_run_trains_the_last_partial_batch_and_records_its_recipe_note(tmp_path, capsys):
    from dctkd_train.train import train

    _write_fake_cifar100(tmp_path / "c100", n_train=200, n_test=50)
    s = train({"data": f"cifar100:{tmp_path / 'c100'}", "model": "resnet8", "epochs": 1, "batch_size": 64,
               "device": "cpu", "out": str(tmp_path / "run"), "progress": False})
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["steps"] == 4 and s["final"]["epoch"] == 1  # 64 + 64 + 64 + 8
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    note = cfg["paper_recipe"]
    assert note["is_paper_recipe"] is False and note["paper_recipes"] == ["famkd-cifar", "dctkd-cifar"]
    assert note["differs"]["mean"] == [list(D.CIFAR100_MEAN), list(CIFAR100["mean"])]
    assert "lr" not in note["differs"] and "batch_size" not in note["differs"]  # the RepDistiller settings
    lines = [ln for ln in out.splitlines() if "not a paper's recipe" in ln]
    assert len(lines) == 1 and "--recipe famkd-cifar or --recipe dctkd-cifar" in lines[0]
    assert cfg["data"]["transforms"]["train"][0] == ["RandomCrop", {"size": 32, "padding": 4}]


def test_the_note_names_what_differs_from_the_paper_recipe():
    def note(**kw):
        cfg = resolve_config({"model": "resnet18", "out": "o", **kw})
        return paper_recipe_note(cfg, 1, "bf16", {"augment": "random-resized-crop", "mean": D.IMAGENET_MEAN,
                                                  "std": D.IMAGENET_STD})

    n = note(data="imagefolder:/x", method="dct-paper", teacher="t.pt")
    assert n["paper_recipes"] == ["dctkd-scenes"]
    d = n["differs"]
    assert d["batch_size"] == [64, 128] and d["lr"] == [0.025, 0.1] and d["epochs"] == [100, 70]
    assert d["amp"] == ["bf16", "none"] and d["augment"] == ["random-resized-crop", "resize-crop"]
    assert d["mean"] == [list(D.IMAGENET_MEAN), SCENES["mean"]] and "guide" not in d
    for part in ("--recipe dctkd-scenes", "batch 64 (128)", "lr 0.025 (0.1)", "epochs 100 (70)", "amp bf16 (none)",
                 "augment random-resized-crop (resize-crop)", "normalisation"):
        assert part in n["line"], part
    assert "\n" not in n["line"]
    n = note(data="cifar100:/x", method="dct-paper", teacher="t.pt")
    assert n["paper_recipes"] == ["dctkd-cifar"] and n["differs"]["guide"] == [True, False]
    assert note(data="imagefolder:/x", method="fam", teacher="t.pt")["paper_recipes"] == ["famkd-imagenet"]
    assert note(data="imagefolder:/x", method="fam", teacher="t.pt", recipe="famkd-imagenet") == {
        "is_paper_recipe": True, "recipe": "famkd-imagenet"}
