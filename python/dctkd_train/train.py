"""The training loop: an ordinary PyTorch SGD loop with the losses from ``dctkd_ext``.

``train(config)`` runs one training (the ``train`` command and the demo call it); ``evaluate_checkpoint``
is the ``evaluate`` command. Multi-GPU / multi-node runs go through ``torchrun`` (DDP with a
DistributedSampler; gloo on CPU, nccl on GPU): every process runs the same ``train(config)``.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from . import __version__
from .checkpoint import (
    FORMAT,
    atomic_write,
    describe_mismatch,
    extract_state_dict,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_json,
)
from .data import DataBundle, build_data, make_train_loader
from .errors import TrainingStopped, UserError
from .external_models import adapt_state_dict, make_deterministic, stage_layers
from .fam_head import count_real_parameters
from .features import FeatureHooks, probe_feature_shapes
from .methods import Method, MethodConfig, method_class, parse_loss_options
from .models import build_model, count_parameters
from .plots import plot_curves
from .preemption import (
    StopSignals,
    all_ok,
    check_position,
    cpu_group,
    decide_resume,
    elastic_run_id,
    gather,
    position_record,
)
from .progress import Progress
from .recipes import apply_defaults, apply_recipe, data_kind, paper_recipe_note, recipe_transform

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

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


def _split_layers(v) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return list(v)


# ---------------------------------------------------------------------------------------------
# Distributed / device
# ---------------------------------------------------------------------------------------------


class Env:
    def __init__(self, device: torch.device, rank: int, world: int, local_rank: int, owns_pg: bool):
        self.device, self.rank, self.world, self.local_rank, self.owns_pg = device, rank, world, local_rank, owns_pg

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_env(device_arg: str) -> Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but CUDA is not available here (use --device cpu or auto)")
        idx = int(device_arg.split(":", 1)[1]) if ":" in device_arg else (local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(idx)
        device = torch.device("cuda", idx)
    else:
        device = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        owns = True
    return Env(device, rank, world, local_rank, owns)


def release_process_group(env: Env, completed: bool) -> None:
    """Tear down the process group :func:`setup_env` started. Reference cycles (DDP's reducer, the
    loaders) are collected first, so that no gloo work object outlives the group into interpreter
    shutdown, where freeing one aborts the process ("terminate called without an active exception").
    After a completed run the processes also wait for each other, so that none closes its connections
    while a peer still reads them; after a failure they do not, since a peer may be gone."""
    if not (env.owns_pg and dist.is_initialized()):
        return
    gc.collect()
    if completed:
        dist.barrier()
    dist.destroy_process_group()


class TrainingDiverged(UserError):
    """The loss became NaN/inf."""


def _all_reduce(t: torch.Tensor, env: Env) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t)
    return t


def _log(env: Env, msg: str, quiet: bool = False) -> None:
    if env.main and not quiet:
        print(msg, flush=True)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class LossTimer:
    """Wall time of the distillation-loss calls. On CUDA it records events (no host sync per step)
    and sums them at ``collect()``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []
        self.total = 0.0
        self.calls = 0

    @contextlib.contextmanager
    def __call__(self):
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            yield
            e.record()
            self.pending.append((s, e))
        else:
            t = time.perf_counter()
            yield
            self.total += time.perf_counter() - t
        self.calls += 1

    def peek(self) -> tuple[float, int]:
        """(seconds, calls) so far in the epoch, without resetting them."""
        if self.pending:
            torch.cuda.synchronize()
        return self.total + sum(s.elapsed_time(e) for s, e in self.pending) / 1000.0, self.calls

    def collect(self) -> tuple[float, int]:
        if self.pending:
            torch.cuda.synchronize()
            self.total += sum(s.elapsed_time(e) for s, e in self.pending) / 1000.0
            self.pending = []
        out = (self.total, self.calls)
        self.total, self.calls = 0.0, 0
        return out


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class StudentModule(nn.Module):
    """Student + feature hooks + optional distiller head, as one module (what DDP wraps), so that
    every trainable parameter is used inside the wrapped forward."""

    def __init__(self, student: nn.Module, layers: list[str] | None, head: nn.Module | None, timer: LossTimer | None):
        super().__init__()
        self.student = student
        self.head = head
        self.hooks = FeatureHooks(student, layers) if layers else None
        self.timer = timer
        self.run_student = student  # replaced by a compiled version with --compile

    def forward(self, x):
        logits = self.run_student(x)
        feats = self.hooks.pop() if self.hooks is not None else []
        head_out = None
        if self.head is not None:
            with (self.timer() if self.timer is not None else contextlib.nullcontext()):
                head_out = self.head(feats)
        return logits, feats, head_out


def load_teacher(path: str, arch: str | None, num_classes: int, data_spec: str | None = None, stages=None,
                 image_size: int = 224) -> tuple[nn.Module, dict]:
    """Build the teacher from a checkpoint of this trainer, or from a foreign state dict with
    ``arch`` (``--teacher-model``). :class:`UserError` when it does not fit."""
    ckpt = load_checkpoint(path, "teacher checkpoint")
    ck_arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
    if arch and ck_arch and arch != ck_arch:
        raise UserError(f"teacher checkpoint {path!r} is a {ck_arch}, not the --teacher-model {arch}")
    arch = arch or ck_arch
    if not arch:
        raise UserError(f"teacher checkpoint {path!r} does not name its architecture; pass --teacher-model NAME")
    ck_nc = ckpt.get("num_classes") if isinstance(ckpt, dict) else None
    if ck_nc is not None and int(ck_nc) != num_classes:
        raise UserError(f"teacher checkpoint {path!r} has {ck_nc} classes but the data has {num_classes}")
    model = build_model(arch, num_classes, stages, image_size)
    sd = adapt_state_dict(model, extract_state_dict(ckpt))
    bad = describe_mismatch(model, sd)
    if bad:
        raise UserError(f"teacher checkpoint {path!r} does not fit a {arch} with {num_classes} classes: {bad}")
    model.load_state_dict(sd)
    info = {"arch": arch, "path": str(path)}
    if isinstance(ckpt, dict) and isinstance(ckpt.get("data"), dict):
        info["data_spec"] = ckpt["data"].get("spec")
    return model, info


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: Env, num_classes: int, amp_dtype=None, channels_last=False) -> dict:
    """Top-1, top-5 (top-min(5, classes)), mean class accuracy and CE over the loader; the counts
    are summed over all processes (each evaluates its own shard, no duplicates)."""
    was = model.training
    model.eval()
    k = min(5, num_classes)
    per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=env.device)  # correct, count
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # top-k correct, loss sum, n
    for x, y in loader:
        x = x.to(env.device, non_blocking=True)
        y = y.to(env.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(env.device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        topk = logits.topk(k, dim=1).indices
        correct1 = (topk[:, 0] == y).double()
        per_class[0].index_add_(0, y, correct1)
        per_class[1].index_add_(0, y, torch.ones_like(correct1))
        sums[0] += (topk == y[:, None]).any(1).double().sum()
        sums[1] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[2] += y.numel()
    _all_reduce(per_class, env)
    _all_reduce(sums, env)
    model.train(was)
    n = max(sums[2].item(), 1.0)
    present = per_class[1] > 0
    mca = (per_class[0][present] / per_class[1][present]).mean().item() if present.any() else 0.0
    return {
        "top1": 100.0 * per_class[0].sum().item() / n,
        "top5": 100.0 * sums[0].item() / n,
        "mca": 100.0 * mca,
        "loss": sums[1].item() / n,
        "n": int(sums[2].item()),
    }


def _val_loader(ds, env: Env, batch_size: int, workers: int, pin: bool):
    shard = Subset(ds, list(range(env.rank, len(ds), env.world))) if env.distributed else ds
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0)


def _default_workers(data: DataBundle, device: torch.device, env: Env) -> int:
    cpus = os.cpu_count() or 1
    per_proc = max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", env.world))))
    if data.name == "imagefolder":
        return min(8, per_proc)
    return 0 if device.type == "cpu" else min(4, per_proc)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / "last.pt").is_file():
            raise UserError(f"--resume: there is no {out / 'last.pt'} to resume from")
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder")
    if (out / "last.pt").exists() and not overwrite:
        raise UserError(f"{str(out)!r} already holds a run (last.pt); pass --resume to continue it, "
                        "--overwrite to start over, or choose another --out")


def _merge_resume_config(saved: dict, given: dict) -> dict:
    """The saved run's config, with the options that may change on resume taken from ``given``."""
    diffs = []
    for k, v in given.items():
        if v is None or k in RESUME_MUTABLE or k not in saved:
            continue
        sv = saved[k]
        if k in ("student_layers", "teacher_layers"):
            v, sv = _split_layers(v), _split_layers(sv)
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


def train(raw: dict) -> dict:
    """Run one training; returns the summary dict (also written to OUT/summary.json)."""
    env = setup_env(raw.get("device") or "auto")
    completed = False
    try:
        with StopSignals() as stop:
            stop.group = cpu_group(env)
            summary = _train(raw, env, stop)
            completed = True
            return summary
    finally:
        release_process_group(env, completed)


def _train(raw: dict, env: Env, stop: StopSignals) -> dict:
    t_start = time.perf_counter()
    out, cfg, ckpt = _run_config(raw, env)
    run = _setup(cfg, env, out, ckpt)
    run.stop = stop
    run.save_every = _save_every(cfg)
    _write_run_info(run)
    run.teacher_eval = _evaluate_teacher(run)
    last_plot = time.perf_counter()
    for epoch in range(run.start_epoch, run.epochs + 1):
        row = _train_epoch(run, epoch)
        ev, is_best = _evaluate_epoch(run, epoch, row)
        last_plot = _save_epoch(run, epoch, row, ev, is_best, last_plot)
        if stop.requested(env):
            raise _stopped(run, epoch, None)
    return _finish(run, t_start)


class _Run:
    """What the steps of one training share: the configuration, data, models, optimiser, loaders and
    the history so far (set by _setup, advanced by the epoch steps)."""


def _run_config(raw: dict, env: Env):
    """(out, cfg, checkpoint or None): the output folder checked, the configuration resolved, or on
    --resume merged with the saved run's."""
    out = Path(raw.get("out") or ".").expanduser()
    if raw.get("out") is None:
        raise UserError("--out DIR is required")
    resume, ckpt = decide_resume(out, raw.get("resume"), bool(raw.get("overwrite")))
    _check_out_dir(out, resume, bool(raw.get("overwrite")))
    if resume:
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise UserError(f"{out / 'last.pt'} is not a dctkd_train checkpoint")
        cfg = _merge_resume_config(ckpt["config"], raw)
        cfg["resume"] = True
    else:
        cfg = resolve_config(raw, env.world)
    return out, cfg, ckpt


def _setup(cfg: dict, env: Env, out: Path, ckpt) -> _Run:
    """Seeds, data, method, models (and the feature head), optimiser, loaders, and the state of a resumed
    run, in this order (the order of the random draws, which a resumed run replays)."""
    run = _Run()
    run.cfg, run.env, run.out, run.ckpt = cfg, env, out, ckpt
    quiet = bool(cfg.get("quiet"))
    run.quiet = quiet
    log = run.log = lambda msg: _log(env, msg, quiet)
    device = run.device = env.device

    seed = int(cfg["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if cfg.get("deterministic"):
        make_deterministic()

    # ---- data
    data = run.data = build_data(cfg["data"], image_size=cfg.get("image_size"), train_size=cfg.get("train_size"),
                                 val_size=cfg.get("val_size"), seed=seed,
                                 transform=recipe_transform(cfg.get("recipe"), cfg["data"]))
    log(f"data: {data.describe()}")

    # ---- method, models
    mcfg = run.mcfg = make_method_config(cfg)
    method = run.method = Method(mcfg)
    stages = cfg.get("stages")
    student = build_model(cfg["model"], data.num_classes, stages, data.image_size)
    teacher = None
    t_info = None
    if mcfg.needs_teacher:
        teacher, t_info = load_teacher(cfg["teacher"], cfg.get("teacher_model"), data.num_classes, stages=stages,
                                       image_size=data.image_size)
        if t_info.get("data_spec") and data_identity(t_info["data_spec"]) != data_identity(data.spec):
            log(f"warning: the teacher was trained on --data {t_info['data_spec']!r}, this run uses {data.spec!r}")
    elif cfg.get("teacher"):
        log(f"note: method {cfg['method']!r} does not use the teacher; ignoring --teacher")
    run.t_info = t_info

    s_layers = t_layers = None
    head = None
    if method.uses_features:
        s_layers = _split_layers(cfg.get("student_layers")) or (
            stage_layers(student, stages, data.image_size, "--stages (student)") if stages
            else method.default_layers(student, data.image_size, "student"))
        t_layers = _split_layers(cfg.get("teacher_layers")) or (
            stage_layers(teacher, stages, data.image_size, "--stages (teacher)") if stages
            else method.default_layers(teacher, data.image_size, "teacher"))
        s_shapes = probe_feature_shapes(student, s_layers, data.image_size, "cpu")
        t_shapes = probe_feature_shapes(teacher, t_layers, data.image_size, "cpu")
        head = method.build_head(s_shapes, t_shapes)
        log(f"features: student {list(zip(s_layers, s_shapes))}")
        log(f"          teacher {list(zip(t_layers, t_shapes))}")
    cfg["student_layers"], cfg["teacher_layers"] = s_layers, t_layers
    run.s_layers = s_layers

    if cfg.get("sync_bn") and env.distributed:
        if device.type != "cuda":
            raise UserError("--sync-bn: SyncBatchNorm runs on GPUs only; drop it for a run on the CPU")
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        if head is not None:
            head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    channels_last = run.channels_last = (cfg["channels_last"] if cfg.get("channels_last") is not None
                                         else device.type == "cuda")
    mem = torch.channels_last if channels_last else torch.contiguous_format
    student.to(device, memory_format=mem)
    if head is not None:
        head.to(device)
    if teacher is not None:
        teacher.to(device, memory_format=mem).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    timer = run.timer = LossTimer(device)
    smod = run.smod = StudentModule(student, s_layers, head, timer)
    run.t_hooks = FeatureHooks(teacher, t_layers) if (teacher is not None and t_layers) else None
    run.run_teacher = teacher
    if cfg.get("compile"):
        smod.run_student = torch.compile(student)
        if teacher is not None:
            run.run_teacher = torch.compile(teacher)
    run.model = smod
    if env.distributed:
        run.model = nn.parallel.DistributedDataParallel(
            smod, device_ids=[device.index] if device.type == "cuda" else None)
    run.student, run.teacher, run.head = student, teacher, head

    # The papers' recipes apply weight decay to every parameter (BN and biases included).
    params = [p for p in smod.parameters() if p.requires_grad]
    optimizer = run.optimizer = torch.optim.SGD(params, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                                                weight_decay=float(cfg["weight_decay"]),
                                                nesterov=bool(cfg.get("nesterov")))
    amp_dtype = run.amp_dtype = _amp_dtype(cfg["amp"], device)
    scaler_cls = torch.amp.GradScaler
    if amp_dtype == torch.float16 and any(p.is_complex() for p in params):
        from dctkd_ext.amp import GradScaler as scaler_cls  # unscales FrequencyAttention's complex weights
    scaler = run.scaler = scaler_cls(device.type, enabled=amp_dtype == torch.float16)

    # ---- loaders
    workers = run.workers = cfg["workers"] if cfg.get("workers") is not None else _default_workers(data, device, env)
    pin = device.type == "cuda"
    n_train = len(data.train)
    per_rank = math.ceil(n_train / env.world)
    batch_size = int(cfg["batch_size"])
    if per_rank < 2:
        raise UserError(f"the training set has {n_train} images: too few for {env.world} process(es)")
    if batch_size > per_rank:
        log(f"warning: --batch-size {batch_size} exceeds the {per_rank} training images per process; using {per_rank}")
        batch_size = per_rank
    run.batch_size = batch_size
    # every image every epoch, the last batch partial, as the released loaders (no drop_last)
    run.sampler, run.train_loader = make_train_loader(data.train, batch_size, world=env.world, rank=env.rank,
                                                      seed=seed, workers=workers, pin_memory=pin)
    run.val_loader = _val_loader(data.val, env, batch_size, workers, pin)

    # ---- state
    run.start_epoch, run.best_top1, run.metrics = 1, -1.0, []
    if ckpt is not None:
        student.load_state_dict(ckpt["model"])
        if head is not None and ckpt.get("head") is not None:
            head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        run.start_epoch = int(ckpt["epoch"]) + 1
        run.best_top1 = float(ckpt.get("best_top1", -1.0))
        run.metrics = list(ckpt.get("metrics", []))
        set_rng_state(ckpt.get("rng"))
        if ckpt.get("position"):
            pos = ckpt["position"]
            log(f"resuming {out / 'last.pt'} in epoch {pos['epoch']} after step {pos['step']} of {pos['steps']}")
        else:
            log(f"resuming {out / 'last.pt'} after epoch {ckpt['epoch']}")
    run.epochs = int(cfg["epochs"])
    return run


def _write_run_info(run: _Run) -> None:
    """OUT/config.json (configuration, data, environment, teacher) and metrics.jsonl as of the checkpoint;
    the run's one-line description in the log."""
    cfg, env, data, device, out = run.cfg, run.env, run.data, run.device, run.out
    run.data_info = {"spec": data.spec, "name": data.name, "num_classes": data.num_classes,
                     "class_names": data.class_names, "image_size": data.image_size, "mean": list(data.mean),
                     "std": list(data.std), "train_size": len(data.train), "val_size": len(data.val),
                     "transforms": data.transforms()}
    note = paper_recipe_note(cfg, env.world, str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "none",
                             {"augment": data.augment, "mean": data.mean, "std": data.std})
    if not note["is_paper_recipe"]:
        run.log(note["line"])
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        env_info = {"torch": torch.__version__, "python": platform.python_version(), "dctkd_train": __version__,
                    "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
                    "world_size": env.world, "amp": str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "none",
                    "channels_last": run.channels_last, "workers": run.workers, "argv": sys.argv}
        try:
            import dctkd_ext

            env_info["dctkd_ext"] = getattr(dctkd_ext, "__version__", "present")
        except Exception:
            env_info["dctkd_ext"] = None
        write_json({"config": cfg, "paper_recipe": note, "data": run.data_info, "environment": env_info,
                    "teacher": run.t_info,
                    "student_params": count_parameters(run.student),
                    "head_params": count_real_parameters(run.head) if run.head is not None else None},
                   out / "config.json")
        # metrics.jsonl always mirrors the checkpoint's history (drops epochs logged after last.pt).
        atomic_write(out / "metrics.jsonl", lambda f: f.write("".join(json.dumps(m) + "\n" for m in run.metrics)),
                     mode="w")

    mcfg = run.mcfg
    run.log(f"model: {cfg['model']} ({count_parameters(run.student) / 1e6:.2f} M params), method {cfg['method']} "
            f"(ce {mcfg.ce_weight:g}, kd {mcfg.kd_weight:g}, feat {mcfg.feat_weight:g}{', guide' if mcfg.guide else ''}), "
            f"recipe {cfg['recipe']}, "
            f"{env.world} process(es) on {device}, batch {run.batch_size}/process, amp {cfg['amp']}")


def _evaluate_teacher(run: _Run):
    """The teacher's validation metrics: measured at the start of a new run, carried over on --resume."""
    if run.teacher is not None and run.cfg.get("eval_teacher", True) and run.ckpt is None:
        ev = evaluate(run.teacher, run.val_loader, run.env, run.data.num_classes, run.amp_dtype, run.channels_last)
        run.log(f"teacher {run.t_info['arch']}: val top-1 {ev['top1']:.2f}  top-5 {ev['top5']:.2f}  "
                f"MCA {ev['mca']:.2f}")
        return ev
    if run.ckpt is not None:
        return run.ckpt.get("teacher_eval")
    return None


def _train_epoch(run: _Run, epoch: int) -> dict:
    """One epoch of training steps; returns the epoch's row of metrics (losses, accuracy, timings),
    reduced over processes. Raises TrainingDiverged on a non-finite loss."""
    cfg, env, device, method, timer = run.cfg, run.env, run.device, run.method, run.timer
    show_progress = bool(cfg.get("progress", True)) and env.main and not run.quiet
    lr = lr_at(cfg, epoch)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    run.sampler.set_epoch(epoch)
    run.smod.train()
    sums: dict[str, torch.Tensor] = {}
    n_seen = 0
    correct = torch.zeros((), dtype=torch.float64, device=device)
    steps = len(run.train_loader)
    mine = _resume_position(run, epoch, steps)  # this process's saved state when resuming inside this epoch
    step = 0
    if mine is not None:
        step, n_seen = int(run.ckpt["position"]["step"]), int(mine["n_seen"])
        sums = {k: v.to(device) for k, v in mine["sums"].items()}
        correct = mine["correct"].to(device)
        timer.total, timer.calls = float(mine["loss_time"]), int(mine["loss_calls"])
        run.sampler.skip = step * run.batch_size
    bar = Progress(steps - step, f"epoch {epoch}/{run.epochs}", enabled=show_progress)
    shown: dict[str, float] = {}
    t0 = time.perf_counter() - (float(mine["train_time"]) if mine is not None else 0.0)
    for x, y in _epoch_batches(run, mine):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t_logits = t_feats = None
        with _autocast(device, run.amp_dtype):
            if run.teacher is not None:
                with torch.no_grad():
                    t_logits = run.run_teacher(x)
                    t_feats = run.t_hooks.pop() if run.t_hooks is not None else None
            s_logits, s_feats, head_out = run.model(x)
        s_logits = s_logits.float()
        ce = F.cross_entropy(s_logits, y)
        with timer():
            terms = method.distill_terms(y, s_logits, s_feats, head_out,
                                         t_logits.float() if t_logits is not None else None, t_feats, epoch)
        loss = method.total(ce, terms, epoch)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()

        b = y.numel()
        with torch.no_grad():
            for k, v in (("loss", loss), ("ce", ce), *method.unweighted(terms, epoch).items()):
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=device)) + v.detach().double() * b
            correct += (s_logits.argmax(1) == y).sum()
        n_seen += b
        if show_progress:
            if bar.step % 10 == 0:  # reading the loss syncs the device: not every step
                shown = {"loss": float(loss.item())}
            bar.update(b * env.world, **shown)
        step += 1
        _after_step(run, epoch, step, steps, sums, n_seen, correct, t0)
    train_time = time.perf_counter() - t0
    bar.close()
    loss_time, loss_calls = timer.collect()

    # reduce the epoch's statistics over processes
    keys = sorted(sums)
    vec = torch.stack([sums[k] for k in keys] + [torch.tensor(float(n_seen), dtype=torch.float64, device=device),
                      correct, torch.tensor(loss_time, dtype=torch.float64, device=device)])
    _all_reduce(vec, env)
    if not math.isfinite(vec[keys.index("loss")].item()):
        raise TrainingDiverged(f"the training loss became non-finite in epoch {epoch} (last.pt keeps the last "
                               "checkpoint before it); lower --lr, or use --amp none / bf16")
    tt = torch.tensor([train_time], dtype=torch.float64, device=device)
    if env.distributed:
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
    n_all = vec[len(keys)].item()
    row: dict[str, Any] = {"epoch": epoch, "lr": lr}
    for i, k in enumerate(keys):
        row["train_loss" if k == "loss" else f"train_loss_{k}"] = vec[i].item() / max(n_all, 1)
    row["train_top1"] = 100.0 * vec[len(keys) + 1].item() / max(n_all, 1)
    row["images_per_sec"] = n_all / max(tt.item(), 1e-9)
    row["epoch_time_s"] = tt.item()
    row["loss_time_s"] = vec[-1].item() / env.world  # per process (each computes its own shard)
    row["steps"] = len(run.train_loader)
    row["loss_ms_per_step"] = 1000 * row["loss_time_s"] / max(1, len(run.train_loader))
    run.term_keys = [k for k in keys if k != "loss"]
    return row


def _evaluate_epoch(run: _Run, epoch: int, row: dict):
    """Validation after an epoch: (the evaluation, whether it is the best so far); the row and the
    history (run.metrics, run.best_top1) updated."""
    env = run.env
    if env.distributed:
        # BatchNorm statistics: each rank updated its own after the last step; evaluate (and save) rank 0's.
        for buf in run.student.buffers():
            dist.broadcast(buf, 0)
    ev = evaluate(run.smod.student, run.val_loader, env, run.data.num_classes, run.amp_dtype, run.channels_last)
    row.update({"val_top1": ev["top1"], "val_top5": ev["top5"], "val_mca": ev["mca"], "val_loss": ev["loss"],
                "val_images": ev["n"]})
    if run.head is not None:
        row["feat_weight_scale"] = run.method.feat_scale(epoch)
    run.metrics.append(row)
    is_best = ev["top1"] > run.best_top1
    run.best_top1 = max(run.best_top1, ev["top1"])
    row["best_val_top1"] = run.best_top1
    return ev, is_best


def _save_epoch(run: _Run, epoch: int, row: dict, ev: dict, is_best: bool, last_plot: float) -> float:
    """Checkpoints (last.pt, best.pt), the metrics line, the curves (at most once a minute and after the
    last epoch) and the epoch's log line; returns the time of the last plot."""
    cfg, env, out = run.cfg, run.env, run.out

    def write():
        nonlocal last_plot
        state = _checkpoint_state(run, epoch, ev)
        save_checkpoint(state, out / "last.pt")
        if is_best:
            save_checkpoint(state, out / "best.pt")
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        # a plot takes ~1 s: redraw at most once a minute, and after the last epoch
        if epoch == run.epochs or time.perf_counter() - last_plot >= 60:
            try:
                plot_curves(run.metrics, out / "curves.png", f"{cfg['model']} / {cfg['method']} / {run.data.spec}")
            except Exception as e:  # a plot must never stop a run
                run.log(f"warning: curves.png not written ({type(e).__name__}: {e})")
            last_plot = time.perf_counter()

    _on_main(run, write)
    terms_txt = " ".join(f"{k} {row[f'train_loss_{k}']:.4f}" for k in run.term_keys)
    run.log(f"epoch {epoch}/{run.epochs}: loss {row['train_loss']:.4f} ({terms_txt}) | val top-1 {ev['top1']:.2f} "
            f"top-5 {ev['top5']:.2f} MCA {ev['mca']:.2f} | {row['images_per_sec']:.0f} img/s, "
            f"loss time {row['loss_time_s']:.2f}s, lr {row['lr']:.4g}")
    if env.distributed:
        dist.barrier()
    return last_plot


# ---------------------------------------------------------------------------------------------
# Checkpoints inside an epoch, stopping on a signal (see preemption.py)
# ---------------------------------------------------------------------------------------------


def _save_every(cfg: dict) -> int:
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


def _checkpoint_state(run: _Run, epochs_done: int, ev: dict | None) -> dict:
    """The checkpoint of the run after ``epochs_done`` completed epochs (see checkpoint.py)."""
    cfg = run.cfg
    return {
        "format": FORMAT, "arch": cfg["model"], "num_classes": run.data.num_classes,
        "model": run.student.state_dict(), "head": run.head.state_dict() if run.head is not None else None,
        "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        "epoch": epochs_done, "best_top1": run.best_top1, "metrics": run.metrics, "config": cfg,
        "data": run.data_info, "feature_layers": run.s_layers, "teacher_eval": run.teacher_eval,
        "rng": rng_state(), "val": ev, "elastic_run_id": elastic_run_id(),
    }


def _on_main(run: _Run, write) -> None:
    """``write()`` on rank 0. When it fails (a full disk, an unwritable folder) every process ends with
    a one-line UserError instead of the others waiting for rank 0."""
    error = None
    if run.env.main:
        try:
            write()
        except UserError as e:
            error = e
        except OSError as e:
            error = UserError(f"could not write to {run.out}: {e.strerror or e}")
    if not all_ok(error is None, run.env, run.stop.group):
        raise error or UserError("rank 0 could not write the run's outputs (its error says why)")


def _resume_position(run: _Run, epoch: int, steps: int) -> dict | None:
    """This process's saved state when the run resumes inside ``epoch``, else None."""
    pos = run.ckpt.get("position") if run.ckpt is not None else None
    if not pos or int(pos["epoch"]) != epoch:
        return None
    return check_position(pos, run.env, run.batch_size, steps, run.out / "last.pt")


def _epoch_batches(run: _Run, mine: dict | None):
    """The epoch's batch iterator. Creating it draws the loader's base seed from torch's global RNG
    (each epoch, or once with persistent workers); the draw is undone, so the global RNG stream is the
    same whatever the workers and wherever the run was resumed. Resuming inside the epoch (``mine``),
    the sampler skips the steps done and the process's RNG states are those saved after them."""
    state = torch.get_rng_state()
    batches = iter(run.train_loader)
    torch.set_rng_state(state)
    if mine is not None:
        set_rng_state(mine["rng"])
    return batches


def _after_step(run: _Run, epoch: int, step: int, steps: int, sums: dict, n_seen: int, correct: torch.Tensor,
                t0: float) -> None:
    """After step ``step`` of ``steps``: last.pt every --save-every steps (counted over the run), and the
    stop a signal asked for. At the epoch's last step both wait for the epoch's own checkpoint."""
    stop = run.stop.requested(run.env)
    if step >= steps:
        return
    if stop or (run.save_every and ((epoch - 1) * steps + step) % run.save_every == 0):
        _save_position(run, epoch, step, steps, sums, n_seen, correct, time.perf_counter() - t0)
    if stop:
        raise _stopped(run, epoch, step, steps)


def _save_position(run: _Run, epoch: int, step: int, steps: int, sums: dict, n_seen: int,
                   correct: torch.Tensor, elapsed: float) -> None:
    """last.pt inside epoch ``epoch`` after ``step`` steps, with every process's RNG states and partial
    statistics (a collective under DDP)."""
    env = run.env
    loss_time, loss_calls = run.timer.peek()
    mine = {"rng": rng_state(), "sums": {k: v.detach().cpu() for k, v in sums.items()}, "n_seen": int(n_seen),
            "correct": correct.detach().cpu(), "train_time": float(elapsed), "loss_time": float(loss_time),
            "loss_calls": int(loss_calls)}
    ranks = gather(mine, env, run.stop.group)
    if not all(math.isfinite(v.item()) for r in ranks for v in r["sums"].values()):
        raise TrainingDiverged(f"the training loss became non-finite in epoch {epoch} (last.pt keeps the last "
                               "checkpoint before it); lower --lr, or use --amp none / bf16")

    def write():
        state = _checkpoint_state(run, epoch - 1, None)
        state["position"] = position_record(epoch, step, steps, run.batch_size, env.world, ranks)
        save_checkpoint(state, run.out / "last.pt")

    _on_main(run, write)


def _stopped(run: _Run, epoch: int, step: int | None, steps: int | None = None) -> TrainingStopped:
    where = f"after step {step} of {steps} in epoch {epoch}" if step else f"after epoch {epoch}"
    why = run.stop.received or "a signal to another process"
    return TrainingStopped(f"stopped by {why} {where}; {run.out / 'last.pt'} holds the run, and the same command "
                           "with --resume continues it")


def _finish(run: _Run, t_start: float) -> dict:
    """The run's summary (also OUT/summary.json); removes the teacher's feature hooks."""
    if run.t_hooks is not None:
        run.t_hooks.remove()
    metrics = run.metrics
    final = metrics[-1] if metrics else {}
    best = max(metrics, key=lambda m: m["val_top1"]) if metrics else {}
    summary = {
        "model": run.cfg["model"], "method": run.cfg["method"], "data": run.data.spec, "epochs": run.epochs,
        "final": final, "best": best, "teacher_eval": run.teacher_eval,
        "loss_time_s": sum(m.get("loss_time_s", 0.0) for m in metrics),
        "steps": sum(m.get("steps", 0) for m in metrics),
        "train_time_s": sum(m.get("epoch_time_s", 0.0) for m in metrics),
        "wall_time_s": time.perf_counter() - t_start, "out": str(run.out),
    }
    if run.env.main:
        write_json(summary, run.out / "summary.json")
    return summary


# ---------------------------------------------------------------------------------------------
# evaluate command
# ---------------------------------------------------------------------------------------------


def evaluate_checkpoint(checkpoint: str, data_spec: str, *, batch_size: int = 256, device: str = "auto",
                        workers: int | None = None, val_size: int | None = None, amp: str = "none",
                        image_size: int | None = None, model: str | None = None) -> dict:
    env = setup_env(device)
    completed = False
    try:
        ckpt = load_checkpoint(checkpoint)
        arch = model or (ckpt.get("arch") if isinstance(ckpt, dict) else None)
        if not arch:
            raise UserError(f"checkpoint {checkpoint!r} does not name its architecture; pass --model NAME")
        ck_data = ckpt.get("data", {}) if isinstance(ckpt, dict) else {}
        if image_size is None and ck_data.get("image_size") and not data_spec.startswith(("cifar", "synthetic")):
            image_size = ck_data["image_size"]
        same_kind = ck_data.get("mean") and data_kind(ck_data.get("spec", "")) == data_kind(data_spec)
        data = build_data(data_spec, image_size=image_size, val_size=val_size, with_train=False,  # as trained
                          transform={"mean": ck_data["mean"], "std": ck_data["std"]} if same_kind else None)
        ck_nc = ckpt.get("num_classes") if isinstance(ckpt, dict) else None
        if ck_nc is not None and int(ck_nc) != data.num_classes:
            raise UserError(f"checkpoint {checkpoint!r} has {ck_nc} classes but {data_spec!r} has {data.num_classes}")
        net = build_model(arch, data.num_classes, image_size=data.image_size)
        sd = extract_state_dict(ckpt)
        bad = describe_mismatch(net, sd)
        if bad:
            raise UserError(f"checkpoint {checkpoint!r} does not fit a {arch} with {data.num_classes} classes: {bad}")
        net.load_state_dict(sd)
        net.to(env.device).eval()
        w = workers if workers is not None else _default_workers(data, env.device, env)
        loader = _val_loader(data.val, env, batch_size, w, env.device.type == "cuda")
        res = evaluate(net, loader, env, data.num_classes, _amp_dtype(amp, env.device))
        res.update({"checkpoint": str(checkpoint), "arch": arch, "data": data_spec})
        completed = True
        return res
    finally:
        release_process_group(env, completed)
