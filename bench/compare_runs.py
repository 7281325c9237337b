#!/usr/bin/env python
"""Before/after table of ``bench_tuner.py --json`` runs of two code versions (the paired ratios of each run).

    python bench/compare_runs.py --before a1.json a2.json --after b1.json b2.json

Ratios within one run (ours/stock, ours/LoRA, ...) are paired per repeat and cancel most of the machine's drift;
runs of the two versions should alternate (before, after, before, after) so drift between runs cancels too.
"""

import argparse
import json
import statistics


def rows(paths):
    out = {}
    for p in paths:
        d = json.load(open(p))
        for c in d.get("layer", []):
            key = f"layer {c['d_in']}->{c['d_out']} n={c['n']} r={c['r']}"
            for k in ("ours/stock", "ours/lora", "ours/base"):
                out.setdefault((key, k), []).append(c["ratios"][k][0])
            out.setdefault((key, "ours fwd+bwd ms"), []).append(c["median_ms"]["ours"]["total"])
        for c in d.get("model", []):
            key = f"step {c['model']}"
            for k in ("ours/stock", "ours/lora"):
                out.setdefault((key, k), []).append(c["ratios"][k][0])
            out.setdefault((key, "ours step s"), []).append(c["median_s"]["ours"]["total"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", nargs="+", required=True)
    ap.add_argument("--after", nargs="+", required=True)
    args = ap.parse_args()
    before, after = rows(args.before), rows(args.after)
    print("| cell | quantity | before (runs) | after (runs) | after/before (medians) |")
    print("|---|---|---|---|---|")
    for key in before:
        b, a = before[key], after.get(key, [])
        fmt = lambda v: ", ".join(f"{x:.3g}" for x in v)  # noqa: E731
        ratio = statistics.median(a) / statistics.median(b) if a else float("nan")
        print(f"| {key[0]} | {key[1]} | {fmt(b)} | {fmt(a)} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
