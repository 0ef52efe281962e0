"""The training loop: an ordinary PyTorch SGD loop with the losses from ``dctkd_ext``.

``train(config)`` runs one training (the ``train`` command and the demo call it); ``evaluate_checkpoint``
is the ``evaluate`` command. Multi-GPU / multi-node runs go through ``torchrun`` (DDP with a
DistributedSampler; gloo on CPU, nccl on GPU): every process runs the same ``train(config)``.
"""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

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
from .config import (  # noqa: F401  (resolve_config, lr_at, make_method_config: this module's API too)
    lr_at,
    make_method_config,
    resolve_config,
    run_config,
    save_every_steps,
)
from .data import build_data
from .errors import TrainingStopped, UserError
from .fam_head import count_real_parameters
from .models import build_model, count_parameters
from .plots import plot_curves
from .preemption import StopSignals, all_ok, check_position, cpu_group, elastic_run_id, gather, position_record
from .progress import Progress
from .recipes import data_kind, paper_recipe_note
from .runtime import (  # noqa: F401  (Env, setup_env: this module's API too)
    Env,
    all_reduce,
    amp_dtype,
    autocast,
    default_workers,
    release_process_group,
    setup_env,
    val_loader,
)
from .state import Run, StudentModule, load_teacher, setup  # noqa: F401  (StudentModule, load_teacher: API)


class TrainingDiverged(UserError):
    """The loss became NaN/inf."""


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
        with autocast(env.device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        topk = logits.topk(k, dim=1).indices
        correct1 = (topk[:, 0] == y).double()
        per_class[0].index_add_(0, y, correct1)
        per_class[1].index_add_(0, y, torch.ones_like(correct1))
        sums[0] += (topk == y[:, None]).any(1).double().sum()
        sums[1] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[2] += y.numel()
    all_reduce(per_class, env)
    all_reduce(sums, env)
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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


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
    out, cfg, ckpt = run_config(raw, env.world)
    run = setup(cfg, env, out, ckpt, stop, save_every_steps(cfg))
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


def _write_run_info(run: Run) -> None:
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


def _evaluate_teacher(run: Run):
    """The teacher's validation metrics: measured at the start of a new run, carried over on --resume."""
    if run.teacher is not None and run.cfg.get("eval_teacher", True) and run.ckpt is None:
        ev = evaluate(run.teacher, run.val_loader, run.env, run.data.num_classes, run.amp_dtype, run.channels_last)
        run.log(f"teacher {run.t_info['arch']}: val top-1 {ev['top1']:.2f}  top-5 {ev['top5']:.2f}  "
                f"MCA {ev['mca']:.2f}")
        return ev
    if run.ckpt is not None:
        return run.ckpt.get("teacher_eval")
    return None


def _train_epoch(run: Run, epoch: int) -> dict:
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
        loss, ce, terms, s_logits = _train_step(run, x, y, epoch)
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
    return _epoch_row(run, epoch, lr, sums, n_seen, correct, train_time)


def _train_step(run: Run, x: torch.Tensor, y: torch.Tensor, epoch: int):
    """One SGD step on the batch (x, y): (loss, CE, the distillation terms, the student's logits)."""
    device, method = run.device, run.method
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t_logits = t_feats = None
    with autocast(device, run.amp_dtype):
        if run.teacher is not None:
            with torch.no_grad():
                t_logits = run.run_teacher(x)
                t_feats = run.t_hooks.pop() if run.t_hooks is not None else None
        s_logits, s_feats, head_out = run.model(x)
    s_logits = s_logits.float()
    ce = F.cross_entropy(s_logits, y)
    with run.timer():
        terms = method.distill_terms(y, s_logits, s_feats, head_out,
                                     t_logits.float() if t_logits is not None else None, t_feats, epoch)
    loss = method.total(ce, terms, epoch)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss, ce, terms, s_logits


def _epoch_row(run: Run, epoch: int, lr: float, sums: dict, n_seen: int, correct: torch.Tensor,
               train_time: float) -> dict:
    """The epoch's row of metrics from this process's sums, reduced over the processes."""
    env, device = run.env, run.device
    loss_time, _ = run.timer.collect()
    # reduce the epoch's statistics over processes
    keys = sorted(sums)
    vec = torch.stack([sums[k] for k in keys] + [torch.tensor(float(n_seen), dtype=torch.float64, device=device),
                      correct, torch.tensor(loss_time, dtype=torch.float64, device=device)])
    all_reduce(vec, env)
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


def _evaluate_epoch(run: Run, epoch: int, row: dict):
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


def _save_epoch(run: Run, epoch: int, row: dict, ev: dict, is_best: bool, last_plot: float) -> float:
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


def _checkpoint_state(run: Run, epochs_done: int, ev: dict | None) -> dict:
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


def _on_main(run: Run, write) -> None:
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


def _resume_position(run: Run, epoch: int, steps: int) -> dict | None:
    """This process's saved state when the run resumes inside ``epoch``, else None."""
    pos = run.ckpt.get("position") if run.ckpt is not None else None
    if not pos or int(pos["epoch"]) != epoch:
        return None
    return check_position(pos, run.env, run.batch_size, steps, run.out / "last.pt")


def _epoch_batches(run: Run, mine: dict | None):
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


def _after_step(run: Run, epoch: int, step: int, steps: int, sums: dict, n_seen: int, correct: torch.Tensor,
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


def _save_position(run: Run, epoch: int, step: int, steps: int, sums: dict, n_seen: int,
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


def _stopped(run: Run, epoch: int, step: int | None, steps: int | None = None) -> TrainingStopped:
    where = f"after step {step} of {steps} in epoch {epoch}" if step else f"after epoch {epoch}"
    why = run.stop.received or "a signal to another process"
    return TrainingStopped(f"stopped by {why} {where}; {run.out / 'last.pt'} holds the run, and the same command "
                           "with --resume continues it")


def _finish(run: Run, t_start: float) -> dict:
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
        w = workers if workers is not None else default_workers(data, env.device, env)
        loader = val_loader(data.val, env, batch_size, w, env.device.type == "cuda")
        res = evaluate(net, loader, env, data.num_classes, amp_dtype(amp, env.device))
        res.update({"checkpoint": str(checkpoint), "arch": arch, "data": data_spec})
        completed = True
        return res
    finally:
        release_process_group(env, completed)
