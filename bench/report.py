"""Render a bench/run.py results file as a Markdown table (for the README), so that recorded
figures are copied from the output file by a program, never typed by hand.

    python bench/report.py bench/results/cpu.json [--mode fwd+bwd] [--op dct_at_loss]
"""

import argparse
import json


def render(path, mode="fwd+bwd", op=None):
    with open(path) as f:
        data = json.load(f)
    meta, records = data["meta"], data["records"]
    rows = [r for r in records if r["impl"] == "ours" and r["mode"] == mode and (op is None or r["op"] == op)]
    others = list(dict.fromkeys(k for r in rows for k in r["speedup_vs"]))
    lines = [
        f"{meta['device']}, torch {meta['torch']}, {meta['date'][:10]}; copy bandwidth {meta['copy_gbps']:.1f} GB/s; "
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--mode", default="fwd+bwd", choices=["fwd", "bwd", "fwd+bwd"])
    ap.add_argument("--op", default=None)
    args = ap.parse_args()
    print(render(args.path, args.mode, args.op))


if __name__ == "__main__":
    main()
