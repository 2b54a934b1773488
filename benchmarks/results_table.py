"""Markdown tables of a finished (or running) evaluation folder, as the README shows them:
accuracy, needle survival and measured bytes per method x budget x task, and the paired
comparisons of the folder's paired.json (or of --pairs).

    python benchmarks/results_table.py results/grkv_4k
    python benchmarks/results_table.py results/smollm2_4k --values accuracy --interval
    python benchmarks/results_table.py results/grkv_4k --pairs grkv:critical_adakv grkv:cam

Records come from DIR/results.json; with --partial, the finished batches of DIR/partial.json of
a sweep still running are shown too, marked * (over those batches only).
"""
from __future__ import annotations

import argparse
import json
import os

from jaxkv.eval import (PAIRED_FILE, PARTIAL_FILE, load_results, markdown_grid, markdown_paired,
                        paired_comparisons)
from jaxkv.eval.report import MARKDOWN_VALUES


def partial_records(out_dir: str) -> list:
    """Records of the finished batches in out_dir/partial.json (accuracy and needle survival
    over those batches only; n their prompt count)."""
    path = os.path.join(out_dir, PARTIAL_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        partial = json.load(f)
    out = []
    for key, batches in partial.items():
        task, length, method, budget = json.loads(key)[:4]
        scores, survival, cache, full = [], [], 0.0, 0.0
        for part in batches.values():
            scores += part["scores"]
            survival += [s for s in part.get("needle_survival") or [] if s is not None]
            cache, full = cache + part["cache_bytes"], full + part["full_bytes"]
        if scores:
            out.append(dict(task=task, length=length, method=method, budget=budget, partial=True,
                            n=len(scores), accuracy=sum(scores) / len(scores),
                            needle_survival_mean=sum(survival) / len(survival) if survival
                            else None, measured_budget=cache / full if full else None))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="an evaluation folder (results.json, paired.json)")
    ap.add_argument("--values", nargs="+", default=list(MARKDOWN_VALUES), choices=MARKDOWN_VALUES)
    ap.add_argument("--interval", action="store_true", help="Wilson intervals on accuracy")
    ap.add_argument("--pairs", nargs="*", default=None, metavar="A:B",
                    help="paired comparisons to compute (default: the folder's paired.json)")
    ap.add_argument("--partial", action="store_true",
                    help="also show the finished batches of a sweep still running")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.folder):
        raise SystemExit(f"{args.folder}: not a folder")
    records = load_results(args.folder)
    shown = records + (partial_records(args.folder) if args.partial else [])
    if any(r.get("partial") for r in shown):
        print("* over the finished batches of a sweep still running")
    for value in args.values:
        print(f"\n{value}:\n")
        print(markdown_grid(shown, value, interval=args.interval))
    if args.pairs is not None:
        pairs = []
        for p in args.pairs:
            if p.count(":") != 1:
                raise SystemExit(f"--pairs {p!r}: give A:B (two method labels)")
            pairs.append(tuple(p.split(":")))
        rows = paired_comparisons(records, pairs)
    else:
        path = os.path.join(args.folder, PAIRED_FILE)
        rows = json.load(open(path)) if os.path.exists(path) else []
    if rows:
        print("\npaired (A - B, bootstrap 95%; bold: above zero):\n")
        print(markdown_paired(rows))


if __name__ == "__main__":
    main()
