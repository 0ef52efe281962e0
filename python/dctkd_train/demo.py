"""``python -m dctkd_train demo``: a teacher and CE, KD, AT, DCT, DCT+KD, the released DCT-KD
(with and without KD) and the released FAM-KD students on synthetic-scenes, with a results table
(top-1, top-5, MCA, the time the distillation loss took, training throughput).

At ``--budget 1`` it takes about 20 minutes on 2 CPU cores (``fam`` about a quarter of it);
``--budget B`` scales the number of training images (and so the time) by B. Every run is an
ordinary ``train`` run in OUT/<name>/ with its own metrics.jsonl, checkpoints and curves.png.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .checkpoint import atomic_write, write_json
from .errors import UserError
from .methods import REGISTRY, method_available

# The demo's fixed setting. The budget scales the training set (and so the images seen); the
# epochs stay fixed so the schedules keep their shape.
DEMO = {
    "image_size": 32,
    "classes": 40,
    "train": 5000,
    "val": 2000,
    "teacher_model": "resnet20",
    "student_model": "resnet8",
    "teacher_epochs": 10,
    "student_epochs": 6,
    "batch_size": 64,
    "lr": 0.05,
    "schedule": "cosine",
}
DEFAULT_METHODS = ("ce", "kd", "at", "dct", "dct+kd", "dct-paper", "dct-paper+kd", "fam")


def demo_plan(budget: float, seed: int = 0, teacher_model: str | None = None, student_model: str | None = None,
              epochs: int | None = None) -> dict:
    if not budget > 0:
        raise UserError(f"--budget must be > 0, got {budget}")
    n_train = max(DEMO["classes"] * 4, int(round(DEMO["train"] * budget)))
    n_val = max(DEMO["classes"] * 2, min(DEMO["val"], int(round(DEMO["val"] * max(budget, 0.1)))))
    data = (f"synthetic-scenes:size={DEMO['image_size']},classes={DEMO['classes']},"
            f"train={n_train},val={n_val},seed={seed}")
    plan = {**DEMO, "data": data, "n_train": n_train, "n_val": n_val, "budget": budget}
    if teacher_model:
        plan["teacher_model"] = teacher_model
    if student_model:
        plan["student_model"] = student_model
    if epochs:
        plan["teacher_epochs"] = plan["student_epochs"] = int(epochs)
    return plan


def _fmt_table(rows: list[dict]) -> str:
    head = ("| run | model | method | top-1 | top-5 | MCA | loss time (s) | loss ms/step | train time (s) | img/s |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        distill = r["method"] != "ce"  # ce has no distillation loss to time
        lt = f"{r['loss_time_s']:.2f}" if distill else "-"
        lms = f"{r['loss_ms_per_step']:.2f}" if distill else "-"
        lines.append(
            f"| {r['run']} | {r['model']} | {r['method']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['mca']:.2f} | "
            f"{lt} | {lms} | {r['train_time_s']:.0f} | {r['images_per_sec']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def run_demo(out: str = "runs/demo", budget: float = 1.0, device: str = "auto", methods: str | None = None,
             seed: int = 0, workers: int | None = None, resume: bool = False, quiet: bool = False,
             teacher_model: str | None = None, student_model: str | None = None, epochs: int | None = None) -> dict:
    from .train import train

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("run the demo as one process (python -m dctkd_train demo), not under torchrun")
    plan = demo_plan(budget, seed, teacher_model, student_model, epochs)
    if methods:
        wanted = [m.strip() for m in methods.split(",") if m.strip()]
        bad = [m for m in wanted if m not in REGISTRY]
        if bad:
            raise UserError(f"unknown method(s) {', '.join(bad)}; methods: {', '.join(REGISTRY)}")
    else:
        wanted = list(DEFAULT_METHODS)
    skipped = [m for m in wanted if not method_available(m)]
    if skipped and not quiet:
        fam_only = all(REGISTRY[m].feature_kind == "fam" for m in skipped)
        print(f"demo: skipping {', '.join(skipped)} (not available in this install: "
              f"{'fam needs dctkd_ext.nn.FrequencyAttention' if fam_only else 'dctkd_ext is not built'})")
    if skipped and methods:
        # asked for explicitly: say why it cannot run
        raise UserError(f"demo: method(s) {', '.join(skipped)} cannot run in this install"
                        + (" (fam needs dctkd_ext.nn.FrequencyAttention, which the installed dctkd_ext does not provide)"
                           if any(REGISTRY[m].feature_kind == "fam" for m in skipped) else ""))
    wanted = [m for m in wanted if m not in skipped]

    out_dir = Path(out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    common = {
        "data": plan["data"], "device": device, "batch_size": plan["batch_size"], "lr": plan["lr"],
        "schedule": plan["schedule"], "seed": seed, "workers": workers, "quiet": quiet,
        "progress": not quiet,
    }
    if not quiet:
        print(f"demo: budget {budget:g}: {plan['data']}; teacher {plan['teacher_model']} "
              f"({plan['teacher_epochs']} epochs), students {plan['student_model']} ({plan['student_epochs']} epochs): "
              f"{', '.join(wanted)}", flush=True)

    def run(name: str, cfg: dict) -> dict:
        d = out_dir / name
        summ = d / "summary.json"
        if resume and summ.is_file():
            s = json.loads(summ.read_text())
            if all(s.get(k) == cfg[k] for k in ("data", "epochs", "method", "model")):
                if not quiet:
                    print(f"demo: reusing {d}")
                return s
        if not quiet:
            print(f"\n=== {name}: {cfg['model']} / {cfg['method']} ===", flush=True)
        if resume and (d / "last.pt").is_file():
            try:
                return train({**cfg, "out": str(d), "resume": True})
            except UserError as e:  # a different setting: start that run over
                if not quiet:
                    print(f"demo: cannot resume {d} ({e}); starting it over")
        return train({**cfg, "out": str(d), "overwrite": True})

    rows = []
    teacher = run("teacher", {**common, "model": plan["teacher_model"], "method": "ce", "epochs": plan["teacher_epochs"]})
    teacher_ckpt = str(out_dir / "teacher" / "best.pt")

    def row(name, s):
        b = s["final"]
        return {"run": name, "model": s["model"], "method": s["method"], "top1": b["val_top1"], "top5": b["val_top5"],
                "mca": b["val_mca"], "loss_time_s": s["loss_time_s"],
                "loss_ms_per_step": 1000 * s["loss_time_s"] / max(1, s.get("steps", 0)),
                "train_time_s": s["train_time_s"], "best_top1": s["best"]["val_top1"],
                # every epoch trains on every image (one process): training images over the epochs' wall time
                "images_per_sec": s["epochs"] * plan["n_train"] / max(s["train_time_s"], 1e-9)}

    rows.append(row("teacher", teacher))
    for m in wanted:
        s = run(f"student-{m.replace('+', '_')}", {**common, "model": plan["student_model"], "method": m,
                                                    "teacher": teacher_ckpt, "epochs": plan["student_epochs"]})
        rows.append(row("student", s))
    wall = time.perf_counter() - t0
    cmd = f"python -m dctkd_train demo --budget {budget:g}"
    for flag, val, default in (("--methods", methods, None), ("--teacher-model", teacher_model, None),
                               ("--student-model", student_model, None), ("--epochs", epochs, None),
                               ("--seed", seed, 0), ("--device", device, "auto")):
        if val is not None and val != default:
            cmd += f" {flag} {val}"
    env = f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads" if not torch.cuda.is_available() or device == "cpu" \
        else f"torch {torch.__version__}, {torch.cuda.get_device_name()}"
    md = (f"Demo results ({plan['data']}; teacher {plan['teacher_model']}, students {plan['student_model']}, "
          f"{plan['student_epochs']} epochs; {env}; {wall / 60:.1f} min in all).\n"
          f"Command: `{cmd}`. Accuracies are the final epoch's on the validation split, in %; "
          f"loss time is the wall time of the distillation-loss calls (forward) over the whole run; "
          f"img/s is the training throughput (student, teacher and loss, forward and backward).\n\n"
          + _fmt_table(rows))
    result = {"plan": plan, "rows": rows, "wall_time_s": wall, "command": cmd, "environment": env,
              "skipped": skipped}
    write_json(result, out_dir / "results.json")
    atomic_write(out_dir / "results.md", lambda f: f.write(md), mode="w")
    print("\n" + md, flush=True)
    return result
