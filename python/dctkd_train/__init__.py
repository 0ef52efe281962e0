"""dctkd_train: a thin trainer for distillation with the fused losses of ``dctkd_ext``.

Run it as ``python -m dctkd_train train|evaluate|demo`` (docs/TRAINER.md). The pieces are usable
on their own: :mod:`.models` (CIFAR ResNets/WRNs, torchvision models), :mod:`.data` (the
synthetic-scenes generator, CIFAR and image-folder data), :mod:`.features` (forward hooks),
:mod:`.methods` (the loss wiring), :mod:`.train` (the loop), :mod:`.checkpoint` (atomic files).
"""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402


def main(argv=None) -> int:
    """Entry point of ``python -m dctkd_train`` (and of a ``dctkd-train`` console script)."""
    from .cli import main as _main

    return _main(argv)


__all__ = ["UserError", "main", "__version__"]
