"""Trainer data: the synthetic-scenes generator, the CIFAR pickles, image folders, subsets."""
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from dctkd_train import data as D  # noqa: E402
from dctkd_train.errors import UserError  # noqa: E402


def fresh(spec, split):
    D.generate_scenes.cache_clear()  # really regenerate, do not hand back the cached tensors
    return D.generate_scenes(spec, split)


# ----------------------------------------------------------------------------- synthetic scenes


def test_scenes_are_deterministic():
    spec = D.SceneSpec(size=32, classes=12, train=48, val=24, seed=3)
    x1, y1 = fresh(spec, "train")
    x2, y2 = fresh(spec, "train")
    assert x1.dtype == torch.uint8 and x1.shape == (48, 3, 32, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # sample i does not depend on how many samples are generated
    x3, _ = fresh(D.SceneSpec(size=32, classes=12, train=20, val=24, seed=3), "train")
    assert torch.equal(x3, x1[:20])
    # another seed or split gives other images
    x4, _ = fresh(D.SceneSpec(size=32, classes=12, train=48, val=24, seed=4), "train")
    xv, _ = fresh(spec, "val")
    assert not torch.equal(x4, x1)
    assert not torch.equal(xv[:24], x1[:24])


@pytest.mark.parametrize("classes,n", [(20, 200), (8, 61), (7, 100)])
def test_scenes_classes_are_balanced(classes, n):
    _, y = fresh(D.SceneSpec(size=16, classes=classes, train=n, val=1, noise=0), "train")
    counts = torch.bincount(y, minlength=classes)
    assert counts.numel() == classes
    assert counts.max() - counts.min() <= (0 if n % classes == 0 else 1)
    assert counts.sum() == n


def test_scene_class_table_pairs_every_arrangement():
    table = D.scene_class_table(D.SceneSpec.max_classes())
    assert len(table) == len(set(table)) == D.SceneSpec.max_classes()
    # classes come in groups of four: one pair of shapes in the four relations
    for k in range(0, len(table), 4):
        pairs = {(a, b) for a, b, _ in table[k:k + 4]}
        assert len(pairs) == 1
        assert [r for _, _, r in table[k:k + 4]] == [0, 1, 2, 3]
    names = D.scene_class_names(8)
    assert names[0] == "square left of disc" and names[1] == "square right of disc"


def test_scene_placement_satisfies_the_relation():
    rng = np.random.default_rng(5)
    for S in (16, 32, 64):
        for r in range(4):
            for _ in range(50):
                pa, pb, rad = D._place_pair(S, r, rng)
                assert (rad >= 0.13 * S).all() and (rad <= 0.17 * S).all()
                for p, q in ((pa, rad[0]), (pb, rad[1])):  # inside the image
                    assert (p - q >= 0).all() and (p + q <= S).all()
                dx, dy = pb - pa  # from the first object to the second (x right, y down)
                # r: first object left of / right of / above / below the second
                along, across = {0: (dx, dy), 1: (-dx, dy), 2: (dy, dx), 3: (-dy, dx)}[r]
                assert along >= rad.sum() and along > abs(across)


def test_scene_rendering_puts_the_two_objects_apart_along_the_relation_axis():
    # Without noise, clutter or distractors, the two objects are the two most frequent exact colours.
    spec = D.SceneSpec(size=32, classes=8, train=1, val=1, noise=0, clutter=0, distractors=0)
    table = D.scene_class_table(8)
    for label in range(8):
        rng = np.random.default_rng([99, label])
        img = D._render_scene(spec, label, rng, table, []).reshape(-1, 3)
        bright = img.max(axis=1) >= 100
        colours, counts = np.unique(img[bright], axis=0, return_counts=True)
        top = colours[np.argsort(counts)[-2:]]
        cents = [np.argwhere((img == c).all(axis=1)).ravel() for c in top]
        cents = [np.array([(i % 32).mean(), (i // 32).mean()]) for i in cents]  # (x, y)
        d = np.abs(cents[1] - cents[0])
        axis = 0 if table[label][2] in (0, 1) else 1
        assert d[axis] > d[1 - axis] and d[axis] > 6, (label, d)


def test_scene_spec_parsing():
    sc = D.parse_scene_spec("size=24,classes=10,train=100,val=50,seed=7,noise=2.5")
    assert (sc.size, sc.classes, sc.train, sc.val, sc.seed, sc.noise) == (24, 10, 100, 50, 7, 2.5)
    assert D.parse_scene_spec("", image_size=40, train_size=30).size == 40
    with pytest.raises(UserError, match="unknown option 'colour'"):
        D.parse_scene_spec("colour=3")
    with pytest.raises(UserError, match="not a number"):
        D.parse_scene_spec("classes=many")
    with pytest.raises(UserError, match="classes must be in"):
        D.parse_scene_spec("classes=1000")
    with pytest.raises(UserError, match="disagrees"):
        D.parse_scene_spec("size=32", image_size=64)


def test_build_synthetic_bundle():
    b = D.build_data("synthetic-scenes:size=16,classes=4,train=16,val=8", seed=1)
    assert b.num_classes == 4 and len(b.train) == 16 and len(b.val) == 8 and b.image_size == 16
    x, y = b.train[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 4


def test_augmentation_is_a_function_of_seed_epoch_index():
    b = D.build_data("synthetic-scenes:size=16,classes=4,train=16,val=8", seed=1)
    ds = D.EpochDataset(b.train)
    n = len(b.train)
    a1, _ = ds[1 * n + 5]
    a2, _ = ds[1 * n + 5]
    assert torch.equal(a1, a2)
    others = [ds[e * n + 5][0] for e in range(2, 8)]
    assert any(not torch.equal(a1, o) for o in others)  # another epoch, another crop
    # validation images are not augmented
    assert torch.equal(b.val[2][0], b.val[2][0])


def test_unknown_spec_and_missing_folder():
    with pytest.raises(UserError, match="unknown data spec"):
        D.build_data("mnist:/tmp")
    with pytest.raises(UserError, match="does not exist"):
        D.build_data("cifar100:/no/such/folder")
    with pytest.raises(UserError, match="does not exist"):
        D.build_data("imagefolder:/no/such/folder")
    with pytest.raises(UserError, match="give the folder"):
        D.build_data("cifar100")


# ----------------------------------------------------------------------------- CIFAR-100


def _write_fake_cifar100(root: Path, n_train=200, n_test=100, classes=100):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"fine_labels": [i % classes for i in range(n)], b"coarse_labels": [0] * n}
        (root / name).write_bytes(pickle.dumps(d))
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(classes)]}))


def test_cifar100_from_local_files(tmp_path):
    _write_fake_cifar100(tmp_path / "cifar-100-python")
    b = D.build_data(f"cifar100:{tmp_path}", train_size=100, val_size=100)
    assert b.num_classes == 100 and b.class_names[3] == "c3"
    assert len(b.train) == 100 and len(b.val) == 100
    x, y = b.train[0]
    assert x.shape == (3, 32, 32)
    # the subset is class-balanced: 100 images of 100 classes -> one each
    assert sorted(b.train.targets()) == list(range(100))
    # the same files straight in DIR
    b2 = D.build_data(f"cifar100:{tmp_path / 'cifar-100-python'}")
    assert len(b2.train) == 200


def test_cifar100_from_the_unextracted_tarball(tmp_path):
    src = tmp_path / "src" / "cifar-100-python"
    _write_fake_cifar100(src, 20, 10)
    (tmp_path / "d").mkdir()
    with tarfile.open(tmp_path / "d" / "cifar-100-python.tar.gz", "w:gz") as tf:
        tf.add(src, arcname="cifar-100-python")
    b = D.build_data(f"cifar100:{tmp_path / 'd'}")
    assert len(b.train) == 20 and len(b.val) == 10


def test_cifar100_missing_files_message(tmp_path):
    with pytest.raises(UserError, match="never downloads"):
        D.build_data(f"cifar100:{tmp_path}")
    (tmp_path / "train").write_bytes(b"not a pickle")
    (tmp_path / "test").write_bytes(b"x")
    (tmp_path / "meta").write_bytes(b"x")
    with pytest.raises(UserError, match="not valid CIFAR"):
        D.build_data(f"cifar100:{tmp_path}")


# ----------------------------------------------------------------------------- image folders


def _write_image_folder(root: Path, classes=("bedroom", "kitchen", "street"), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (20 + 3 * i, 30, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
        (root / split / "notes.txt").write_text("ignored")


def test_imagefolder(tmp_path):
    _write_image_folder(tmp_path)
    b = D.build_data(f"imagefolder:{tmp_path}", image_size=16)
    assert b.class_names == ["bedroom", "kitchen", "street"] and b.num_classes == 3
    assert len(b.train) == 9 and len(b.val) == 9
    x, y = b.train[4]
    assert x.shape == (3, 16, 16) and y == 1
    xv1, _ = b.val[0]
    xv2, _ = b.val[0]
    assert torch.equal(xv1, xv2)


def test_imagefolder_errors(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="val"):
        D.build_data(f"imagefolder:{tmp_path}")
    (tmp_path / "val" / "attic").mkdir(parents=True)
    (tmp_path / "train" / "kitchen").mkdir()
    with pytest.raises(UserError, match="val has classes that train lacks: attic"):
        D.build_data(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "attic").mkdir()
    with pytest.raises(UserError, match="no images"):
        D.build_data(f"imagefolder:{tmp_path}")


def test_stratified_subset_is_balanced_and_deterministic():
    targets = [i % 5 for i in range(100)] + [0] * 50
    idx = D.stratified_subset(targets, 25, seed=1)
    assert idx == D.stratified_subset(targets, 25, seed=1)
    assert len(set(idx)) == 25
    assert np.bincount([targets[i] for i in idx]).tolist() == [5] * 5


def test_imagefolder_and_cifar_train_end_to_end(tmp_path):
    from dctkd_train.train import train

    _write_image_folder(tmp_path / "scenes", per_class=4)
    s = train({"data": f"imagefolder:{tmp_path / 'scenes'}", "model": "resnet8", "image_size": 16, "epochs": 1,
               "batch_size": 4, "device": "cpu", "out": str(tmp_path / "run"), "quiet": True, "workers": 0})
    assert s["final"]["val_images"] == 12 and s["final"]["epoch"] == 1
    _write_fake_cifar100(tmp_path / "c100", n_train=64, n_test=32, classes=100)
    s = train({"data": f"cifar100:{tmp_path / 'c100'}", "model": "resnet8", "epochs": 1, "batch_size": 32,
               "device": "cpu", "out": str(tmp_path / "run2"), "quiet": True})
    assert s["final"]["val_images"] == 32
