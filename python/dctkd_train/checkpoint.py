"""Checkpoints and other output files, written atomically.

Every file goes to a temporary name in the same folder, is flushed and fsync'ed, then renamed over
the target with ``os.replace`` (atomic on POSIX and Windows). A run killed mid-write leaves at worst
a stray ``.tmp`` file; ``last.pt``/``best.pt`` always hold the last complete checkpoint.

A checkpoint is a dict::

    format        "dctkd_train/1"
    arch          model name (models.build_model)
    num_classes   int
    model         student state_dict
    head          distiller head state_dict (fam) or None
    optimizer, scheduler, scaler   states (for --resume)
    epoch         number of completed epochs
    best_top1     best val top-1 so far
    metrics       the list of per-epoch metric dicts so far
    config        the run's resolved configuration
    data          {spec, num_classes, class_names, image_size, mean, std}
    feature_layers  the hooked layers of the student
    rng           RNG states (python, numpy, torch, cuda) for an exact resume
    position      only in a checkpoint written inside an epoch (--save-every, a SIGTERM/SIGINT stop):
                  {epoch, step, steps, batch_size, world_size, ranks}, ``epoch`` the epoch in progress
                  (``epoch`` above counts the completed ones) and ``step`` the steps done in it; per
                  process (``ranks``, in rank order) its RNG states and the epoch's partial statistics
    elastic_run_id  torchrun's TORCHELASTIC_RUN_ID of the job that wrote it (None outside torchrun)

The learning rate is a pure function of the configuration and the epoch (``train.lr_at``): the
schedule has no state of its own beyond the epoch. The data order and the augmentation are
functions of (seed, epoch, sample, rank), so the step inside the epoch is their whole state.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import UserError

FORMAT = "dctkd_train/1"


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync, then ``os.replace`` it. An OSError
    (a full disk, a folder that is read-only or gone) becomes a one-line :class:`UserError`; ``path``
    keeps its previous content either way."""
    path = Path(path)
    try:
        _atomic_write(path, write, mode)
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise UserError(f"could not write {path}: {reason}; the previous {path.name}, if any, is unchanged") from None


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"), mode="w")


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """Load a checkpoint on the CPU; :class:`UserError` when missing or unreadable."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} {str(p)!r} does not exist")
    if p.suffix == ".safetensors":  # timm / Hugging Face weight files
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{what} {str(p)!r} is a .safetensors file: pip install safetensors") from None
        try:
            return load_file(str(p))
        except Exception as e:
            raise UserError(f"{what} {str(p)!r} could not be read as safetensors ({type(e).__name__}: {e})") from None
    try:
        # weights_only: tensors, numbers, strings and containers only -- never arbitrary pickled code.
        # This trainer's checkpoints and RepDistiller/mdistiller's load this way.
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if os.environ.get("DCTKD_TRUST_CHECKPOINTS") == "1":
            return torch.load(p, map_location="cpu", weights_only=False)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {str(p)!r} could not be read as a PyTorch checkpoint of tensors ({first}). "
                        "If it is a checkpoint you trust that pickles other Python objects, set "
                        "DCTKD_TRUST_CHECKPOINTS=1 to load it anyway") from None
    except Exception as e:
        raise UserError(f"{what} {str(p)!r} could not be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    return ckpt


def extract_state_dict(ckpt: Any) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint: ours, RepDistiller/mdistiller (``{"model": sd}``,
    ``{"state_dict": sd}``, ``{"net": sd}``) or a bare state dict. Strips ``module.`` prefixes."""
    sd = ckpt
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict", "net", "model_state_dict"):
            if key in ckpt and isinstance(ckpt[key], dict):
                sd = ckpt[key]
                break
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError("the checkpoint holds no model state dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def describe_mismatch(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> str | None:
    """None if ``sd`` loads strictly into ``model``; else a short description of the differences."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
    return "; ".join(parts)


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:
            pass
