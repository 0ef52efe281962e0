"""The papers' training recipes in one flag (``--recipe NAME``), and FAM-KD's per-pair settings.

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
"""
from __future__ import annotations

from typing import Any

from .errors import UserError

RECIPES: dict[str, dict[str, Any]] = {
    "dctkd-scenes": {
        "settings": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128, "epochs": 70,
                     "schedule": "step", "milestones": [25, 50], "lr_decay": 0.1, "warmup_epochs": 0,
                     "nesterov": False, "amp": "none", "image_size": 224, "kd_temperature": 4.0},
        "guide": True,
        "source": "alexlopezcifuentes/Distillation-Attention (dev): Config/Training/config_SGD.yaml, "
                  "Config/Distillation/config_DFT.yaml, Scripts/Run_Train.sh",
    },
    "dctkd-cifar": {
        "settings": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128, "epochs": 240,
                     "schedule": "step", "milestones": [150, 180, 210], "lr_decay": 0.1, "warmup_epochs": 0,
                     "nesterov": False, "amp": "none", "kd_temperature": 4.0},
        "guide": False,
        "source": "alexlopezcifuentes/Distillation-Attention (dev): Config/Training/config_SGD_CIFAR.yaml, "
                  "Scripts/Run_TrainNew.sh (CIFAR100 line, PRED_GUIDE=False)",
    },
    "famkd-cifar": {
        "settings": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64, "epochs": 240,
                     "schedule": "step", "milestones": [150, 180, 210], "lr_decay": 0.1, "warmup_epochs": 0,
                     "nesterov": False, "amp": "none", "feat_warmup": 20},
        "source": "cuong-pv/FAM-KD: configs/cifar100/FAM_KD/*.yaml, engine/cfg.py",
    },
    "famkd-imagenet": {
        "settings": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128, "epochs": 100,
                     "schedule": "step", "milestones": [30, 60, 90], "lr_decay": 0.1, "warmup_epochs": 0,
                     "nesterov": False, "amp": "none", "image_size": 224, "feat_warmup": 1},
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


def recipe_names() -> tuple[str, ...]:
    return tuple(RECIPES)


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
    recipe = None
    if name in ("cifar", "imagenet"):  # the trainer's own defaults, as a resolved config names them
        return
    if name is not None:
        if name not in RECIPES:
            raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
        recipe = RECIPES[name]
        settings = recipe["settings"]
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
        if "guide" in recipe and "guide" not in given:
            from .methods import GUIDE_METHODS

            if cfg.get("method") in GUIDE_METHODS:
                cfg["guide"] = recipe["guide"]


def apply_fam_pair(cfg: dict, raw: dict) -> None:
    """For ``fam``: the pair's released weight, student taps and loss levels, and (without a recipe
    that sets it) its warm-up scaled to ``cfg["epochs"]``, for every option ``raw`` leaves unset."""
    if cfg.get("method") != "fam":
        return
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
