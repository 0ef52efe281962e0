"""What a benchmark suite declares: cases (one op at one shape, batch, dtype) and, per case, the
implementations to time side by side. bench/run.py times every impl of every case in fwd, bwd and
fwd+bwd, and reports GB/s on the case's minimal bytes and speed-ups of "ours" over the others.

A suite is a module bench/suites/<name>.py with
    def cases(args, device: torch.device) -> list[Case]
(args.quick asks for a short run, args.batches / args.dtypes restrict the grid)."""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Impl:
    name: str  # "ours", "eager_paper", "eager_reference", "compiled_reference", "eager_module", ...
    # Builds the closure to time: called once per (case, impl), after the inputs exist; returns
    # fwd() -> Tensor (the forward on the case's inputs) and the leaf tensors the backward differentiates.
    make: Callable[[], "Prepared"]


@dataclass
class Prepared:
    fwd: Callable[[], torch.Tensor]
    leaves: List[torch.Tensor]


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
