"""The training recipes: the papers' (``--recipe NAME``), the trainer's own defaults (``cifar``,
``imagenet``, for a run without ``--recipe``), and FAM-KD's per-pair settings. ``RECIPES`` is the one
table; a resolved configuration's ``recipe`` names the entry it was filled from.

A recipe fills every option the user did not give: optimiser (always SGD), learning rate, batch,
epochs, schedule, weight decay, warm-ups, precision (fp32) and image size; explicit flags win. When
``--epochs`` differs from the recipe's, its milestones and the feature-weight warm-up scale with it
(so a short run keeps the schedule's shape); ``config.json`` records the resolved values and the
recipe's name. The batch is global: under torchrun each process gets ``batch // world_size``.

Sources (read from the released code):

* ``dctkd-scenes``: DCT-KD (Lopez-Cifuentes et al.), alexlopezcifuentes/Distillation-Attention,
  ``Config/Training/config_SGD.yaml`` (SGD lr 0.1, momentum 0.9, wd 1e-4, batch 128, 70 epochs,
  StepLR every 25 epochs x0.1), ``Config/Architecture/config_ResNet18.yaml`` (224 crops),
  ``Config/Distillation/config_DFT.yaml`` (alpha 1, ``PRED_GUIDE: True``), ``Scripts/Run_Train.sh``
  (DCT: beta 1, delta 0; DCT+KD: beta 0.1, delta 1).
* ``dctkd-cifar``: the same repository, ``Config/Training/config_SGD_CIFAR.yaml`` (lr 0.05, wd 5e-4,
  batch 128, 240 epochs, x0.1 at 150/180/210); its CIFAR script line passes ``PRED_GUIDE=False``.
* ``famkd-cifar``: FAM-KD (Pham et al.), cuong-pv/FAM-KD, ``configs/cifar100/FAM_KD/*.yaml`` and
  ``engine/cfg.py`` (SGD lr 0.05, momentum 0.9, wd 5e-4, batch 64, 240 epochs, x0.1 at
  150/180/210, feature warm-up 20 epochs, CE weight 1, no KD).
* ``famkd-imagenet``: the same repository, ``configs/imagenet/r34_r18/fam_kd.yaml`` (lr 0.1, batch
  128, 100 epochs, x0.1 at 30/60/90, wd 1e-4, warm-up 1 epoch).

The trainer's own defaults fill only what is still unset after the flags (and a paper recipe, if
named): batch, epochs, weight decay, learning rate (``lr``, or ``lr_per_256`` per 256 images of the
global batch) and the milestones (``milestone_fractions`` of the epochs).
"""
from __future__ import annotations

from typing import Any

from .data import (
    DCTKD_SCENES_MEAN,
    DCTKD_SCENES_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RELEASED_CIFAR100_MEAN,
    RELEASED_CIFAR100_STD,
)
from .errors import UserError

# The released loaders' transforms, per kind of data (--data NAME:...). Kinds a recipe does not list
# get the trainer's own (data.py). CIFAR: both releases pad 4, crop 32, flip, with the same statistics.
_RELEASED_CIFAR100 = {"mean": RELEASED_CIFAR100_MEAN, "std": RELEASED_CIFAR100_STD}

RECIPES: dict[str, dict[str, Any]] = {
    # The trainer's defaults. RepDistiller / mdistiller CIFAR-100: SGD 0.05, momentum 0.9, wd 5e-4, batch
    # 64, 240 epochs, x0.1 at 150/180/210 (milestones scale with --epochs).
    "cifar": {
        "paper": False,
        "settings": {"lr": 0.05, "weight_decay": 5e-4, "batch_size": 64, "epochs": 240},
        "milestone_fractions": (150 / 240, 180 / 240, 210 / 240),
    },
    # ImageNet-style (torchvision models, image folders): SGD 0.1 per 256 images, wd 1e-4, 100 epochs,
    # x0.1 at 30/60/90.
    "imagenet": {
        "paper": False,
        "settings": {"weight_decay": 1e-4, "batch_size": 64, "epochs": 100},
        "lr_per_256": 0.1, "milestone_fractions": (0.3, 0.6, 0.9),
    },
    # The papers' released settings (--recipe NAME).
    "dctkd-scenes": {
        "paper": True,
        "settings": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128, "epochs": 70,
                     "schedule": "step", "milestones": [25, 50], "lr_decay": 0.1, "warmup_epochs": 0,
                     "nesterov": False, "amp": "none", "image_size": 224, "kd_temperature": 4.0},
        "guide": True,
        # Libs/Datasets/SceneRecognitionDataset.py: Resize(256), RandomCrop(224), flip; eval Resize(256),
        # CenterCrop(224); Config/Dataset/config_ADE20K.yaml's MEAN / STD
        "data": {"imagefolder": {"augment": "resize-crop", "mean": DCTKD_SCENES_MEAN, "std": DCTKD_SCENES_STD}},
        "source": "alexlopezcifuentes/Distillation-Attention (dev): Config/Training/config_SGD.yaml, "
                  "Config/Distillation/config_DFT.yaml, Scripts/Run_Train.sh",
    },
    "dctkd-cifar": {
        "paper": True,
        "settings": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128, "epochs": 240,
                     "schedule": "step", "milestones": [150, 180, 210], "lr_decay": 0.1, "warmup_epochs": 0,
                     "nesterov": False, "amp": "none", "kd_temperature": 4.0},
        "guide": False,
        "data": {"cifar100": _RELEASED_CIFAR100},  # trainCNNs.py, Config/Dataset/config_CIFAR100.yaml
        "source": "alexlopezcifuentes/Distillation-Attention (dev): Config/Training/config_SGD_CIFAR.yaml, "
                  "Scripts/Run_TrainNew.sh (CIFAR100 line, PRED_GUIDE=False)",
    },
    "famkd-cifar": {
        "paper": True,
        "settings": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64, "epochs": 240,
                     "schedule": "step", "milestones": [150, 180, 210], "lr_decay": 0.1, "warmup_epochs": 0,
                     "nesterov": False, "amp": "none", "feat_warmup": 20},
        "data": {"cifar100": _RELEASED_CIFAR100},  # dataset/cifar100.py
        "source": "cuong-pv/FAM-KD: configs/cifar100/FAM_KD/*.yaml, engine/cfg.py",
    },
    "famkd-imagenet": {
        "paper": True,
        "settings": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128, "epochs": 100,
                     "schedule": "step", "milestones": [30, 60, 90], "lr_decay": 0.1, "warmup_epochs": 0,
                     "nesterov": False, "amp": "none", "image_size": 224, "feat_warmup": 1},
        # dataset/imagenet.py: RandomResizedCrop(224), flip; eval Resize(256), CenterCrop(224)
        "data": {"imagefolder": {"augment": "random-resized-crop", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}},
        "source": "cuong-pv/FAM-KD: configs/imagenet/r34_r18/fam_kd.yaml, engine/cfg.py",
    },
}

# FAM-KD's per-pair settings, (teacher, student) -> the released config's values: loss weight
# (FAMKD_WEIGHT), pre-activation student features (STU_PREACT), whether the pooled level is in the
# loss (GUIDE_LAYERS), the feature-weight warm-up (WARMUP_EPOCHS) and the epochs it belongs to.
# resnet32x4 -> resnet8x4: its config spells the weight REVIEWKD_WEIGHT: 20.0 (a key engine/cfg.py
# does not define under FAM_KD); 20 is taken as the intended value.
FAM_PAIRS: dict[tuple[str, str], dict[str, Any]] = {
    ("resnet32x4", "resnet8x4"): {"feat_weight": 20.0, "fam_student_preact": True, "fam_pooled_target": True,
                                  "warmup": (20, 240), "config": "configs/cifar100/FAM_KD/res324_res84.yaml"},
    ("resnet56", "resnet20"): {"feat_weight": 0.8, "fam_student_preact": False, "fam_pooled_target": True,
                               "warmup": (20, 240), "config": "configs/cifar100/FAM_KD/res56_res20.yaml"},
    ("resnet110", "resnet20"): {"feat_weight": 1.0, "fam_student_preact": False, "fam_pooled_target": True,
                                "warmup": (20, 240), "config": "configs/cifar100/FAM_KD/res110_res20.yaml"},
    ("resnet110", "resnet32"): {"feat_weight": 1.0, "fam_student_preact": False, "fam_pooled_target": True,
                                "warmup": (20, 240), "config": "configs/cifar100/FAM_KD/res110_res32.yaml"},
    ("wrn40_2", "wrn16_2"): {"feat_weight": 5.0, "fam_student_preact": False, "fam_pooled_target": True,
                             "warmup": (20, 240), "config": "configs/cifar100/FAM_KD/wrn402_wrn162.yaml"},
    ("wrn40_2", "wrn40_1"): {"feat_weight": 5.0, "fam_student_preact": False, "fam_pooled_target": True,
                             "warmup": (20, 240), "config": "configs/cifar100/FAM_KD/wrn402_wrn401.yaml"},
    ("resnet34", "resnet18"): {"feat_weight": 1.0, "fam_student_preact": False, "fam_pooled_target": False,
                               "warmup": (1, 100), "config": "configs/imagenet/r34_r18/fam_kd.yaml"},
}
# engine/cfg.py's defaults, for the pairs without a released config.
FAM_DEFAULT = {"feat_weight": 1.0, "fam_student_preact": False, "fam_pooled_target": True, "warmup": (20, 240)}


def data_kind(spec: str) -> str:
    """The kind of data of a --data spec: synthetic-scenes, cifar100, cifar10, imagefolder (or the name given)."""
    name = str(spec).split(":", 1)[0].strip().lower()
    return "synthetic-scenes" if name in ("synthetic-scenes", "synthetic", "scenes") else name


def recipe(name: str) -> dict[str, Any]:
    """The entry ``name`` of RECIPES; :class:`UserError` for an unknown name."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(paper_recipes())}")
    return RECIPES[name]


def paper_recipes() -> list[str]:
    """The names of the papers' recipes (what --recipe takes)."""
    return [n for n, r in RECIPES.items() if r["paper"]]


def default_recipe(data: str, model: str) -> str:
    """The trainer's own recipe for a run without --recipe: ``imagenet`` for image folders and
    ImageNet-family models, else ``cifar``."""
    from .models import model_family

    return "imagenet" if (data_kind(data) == "imagefolder" or model_family(model) == "imagenet") else "cifar"


def apply_defaults(cfg: dict, world_size: int = 1) -> None:
    """Fill batch, epochs, weight decay, learning rate and milestones still unset in ``cfg`` from the
    recipe ``cfg["recipe"]`` (the trainer's own for the data and model when there is none; the name
    is then recorded in ``cfg["recipe"]``)."""
    cfg["recipe"] = cfg.get("recipe") or default_recipe(cfg["data"], cfg["model"])
    r = recipe(cfg["recipe"])
    for k in ("batch_size", "epochs", "weight_decay"):
        if cfg[k] is None:
            cfg[k] = r["settings"][k]
    if int(cfg["epochs"]) < 1 or int(cfg["batch_size"]) < 1:
        raise UserError("--epochs and --batch-size must be >= 1")
    cfg["epochs"], cfg["batch_size"] = int(cfg["epochs"]), int(cfg["batch_size"])
    if cfg["lr"] is None:
        cfg["lr"] = r["settings"]["lr"] if "lr" in r["settings"] else r["lr_per_256"] * cfg["batch_size"] * world_size / 256
    if float(cfg["lr"]) <= 0:
        raise UserError("--lr must be > 0")
    if cfg["milestones"] is None:
        cfg["milestones"] = sorted({max(1, int(round(f * cfg["epochs"]))) for f in r["milestone_fractions"]})
    cfg["milestones"] = [int(m) for m in cfg["milestones"]]


def recipe_transform(recipe: str | None, spec: str) -> dict | None:
    """The recipe's released data transform for this kind of data (augment, mean, std), or None: the
    trainer's own (no recipe, or one whose release has no loader for this kind of data)."""
    return RECIPES.get(recipe or "", {}).get("data", {}).get(data_kind(spec))


def _scaled(value: int, epochs: int, recipe_epochs: int) -> int:
    return max(0, int(round(value * epochs / recipe_epochs)))


def _teacher_arch(cfg: dict) -> str | None:
    """The teacher's architecture: --teacher-model, else the name saved in the checkpoint."""
    if cfg.get("teacher_model"):
        return cfg["teacher_model"]
    if not cfg.get("teacher"):
        return None
    from .checkpoint import load_checkpoint

    try:
        ck = load_checkpoint(cfg["teacher"], "teacher checkpoint")
    except UserError:
        return None  # the run reports the bad checkpoint when it loads the teacher
    return ck.get("arch") if isinstance(ck, dict) else None


def fam_pair_settings(teacher: str | None, student: str) -> dict[str, Any]:
    """The released per-pair settings of FAM-KD (engine/cfg.py's defaults for other pairs)."""
    return dict(FAM_PAIRS.get((teacher, student), FAM_DEFAULT))


def apply_recipe(cfg: dict, raw: dict, world_size: int = 1) -> None:
    """Fill ``cfg`` in place from the recipe ``cfg["recipe"]`` (if any) for every option that ``raw``
    (what the user gave) leaves unset."""
    given = {k for k, v in raw.items() if v is not None}
    name = cfg.get("recipe")
    if name is not None and recipe(name)["paper"]:  # the trainer's own defaults come after (apply_defaults)
        entry = recipe(name)
        settings = entry["settings"]
        for k, v in settings.items():
            if k not in given:
                cfg[k] = list(v) if isinstance(v, list) else v
        if "epochs" in given and int(cfg["epochs"]) != settings["epochs"]:
            if "milestones" not in given:
                cfg["milestones"] = sorted({max(1, _scaled(m, int(cfg["epochs"]), settings["epochs"]))
                                            for m in settings["milestones"]})
            if "feat_warmup" not in given and "feat_warmup" in settings:
                cfg["feat_warmup"] = _scaled(settings["feat_warmup"], int(cfg["epochs"]), settings["epochs"])
        if "batch_size" not in given and world_size > 1:
            if settings["batch_size"] % world_size:
                raise UserError(f"recipe {name}: its batch of {settings['batch_size']} does not split over "
                                f"{world_size} processes; pass --batch-size (images per process)")
            cfg["batch_size"] = settings["batch_size"] // world_size
        if "guide" in entry and "guide" not in given and _uses_guide(cfg.get("method")):
            cfg["guide"] = entry["guide"]


def _uses_guide(method: str | None) -> bool:
    from .methods import REGISTRY

    return method in REGISTRY and REGISTRY[method].uses_guide


def apply_fam_pair(cfg: dict, raw: dict) -> None:
    """For ``fam`` (its Method.fill_config): the pair's released weight, student taps and loss levels, and (without a recipe
    that sets it) its warm-up scaled to ``cfg["epochs"]``, for every option ``raw`` leaves unset."""
    given = {k for k, v in raw.items() if v is not None}
    if "fam_mid_channels" in given:
        raise UserError("--fam-mid-channels sets the fusion width of fam-abf; fam uses the student's widths at "
                        "every level, as released")
    pair = fam_pair_settings(_teacher_arch(cfg), cfg["model"])
    for k in ("feat_weight", "fam_student_preact", "fam_pooled_target"):
        if k not in given:
            cfg[k] = pair[k]
    recipe = RECIPES.get(cfg.get("recipe") or "", {})
    if "feat_warmup" not in given and "feat_warmup" not in recipe.get("settings", {}):
        warm, of = pair["warmup"]
        cfg["feat_warmup"] = warm if int(cfg["epochs"]) == of else _scaled(warm, int(cfg["epochs"]), of)


def paper_recipes_for(method: str, spec: str) -> tuple[str, ...]:
    """The recipes of the papers whose method (or, for the baselines ce/kd/at, whose data) this is:
    FAM-KD's for fam*, DCT-KD's for dct*, both for the baselines; image folders get the ImageNet /
    scene recipes, everything else the CIFAR ones."""
    folder = data_kind(spec) == "imagefolder"
    fam, dct = ("famkd-imagenet" if folder else "famkd-cifar"), ("dctkd-scenes" if folder else "dctkd-cifar")
    from .methods import REGISTRY

    paper = REGISTRY[method].paper if method in REGISTRY else None
    if paper == "famkd":
        return (fam,)
    if paper == "dctkd":
        return (dct,)
    return (dct, fam) if folder else (fam, dct)


def _shown(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def paper_recipe_note(cfg: dict, world_size: int, amp: str, data_transform: dict | None = None) -> dict:
    """What config.json records under ``paper_recipe``, and for a run without --recipe the one line
    the trainer prints at start-up: that the run is not a paper recipe, which --recipe is, and the
    settings that differ from it. ``amp``: the precision the run uses (bf16, fp16 or none);
    ``data_transform``: the run's training augmentation and normalisation (augment, mean, std)."""
    name = cfg.get("recipe")
    if name in RECIPES and RECIPES[name]["paper"]:
        return {"is_paper_recipe": True, "recipe": name}
    candidates = paper_recipes_for(cfg["method"], cfg["data"])
    target = RECIPES[candidates[0]]
    ours = dict(cfg, batch_size=int(cfg["batch_size"]) * world_size, amp=amp)
    differs: dict[str, list] = {}
    for k, v in target["settings"].items():
        if ours.get(k) is not None and ours[k] != v:
            differs[k] = [ours[k], v]
    if "guide" in target and _uses_guide(cfg["method"]) and bool(cfg.get("guide")) != target["guide"]:
        differs["guide"] = [bool(cfg.get("guide")), target["guide"]]
    released = target.get("data", {}).get(data_kind(cfg["data"]), {})
    for k, v in released.items():  # augment (a name), mean, std (triples)
        mine = (data_transform or {}).get(k)
        mine, v = (mine, v) if isinstance(v, str) else (None if mine is None else [float(m) for m in mine], list(v))
        if mine is not None and mine != v:
            differs[k] = [mine, v]
    label = {"batch_size": "batch", "weight_decay": "wd"}
    parts = [f"{label.get(k, k)} {_shown(a)} ({_shown(b)})" for k, (a, b) in differs.items()
             if k not in ("mean", "std")]
    if "mean" in differs or "std" in differs:
        parts.append("normalisation mean/std (config.json)")
    which = " or ".join(f"--recipe {c}" for c in candidates)
    line = (f"note: no --recipe, so this run uses the trainer's defaults, not a paper's recipe; the papers' "
            f"settings: {which}" + (f" (it differs from {candidates[0]} in: {', '.join(parts)})" if parts else ""))
    return {"is_paper_recipe": False, "recipe": None, "paper_recipes": list(candidates),
            "differs_from": candidates[0], "differs": differs, "line": line}

