"""Where a run runs: the device and the processes (DDP), precision, loaders' workers, and the timer of
the distillation loss."""
from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from .data import DataBundle
from .errors import UserError


@dataclass
class Env:
    """The device and this process's place among the run's processes."""

    device: torch.device
    rank: int
    world: int
    local_rank: int
    owns_pg: bool  # whether setup_env started the process group (and release_process_group ends it)

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


def all_reduce(t: torch.Tensor, env: Env) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t)
    return t


def log_line(env: Env, msg: str, quiet: bool = False) -> None:
    if env.main and not quiet:
        print(msg, flush=True)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def autocast(device: torch.device, dtype):
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


def val_loader(ds, env: Env, batch_size: int, workers: int, pin: bool):
    shard = Subset(ds, list(range(env.rank, len(ds), env.world))) if env.distributed else ds
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0)


def default_workers(data: DataBundle, device: torch.device, env: Env) -> int:
    cpus = os.cpu_count() or 1
    per_proc = max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", env.world))))
    if data.name == "imagefolder":
        return min(8, per_proc)
    return 0 if device.type == "cpu" else min(4, per_proc)
