"""Benchmark suite of one whole distillation training step, as the trainer runs it
(python/dctkd_train): the teacher's forward under no_grad, the student's forward with its feature
hooks (and FAM-KD's head), cross-entropy and the method's terms, the backward, the SGD step (the
trainer's, dctkd_train.optim: torch's fused kernel where the device has one, the same for every impl), and
the gradients set to None as `optimizer.zero_grad()` does. The mode is "step" (no fwd/bwd split); records
carry the images per second beside the median time.

Cases: "cifar_r32x4_r8x4:<method>" (resnet32x4 teacher -> resnet8x4 student, 32x32 images, 100
classes, B=64) for the methods ce, kd, at, dct, dct+kd, dct-paper and fam; on a GPU also
"imagenet_r34_r18:<method>" (torchvision resnet34 -> resnet18, 224x224, 1000 classes, B=128).
Impls: "ours" (the trainer's method on dctkd_ext) and, where the method uses a distillation op,
"eager_released" (the same step with the released formulation: the DCT-KD authors' loss for
dct-paper, the plain-PyTorch reference for dct / dct+kd, attention transfer as RepDistiller and
mdistiller write it for at, and for fam the released head: the authors' FAM module and the local
self-attention that stacks the shifted windows). Weights are random and the data synthetic: the
step's cost does not depend on them. The targets compare steps of different methods in one run
(bench/targets.py, metric "ratio").
"""

import contextlib
import types
from typing import List

import torch
import torch.nn.functional as F

from dctkd_ext import reference as R

try:  # bench/run.py puts bench/ on sys.path
    from common import Case, Impl, Prepared, released_fam
except ImportError:  # pragma: no cover  (imported as bench.suites.train_step from the repository root)
    from bench.common import Case, Impl, Prepared, released_fam

METHODS = ["ce", "kd", "at", "dct", "dct+kd", "dct-paper", "fam"]
# (name, teacher, student, image size, classes, batch); the ImageNet pair runs on a GPU only
SHAPES = [("cifar_r32x4_r8x4", "resnet32x4", "resnet8x4", 32, 100, 64),
          ("imagenet_r34_r18", "resnet34", "resnet18", 224, 1000, 128)]


def _released_dct_at_loss(s, t, preset, weights=None, sample_weight=None, **options):
    """The released (or plain-PyTorch) formulation of the trainer's dct_at_loss call, eager."""
    if options:
        raise ValueError(f"the eager baseline takes no loss options, got {sorted(options)}")
    w = weights if weights is not None else [1.0] * len(s)
    if preset == "paper":
        if len(set(w)) != 1:
            raise ValueError("the released DCT-KD loss has one weight for all levels")
        return w[0] * R.released_dct_loss([x.float() for x in s], [x.float() for x in t], mask=sample_weight)
    if preset == "at":
        if sample_weight is not None or len(set(w)) != 1:
            raise ValueError("attention transfer as released has one weight and no sample weights")
        return w[0] * R.released_at_loss(s, t)
    return R.dct_at_loss(s, t, preset=preset, weights=w, sample_weight=sample_weight)


def _make_step(shape, method_name, released, device):
    from dctkd_train.fam_head import use_released_attention
    from dctkd_train.features import FeatureHooks, probe_feature_shapes
    from dctkd_train.methods import Method, MethodConfig
    from dctkd_train.models import build_model
    from dctkd_train.optim import make_sgd
    from dctkd_train.train import StudentModule

    _name, t_arch, s_arch, size, classes, batch = shape
    torch.manual_seed(0)
    teacher, student = build_model(t_arch, classes, image_size=size), build_model(s_arch, classes, image_size=size)
    method = Method(MethodConfig.make(method_name))
    head = s_layers = t_layers = None
    if method.uses_features:
        s_layers = method.default_layers(student, size, "student")
        t_layers = method.default_layers(teacher, size, "teacher")
        s_shapes = probe_feature_shapes(student, s_layers, size, "cpu")
        t_shapes = probe_feature_shapes(teacher, t_layers, size, "cpu")
        if released and method.fam_cls is not None:
            method.fam_cls = released_fam
        head = method.build_head(s_shapes, t_shapes)
        if released and head is not None:
            use_released_attention(head)
        if released and method.ext is not None:
            method.ext = types.SimpleNamespace(dct_at_loss=_released_dct_at_loss)
    channels_last = device.type == "cuda"
    mem = torch.channels_last if channels_last else torch.contiguous_format
    student.to(device, memory_format=mem)
    teacher.to(device, memory_format=mem).eval().requires_grad_(False)
    if head is not None:
        head.to(device)
    smod = StudentModule(student, s_layers, head, None)
    t_hooks = FeatureHooks(teacher, t_layers) if t_layers else None
    params = [p for p in smod.parameters() if p.requires_grad]
    # the trainer's SGD (fused where the device has the kernel), for ours and the released step alike
    opt = make_sgd(params, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=False, device=device,
                   grad_scaler=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=mem)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def step():
        with autocast:
            with torch.no_grad():
                t_logits = teacher(x)
                t_feats = t_hooks.pop() if t_hooks is not None else None
            s_logits, s_feats, head_out = smod(x)
        s_logits = s_logits.float()
        ce = F.cross_entropy(s_logits, y)
        terms = method.distill_terms(y, s_logits, s_feats, head_out, t_logits.float(), t_feats, epoch=1)
        loss = method.total(ce, terms, epoch=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Prepared(fwd=None, leaves=[], step=step)


def cases(args, device: torch.device) -> List[Case]:
    device = torch.device(device)
    out: List[Case] = []
    for shape in SHAPES:
        name, *_rest, batch = shape
        if name.startswith("imagenet") and device.type != "cuda":
            continue
        for b in getattr(args, "batches", None) or [batch]:
            shape_b = (*shape[:-1], b)
            for method in METHODS:
                impls = [Impl("ours", lambda s=shape_b, m=method: _make_step(s, m, False, device))]
                if method not in ("ce", "kd"):
                    impls.append(Impl("eager_released", lambda s=shape_b, m=method: _make_step(s, m, True, device)))
                out.append(Case(op="train_step", shape_name=f"{name}:{method}", batch=b,
                                dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                min_bytes={"step": 0}, impls=impls, modes=("step",),
                                notes="one SGD step: teacher fwd (no_grad), student fwd+bwd, losses, optimizer",
                                extra={"method": method}))
    return out
