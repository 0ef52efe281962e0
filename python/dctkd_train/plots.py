"""curves.png: loss terms, accuracies, learning rate and throughput per epoch (matplotlib, Agg)."""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import atomic_write


def plot_curves(metrics: list[dict], path: str | os.PathLike, title: str = "") -> bool:
    """Write the curves of ``metrics`` (the metrics.jsonl rows) to ``path``. Returns False (and
    writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except Exception:
        return False
    if not metrics:
        return False
    ep = [m["epoch"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    loss_keys = [k for k in metrics[-1] if k.startswith("train_loss")]
    for k in loss_keys:
        label = "total (weighted)" if k == "train_loss" else k[len("train_loss_"):]
        ax.plot(ep, [m.get(k) for m in metrics], marker=".", label=label)
    if "val_loss" in metrics[-1]:
        ax.plot(ep, [m.get("val_loss") for m in metrics], marker=".", linestyle="--", label="val CE")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("training loss terms (unweighted) and total")
    ax.legend(fontsize=8)
    ax = axes[1]
    for k, lab in (("val_top1", "val top-1"), ("val_top5", "val top-5"), ("val_mca", "val MCA"), ("train_top1", "train top-1")):
        if k in metrics[-1]:
            ax.plot(ep, [m.get(k) for m in metrics], marker=".", label=lab)
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.set_title("accuracy")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(ep, [m.get("images_per_sec") for m in metrics], marker=".", color="tab:green", label="train img/s")
    ax.set_xlabel("epoch")
    ax.set_ylabel("images / s")
    ax2 = ax.twinx()
    ax2.plot(ep, [m.get("lr") for m in metrics], color="tab:gray", linestyle=":", label="lr")
    ax2.set_ylabel("learning rate")
    ax.set_title("throughput and learning rate")
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.94, bottom=0.13, top=0.85 if title else 0.9, wspace=0.32)
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return True
