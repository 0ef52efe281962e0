"""Benchmark suite of FAM-KD's local self-attention (docs/DESIGN.md §3.5, §6).

Cases:
- "local_attention": the op at the CIFAR ResNet32x4 -> ResNet8x4 head's levels (64@32, 128@16, 256@8, batch 64),
  q, k, v and rel differentiated. Impls: "ours" (dctkd_ext.local_attention), "eager_paper" (the head's released
  formulation, dctkd_ext.reference.released_local_attention: K*K shifted windows stacked, one softmax) and
  "compiled_paper" (torch.compile of it). Minimal bytes (§6.1): forward reads q, k, v, rel and writes out;
  backward reads dout, q, k, v, rel and writes dq, dk, dv, drel.
- "fam_head": the whole FAM-KD head (python/dctkd_train/fam_head.py, FamHead) at the ResNet32x4 -> ResNet8x4
  shapes, forward (the per-level MSE against random teacher features) and backward into the student features
  and every parameter. Impls: "ours" (the fused attention op, keys and values in one GEMM, and
  dctkd_ext.nn.FrequencyAttention), "eager_released" (the released head: the released eager attention,
  use_released_attention, and the authors' FAM module, dctkd_ext.reference.ReleasedFAM) and
  "compiled_released" (torch.compile of that); one state_dict.
  Minimal bytes: the student features and parameters read, the outputs written (forward); the output
  gradients, features and parameters read, their gradients written (backward). The head lives in the trainer
  (python/): the case is left out where the trainer cannot be imported.
"""

import os
import sys
from typing import List

import torch
import torch.nn.functional as F

import dctkd_ext
from dctkd_ext import reference as R

try:  # bench/run.py puts bench/ on sys.path
    from common import Case, Impl, Prepared, released_fam
except ImportError:  # pragma: no cover  (imported as bench.suites.local_attention from the repository root)
    from bench.common import Case, Impl, Prepared, released_fam

KERNEL_SIZE = 3
# (name, batch of the recipe, [(channels, size), ...]): the head's attention levels
LEVELS = [("cifar_r32x4_r8x4", 64, [(64, 32), (128, 16), (256, 8)])]
# the head's (C, H, W) per level, shallow to deep (student ResNet8x4 pre-activation taps and pooled feature,
# teacher ResNet32x4), and which levels are compared: the pooled level is compared in this recipe
HEAD = ("cifar_r32x4_r8x4", 64, [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1)],
        [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 1, 1)])
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtypes(args) -> List[torch.dtype]:
    names = getattr(args, "dtypes", None)
    if not names:
        return [torch.float32]
    out = []
    for n in names:
        n = str(n).replace("torch.", "")
        n = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(n, n)
        if n in DTYPES:
            out.append(DTYPES[n])
    return out


def _op_bytes(b, c, s, dtype):
    n = b * c * s * s * torch.empty((), dtype=dtype).element_size()
    rel = c * KERNEL_SIZE * KERNEL_SIZE * 4
    fwd = 4 * n + rel
    bwd = 7 * n + 2 * rel
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _op_case(name, b, c, s, dtype, device) -> Case:
    torch.manual_seed(0)
    base = [torch.randn(b, c, s, s, device=device).to(dtype) for _ in range(3)]
    rel0 = torch.randn(c, KERNEL_SIZE * KERNEL_SIZE, device=device)

    def make(fn):
        def build():
            q, k, v = (t.clone().requires_grad_() for t in base)
            rel = rel0.clone().requires_grad_()
            return Prepared(fwd=lambda: fn(q, k, v, rel, KERNEL_SIZE), leaves=[q, k, v, rel])

        return build

    compiled = torch.compile(R.released_local_attention)
    return Case(
        op="local_attention",
        shape_name=f"{name}:{c}@{s}",
        batch=b,
        dtype=dtype,
        min_bytes=_op_bytes(b, c, s, dtype),
        impls=[Impl("ours", make(dctkd_ext.local_attention)), Impl("eager_paper", make(R.released_local_attention)),
               Impl("compiled_paper", make(compiled))],
        notes="per-channel softmax over the 3x3 window of q (k + rel), weighted sum of v; dq, dk, dv, drel",
        extra={"channels": c, "size": s, "kernel_size": KERNEL_SIZE},
    )


def _trainer():
    """dctkd_train.fam_head from the checkout's python/, or None where it is not there."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "python")
    if os.path.isdir(path) and path not in sys.path:
        sys.path.insert(0, path)
    try:
        from dctkd_train import fam_head
    except ImportError:
        return None
    return fam_head


def _head_case(fam_head, b, device) -> Case:
    name, _, s_shapes, t_shapes = HEAD
    torch.manual_seed(0)
    from dctkd_ext.nn import FrequencyAttention

    def new_head(fam_cls=FrequencyAttention):
        return fam_head.FamHead(s_shapes, t_shapes, fam_cls, 0.1).to(device)

    state = new_head().state_dict()
    feats0 = [torch.randn(b, *s, device=device) for s in s_shapes]
    targets = [torch.randn(b, *t, device=device) for t in t_shapes]

    def loss(outs):
        return sum(F.mse_loss(o, t) for o, t in zip(outs, targets) if o is not None)

    def make(released, compile_head=False):
        def build():
            head = new_head(released_fam if released else FrequencyAttention)
            head.load_state_dict(state)
            fam_head.use_released_attention(head, released)
            run = torch.compile(head) if compile_head else head
            feats = [f.clone().requires_grad_() for f in feats0]
            return Prepared(fwd=lambda: loss(run(feats)), leaves=feats + [p for p in head.parameters()
                                                                          if p.requires_grad])

        return build

    f32 = 4
    params = sum(p.numel() * p.element_size() for p in new_head().parameters())
    feats = sum(b * c * h * w for c, h, w in s_shapes) * f32
    outs = sum(b * c * h * w for c, h, w in t_shapes) * f32
    fwd = feats + params + outs
    bwd = outs + feats + params + feats + params
    return Case(
        op="fam_head",
        shape_name=name,
        batch=b,
        dtype=torch.float32,
        min_bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd},
        impls=[Impl("ours", make(False)), Impl("eager_released", make(True)),
               Impl("compiled_released", make(True, compile_head=True))],
        notes="FamHead: fusion chain with local self-attention and FrequencyAttention projections, MSE per level",
        extra={"levels": len(s_shapes)},
    )


def cases(args, device: torch.device) -> List[Case]:
    device = torch.device(device)
    out: List[Case] = []
    for dtype in _dtypes(args):
        for name, batch, levels in LEVELS:
            for c, s in levels:
                for b in getattr(args, "batches", None) or [batch]:
                    out.append(_op_case(name, int(b), c, s, dtype, device))
    fam_head = _trainer()
    if fam_head is not None and torch.float32 in _dtypes(args):
        for b in getattr(args, "batches", None) or [HEAD[1]]:
            out.append(_head_case(fam_head, int(b), device))
    return out
