"""Command line: ``python -m dctkd_train train|evaluate|demo`` (see docs/TRAINER.md)."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import EXIT_STOPPED, TrainingStopped, UserError

EPILOG_MODELS = ("models: resnet8 resnet14 resnet20 resnet32 resnet44 resnet56 resnet110 resnet8x4 resnet32x4 "
                 "wrn16_1 wrn16_2 wrn40_1 wrn40_2; with torchvision: resnet18 resnet34 resnet50 mobilenet_v2, or any "
                 "classifier as tv:NAME; with timm: timm:NAME (random init; no downloads). "
                 "methods: ce kd at dct dct-paper dct+kd dct-paper+kd fam fam-abf. "
                 "recipes: dctkd-scenes dctkd-cifar famkd-cifar famkd-imagenet. "
                 "data: synthetic-scenes[:size=32,classes=20,train=10000,val=2000,seed=0] | cifar100:DIR | "
                 "cifar10:DIR | imagefolder:DIR")


def _csv_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _resume_mode(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"expected nothing or 'auto', got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dctkd_train",
        description="Thin distillation trainer built on the fused losses of dctkd_ext.",
        epilog="Run `python -m dctkd_train COMMAND --help` for the options of a command. " + EPILOG_MODELS,
    )
    sub = p.add_subparsers(dest="command", metavar="{train,evaluate,demo}")
    sub.required = True

    # ------------------------------------------------------------------ train
    t = sub.add_parser("train", help="train a model (a teacher with --method ce, or a student by distillation)",
                       epilog=EPILOG_MODELS, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = t.add_argument_group("run")
    g.add_argument("--data", required=True, metavar="SPEC", help="data set (see below)")
    g.add_argument("--model", required=True, metavar="NAME", help="student (or teacher) architecture")
    g.add_argument("--method", metavar="M", help="ce (default) | kd | at | dct | dct-paper | dct+kd | dct-paper+kd | "
                   "fam | fam-abf")
    g.add_argument("--recipe", choices=("dctkd-scenes", "dctkd-cifar", "famkd-cifar", "famkd-imagenet"),
                   help="a paper's released training settings (optimiser, lr, batch, epochs, schedule, weight decay, "
                   "warm-ups, fp32, crops); flags given explicitly override them (see docs/TRAINER.md)")
    g.add_argument("--teacher", metavar="CKPT", help="teacher checkpoint (from `train --method ce`, or a "
                   "RepDistiller/mdistiller state dict with --teacher-model)")
    g.add_argument("--teacher-model", metavar="NAME", help="teacher architecture, for checkpoints that do not name it")
    g.add_argument("--epochs", type=_positive_int, help="epochs (default: the recipe's, 240 CIFAR-style / 100 ImageNet-style)")
    g.add_argument("--batch-size", type=_positive_int, help="images per process and step (default 64)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder")
    g.add_argument("--resume", nargs="?", const=True, default=None, type=_resume_mode, metavar="auto",
                   help="continue the run in DIR from DIR/last.pt (also from inside an epoch); `--resume auto`: "
                   "continue it when DIR/last.pt exists, else start (for jobs a scheduler restarts). A worker "
                   "that torchrun --max-restarts restarts resumes its job's last.pt by itself")
    g.add_argument("--save-every", type=_nonneg_int, metavar="N",
                   help="also write DIR/last.pt every N optimiser steps, with the position in the epoch, so a "
                   "crash loses at most N steps (default: at epoch ends only). SIGTERM or SIGINT always finish "
                   f"the step, write last.pt and exit with status {EXIT_STOPPED}")
    g.add_argument("--overwrite", action="store_true", help="start over in a DIR that already holds a run")
    g.add_argument("--seed", type=int, help="seed of the initialisation, data order and augmentation (default 0)")
    g.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic algorithms (with --seed: the same run gives the same weights on the same machine)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    g.add_argument("--quiet", action="store_true", default=None, help="print nothing but errors")

    g = t.add_argument_group("optimisation (defaults: the papers' SGD recipes)")
    g.add_argument("--lr", type=float, help="learning rate (CIFAR-style 0.05; ImageNet-style 0.1 per 256 images)")
    g.add_argument("--momentum", type=float, help="SGD momentum (0.9)")
    g.add_argument("--weight-decay", "--wd", type=float, dest="weight_decay", help="weight decay (5e-4 / 1e-4)")
    g.add_argument("--schedule", choices=("step", "cosine"), help="learning-rate schedule (step)")
    g.add_argument("--milestones", type=_csv_ints, help="step epochs, e.g. 150,180,210 (default: the recipe's, "
                   "scaled to --epochs)")
    g.add_argument("--lr-decay", type=float, help="step factor (0.1)")
    g.add_argument("--warmup-epochs", type=_nonneg_int, help="linear learning-rate warm-up epochs (0)")
    g.add_argument("--nesterov", action="store_true", default=None)
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), help="mixed precision (auto: bf16 on GPUs "
                   "that have it, fp16 on older GPUs, none on CPU)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the student and teacher")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA)")
    g.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under DDP")
    g.add_argument("--workers", type=_nonneg_int, help="data-loader workers (default: 0 for in-memory data on CPU)")

    g = t.add_argument_group("data")
    g.add_argument("--train-size", type=_positive_int, help="use a class-balanced subset of N training images")
    g.add_argument("--val-size", type=_positive_int, help="use a class-balanced subset of N validation images")
    g.add_argument("--image-size", type=_positive_int, help="image side (imagefolder: 224; synthetic-scenes: 32)")

    g = t.add_argument_group("loss (defaults per method; see docs/TRAINER.md)")
    g.add_argument("--ce-weight", type=float, help="weight of cross-entropy (beta)")
    g.add_argument("--kd-weight", type=float, help="weight of Hinton KD (delta)")
    g.add_argument("--feat-weight", type=float, help="weight of the feature term: DCT (alpha), AT (1000), FAM")
    g.add_argument("--kd-temperature", "-T", type=float, help="KD temperature (4)")
    g.add_argument("--guide", action=argparse.BooleanOptionalAction, default=None,
                   help="teacher-prediction guide: only samples the teacher gets right count in the DCT loss "
                   "(default: on for dct-paper and dct-paper+kd, and as the recipe says)")
    g.add_argument("--level-weights", type=_csv_floats, help="per-level weights of the DCT/AT loss, e.g. 1,1,2")
    g.add_argument("--loss-preset", metavar="NAME", help="the dct_at_loss preset of at/dct/dct-paper/dct+kd/"
                   "dct-paper+kd instead of the method's own, e.g. fft-real-minmax: the DCT-KD release's main-branch "
                   "loss (dct-paper: fft-abs-max, also named paper, the dev-branch loss)")
    g.add_argument("--loss-opt", action="append", metavar="KEY=VALUE",
                   help="override a dct_at_loss option, e.g. --loss-opt distance=mse (repeatable)")
    g.add_argument("--student-layers", metavar="A,B,C", help="student layers to hook (default: stage outputs)")
    g.add_argument("--teacher-layers", metavar="A,B,C", help="teacher layers to hook (default: stage outputs)")
    g.add_argument("--stages", metavar="S1,S2,...", help="stages to distil, for student and teacher, by name or by "
                   "index into the model's stage list (timm:/tv: models: feature_info modules / graph nodes)")
    g.add_argument("--feat-warmup", type=_nonneg_int, help="epochs of linear warm-up of the feature weight "
                   "(fam: 20 of 240, scaled to --epochs)")
    g.add_argument("--fam-mid-channels", type=_positive_int, help="fam-abf: channels of the fusion (64); fam uses "
                   "the student's widths, as released")
    g.add_argument("--fam-cuton", type=float, help="fam, fam-abf: high-pass cut-on of FrequencyAttention (0.1)")
    g.add_argument("--fam-student-preact", action=argparse.BooleanOptionalAction, default=None,
                   help="fam: the student's pre-ReLU stage outputs (default: the released pair's setting)")
    g.add_argument("--fam-pooled-target", action=argparse.BooleanOptionalAction, default=None,
                   help="fam: compare the pooled level with the teacher's pooled feature (default: the released "
                   "setting, on for CIFAR pairs, off for resnet34->resnet18)")
    g.add_argument("--no-eval-teacher", dest="eval_teacher", action="store_false", default=None,
                   help="skip evaluating the teacher before training")

    # ------------------------------------------------------------------ evaluate
    e = sub.add_parser("evaluate", help="top-1, top-5 and mean class accuracy of a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--checkpoint", required=True, metavar="CKPT")
    e.add_argument("--data", required=True, metavar="SPEC")
    e.add_argument("--model", metavar="NAME", help="architecture, for checkpoints that do not name it")
    e.add_argument("--batch-size", type=_positive_int, default=256)
    e.add_argument("--device", default="auto")
    e.add_argument("--workers", type=_nonneg_int)
    e.add_argument("--val-size", type=_positive_int)
    e.add_argument("--image-size", type=_positive_int)
    e.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="none")
    e.add_argument("--json", metavar="FILE", help="also write the result as JSON")

    # ------------------------------------------------------------------ demo
    d = sub.add_parser("demo", help="teacher + CE/KD/AT/DCT/DCT+KD/released DCT-KD and FAM-KD students on "
                       "synthetic-scenes",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", default="runs/demo", metavar="DIR")
    d.add_argument("--budget", type=float, default=1.0,
                   help="scales the training images seen (1: about 20 minutes on 2 CPU cores)")
    d.add_argument("--device", default="auto")
    d.add_argument("--methods", help="comma-separated students (default: ce,kd,at,dct,dct+kd,dct-paper,"
                   "dct-paper+kd,fam)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=_nonneg_int)
    d.add_argument("--resume", action="store_true", help="reuse the runs that already finished in DIR")
    d.add_argument("--teacher-model", metavar="NAME", help="teacher architecture (default: the demo's)")
    d.add_argument("--student-model", metavar="NAME", help="student architecture (default: the demo's)")
    d.add_argument("--epochs", type=_positive_int, help="epochs of every run (default: the demo's)")
    d.add_argument("--quiet", action="store_true")
    return p


def _train_config(ns: argparse.Namespace) -> dict:
    cfg = {k: v for k, v in vars(ns).items() if k != "command"}
    return cfg


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .train import train

        summary = train(_train_config(args))
        if int(os.environ.get("RANK", "0")) == 0 and not args.quiet and summary.get("best"):
            b = summary["best"]
            print(f"best val top-1 {b['val_top1']:.2f} (epoch {b['epoch']}); outputs in {summary['out']}")
        return 0
    if args.command == "evaluate":
        from .checkpoint import write_json
        from .train import evaluate_checkpoint

        res = evaluate_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size, device=args.device,
                                  workers=args.workers, val_size=args.val_size, amp=args.amp,
                                  image_size=args.image_size, model=args.model)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{res['arch']} on {res['data']} ({res['n']} images): top-1 {res['top1']:.2f}  "
                  f"top-5 {res['top5']:.2f}  MCA {res['mca']:.2f}  CE {res['loss']:.4f}")
            if args.json:
                write_json(res, args.json)
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(out=args.out, budget=args.budget, device=args.device, methods=args.methods, seed=args.seed,
                 workers=args.workers, resume=args.resume, quiet=args.quiet, teacher_model=args.teacher_model,
                 student_model=args.student_model, epochs=args.epochs)
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except UserError as e:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingStopped as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(str(e), file=sys.stderr, flush=True)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("interrupted (last.pt holds the last checkpoint written; --resume continues it)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
