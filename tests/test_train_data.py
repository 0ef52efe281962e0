"""Trainer data: the synthetic-scenes generator, the CIFAR pickles (real-format files, crafted and
malformed ones), image folders, subsets."""
import io
import os
import pickle
import struct
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
    with pytest.raises(UserError, match="meta is not a valid CIFAR python pickle"):
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


# ----------------------------------------------------------------------------- CIFAR files cannot run code


def _py2_pickle(obj) -> bytes:
    """``obj`` pickled the way Python 2's cPickle wrote the CIFAR files: protocol 2, strings as byte
    strings (BINSTRING), numpy's multiarray module under its numpy 1.x name."""

    class Py2Pickler(pickle._Pickler):
        dispatch = dict(pickle._Pickler.dispatch)

        def save_py2_str(self, b):
            if isinstance(b, str):
                b = b.encode("latin-1")
            if len(b) < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
            else:
                self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
            self.memoize(b)

        dispatch[bytes] = save_py2_str
        dispatch[str] = save_py2_str

    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


WRITERS = {"python2": _py2_pickle, "protocol2": lambda o: pickle.dumps(o, protocol=2),
           "protocol5": lambda o: pickle.dumps(o, protocol=5)}


def _cifar100_parts(n_train=30, n_test=20, classes=100):
    """The dicts of the CIFAR-100 python files, with every entry the real ones have."""
    rng = np.random.default_rng(1)
    parts = {}
    for name, n in (("train", n_train), ("test", n_test)):
        parts[name] = {b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                       b"batch_label": f"{name}ing batch 1 of 1".encode(),
                       b"fine_labels": [int(v) for v in rng.integers(0, classes, n)],
                       b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
                       b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    parts["meta"] = {b"fine_label_names": [f"fine{i}".encode() for i in range(classes)],
                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    return parts


def _write_cifar100(root: Path, parts: dict, writer=WRITERS["python2"]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, obj in parts.items():
        (root / name).write_bytes(obj if isinstance(obj, bytes) else writer(obj))
    return root


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_cifar100_files_in_the_real_format_load(tmp_path, writer):
    parts = _cifar100_parts()
    _write_cifar100(tmp_path / "cifar-100-python", parts, WRITERS[writer])
    b = D.build_data(f"cifar100:{tmp_path}")
    assert b.num_classes == 100 and b.class_names[7] == "fine7"
    assert torch.equal(b.train.images, torch.from_numpy(parts["train"][b"data"]).reshape(-1, 3, 32, 32))
    assert b.train.labels.tolist() == parts["train"][b"fine_labels"]
    assert torch.equal(b.val.images, torch.from_numpy(parts["test"][b"data"]).reshape(-1, 3, 32, 32))
    assert b.val.labels.tolist() == parts["test"][b"fine_labels"]


class _Payload:
    """Unpickling it would run ``touch MARKER`` (the shape of a crafted pickle)."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.marker}",)
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("how", ["os.system", "builtins.eval"])
@pytest.mark.parametrize("position", ["train", "test", "meta"])
def test_a_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path, capsys, position, how):
    marker = tmp_path / "marker"
    parts = _cifar100_parts()
    parts[position] = {**parts[position], b"x": _Payload(marker, how)}
    root = _write_cifar100(tmp_path / "cifar-100-python", parts, WRITERS["protocol2"])
    with pytest.raises(UserError) as e:
        D.build_data(f"cifar100:{tmp_path}")
    msg = str(e.value)
    assert str(root / position) in msg and "refused" in msg and "\n" not in msg, msg
    assert f".{how.split('.')[1]}, which a CIFAR file does not hold" in msg, msg  # posix.system, __builtin__.eval
    assert not marker.exists()
    # the command line: one line on stderr, status 2, nothing run
    from dctkd_train.cli import main

    assert main(["train", "--data", f"cifar100:{tmp_path}", "--model", "resnet8", "--out", str(tmp_path / "run"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(root / position) in err and "Traceback" not in err, err
    assert not marker.exists()
    # the same file whole (a payload as the file's only object), and inside the unextracted tarball
    (root / position).write_bytes(pickle.dumps(_Payload(marker, how)))
    with pytest.raises(UserError, match="refused"):
        D.build_data(f"cifar100:{tmp_path}")
    (tmp_path / "tgz").mkdir()
    with tarfile.open(tmp_path / "tgz" / "cifar-100-python.tar.gz", "w:gz") as tf:
        tf.add(root, arcname="cifar-100-python")
    with pytest.raises(UserError, match=f"cifar-100-python.tar.gz:cifar-100-python/{position} .*refused"):
        D.build_data(f"cifar100:{tmp_path / 'tgz'}")
    assert not marker.exists()


def _truncated(parts, name):
    return dict(parts, **{name: WRITERS["python2"](parts[name])[:-40]})


MALFORMED = {
    # name: (change the parts, the file the error names, a piece of the message)
    "no data": (lambda p: dict(p, train={k: v for k, v in p["train"].items() if k != b"data"}), "train",
                "has no b'data' entry"),
    "no labels": (lambda p: dict(p, test={k: v for k, v in p["test"].items() if k != b"fine_labels"}), "test",
                  "has no b'fine_labels' entry"),
    "no class names": (lambda p: dict(p, meta={b"coarse_label_names": [b"a"]}), "meta",
                       "has no b'fine_label_names' entry"),
    "data of another shape": (lambda p: dict(p, train={**p["train"], b"data": p["train"][b"data"][:, :3000]}),
                              "train", "shape (N, 3072), got a uint8 array of shape (30, 3000)"),
    "data of another dtype": (lambda p: dict(p, test={**p["test"], b"data": p["test"][b"data"].astype(np.float32)}),
                              "test", "got a float32 array"),
    "data as a list": (lambda p: dict(p, test={**p["test"], b"data": [1, 2, 3]}), "test", "got a list"),
    "labels as text": (lambda p: dict(p, train={**p["train"], b"fine_labels": [b"cat"] * 30}), "train",
                       "must be a list of integer class indices"),
    "too few labels": (lambda p: dict(p, train={**p["train"], b"fine_labels": [0] * 29}), "train",
                       "29 labels for 30 images"),
    "label out of range": (lambda p: dict(p, test={**p["test"], b"fine_labels": [100] * 20}), "test",
                           "labels must lie in 0..99"),
    "not a dict": (lambda p: dict(p, meta=[b"a", b"b"]), "meta", "holds a list, not the dict"),
    "truncated": (lambda p: _truncated(p, "train"), "train", "is not a valid CIFAR python pickle"),
    "empty": (lambda p: dict(p, test=b""), "test", "is not a valid CIFAR python pickle"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_cifar_files_get_one_line_naming_the_file(tmp_path, case):
    change, name, piece = MALFORMED[case]
    root = _write_cifar100(tmp_path, change(_cifar100_parts()))
    with pytest.raises(UserError) as e:
        D.build_data(f"cifar100:{tmp_path}")
    msg = str(e.value)
    assert msg.startswith(f"cifar100: {root / name}") and piece in msg and "\n" not in msg, msg


def test_a_broken_cifar_tarball_gets_one_line(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b" + b"\0" * 50)
    with pytest.raises(UserError, match=r"cifar-100-python.tar.gz is not a readable \.tar\.gz"):
        D.build_data(f"cifar100:{tmp_path}")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_gets_one_line_naming_it(tmp_path, capsys, workers):
    from dctkd_train.cli import main

    _write_image_folder(tmp_path / "scenes", per_class=4)
    bad = tmp_path / "scenes" / "train" / "kitchen" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    args = ["train", "--data", f"imagefolder:{tmp_path / 'scenes'}", "--model", "resnet8", "--image-size", "16",
            "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-progress", "--workers", str(workers)]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: imagefolder: cannot read the image {bad} ("), err
    (tmp_path / "scenes" / "val" / "bedroom" / "1.png").write_text("not an image")
    bad.unlink()
    assert main([*args, "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: imagefolder: cannot read the image {tmp_path / 'scenes' / 'val' / 'bedroom' / '1.png'}")
    assert len(err.splitlines()) == 1, err
