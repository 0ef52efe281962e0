"""The state of one training run (:class:`Run`) and the functions that build it from the resolved
configuration, each doing one job: seeds, data, models, features and head, placement and DDP,
optimiser, loaders, and the state of a resumed run."""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import describe_mismatch, extract_state_dict, load_checkpoint, set_rng_state
from .config import data_identity, make_method_config, split_layers
from .data import DataBundle, build_data, make_train_loader
from .errors import UserError
from .external_models import adapt_state_dict, make_deterministic, stage_layers
from .features import FeatureHooks, probe_feature_shapes
from .methods import Method, MethodConfig
from .models import build_model
from .optim import make_sgd
from .preemption import StopSignals
from .recipes import recipe_transform
from .runtime import Env, LossTimer, amp_dtype, default_workers, log_line, val_loader


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


@dataclass(eq=False)
class Models:
    """The student, the teacher (None: the method needs none), the head on the student's features
    (None: the method has none) and the hooked layers."""

    student: nn.Module
    teacher: nn.Module | None
    t_info: dict | None
    head: nn.Module | None = None
    s_layers: list[str] | None = None
    t_layers: list[str] | None = None


@dataclass(eq=False)
class Run:
    """What the steps of one training share: the configuration, data, models, optimiser, loaders and
    the history so far (built by :func:`setup`, advanced by the epoch steps of train.py)."""

    cfg: dict[str, Any]
    env: Env
    out: Path
    ckpt: dict | None  # the checkpoint resumed from
    stop: StopSignals
    data: DataBundle
    method: Method
    student: nn.Module
    teacher: nn.Module | None
    head: nn.Module | None
    t_info: dict | None  # the teacher's architecture and checkpoint
    s_layers: list[str] | None  # the student's hooked layers (recorded in the checkpoint)
    t_hooks: FeatureHooks | None
    run_teacher: Callable | None  # the teacher, compiled with --compile
    smod: StudentModule
    model: nn.Module  # smod, DDP-wrapped under torchrun
    timer: LossTimer
    channels_last: bool
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler (dctkd_ext.amp's with complex parameters under fp16)
    amp_dtype: torch.dtype | None
    workers: int
    batch_size: int  # per process
    sampler: Any
    train_loader: Any
    val_loader: Any
    epochs: int
    save_every: int  # steps between checkpoints inside an epoch (0: at epoch ends only)
    quiet: bool = False
    start_epoch: int = 1
    best_top1: float = -1.0
    metrics: list[dict] = field(default_factory=list)
    data_info: dict = field(default_factory=dict)  # config.json's and the checkpoint's description of the data
    teacher_eval: dict | None = None
    term_keys: list[str] = field(default_factory=list)  # the distillation terms of the last epoch

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def mcfg(self) -> MethodConfig:
        return self.method.cfg

    def log(self, msg: str) -> None:
        log_line(self.env, msg, self.quiet)


def setup(cfg: dict, env: Env, out: Path, ckpt: dict | None, stop: StopSignals, save_every: int) -> Run:
    """Seeds, data, method, models (and the feature head), optimiser, loaders, and the state of a resumed
    run, in this order (the order of the random draws, which a resumed run replays)."""
    quiet = bool(cfg.get("quiet"))

    def log(msg: str) -> None:
        log_line(env, msg, quiet)

    seed_everything(cfg)
    data = build_run_data(cfg, log)
    method = Method(make_method_config(cfg))
    models = build_models(cfg, data, method, log)
    attach_features(cfg, data, method, models, log)
    channels_last = place_models(cfg, env, models)
    timer = LossTimer(env.device)
    smod, model, run_teacher, t_hooks = wrap_models(cfg, env, models, timer)
    optimizer, dtype, scaler = build_optimizer(cfg, smod, env.device)
    workers, batch_size, sampler, train_loader, v_loader = build_loaders(cfg, env, data, log)
    run = Run(cfg=cfg, env=env, out=out, ckpt=ckpt, stop=stop, data=data, method=method, student=models.student,
              teacher=models.teacher, head=models.head, t_info=models.t_info, s_layers=models.s_layers,
              t_hooks=t_hooks, run_teacher=run_teacher, smod=smod, model=model, timer=timer,
              channels_last=channels_last, optimizer=optimizer, scaler=scaler, amp_dtype=dtype, workers=workers,
              batch_size=batch_size, sampler=sampler, train_loader=train_loader, val_loader=v_loader,
              epochs=int(cfg["epochs"]), save_every=save_every, quiet=quiet)
    if ckpt is not None:
        restore(run, ckpt)
    return run


def seed_everything(cfg: dict) -> None:
    seed = int(cfg["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if cfg.get("deterministic"):
        make_deterministic()


def build_run_data(cfg: dict, log) -> DataBundle:
    data = build_data(cfg["data"], image_size=cfg.get("image_size"), train_size=cfg.get("train_size"),
                      val_size=cfg.get("val_size"), seed=int(cfg["seed"]),
                      transform=recipe_transform(cfg.get("recipe"), cfg["data"]))
    log(f"data: {data.describe()}")
    return data


def build_models(cfg: dict, data: DataBundle, method: Method, log) -> Models:
    """The student, and the teacher when the method needs one."""
    stages = cfg.get("stages")
    student = build_model(cfg["model"], data.num_classes, stages, data.image_size)
    teacher = t_info = None
    if method.cfg.needs_teacher:
        teacher, t_info = load_teacher(cfg["teacher"], cfg.get("teacher_model"), data.num_classes, stages=stages,
                                       image_size=data.image_size)
        if t_info.get("data_spec") and data_identity(t_info["data_spec"]) != data_identity(data.spec):
            log(f"warning: the teacher was trained on --data {t_info['data_spec']!r}, this run uses {data.spec!r}")
    elif cfg.get("teacher"):
        log(f"note: method {cfg['method']!r} does not use the teacher; ignoring --teacher")
    return Models(student, teacher, t_info)


def attach_features(cfg: dict, data: DataBundle, method: Method, models: Models, log) -> None:
    """The layers hooked on the student and the teacher, and the method's head (for a method that uses
    features); the layers recorded in ``cfg``."""
    if method.uses_features:
        stages = cfg.get("stages")
        layers = []
        for role, model in (("student", models.student), ("teacher", models.teacher)):
            layers.append(split_layers(cfg.get(f"{role}_layers")) or (
                stage_layers(model, stages, data.image_size, f"--stages ({role})") if stages
                else method.default_layers(model, data.image_size, role)))
        models.s_layers, models.t_layers = layers
        s_shapes = probe_feature_shapes(models.student, models.s_layers, data.image_size, "cpu")
        t_shapes = probe_feature_shapes(models.teacher, models.t_layers, data.image_size, "cpu")
        models.head = method.build_head(s_shapes, t_shapes)
        log(f"features: student {list(zip(models.s_layers, s_shapes))}")
        log(f"          teacher {list(zip(models.t_layers, t_shapes))}")
    cfg["student_layers"], cfg["teacher_layers"] = models.s_layers, models.t_layers


def place_models(cfg: dict, env: Env, models: Models) -> bool:
    """SyncBatchNorm (--sync-bn), the device and the memory format; the teacher frozen in eval mode.
    Returns whether the models run channels-last."""
    device = env.device
    if cfg.get("sync_bn") and env.distributed:
        if device.type != "cuda":
            raise UserError("--sync-bn: SyncBatchNorm runs on GPUs only; drop it for a run on the CPU")
        models.student = nn.SyncBatchNorm.convert_sync_batchnorm(models.student)
        if models.head is not None:
            models.head = nn.SyncBatchNorm.convert_sync_batchnorm(models.head)
    channels_last = cfg["channels_last"] if cfg.get("channels_last") is not None else device.type == "cuda"
    mem = torch.channels_last if channels_last else torch.contiguous_format
    models.student.to(device, memory_format=mem)
    if models.head is not None:
        models.head.to(device)
    if models.teacher is not None:
        models.teacher.to(device, memory_format=mem).eval()
        for p in models.teacher.parameters():
            p.requires_grad_(False)
    return channels_last


def wrap_models(cfg: dict, env: Env, models: Models, timer: LossTimer):
    """(the student module, the module the steps call (DDP-wrapped under torchrun), the teacher to
    call, the teacher's feature hooks)."""
    smod = StudentModule(models.student, models.s_layers, models.head, timer)
    teacher = models.teacher
    t_hooks = FeatureHooks(teacher, models.t_layers) if (teacher is not None and models.t_layers) else None
    run_teacher = teacher
    if cfg.get("compile"):
        smod.run_student = torch.compile(models.student)
        if teacher is not None:
            run_teacher = torch.compile(teacher)
    model = smod
    if env.distributed:
        device = env.device
        model = nn.parallel.DistributedDataParallel(smod, device_ids=[device.index] if device.type == "cuda" else None)
    return smod, model, run_teacher, t_hooks


def build_optimizer(cfg: dict, smod: nn.Module, device: torch.device):
    """(SGD over the student's and the head's parameters, the autocast dtype, the gradient scaler)."""
    # The papers' recipes apply weight decay to every parameter (BN and biases included).
    params = [p for p in smod.parameters() if p.requires_grad]
    dtype = amp_dtype(cfg["amp"], device)
    optimizer = make_sgd(params, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                         weight_decay=float(cfg["weight_decay"]), nesterov=bool(cfg.get("nesterov")), device=device,
                         grad_scaler=dtype == torch.float16)
    scaler_cls = torch.amp.GradScaler
    if dtype == torch.float16 and any(p.is_complex() for p in params):
        from dctkd_ext.amp import GradScaler as scaler_cls  # unscales FrequencyAttention's complex weights
    return optimizer, dtype, scaler_cls(device.type, enabled=dtype == torch.float16)


def build_loaders(cfg: dict, env: Env, data: DataBundle, log):
    """(workers, batch per process, the training sampler and loader, the validation loader)."""
    device = env.device
    workers = cfg["workers"] if cfg.get("workers") is not None else default_workers(data, device, env)
    pin = device.type == "cuda"
    n_train = len(data.train)
    per_rank = math.ceil(n_train / env.world)
    batch_size = int(cfg["batch_size"])
    if per_rank < 2:
        raise UserError(f"the training set has {n_train} images: too few for {env.world} process(es)")
    if batch_size > per_rank:
        log(f"warning: --batch-size {batch_size} exceeds the {per_rank} training images per process; using {per_rank}")
        batch_size = per_rank
    # every image every epoch, the last batch partial, as the released loaders (no drop_last)
    sampler, train_loader = make_train_loader(data.train, batch_size, world=env.world, rank=env.rank,
                                              seed=int(cfg["seed"]), workers=workers, pin_memory=pin)
    return workers, batch_size, sampler, train_loader, val_loader(data.val, env, batch_size, workers, pin)


def restore(run: Run, ckpt: dict) -> None:
    """The state of the resumed run: weights, optimiser, scaler, history and RNG states."""
    run.student.load_state_dict(ckpt["model"])
    if run.head is not None and ckpt.get("head") is not None:
        run.head.load_state_dict(ckpt["head"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.start_epoch = int(ckpt["epoch"]) + 1
    run.best_top1 = float(ckpt.get("best_top1", -1.0))
    run.metrics = list(ckpt.get("metrics", []))
    set_rng_state(ckpt.get("rng"))
    if ckpt.get("position"):
        pos = ckpt["position"]
        run.log(f"resuming {run.out / 'last.pt'} in epoch {pos['epoch']} after step {pos['step']} of {pos['steps']}")
    else:
        run.log(f"resuming {run.out / 'last.pt'} after epoch {ckpt['epoch']}")
