"""Data sets and the ``--data SPEC`` parser.

Specs:

* ``synthetic-scenes[:key=value,...]`` -- a built-in generator of deterministic multi-object scenes
  (:class:`SceneSpec`). The class of a scene is *which two objects* appear and *where they stand
  relative to each other* (left of / above), so a network has to find both objects and compare their
  positions: a small multi-attention task in the spirit of scene recognition.
* ``cifar100:DIR`` / ``cifar10:DIR`` -- the python-pickle CIFAR files in DIR (``train``, ``test``,
  ``meta``; or DIR/cifar-100-python/...; or the unextracted ``cifar-100-python.tar.gz`` in DIR). Never
  downloads anything.
* ``imagefolder:DIR`` -- DIR/train/<class>/<images> and DIR/val/<class>/<images> (e.g. the ADE20K
  scene categories or MIT Indoor 67 laid out that way).

Augmentation randomness is a pure function of (seed, epoch, sample index), so a run gives the same
batches whatever the number of loader workers or processes, and a resumed run continues exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import math
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# The CIFAR-100 statistics both papers' released loaders normalise with (their 4th digits differ
# from the ones above): cuong-pv/FAM-KD dataset/cifar100.py, and
# alexlopezcifuentes/Distillation-Attention Config/Dataset/config_CIFAR100.yaml.
RELEASED_CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
RELEASED_CIFAR100_STD = (0.2675, 0.2565, 0.2761)
# The scene data sets' normalisation in the DCT-KD release (Config/Dataset/config_ADE20K.yaml, and
# the same in config_MIT67.yaml / config_SUN397.yaml; commented "ImageNet" there, though not
# torchvision's ImageNet statistics).
DCTKD_SCENES_MEAN = (0.43216, 0.394666, 0.37645)
DCTKD_SCENES_STD = (0.22803, 0.22145, 0.216989)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Fixed normalisation of synthetic-scenes (close to the statistics of the default options).
SCENES_MEAN = (0.28, 0.28, 0.28)
SCENES_STD = (0.25, 0.25, 0.25)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")


# =============================================================================================
# Synthetic scenes
# =============================================================================================

SHAPES = ("square", "disc", "triangle", "plus", "ring", "diamond", "cross", "frame")
RELATIONS = ("left of", "right of", "above", "below")  # relation of the first object to the second


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of shape ``kind`` on local coordinates scaled so the shape fits in [-1, 1]^2."""
    au, av = np.abs(u), np.abs(v)
    inside = (au <= 1) & (av <= 1)
    if kind == 0:  # filled square
        return inside
    if kind == 1:  # disc
        return u * u + v * v <= 1
    if kind == 2:  # triangle, apex up (v grows downwards)
        return inside & (au <= (v + 1) / 2)
    if kind == 3:  # plus
        return inside & ((au <= 0.34) | (av <= 0.34))
    if kind == 4:  # ring
        r2 = u * u + v * v
        return (r2 <= 1) & (r2 >= 0.36)
    if kind == 5:  # diamond
        return au + av <= 1
    if kind == 6:  # diagonal cross
        return inside & ((np.abs(u - v) <= 0.45) | (np.abs(u + v) <= 0.45))
    if kind == 7:  # hollow square
        return inside & (np.maximum(au, av) >= 0.55)
    raise ValueError(kind)


@dataclass(frozen=True)
class SceneSpec:
    """Options of ``synthetic-scenes``: ``size``, ``classes``, ``train``, ``val``, ``seed``,
    ``distractors`` (extra objects of shapes no class uses, when some are left), ``clutter``
    (small line segments), ``noise`` (pixel noise std, 0-255 scale)."""

    size: int = 32
    classes: int = 20
    train: int = 10000
    val: int = 2000
    seed: int = 0
    distractors: int = 1
    clutter: int = 3
    noise: float = 8.0

    @staticmethod
    def max_classes() -> int:
        n = len(SHAPES)
        return n * (n - 1) // 2 * 4

    def validate(self) -> None:
        if self.size < 16:
            raise UserError(f"synthetic-scenes: size must be >= 16, got {self.size}")
        if not 2 <= self.classes <= self.max_classes():
            raise UserError(f"synthetic-scenes: classes must be in 2..{self.max_classes()}, got {self.classes}")
        if self.train < 1 or self.val < 1:
            raise UserError("synthetic-scenes: train and val sizes must be >= 1")
        if self.distractors < 0 or self.clutter < 0 or self.noise < 0:
            raise UserError("synthetic-scenes: distractors, clutter and noise must be >= 0")


def scene_class_table(num_classes: int) -> list[tuple[int, int, int]]:
    """Class k -> (shape a, shape b, relation r): "a is <r> b". Pairs are taken in the order
    (0,1), (0,2), (1,2), (0,3), (1,3), (2,3), (0,4) ..., four relations each, so a small class count
    uses few shapes and every pair appears in all four arrangements (telling "a left of b" from
    "b left of a" needs the positions, not just the objects)."""
    table = []
    for b in range(1, len(SHAPES)):
        for a in range(b):
            for r in range(len(RELATIONS)):
                table.append((a, b, r))
    return table[:num_classes]


def scene_class_names(num_classes: int) -> list[str]:
    return [f"{SHAPES[a]} {RELATIONS[r]} {SHAPES[b]}" for a, b, r in scene_class_table(num_classes)]


_SPLIT_ID = {"train": 1, "val": 2}


def _place_pair(S: int, r: int, rng: np.random.Generator):
    """Centres and half-sizes of the two class objects, so that "first <r> second" holds clearly:
    along the relation's axis they are at least one object apart, and that displacement dominates
    the one across it (r: 0 left of, 1 right of, 2 above, 3 below; x right, y down)."""
    radius = rng.uniform(0.13, 0.17, 2) * S
    margin = 0.05 * S
    lo, hi = radius.max() + 0.5, S - radius.max() - 0.5
    while True:  # accepts about one draw in five
        pa = rng.uniform(lo, hi, 2)
        pb = rng.uniform(lo, hi, 2)
        dx, dy = pb[0] - pa[0], pb[1] - pa[1]  # from a to b
        main, other = {0: (dx, dy), 1: (-dx, dy), 2: (dy, dx), 3: (-dy, dx)}[r]
        if main >= radius.sum() + margin and main >= abs(other) + margin:
            return pa, pb, radius


def _render_scene(spec: SceneSpec, label: int, rng: np.random.Generator, table, free_shapes) -> np.ndarray:
    S = spec.size
    ss = 2  # supersampling factor for anti-aliased edges
    N = S * ss
    yy, xx = np.mgrid[0:N, 0:N].astype(np.float32)
    yy = (yy + 0.5) / ss
    xx = (xx + 0.5) / ss

    # Background: a dim random linear gradient between two random colours.
    c0 = rng.uniform(0, 90, 3)
    c1 = rng.uniform(0, 90, 3)
    ang = rng.uniform(0, 2 * np.pi)
    t = ((xx - S / 2) * np.cos(ang) + (yy - S / 2) * np.sin(ang)) / S + 0.5
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]

    # Small clutter: short bright-ish line segments (never one of the shapes).
    for _ in range(spec.clutter):
        p = rng.uniform(0, S, 2)
        ang2 = rng.uniform(0, np.pi)
        length = rng.uniform(0.08, 0.18) * S
        d = np.array([np.cos(ang2), np.sin(ang2)])
        rel_x, rel_y = xx - p[0], yy - p[1]
        along = rel_x * d[0] + rel_y * d[1]
        across = -rel_x * d[1] + rel_y * d[0]
        m = (np.abs(along) <= length / 2) & (np.abs(across) <= 0.5)
        img[m] = rng.uniform(60, 200, 3)

    a, b, r = table[label]
    pa, pb, radius = _place_pair(S, r, rng)
    objects = [(a, pa, radius[0]), (b, pb, radius[1])]

    # Distractor objects: shapes that no class uses, away from the two class objects.
    for _ in range(spec.distractors if free_shapes else 0):
        kind = int(free_shapes[rng.integers(len(free_shapes))])
        rad = rng.uniform(0.10, 0.14) * S
        for _ in range(100):
            p = rng.uniform(rad + 0.5, S - rad - 0.5, 2)
            if all(np.abs(p - q).max() >= rad + qr for _, q, qr in objects):
                objects.append((kind, p, rad))
                break

    for kind, p, rad in objects:
        u = (xx - p[0]) / rad
        v = (yy - p[1]) / rad
        m = _shape_mask(kind, u, v)
        hue_col = rng.uniform(0, 1, 3)
        colour = 110 + 145 * hue_col / max(hue_col.max(), 1e-6)  # bright, saturated, random hue
        img[m] = colour

    # Downsample the supersampled image (box filter), add pixel noise.
    img = img.reshape(S, ss, S, ss, 3).mean(axis=(1, 3))
    if spec.noise > 0:
        img = img + rng.normal(0, spec.noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def generate_scenes(spec: SceneSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, S, S) uint8 and labels (N,) int64 of one split. Deterministic: sample i of a
    split depends only on (seed, split, i, the options); labels are ``i % classes``, so the classes
    are balanced (counts differ by at most one)."""
    spec.validate()
    n = spec.train if split == "train" else spec.val
    table = scene_class_table(spec.classes)
    used = {s for a, b, _ in table for s in (a, b)}
    free = [s for s in range(len(SHAPES)) if s not in used]
    images = np.empty((n, spec.size, spec.size, 3), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % spec.classes
    for i in range(n):
        rng = np.random.default_rng([spec.seed, _SPLIT_ID[split], i])
        images[i] = _render_scene(spec, int(labels[i]), rng, table, free)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


# =============================================================================================
# Datasets
# =============================================================================================


class _EpochMixin:
    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])


class TensorImageDataset(_EpochMixin, Dataset):
    """In-memory uint8 images (N, 3, H, W). ``augment``: "none", or "crop-flip" (pad 4 + random
    crop + horizontal flip, the CIFAR recipe), or "crop" (no flip: flipping changes a scene's
    left/right relation)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, augment: str = "none", seed: int = 0):
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img = self.images[index]
        if self.augment != "none":
            rng = self._rng(index)
            pad = 4
            h, w = img.shape[-2:]
            padded = torch.zeros((3, h + 2 * pad, w + 2 * pad), dtype=img.dtype)
            padded[:, pad : pad + h, pad : pad + w] = img
            i, j = rng.integers(0, 2 * pad + 1, 2)
            img = padded[:, i : i + h, j : j + w]
            if self.augment == "crop-flip" and rng.random() < 0.5:
                img = img.flip(-1)
        x = (img.float() - self.mean) / self.std
        return x, int(self.labels[index])

    def describe(self) -> list:
        """The transform as torchvision's names and arguments (recorded in config.json)."""
        crop = [["RandomCrop", {"size": int(self.images.shape[-1]), "padding": 4}]] if self.augment != "none" else []
        flip = [["RandomHorizontalFlip", {"p": 0.5}]] if self.augment == "crop-flip" else []
        norm = ["Normalize", {"mean": (self.mean / 255).flatten().tolist(), "std": (self.std / 255).flatten().tolist()}]
        return crop + flip + [["ToTensor", {}], norm]

    def targets(self) -> list[int]:
        return self.labels.tolist()


# Training augmentations of image folders (the evaluation transform is always resize + centre crop):
# "random-resized-crop": torchvision's RandomResizedCrop(size) (scale 0.08-1, aspect 3/4-4/3) and a
#   horizontal flip, the ImageNet loaders' (cuong-pv/FAM-KD dataset/imagenet.py);
# "resize-crop": Resize(size * 256/224) of the shorter side, RandomCrop(size) and a horizontal flip,
#   the DCT-KD scene loader's (alexlopezcifuentes/Distillation-Attention
#   Libs/Datasets/SceneRecognitionDataset.py, RESIZE 256 / CROP 224).
IMAGEFOLDER_AUGMENTS = ("random-resized-crop", "resize-crop")
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def resize_short_side(im, short: int):
    """torchvision's Resize(short) on a PIL image: the shorter side to ``short``, the longer one to
    int(short * long / short_side) (truncated), bilinear; unchanged when already that size."""
    from PIL import Image

    w, h = im.size
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    return im if size == (w, h) else im.resize(size, Image.BILINEAR)


def random_resized_crop_params(width: int, height: int, rng: np.random.Generator,
                               scale=RRC_SCALE, ratio=RRC_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's RandomResizedCrop.get_params, drawn from ``rng``: ten tries
    of an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``, then the
    largest central crop within ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageFolderDataset(_EpochMixin, Dataset):
    """Images on disk read with Pillow, transformed as torchvision's transforms of the same names
    would (the same pixels for the same crop). Train: ``augment`` (IMAGEFOLDER_AUGMENTS). Eval:
    Resize(size * 256/224) of the shorter side and CenterCrop(size). Then ToTensor and Normalize
    with ``mean`` / ``std``."""

    def __init__(self, samples: list[tuple[str, int]], size: int, train: bool, seed: int = 0,
                 augment: str = "random-resized-crop", mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if augment not in IMAGEFOLDER_AUGMENTS:
            raise ValueError(f"augment: expected one of {', '.join(IMAGEFOLDER_AUGMENTS)}, got {augment!r}")
        self.samples = samples
        self.size = size
        self.train = train
        self.seed = seed
        self.augment = augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @property
    def resize(self) -> int:
        return round(self.size * 256 / 224)

    def describe(self) -> list:
        """The transform as torchvision's names and arguments (recorded in config.json)."""
        norm = ["Normalize", {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}]
        if not self.train:
            crop = [["Resize", {"size": self.resize}], ["CenterCrop", {"size": self.size}]]
        elif self.augment == "random-resized-crop":
            crop = [["RandomResizedCrop", {"size": self.size, "scale": list(RRC_SCALE), "ratio": list(RRC_RATIO)}]]
        else:
            crop = [["Resize", {"size": self.resize}], ["RandomCrop", {"size": self.size}]]
        flip = [["RandomHorizontalFlip", {"p": 0.5}]] if self.train else []
        return crop + flip + [["ToTensor", {}], norm]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        try:
            return self._load(Image, path, index), label
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # Pillow reports a truncated or garbled file as OSError/ValueError, some decoders as SyntaxError
            raise UserError(f"imagefolder: cannot read the image {path} ({type(e).__name__}: {e})") from None

    def _load(self, Image, path: str, index: int) -> torch.Tensor:
        s = self.size
        with Image.open(path) as im:
            im = im.convert("RGB")
            if self.train and self.augment == "random-resized-crop":
                rng = self._rng(index)
                top, left, h, w = random_resized_crop_params(im.size[0], im.size[1], rng)
                im = im.crop((left, top, left + w, top + h)).resize((s, s), Image.BILINEAR)
            else:
                im = resize_short_side(im, self.resize)  # both sides >= resize >= s
                w, h = im.size
                if self.train:
                    rng = self._rng(index)
                    top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
                else:
                    top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
                im = im.crop((left, top, left + s, top + s))
            if self.train and rng.random() < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            arr = np.asarray(im, dtype=np.uint8)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std

    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


class SubsetDataset(Dataset):
    def __init__(self, base, indices: Sequence[int]):
        self.base = base
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def describe(self) -> list:
        return self.base.describe()

    def targets(self) -> list[int]:
        t = self.base.targets()
        return [t[i] for i in self.indices]


def stratified_subset(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """n indices, deterministic, taking the classes in turn (so the subset stays balanced)."""
    if n >= len(targets):
        return list(range(len(targets)))
    g = np.random.default_rng([seed, 7])
    by_class: dict[int, list[int]] = {}
    for i in g.permutation(len(targets)).tolist():
        by_class.setdefault(int(targets[i]), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    out: list[int] = []
    k = 0
    while len(out) < n:
        for q in queues:
            if k < len(q) and len(out) < n:
                out.append(q[k])
        k += 1
    return sorted(out)


# =============================================================================================
# Spec parsing
# =============================================================================================


@dataclass
class DataBundle:
    name: str  # "synthetic-scenes", "cifar100", "cifar10", "imagefolder"
    spec: str
    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]
    image_size: int
    mean: tuple
    std: tuple
    augment: str = "none"  # the training augmentation's name (data.py)

    def transforms(self) -> dict:
        """{"train": [...], "val": [...]}: each split's transform as torchvision's names and arguments."""
        return {"train": self.train.describe(), "val": self.val.describe()}

    def describe(self) -> str:
        return (
            f"{self.spec}: {len(self.train)} train / {len(self.val)} val images, "
            f"{self.num_classes} classes, {self.image_size}x{self.image_size}"
        )


def _parse_kv(text: str, what: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise UserError(f"{what}: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_scene_spec(options: str, image_size: int | None = None, train_size: int | None = None,
                     val_size: int | None = None) -> SceneSpec:
    kv = _parse_kv(options, "synthetic-scenes")
    fields = {f.name: f for f in dataclasses.fields(SceneSpec)}
    aliases = {"image_size": "size", "num_classes": "classes", "n_train": "train", "n_val": "val"}
    values = {}
    for k, v in kv.items():
        k = aliases.get(k, k)
        if k not in fields:
            raise UserError(f"synthetic-scenes: unknown option {k!r}; options: {', '.join(fields)}")
        try:
            values[k] = float(v) if fields[k].type in ("float", float) else int(v)
        except ValueError:
            raise UserError(f"synthetic-scenes: option {k}={v!r} is not a number") from None
    for key, flag, val in (("size", "--image-size", image_size), ("train", "--train-size", train_size),
                           ("val", "--val-size", val_size)):
        if val is not None:
            if key in values and values[key] != val:
                raise UserError(f"synthetic-scenes: {key}={values[key]} in the spec disagrees with {flag} {val}")
            values[key] = val
    spec = SceneSpec(**values)
    spec.validate()
    return spec


def _find_cifar(root: Path, kind: str):
    """Return ``read(name) -> (bytes, where)`` for the CIFAR pickle files (``where`` names the file in
    errors), looking in DIR, DIR/cifar-*-python and a cifar-*-python.tar.gz in DIR."""
    sub = "cifar-100-python" if kind == "cifar100" else "cifar-10-batches-py"
    needed = ["train", "test", "meta"] if kind == "cifar100" else [
        "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"]
    for d in (root, root / sub):
        if all((d / n).is_file() for n in needed):
            def read(n, d=d):
                try:
                    return (d / n).read_bytes(), str(d / n)
                except OSError as e:
                    raise UserError(f"{kind}: cannot read {d / n} ({e.strerror or e})") from None
            return read
    tgz = root / (sub.replace("-batches-py", "-python") + ".tar.gz")
    if tgz.is_file():
        try:
            tf = tarfile.open(tgz, "r:gz")
            members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"{kind}: {tgz} is not a readable .tar.gz ({type(e).__name__}: {e})") from None
        if all(n in members for n in needed):
            def read_member(n):
                where = f"{tgz}:{members[n].name}"
                try:
                    return tf.extractfile(members[n]).read(), where
                except (tarfile.TarError, OSError, EOFError) as e:
                    raise UserError(f"{kind}: cannot read {where} ({type(e).__name__}: {e})") from None
            return read_member
    raise UserError(
        f"{kind}: no CIFAR python files ({', '.join(needed)}) in {root} or {root / sub}, and no {tgz.name} there. "
        f"Download the 'python version' from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
        f"into {root} (this tool never downloads)."
    )


def _latin1_encode(text, encoding):
    """``_codecs.encode`` as pickles of protocol <= 2 use it to make bytes, for latin-1 only."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than str -> latin-1 bytes")
    return text.encode("latin-1")


_SAMPLE = np.zeros(1, dtype=np.uint8)
# What a CIFAR file needs to unpickle: numpy arrays (and their dtypes), by the names numpy 1.x and 2.x
# pickle them under. The functions are taken from numpy's own reductions, so both spellings resolve
# to the same objects whichever numpy is installed.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _SAMPLE.__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): _SAMPLE.__reduce__()[0],
    ("numpy.core.numeric", "_frombuffer"): _SAMPLE.__reduce_ex__(5)[0],
    ("numpy._core.numeric", "_frombuffer"): _SAMPLE.__reduce_ex__(5)[0],
    ("_codecs", "encode"): _latin1_encode,
}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python files, which hold only dicts, lists, strings, bytes, numbers and
    numpy arrays: every other global a pickle names (a function it would call, a class it would
    build) is refused before anything runs."""

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR file does not hold; "
                                         "refused, nothing was run") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent id, which a CIFAR file does not; refused")


def _unpickle(data: bytes, where: str, kind: str) -> dict:
    try:
        obj = CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{kind}: {where} is not a valid CIFAR python pickle: {e}") from None
    except Exception as e:  # truncated or garbled: EOFError, ValueError, struct errors, ...
        raise UserError(f"{kind}: {where} is not a valid CIFAR python pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{kind}: {where} holds a {type(obj).__name__}, not the dict of a CIFAR file")
    return obj


def _cifar_field(d: dict, key: bytes, where: str, kind: str):
    if key not in d and key.decode() in d:  # pickled by Python 3 with str keys
        key = key.decode()
    if key not in d:
        have = ", ".join(sorted(repr(k) for k in d)[:6])
        raise UserError(f"{kind}: {where} has no {key!r} entry (it has {have or 'none'})")
    return d[key]


def _cifar_images(d: dict, where: str, kind: str) -> np.ndarray:
    x = _cifar_field(d, b"data", where, kind)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        what = (f"a {x.dtype} array of shape {tuple(x.shape)}" if isinstance(x, np.ndarray)
                else f"a {type(x).__name__}")
        raise UserError(f"{kind}: {where}: 'data' must be a uint8 array of shape (N, 3072), got {what}")
    return x


def _cifar_labels(d: dict, key: bytes, n: int, num_classes: int, where: str, kind: str) -> list[int]:
    y = _cifar_field(d, key, where, kind)
    try:
        arr = np.asarray(y)
    except Exception:
        arr = None
    if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise UserError(f"{kind}: {where}: {key.decode()!r} must be a list of integer class indices")
    if arr.size != n:
        raise UserError(f"{kind}: {where}: {arr.size} labels for {n} images")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise UserError(f"{kind}: {where}: labels must lie in 0..{num_classes - 1} (the classes of the meta "
                        f"file), found {int(arr.min())}..{int(arr.max())}")
    return arr.astype(np.int64).tolist()


def _cifar_names(d: dict, key: bytes, where: str, kind: str) -> list[str]:
    names = _cifar_field(d, key, where, kind)
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise UserError(f"{kind}: {where}: {key.decode()!r} must be a non-empty list of class names")
    try:
        return [n.decode() if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError:
        raise UserError(f"{kind}: {where}: the class names are not UTF-8 text") from None


def load_cifar(root: Path, kind: str) -> tuple[tuple, tuple, list[str]]:
    """The CIFAR python files, unpickled by :class:`CifarUnpickler` and checked (keys, dtypes, shapes,
    label ranges); every problem is a one-line :class:`UserError` naming the file."""
    read = _find_cifar(root, kind)

    def load(name):
        data, where = read(name)
        return _unpickle(data, where, kind), where

    if kind == "cifar100":
        meta_name, names_key, label_key, train_names, test_name = "meta", b"fine_label_names", b"fine_labels", ["train"], "test"
    else:
        meta_name, names_key, label_key = "batches.meta", b"label_names", b"labels"
        train_names, test_name = [f"data_batch_{i}" for i in range(1, 6)], "test_batch"
    meta, where = load(meta_name)
    names = _cifar_names(meta, names_key, where, kind)

    def split(file_names):
        xs, ys = [], []
        for name in file_names:
            d, where = load(name)
            x = _cifar_images(d, where, kind)
            xs.append(x)
            ys += _cifar_labels(d, label_key, len(x), len(names), where, kind)
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.as_tensor(ys, dtype=torch.int64)

    return split(train_names), split([test_name]), names


def _list_image_folder(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    samples = []
    for ci, c in enumerate(classes):
        d = split_dir / c
        if not d.is_dir():
            continue
        for dirpath, _, files in sorted(os.walk(d, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), ci))
    return samples


def build_data(spec: str, *, image_size: int | None = None, train_size: int | None = None,
               val_size: int | None = None, seed: int = 0, with_train: bool = True,
               transform: dict | None = None) -> DataBundle:
    """Parse ``--data SPEC`` and build the train/val data sets (raises :class:`UserError`).
    ``with_train=False`` skips generating the synthetic training split (evaluation only).
    ``transform``: a recipe's ``augment`` (image folders: IMAGEFOLDER_AUGMENTS), ``mean`` and ``std``
    for this kind of data, each replacing the trainer's default."""
    transform = transform or {}
    name, _, arg = spec.partition(":")
    name = name.strip().lower()
    if name in ("synthetic-scenes", "synthetic", "scenes"):
        sc = parse_scene_spec(arg, image_size, train_size, val_size)
        xtr, ytr = generate_scenes(sc, "train") if with_train else (torch.zeros(0, 3, sc.size, sc.size, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
        xva, yva = generate_scenes(sc, "val")
        mean, std = SCENES_MEAN, SCENES_STD
        return DataBundle(
            "synthetic-scenes", spec,
            TensorImageDataset(xtr, ytr, mean, std, augment="crop", seed=seed),
            TensorImageDataset(xva, yva, mean, std),
            sc.classes, scene_class_names(sc.classes), sc.size, mean, std, "crop",
        )

    if name in ("cifar100", "cifar10", "imagefolder"):
        if not arg:
            raise UserError(f"--data {spec!r}: give the folder, as {name}:DIR")
        root = Path(arg).expanduser()
        if not root.is_dir():
            raise UserError(f"data folder {str(root)!r} does not exist (from --data {spec!r})")
    else:
        raise UserError(
            f"unknown data spec {spec!r}; use synthetic-scenes[:key=value,...], cifar100:DIR, cifar10:DIR or imagefolder:DIR"
        )

    if name in ("cifar100", "cifar10"):
        if image_size not in (None, 32):
            raise UserError(f"{name} images are 32x32; --image-size {image_size} is not supported for it")
        (xtr, ytr), (xva, yva), names = load_cifar(root, name)
        mean, std = (CIFAR100_MEAN, CIFAR100_STD) if name == "cifar100" else (CIFAR10_MEAN, CIFAR10_STD)
        mean, std = tuple(transform.get("mean", mean)), tuple(transform.get("std", std))
        train = TensorImageDataset(xtr, ytr, mean, std, augment="crop-flip", seed=seed)
        val = TensorImageDataset(xva, yva, mean, std)
        size, augment = 32, "crop-flip"
    else:
        tr_dir, va_dir = root / "train", root / "val"
        for d in (tr_dir, va_dir):
            if not d.is_dir():
                raise UserError(f"imagefolder: {str(d)!r} does not exist; expected {root}/train/<class>/... and {root}/val/<class>/...")
        names = sorted(e.name for e in tr_dir.iterdir() if e.is_dir())
        if not names:
            raise UserError(f"imagefolder: no class folders in {tr_dir}")
        extra = sorted(e.name for e in va_dir.iterdir() if e.is_dir() and e.name not in names)
        if extra:
            raise UserError(f"imagefolder: val has classes that train lacks: {', '.join(extra[:5])}")
        size = image_size or 224
        tr_s, va_s = _list_image_folder(tr_dir, names), _list_image_folder(va_dir, names)
        if not tr_s or not va_s:
            raise UserError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {tr_dir if not tr_s else va_dir}")
        mean, std = tuple(transform.get("mean", IMAGENET_MEAN)), tuple(transform.get("std", IMAGENET_STD))
        augment = transform.get("augment", "random-resized-crop")
        train = ImageFolderDataset(tr_s, size, True, seed, augment, mean, std)
        val = ImageFolderDataset(va_s, size, False, seed, augment, mean, std)

    if train_size is not None and train_size < len(train):
        train = SubsetDataset(train, stratified_subset(train.targets(), train_size, seed))
    if val_size is not None and val_size < len(val):
        val = SubsetDataset(val, stratified_subset(val.targets(), val_size, seed))
    return DataBundle(name, spec, train, val, len(names), names, size, mean, std, augment)


class EpochDataset(Dataset):
    """Index ``epoch * len(base) + i`` -> ``base[i]`` with the augmentation RNG of that epoch.

    The loop's sampler encodes the epoch into the indices, so loader workers (also persistent
    ones) draw exactly the same augmentations as the main process would."""

    def __init__(self, base):
        self.base = base
        self.n = len(base)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int):
        epoch, i = divmod(int(k), self.n)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)
        return self.base[i]


class EpochSampler(torch.utils.data.Sampler):
    """Wraps a sampler; yields ``epoch * n + index`` for the :class:`EpochDataset`. ``skip``: leave
    out the first ``skip`` indices of the next iteration only (a run resumed inside an epoch)."""

    def __init__(self, sampler, n: int):
        self.sampler = sampler
        self.n = n
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        base, skip = self.epoch * self.n, self.skip
        self.skip = 0
        return (base + int(i) for i in itertools.islice(self.sampler, skip, None))

    def __len__(self) -> int:
        return len(self.sampler)


class EveryImageBatchSampler(torch.utils.data.Sampler):
    """Batches of ``batch_size`` indices from ``sampler``, every index exactly once, the last batch
    holding the remainder (as the released loaders, which do not drop it); a remainder of a single
    image joins the batch before it instead (BatchNorm cannot train on one pooled 1x1 feature)."""

    def __init__(self, sampler, batch_size: int):
        self.sampler = sampler
        self.batch_size = int(batch_size)

    def __iter__(self):
        batch: list[int] = []
        pending: list[int] | None = None
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                if pending is not None:
                    yield pending
                pending, batch = batch, []
        if pending is not None:
            if len(batch) == 1:
                pending, batch = pending + batch, []
            yield pending
        if batch:
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        full, rest = divmod(n, self.batch_size)
        return full + (rest > 1 or (rest == 1 and full == 0))


def make_train_loader(dataset, batch_size: int, *, world: int = 1, rank: int = 0, seed: int = 0, workers: int = 0,
                      pin_memory: bool = False) -> tuple[EpochSampler, torch.utils.data.DataLoader]:
    """The training loader: a shuffled DistributedSampler (one process: a permutation of the whole set
    each epoch; several: its padded share, see docs/TRAINER.md), the epoch encoded in the indices
    (EpochSampler / EpochDataset), and EveryImageBatchSampler. Returns (sampler, loader); call
    ``sampler.set_epoch(epoch)`` before each epoch."""
    from torch.utils.data import DataLoader, DistributedSampler

    n = len(dataset)
    sampler = EpochSampler(DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                              drop_last=False), n)
    loader = DataLoader(EpochDataset(dataset), batch_sampler=EveryImageBatchSampler(sampler, batch_size),
                        num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0)
    return sampler, loader
