"""Stopping and resuming a run anywhere: checkpoints inside an epoch, a graceful stop on SIGTERM /
SIGINT, and resuming by itself after a restart under torchrun.

* ``--save-every N``: every N optimiser steps the loop writes ``last.pt`` with the position inside the
  epoch (:func:`position_record`): the step reached, and for every process its RNG states and its
  partial sums of the epoch's statistics. The data order of an epoch is a function of (seed, epoch,
  rank, world size) and the augmentation of (seed, epoch, sample), so the step is all a resumed run
  needs to take the remaining batches in the same order.
* :class:`StopSignals`: the first SIGTERM or SIGINT asks the loop to stop after the current step; it
  writes ``last.pt`` and the run ends with :class:`~dctkd_train.errors.TrainingStopped` (the CLI exits
  with status 75). A second signal stops at once (SIGINT: KeyboardInterrupt; SIGTERM: the default
  action), keeping the last.pt written before. Under DDP the processes agree on the step to stop at.
* :func:`decide_resume`: ``--resume``, ``--resume auto``, and a restarted torchrun worker
  (``TORCHELASTIC_RESTART_COUNT`` >= 1) that finds a last.pt of its own job resumes from it.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint
from .errors import UserError


def elastic_run_id() -> str | None:
    """torchrun's id of the job (the same for all its restarts), or None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def elastic_restart_count() -> int:
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def decide_resume(out: Path, resume, overwrite: bool) -> tuple[bool, dict | None]:
    """(resume?, the loaded last.pt when resuming). ``resume``: True (``--resume``: last.pt must exist),
    "auto" (``--resume auto``: resume when last.pt exists, else start), or False. A restarted torchrun
    worker resumes from a last.pt written by the same job (its TORCHELASTIC_RUN_ID), whatever the flags
    say, since its command line is the one that started the run."""
    last = out / "last.pt"
    if elastic_restart_count() >= 1 and last.is_file():
        ckpt = load_checkpoint(last, "checkpoint")
        if isinstance(ckpt, dict) and ckpt.get("elastic_run_id") == elastic_run_id():
            return True, ckpt
        if resume:
            return True, ckpt
        return False, None
    if resume == "auto":
        return (True, load_checkpoint(last, "checkpoint")) if last.is_file() else (False, None)
    if resume:
        if not last.is_file():
            raise UserError(f"--resume: there is no {last} to resume from")
        return True, load_checkpoint(last, "checkpoint")
    return False, None


def cpu_group(env):
    """A process group for the small host-side exchanges of this module (the stop flag, the per-process
    states): gloo, so that they never synchronise a GPU stream. The default group when it is gloo."""
    if not env.distributed:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


class StopSignals:
    """Within ``with StopSignals():`` the first SIGTERM/SIGINT only sets :attr:`received`; the loop asks
    :meth:`requested` after every step. Handlers are installed only in the main thread (signals are
    delivered there) and the previous ones come back on exit."""

    NAMES = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}
        self.group = None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            return
        # a second signal: stop now
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def requested(self, env) -> bool:
        """Whether any process received a stop signal (a collective under DDP: every process calls it at
        the same point of the loop, so all stop after the same step)."""
        flag = self.received is not None
        if env.distributed:
            t = torch.tensor([int(flag)], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            flag = bool(t.item())
        return flag


def gather(obj, env, group) -> list:
    """Every process's ``obj``, in rank order (a collective under DDP)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj, group=group)
    return out


def all_ok(ok: bool, env, group) -> bool:
    """True when ``ok`` holds on every process (a collective under DDP)."""
    if not env.distributed:
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item() == 0


def position_record(epoch: int, step: int, steps: int, batch_size: int, world: int, ranks: list) -> dict:
    """The ``position`` entry of a checkpoint written inside epoch ``epoch`` after ``step`` of its
    ``steps`` steps; ``ranks``: each process's RNG states and partial statistics."""
    return {"epoch": int(epoch), "step": int(step), "steps": int(steps), "batch_size": int(batch_size),
            "world_size": int(world), "ranks": ranks}


def check_position(position: dict, env, batch_size: int, steps: int, where: Path) -> dict:
    """This process's saved state of a checkpoint written inside an epoch; :class:`UserError` when the
    run cannot take up the same data order (another number of processes or steps per epoch)."""
    if int(position["world_size"]) != env.world:
        raise UserError(f"{where} was written inside epoch {position['epoch']} by {position['world_size']} "
                        f"process(es); resume it with as many (this run has {env.world})")
    if int(position["batch_size"]) != batch_size or int(position["steps"]) != steps:
        raise UserError(f"{where} was written inside an epoch of {position['steps']} steps of "
                        f"{position['batch_size']} images; this run has {steps} steps of {batch_size}")
    return position["ranks"][env.rank]
