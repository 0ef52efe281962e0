"""Runs the trainer (dctkd_train.train.train) on one or several configurations in turn, in one process
or under torchrun, and saves each run's final parameters as OUT/rank<RANK>.pt: ``{"student": state
dict, "head": the distiller head's state dict or None}``.

By default every BatchNorm of the student, the teacher and the distiller head is replaced by a
per-sample GroupNorm(1, C). Without batch statistics a DDP run of N processes and a one-process run
with the same global batch take the same steps (the sampler shards each global batch, DDP averages
the gradients), which test_train_ddp.py checks. (With BatchNorm each process normalises by the
statistics of its own shard; SyncBatchNorm, which would make them the global batch's, runs on GPUs
only.)

A configuration may carry a ``"_driver"`` entry (removed before training):

* ``"batch_norm": true`` keeps the models as they are;
* ``"interrupt": {"step": S, "signal": "SIGKILL" | "SIGTERM", "rank": R}`` sends the signal to the
  process of rank R right after its S-th optimiser step of that run (counted from the start of the
  process), once: it first writes OUT/interrupted, and a process that finds that file (a restart)
  does not interrupt the run again. A run that stops on SIGTERM (TrainingStopped) writes
  OUT/stopped-rank<RANK>.txt with its message and the process exits with status 75, as the CLI does.

Runs that already finished (OUT/rank<RANK>.pt exists) are skipped, so a restarted process goes on
with the run it was in.

    python tests/ddp_train.py CONFIG_JSON              # a dict or a list of dicts
    python tests/ddp_train.py --teacher PATH ARCH N    # writes a teacher checkpoint of the same models
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from dctkd_train import methods, models  # noqa: E402
from dctkd_train.errors import EXIT_STOPPED, TrainingStopped  # noqa: E402

_build = models.build_model
_build_head = methods.Method.build_head
built = []
heads = []
options = {"batch_norm": False}


def without_batch_statistics(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            norm = nn.GroupNorm(1, child.num_features)
            for p in norm.parameters():  # the fam head keeps the layers it never uses frozen
                p.requires_grad_(child.weight.requires_grad)
            setattr(module, name, norm)
        else:
            without_batch_statistics(child)
    return module


def build_model(name, num_classes, *args, **kwargs):
    model = _build(name, num_classes, *args, **kwargs)
    if not options["batch_norm"]:
        model = without_batch_statistics(model)
    built.append(model)
    return model


def build_head(self, *args, **kwargs):
    head = _build_head(self, *args, **kwargs)
    if head is not None and not options["batch_norm"]:
        head = without_batch_statistics(head)
    heads.append(head)
    return head


def install():
    for mod in [m for n, m in sys.modules.items() if n.startswith("dctkd_train") and m is not None]:
        if getattr(mod, "build_model", None) is _build:
            mod.build_model = build_model
    methods.Method.build_head = build_head


def interrupt_at(spec: dict | None, rank: int, marker: Path):
    """Patch the optimiser step to send ``spec["signal"]`` to this process after step ``spec["step"]``,
    unless ``marker`` says it was done before."""
    real_step = torch.optim.SGD.step
    count = [0]
    armed = bool(spec) and rank == spec.get("rank", 0) and not marker.exists()

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        count[0] += 1
        if armed and count[0] == spec["step"]:
            marker.write_text(f"{spec['signal']} after step {count[0]}")
            os.kill(os.getpid(), getattr(signal, spec["signal"]))
        return out

    torch.optim.SGD.step = step
    return real_step


def main(argv):
    install()
    if argv[0] == "--teacher":
        path, arch, n = argv[1], argv[2], int(argv[3])
        torch.manual_seed(0)
        torch.save({"arch": arch, "num_classes": n, "model": build_model(arch, n).state_dict()}, path)
        return 0
    from dctkd_train import train as T

    install()  # train imported build_model by name
    configs = json.loads(argv[0])
    configs = configs if isinstance(configs, list) else [configs]
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process group for all the runs
        dist.init_process_group("gloo")
    try:
        return run_all(T, configs, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_all(T, configs, rank):
    for cfg in configs:
        driver = cfg.pop("_driver", {})
        out = Path(cfg["out"])
        if (out / f"rank{rank}.pt").is_file():
            continue
        options["batch_norm"] = bool(driver.get("batch_norm"))
        built.clear()
        heads.clear()
        out.mkdir(parents=True, exist_ok=True)
        real_step = interrupt_at(driver.get("interrupt"), rank, out / "interrupted")
        try:
            T.train(cfg)
        except TrainingStopped as e:
            (out / f"stopped-rank{rank}.txt").write_text(str(e))
            return EXIT_STOPPED
        finally:
            torch.optim.SGD.step = real_step
        student = built[0]  # the first model train() builds is the student
        head = heads[0] if heads else None
        torch.save({"student": student.state_dict(), "head": head.state_dict() if head is not None else None},
                   out / f"rank{rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
