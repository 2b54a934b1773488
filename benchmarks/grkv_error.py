"""Attention-output error on held-out queries: GRKV against no merging and the merging baselines,
all at the same retention (Critical-AdaKV) and budget, on the embedded long-context prompts (the
forms of configs/tiny.py BENCHMARK_TASKS, at --length tokens).

    python benchmarks/grkv_error.py [--model jaxkv/assets/tiny] [--budgets 0.1 0.2] [--n 16]

Per layer, relative error ||out_compressed - out_full|| / ||out_full|| over held-out queries
(prompt queries at random positions away from GRKV's 32 reference positions and the observation
window, re-rotated to the last position, plus the last prompt token's query). Prints a table and
writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os

import jax.numpy as jnp
import numpy as np

import jaxkv
from jaxkv.diagnostics import held_out_errors, spread_positions
from jaxkv.policies.base import last_positions
from jaxkv.policies.grkv import reference_positions
from jaxkv.policies.registry import make_policy
from jaxkv.tasks import make_task
from jaxkv.tasks.batching import pad_prompts

METHODS = ("critical_adakv", "cam", "nearest_merge", "kvmerger", "grkv")
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "passkey")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--n", type=int, default=16, help="prompts per task")
    ap.add_argument("--length", type=int, default=224)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--held-out", type=int, default=32)
    ap.add_argument("--out", default="runs/grkv_error.json")
    args = ap.parse_args(argv)
    if args.model is None:
        from jaxkv.embedded import load_embedded
        model = load_embedded()  # the shipped in-house model, jaxkv/assets/tiny
    else:
        model = jaxkv.load_hf(args.model)
    from configs.tiny import BENCHMARK_TASKS
    forms = {t.name: dict(t.settings, length=args.length) for t in BENCHMARK_TASKS
             if t.name in TASKS}
    rng = np.random.default_rng(0)
    results = {}
    for budget in args.budgets:
        policies = {m: make_policy(m, budget, model, window=args.window) for m in METHODS}
        per_method = {m: [] for m in METHODS}
        for task_name in TASKS:
            task = make_task(task_name, **forms[task_name])
            exs = [task.sample(rng) for _ in range(args.n)]
            ids = [model.tokenizer.encode(e.prompt) for e in exs]
            tokens, lengths = pad_prompts(ids)
            lengths = jnp.asarray(lengths)
            avoid = [reference_positions(lengths, 32), last_positions(lengths, args.window)]
            held = spread_positions(lengths, args.held_out, avoid, seed=1)
            errs = held_out_errors(model, tokens, lengths, policies, held)
            for m in METHODS:
                per_method[m].append(errs[m])
        results[str(budget)] = {m: np.mean(np.stack(v), axis=0).tolist()
                                for m, v in per_method.items()}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model or "embedded", "window": args.window, "n_per_task": args.n,
                   "tasks": TASKS, "relative_error_per_layer": results}, f, indent=1)
    print(f"relative attention-output error on held-out queries (mean over {len(TASKS)} tasks x "
          f"{args.n} prompts), per layer and mean")
    for budget, table in results.items():
        print(f"budget {budget}")
        for m, errs in table.items():
            print(f"  {m:16s} " + " ".join(f"{e:.4f}" for e in errs) + f"  mean {np.mean(errs):.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
