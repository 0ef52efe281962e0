"""What a benchmark suite declares: cases (one op at one shape, batch, dtype) and, per case, the
implementations to time side by side. bench/run.py times every impl of every case in fwd, bwd and
fwd+bwd, and reports GB/s on the case's minimal bytes and speed-ups of "ours" over the others.

A suite is a module bench/suites/<name>.py with
    def cases(args, device: torch.device) -> list[Case]
(args.quick asks for a short run, args.batches / args.dtypes restrict the grid).

A case's backward receives `upstream`: "ones" (torch.ones_like of the output), "scale=S" (S times
ones: a weighted loss or a GradScaler's scale) or "mse" (the gradient a mean-squared-error loss over
the output gives: 2 (y - target) / numel, values near 1e-7 at real sizes). A case of mode "step"
times Prepared.step, a whole training step, instead of fwd / bwd / fwd+bwd. An Impl may carry its own
upstream (e.g. ours with upstream 1 beside ours with a scaled one, in one case timed in rounds)."""

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Impl:
    name: str  # "ours", "eager_paper", "eager_reference", "compiled_reference", "eager_module", ...
    # Builds the closure to time: called once per (case, impl), after the inputs exist; returns
    # fwd() -> Tensor (the forward on the case's inputs) and the leaf tensors the backward differentiates.
    make: Callable[[], "Prepared"]
    upstream: Optional[str] = None  # this impl's upstream gradient where it differs from the case's


@dataclass
class Prepared:
    fwd: Optional[Callable[[], torch.Tensor]]
    leaves: List[torch.Tensor]
    step: Optional[Callable[[], None]] = None  # mode "step": one whole training step


FWD_BWD_MODES = ("fwd", "bwd", "fwd+bwd")
UPSTREAMS = ("ones", "mse")  # and "scale=S"


def upstream_gradient(kind: str, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The gradient handed to y.backward() (see the module docstring); the same for every impl of a case."""
    if kind == "ones":
        return torch.ones_like(y)
    if kind.startswith("scale="):
        return torch.full_like(y, float(kind[len("scale="):]))
    if kind == "mse":
        g = torch.Generator().manual_seed(seed)
        diff = torch.randn(y.shape, generator=g, dtype=torch.float32).to(device=y.device, dtype=y.dtype)
        return diff * (2.0 / y.numel())
    raise ValueError(f"upstream: expected 'ones', 'mse' or 'scale=S', got {kind!r}")


@dataclass
class Case:
    op: str  # e.g. "dct_at_loss", "fam_layer", "global_filter"
    shape_name: str  # e.g. "r50_r18", "cifar_r32x4_r8x4"
    batch: int
    dtype: torch.dtype
    # Minimal bytes each mode must move (the roofline denominator), per mode: "fwd", "bwd", "fwd+bwd".
    min_bytes: Dict[str, int]
    impls: List[Impl]
    notes: Optional[str] = None
    extra: Dict[str, object] = field(default_factory=dict)  # copied into each record
    modes: tuple = FWD_BWD_MODES  # or ("step",)
    upstream: str = "ones"  # the backward's upstream gradient (see upstream_gradient)
    # True: the impls are timed in rounds (one call of each per round, mode by mode), for impls whose
    # times are compared with each other more finely than the machine's drift over a case allows
    rounds: bool = False


# ------------------------------------------------------------------------------ what suites share
CPU_BATCH = 8  # the batch of a --full grid on the CPU unless --batches


def wants_fp32(args) -> bool:
    """Whether --dtypes (if given) asks for float32."""
    dtypes = getattr(args, "dtypes", None)
    if not dtypes:
        return True
    names = {str(d).replace("torch.", "") for d in dtypes}
    return bool(names & {"float32", "fp32", "f32"})


def grid_batches(args, default: int, device: torch.device) -> List[int]:
    """The batches of a --full grid: --batches, else the recipe's batch on the GPU and CPU_BATCH on the
    CPU (so that a full run stays minutes long)."""
    batches = getattr(args, "batches", None)
    if batches:
        return [int(b) for b in batches]
    return [CPU_BATCH] if device.type == "cpu" else [default]


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def on_backend(name: str, fn: Callable) -> Callable:
    """fn(*args) run under dctkd_ext.use_backend(name): the backend is chosen when the forward runs, and
    the backward follows the op the forward used."""
    import dctkd_ext

    def run(*args):
        with dctkd_ext.use_backend(name):
            return fn(*args)

    return run


def released_fam(in_channels: int, out_channels: int, size: int, cuton: float = 0.1) -> torch.nn.Module:
    """The FAM-KD authors' FAM module (dctkd_ext.reference.ReleasedFAM) with the constructor of
    dctkd_ext.nn.FrequencyAttention: the `fam_cls` of the released head. Their module fixes cuton at 0.1."""
    from dctkd_ext import reference

    if cuton != 0.1:
        raise ValueError(f"cuton: the released FAM module is built with 0.1, got {cuton}")
    return reference.ReleasedFAM(in_channels, out_channels, size)
