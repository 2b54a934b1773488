"""Where RDKV's bytes go: the cache of real prompts at each budget, split by
`MixedCache.byte_terms` (V codes, V scales, positions, K codes, K group headers, the whole zone of
recent tokens and decode slots, metadata, padding), summed over layers and prompts, as shares of
the compressed cache's bytes.

    python benchmarks/rdkv_terms.py --model smollm2-135m-instruct --dtype bfloat16 \
        --length 4096 --budgets 0.025 0.05 0.1 0.25 --out runs/rdkv_terms_4k.json

One shared prefill for all budgets (`jaxkv.generate.shared_caches`); RDKV uses the model's
calibrated table (`python -m train calibrate --model ...` first).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os

TERMS = ("v_codes", "v_scales", "positions", "k_codes", "k_headers", "whole", "metadata",
         "padding")


def main(argv=None):
    import jaxkv
    from jaxkv.tasks.text import make_text_examples

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--n", type=int, default=1, help="prompts")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.025, 0.05, 0.1, 0.25])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.out and os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out}: a folder; give a file path")
    gen = importlib.import_module("jaxkv.generate")  # the module (jaxkv.generate is the fn)
    model = jaxkv.load(args.model, dtype=args.dtype)
    prompts = [ex.prompt_ids for ex in make_text_examples(args.task, model.tokenizer,
                                                          args.length, args.n, 0)]
    policies = [None] + [jaxkv.make_policy("rdkv", b, model) for b in args.budgets]
    caches = gen.shared_caches(model, prompts, args.max_new_tokens, policies)
    dense = sum(int(c.nbytes()) for c in caches[0])
    rows = []
    for budget, layers in zip(args.budgets, caches[1:]):
        terms = dict.fromkeys(TERMS, 0)
        for cache in layers:
            for name, value in cache.byte_terms().items():
                terms[name] += value
        total = sum(terms.values())
        rows.append(dict(budget=budget, measured_budget=total / dense, bytes=total,
                         shares={k: v / total for k, v in terms.items()}, terms=terms))
    print(f"RDKV bytes by term, {args.model} ({args.dtype}), {args.n} x {args.task} at "
          f"{args.length} tokens (shares of the compressed cache)")
    print(f"{'budget':>7} {'measured':>9} " + " ".join(f"{t:>9}" for t in TERMS))
    for r in rows:
        print(f"{r['budget']:>7g} {r['measured_budget']:>9.4f} "
              + " ".join(f"{r['shares'][t]:>9.3f}" for t in TERMS))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(config=vars(args), dense_bytes=dense, rows=rows), f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
