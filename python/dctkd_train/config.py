"""A training run's configuration: its options and their defaults, resolved from the flags, the
recipe (recipes.py) and the method (methods/); the output folder and the configuration of a resumed run;
the learning-rate schedule."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .checkpoint import FORMAT
from .errors import UserError
from .methods import MethodConfig, method_class, parse_loss_options
from .preemption import decide_resume
from .recipes import apply_defaults, apply_recipe

# Every option of a training run. None = "decide from the recipe / the machine" (see resolve_config).
DEFAULTS: dict[str, Any] = {
    "data": None, "model": None, "method": "ce", "teacher": None, "teacher_model": None,
    "epochs": None, "batch_size": None, "device": "auto", "out": None, "resume": False, "overwrite": False,
    "lr": None, "momentum": 0.9, "weight_decay": None, "schedule": "step", "milestones": None,
    "lr_decay": 0.1, "warmup_epochs": 0, "nesterov": False,
    "amp": "auto", "compile": False, "channels_last": None, "workers": None, "seed": 0,
    "train_size": None, "val_size": None, "image_size": None, "sync_bn": False,
    "ce_weight": None, "kd_weight": None, "feat_weight": None, "kd_temperature": 4.0, "guide": None,
    "level_weights": None, "loss_opt": None, "fam_mid_channels": None, "fam_cuton": 0.1, "feat_warmup": None,
    "fam_student_preact": None, "fam_pooled_target": None, "recipe": None, "loss_preset": None,
    "student_layers": None, "teacher_layers": None, "stages": None, "deterministic": False,
    "progress": True, "eval_teacher": True, "quiet": False, "save_every": None,
}

# Options that may change when a run is resumed (the rest must match the saved run).
RESUME_MUTABLE = {"epochs", "workers", "device", "progress", "compile", "out", "resume", "overwrite", "quiet",
                  "eval_teacher", "save_every"}

def resolve_config(raw: dict, world_size: int = 1) -> dict:
    """Fill the defaults of a run from the recipe; raise :class:`UserError` for bad values."""
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise UserError(f"unknown option(s): {', '.join(sorted(unknown))}")
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in raw.items() if v is not None})
    if not cfg["data"]:
        raise UserError("--data is required")
    if not cfg["model"]:
        raise UserError("--model is required")
    method = method_class(cfg["method"])
    if cfg["amp"] not in ("auto", "bf16", "fp16", "none"):
        raise UserError(f"--amp must be auto, bf16, fp16 or none, not {cfg['amp']!r}")
    if cfg["device"] not in ("auto", "cpu", "cuda") and not str(cfg["device"]).startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu or cuda, not {cfg['device']!r}")
    if cfg["schedule"] not in ("step", "cosine"):
        raise UserError(f"--schedule must be step or cosine, not {cfg['schedule']!r}")
    apply_recipe(cfg, raw, world_size)  # --recipe NAME: the papers' settings, under the flags given
    apply_defaults(cfg, world_size)  # what is still unset: the recipe's, or the trainer's own for the data
    method.fill_config(cfg, raw)  # e.g. fam: the released per-pair weight, taps, loss levels and warm-up
    mc = make_method_config(cfg)
    cfg["ce_weight"], cfg["kd_weight"], cfg["feat_weight"] = mc.ce_weight, mc.kd_weight, mc.feat_weight
    cfg["guide"], cfg["loss_preset"] = mc.guide, mc.preset
    method.record_config(mc, cfg)
    if mc.needs_teacher and not cfg["teacher"]:
        raise UserError(f"method {cfg['method']!r} needs a teacher: --teacher CKPT (train one with --method ce)")
    if cfg["out"] is None:
        raise UserError("--out DIR is required")
    return cfg


def make_method_config(cfg: dict) -> MethodConfig:
    lw = cfg.get("level_weights")
    if isinstance(lw, str):
        try:
            lw = [float(v) for v in lw.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--level-weights expects comma-separated numbers, got {cfg['level_weights']!r}") from None
    opts = cfg.get("loss_opt")
    return MethodConfig.make(
        cfg["method"], cfg.get("ce_weight"), cfg.get("kd_weight"), cfg.get("feat_weight"),
        temperature=float(cfg.get("kd_temperature") or 4.0),
        guide=None if cfg.get("guide") is None else bool(cfg["guide"]), level_weights=lw,
        loss_options=opts if isinstance(opts, dict) else parse_loss_options(opts),
        loss_preset=cfg.get("loss_preset"),
        fam_mid_channels=int(cfg.get("fam_mid_channels") or 64), fam_cuton=float(cfg.get("fam_cuton", 0.1)),
        feat_warmup=int(cfg.get("feat_warmup") or 0),
        fam_student_preact=bool(cfg.get("fam_student_preact")),
        fam_pooled_target=cfg.get("fam_pooled_target") is not False,
    )


def lr_at(cfg: dict, epoch: int) -> float:
    """Learning rate of (1-based) epoch ``epoch``: a pure function of the config (resume-safe)."""
    base = float(cfg["lr"])
    warm = int(cfg.get("warmup_epochs") or 0)
    if warm and epoch <= warm:
        return base * epoch / warm
    if cfg["schedule"] == "cosine":
        e, E = epoch - 1 - warm, max(1, cfg["epochs"] - warm)
        return 0.5 * base * (1 + math.cos(math.pi * e / E))
    k = sum(1 for m in cfg["milestones"] if epoch > m)
    return base * cfg["lr_decay"] ** k


def data_identity(spec: str) -> str:
    """A data spec without its subset sizes (a teacher trained on more images of the same data fits)."""
    name, _, arg = str(spec).partition(":")
    if name.strip().lower() in ("synthetic-scenes", "synthetic", "scenes"):
        keep = sorted(kv.strip() for kv in arg.split(",") if kv.strip() and kv.split("=")[0].strip() not in ("train", "val"))
        return "synthetic-scenes:" + ",".join(keep)
    return f"{name.strip().lower()}:{arg}"


def split_layers(v) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return list(v)


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / "last.pt").is_file():
            raise UserError(f"--resume: there is no {out / 'last.pt'} to resume from")
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder")
    if (out / "last.pt").exists() and not overwrite:
        raise UserError(f"{str(out)!r} already holds a run (last.pt); pass --resume to continue it, "
                        "--overwrite to start over, or choose another --out")


def merge_resume_config(saved: dict, given: dict) -> dict:
    """The saved run's config, with the options that may change on resume taken from ``given``."""
    diffs = []
    for k, v in given.items():
        if v is None or k in RESUME_MUTABLE or k not in saved:
            continue
        sv = saved[k]
        if k in ("student_layers", "teacher_layers"):
            v, sv = split_layers(v), split_layers(sv)
        if isinstance(sv, float) or isinstance(v, float):
            try:
                if math.isclose(float(v), float(sv), rel_tol=1e-9):
                    continue
            except (TypeError, ValueError):
                pass
        if isinstance(v, (list, tuple)) and isinstance(sv, (list, tuple)) and list(v) == list(sv):
            continue
        if v != sv and not (k == "teacher" and Path(str(v)).expanduser().resolve() == Path(str(sv)).expanduser().resolve()):
            diffs.append(f"{k} ({sv!r} in the saved run, {v!r} now)")
    if diffs:
        raise UserError("--resume continues the saved run, whose options differ from the ones given: "
                        + "; ".join(diffs) + ". Drop them, or start a new run in another --out")
    cfg = dict(saved)
    for k in RESUME_MUTABLE:
        if given.get(k) is not None:
            cfg[k] = given[k]
    return cfg


def run_config(raw: dict, world_size: int = 1):
    """(out, cfg, checkpoint or None): the output folder checked, the configuration resolved, or on
    --resume merged with the saved run's."""
    out = Path(raw.get("out") or ".").expanduser()
    if raw.get("out") is None:
        raise UserError("--out DIR is required")
    resume, ckpt = decide_resume(out, raw.get("resume"), bool(raw.get("overwrite")))
    check_out_dir(out, resume, bool(raw.get("overwrite")))
    if resume:
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise UserError(f"{out / 'last.pt'} is not a dctkd_train checkpoint")
        cfg = merge_resume_config(ckpt["config"], raw)
        cfg["resume"] = True
    else:
        cfg = resolve_config(raw, world_size)
    return out, cfg, ckpt


def save_every_steps(cfg: dict) -> int:
    n = cfg.get("save_every")
    if n is None:
        return 0
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise UserError(f"--save-every expects a number of steps, got {n!r}") from None
    if n < 0:
        raise UserError(f"--save-every expects a number of steps >= 1 (0: only at epoch ends), got {n}")
    return n
