"""Runs the trainer (dctkd_train.train.train) with every BatchNorm of the student and the teacher
replaced by a per-sample GroupNorm(1, C), then saves the student's final parameters as
OUT/rank<RANK>.pt. Without batch statistics a DDP run of N processes and a one-process run with the
same global batch take the same steps (the sampler shards each global batch, DDP averages the
gradients), which test_train_ddp.py checks.

    python tests/ddp_train.py CONFIG_JSON              # one process (or under torchrun)
    python tests/ddp_train.py --teacher PATH ARCH N    # writes a teacher checkpoint of the same models
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from dctkd_train import models  # noqa: E402

_build = models.build_model
built = []


def without_batch_statistics(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            without_batch_statistics(child)
    return module


def build_model(name, num_classes, *args, **kwargs):
    model = without_batch_statistics(_build(name, num_classes, *args, **kwargs))
    built.append(model)
    return model


def install():
    for mod in [m for n, m in sys.modules.items() if n.startswith("dctkd_train") and m is not None]:
        if getattr(mod, "build_model", None) is _build:
            mod.build_model = build_model


def main(argv):
    install()
    if argv[0] == "--teacher":
        path, arch, n = argv[1], argv[2], int(argv[3])
        torch.manual_seed(0)
        torch.save({"arch": arch, "num_classes": n, "model": build_model(arch, n).state_dict()}, path)
        return
    from dctkd_train import train as T

    install()  # train imported build_model by name
    cfg = json.loads(argv[0])
    T.train(cfg)
    student = built[0]  # the first model train() builds is the student
    rank = int(os.environ.get("RANK", "0"))
    torch.save(student.state_dict(), Path(cfg["out"]) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
