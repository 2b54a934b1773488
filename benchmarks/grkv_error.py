"""Attention-output error on held-out queries: GRKV against no merging and the merging baselines,
all at the same retention (Critical-AdaKV) and budget: on the in-house model its retrieval
prompts (the forms of configs/tiny.py BENCHMARK_TASKS, at --length tokens); on a real model the
real-text tasks (passkey, niah_single_2, niah_multikey_1, niah_multivalue, vt) at --length tokens.

    python benchmarks/grkv_error.py [--model tiny] [--budgets 0.1 0.2] [--n 16]
    python benchmarks/grkv_error.py --model smollm2-135m-instruct --length 4096 --n 4 --window 32

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

from tqdm.auto import tqdm

import jaxkv
from jaxkv.diagnostics import held_out_errors, spread_positions
from jaxkv.policies.base import last_positions
from jaxkv.policies.grkv import reference_positions
from jaxkv.eval.config import split_method
from jaxkv.policies.registry import make_policy
from jaxkv.tasks import make_task
from jaxkv.tasks.batching import pad_prompts

# GRKV keeps Critical-AdaKV's tokens in spans of 10 (as do the merging baselines, by default):
# critical_adakv[span=10] is that retention with the kept keys and values unchanged, the token-level
# critical_adakv the method as its authors define it
METHODS = ("critical_adakv", "critical_adakv[span=10]", "cam", "nearest_merge", "kvmerger", "grkv")
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "passkey")
TEXT_TASKS = ("passkey", "niah_single_2", "niah_multikey_1", "niah_multivalue", "vt")


def task_prompts(model, task_name: str, n: int, length: int, rng, forms):
    """Token ids of n prompts of one task: in-house tasks for the in-house model, real-text
    tasks (seeded from rng) for any other."""
    from jaxkv.eval.prompts import EMBEDDED, task_suite
    if task_suite(model) == EMBEDDED:
        task = make_task(task_name, **forms[task_name])
        return [model.tokenizer.encode(task.sample(rng).prompt) for _ in range(n)]
    from jaxkv.tasks.text import make_text_examples
    seed = int(rng.integers(2 ** 31))
    return [ex.prompt_ids for ex in make_text_examples(task_name, model.tokenizer, length, n, seed)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny",
                    help="a name or path jaxkv.load takes (default: the in-house model)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--n", type=int, default=16, help="prompts per task")
    ap.add_argument("--length", type=int, default=224)
    ap.add_argument("--window", type=int, default=None,
                    help="observation window (default: 8 on the in-house model's 224-token "
                         "prompts, else 32, the methods' default)")
    ap.add_argument("--held-out", type=int, default=32)
    ap.add_argument("--out", default="runs/grkv_error.json")
    args = ap.parse_args(argv)
    model = jaxkv.load(args.model)
    from configs.tiny import BENCHMARK_TASKS
    from jaxkv.eval.prompts import EMBEDDED, task_suite
    forms = {t.name: dict(t.settings, length=args.length) for t in BENCHMARK_TASKS
             if t.name in TASKS}
    in_house = task_suite(model) == EMBEDDED
    tasks = TASKS if in_house else TEXT_TASKS
    if args.window is None:
        args.window = 8 if in_house else 32
    rng = np.random.default_rng(0)
    policies = {}  # (budget, method) -> policy: every budget's errors from one prefill per task
    for budget in args.budgets:
        for m in METHODS:
            base, settings = split_method(m)
            policies[(budget, m)] = make_policy(base, budget, model, window=args.window,
                                                **settings)
    per_method = {key: [] for key in policies}
    for task_name in tqdm(tasks, desc="tasks", unit="task"):
        ids = task_prompts(model, task_name, args.n, args.length, rng, forms)
        tokens, lengths = pad_prompts(ids)
        lengths = jnp.asarray(lengths)
        avoid = [reference_positions(lengths, 32), last_positions(lengths, args.window)]
        held = spread_positions(lengths, args.held_out, avoid, seed=1)
        errs = held_out_errors(model, tokens, lengths, policies, held)
        for key in policies:
            per_method[key].append(errs[key])
    results = {str(budget): {m: np.mean(np.stack(per_method[(budget, m)]), axis=0).tolist()
                             for m in METHODS} for budget in args.budgets}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "window": args.window, "n_per_task": args.n,
                   "length": args.length, "tasks": tasks, "relative_error_per_layer": results}, f, indent=1)
    print(f"relative attention-output error on held-out queries (mean over {len(tasks)} tasks x "
          f"{args.n} prompts), per layer and mean")
    for budget, table in results.items():
        print(f"budget {budget}")
        for m, errs in table.items():
            print(f"  {m:24s} " + " ".join(f"{e:.4f}" for e in errs) + f"  mean {np.mean(errs):.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
