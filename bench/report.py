"""Render a bench/run.py results file as a Markdown table (for the README), so that recorded
figures are copied from the output file by a program, never typed by hand.

    python bench/report.py bench/results/cpu.json [--mode fwd+bwd] [--op dct_at_loss]
    python bench/report.py bench/results/cpu.json --targets     # the targets of bench/targets.py, met or not
    python bench/report.py bench/results/cpu.json --steps       # the training steps (suite train_step)
    python bench/report.py bench/results/cpu.json --all         # targets, steps, then a table per op
"""

import argparse
import json


def _run_line(meta):
    """Where and when the run was made: device (and CPU model where recorded), torch, date."""
    cpu = f" on {meta['cpu']}" if meta.get("cpu") else ""
    return f"{meta['device']}{cpu}, torch {meta['torch']}, {meta['date'][:10]}"


def render(path, mode="fwd+bwd", op=None):
    with open(path) as f:
        data = json.load(f)
    meta, records = data["meta"], data["records"]
    rows = [r for r in records if r["impl"] == "ours" and r["mode"] == mode and (op is None or r["op"] == op)]
    others = list(dict.fromkeys(k for r in rows for k in r["speedup_vs"]))
    lines = [
        f"{_run_line(meta)}; copy bandwidth {meta['copy_gbps']:.1f} GB/s; "
        f"mode {mode}; source `{path}`",
        "",
        "| op | shape | B | dtype | ours ms | GB/s | of copy bw | peak extra MiB | " + " | ".join(f"vs {o}" for o in others) + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(others),
    ]
    for r in rows:
        mem = f"{r['peak_mem_mb']:.1f}" if r.get("peak_mem_mb") is not None else "-"
        sp = " | ".join(f"{r['speedup_vs'][o]:.2f}x" if o in r["speedup_vs"] else "-" for o in others)
        lines.append(f"| {r['op']} | {r['shape_name']} | {r['batch']} | {r['dtype']} | {r['median_ms']:.2f} | "
                     f"{r['gbps']:.1f} | {100 * r['bw_fraction']:.0f}% | {mem} | {sp} |")
    return "\n".join(lines)


def _find(records, t, impl):
    mode = "step" if t["op"] == "train_step" else "fwd+bwd"
    for r in records:
        if (r["op"], r["shape_name"], r["batch"], r["dtype"], r["mode"], r["impl"]) == (
                t["op"], t["shape"], t["batch"], t["dtype"], mode, impl):
            return r
    return None


def check_targets(data, targets):
    """(target, measured value or None, met) for every target; None where the run lacks the case."""
    out = []
    for t in targets:
        ours = _find(data["records"], t, "ours")
        value = None
        if ours is not None and t["metric"] == "speedup":
            value = ours["speedup_vs"].get(t["vs"])
        elif ours is not None and t["metric"] == "bw":
            value = ours["bw_fraction"]
        elif ours is not None and t["metric"] == "ratio":
            other = (_find(data["records"], t, t["vs"]) if t.get("vs") else
                     _find(data["records"], dict(t, shape=t["of"]), "ours"))
            if other is not None and ours["median_ms"] == ours["median_ms"] and other["median_ms"] > 0:
                value = ours["median_ms"] / other["median_ms"]
        elif ours is not None and t["metric"] == "mem":
            other = _find(data["records"], t, t["vs"])
            if other is not None and ours.get("peak_mem_mb") is not None and other.get("peak_mem_mb"):
                value = ours["peak_mem_mb"] / other["peak_mem_mb"]
        at_most = t["metric"] in ("mem", "ratio")
        met = None if value is None else (value <= t["goal"] if at_most else value >= t["goal"])
        out.append((t, value, met))
    return out


def render_targets(path):
    from targets import TARGETS

    with open(path) as f:
        data = json.load(f)
    meta = data["meta"]
    kind = "cpu" if meta["device"].startswith("cpu") else "cuda"
    what = {"speedup": "speed-up over {vs}", "bw": "fraction of copy bandwidth", "mem": "peak extra memory / {vs}'s",
            "ratio": "time / ours at {of}", "ratio_vs": "time / {vs}'s"}
    lines = [f"Targets ({kind}; forward+backward, or the whole step for train_step; source `{path}`):", "",
             "| op | shape | B | dtype | measure | goal | measured | met |", "|---|---|---|---|---|---|---|---|"]
    for t, value, met in check_targets(data, TARGETS.get(kind, [])):
        goal = ("<= " if t["metric"] in ("mem", "ratio") else ">= ") + (f"{t['goal']:.0%}" if t["metric"] == "bw" else f"{t['goal']:g}")
        shown = "-" if value is None else (f"{value:.0%}" if t["metric"] == "bw" else f"{value:.2f}")
        measure = what["ratio_vs" if t["metric"] == "ratio" and t.get("vs") else t["metric"]].format(**t)
        lines.append(f"| {t['op']} | {t['shape']} | {t['batch']} | {t['dtype']} | {measure} | "
                     f"{goal} | {shown} | {'not in this run' if met is None else ('yes' if met else 'no')} |")
    return "\n".join(lines)


def render_steps(path):
    """The train_step records: per method, ours and the released formulation in ms and img/s, and ours
    against the KD step of the same run."""
    with open(path) as f:
        data = json.load(f)
    meta, records = data["meta"], data["records"]
    steps = [r for r in records if r["op"] == "train_step" and r["mode"] == "step"]
    if not steps:
        return ""
    lines = [f"{_run_line(meta)}; one SGD step; source `{path}`", "",
             "| shape | B | method | ours ms | ours img/s | released ms | ours vs released | ours / ours kd |",
             "|---|---|---|---|---|---|---|---|"]

    def find(shape, impl):
        return next((r for r in steps if r["shape_name"] == shape and r["impl"] == impl and not r.get("error")), None)

    for r in steps:
        if r["impl"] != "ours" or r.get("error"):
            continue
        base, _, method = r["shape_name"].partition(":")
        released, kd = find(r["shape_name"], "eager_released"), find(f"{base}:kd", "ours")
        ms = r["median_ms"]
        rel_ms = f"{released['median_ms']:.0f}" if released else "-"
        speedup = f"{released['median_ms'] / ms:.2f}x" if released else "-"
        of_kd = f"{ms / kd['median_ms']:.2f}" if kd else "-"
        lines.append(f"| {base} | {r['batch']} | {method} | {ms:.0f} | {r['img_per_s']:.1f} | {rel_ms} | {speedup} | {of_kd} |")
    return "\n".join(lines)


def render_all(path):
    """Everything a results file holds, as Markdown: the targets, the training steps, a table per op."""
    with open(path) as f:
        ops = list(dict.fromkeys(r["op"] for r in json.load(f)["records"] if r["op"] != "train_step"))
    parts = [render_targets(path), render_steps(path)] + [render(path, "fwd+bwd", op) for op in ops]
    return "\n\n".join(p for p in parts if p)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--mode", default="fwd+bwd", choices=["fwd", "bwd", "fwd+bwd"])
    ap.add_argument("--op", default=None)
    ap.add_argument("--targets", action="store_true", help="the targets of bench/targets.py, met or not")
    ap.add_argument("--steps", action="store_true", help="the training steps of suite train_step")
    ap.add_argument("--all", action="store_true", help="targets, steps, and a table per op")
    args = ap.parse_args()
    if args.all:
        print(render_all(args.path))
    elif args.steps:
        print(render_steps(args.path))
    else:
        print(render_targets(args.path) if args.targets else render(args.path, args.mode, args.op))


if __name__ == "__main__":
    main()
