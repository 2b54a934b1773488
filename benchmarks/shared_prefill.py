"""What one prefill per prompt batch saves in an evaluation sweep: the same prompts and methods
through `jaxkv.generate.generate_shared` (one prefill, then each method compresses and decodes)
and through one `jaxkv.generate` per method (a prefill each), greedy, same tokens checked.

    python benchmarks/shared_prefill.py --model smollm2-135m-instruct --length 2048 --batch 4 \
        --methods full,streaming,snapkv,critical_adakv,kivi2 --budgets 0.1,0.25

Each path runs twice and the second run is timed (compilation excluded: both compile once).
Prints a table and one JSON line: seconds of each path, their ratio, and whether every method's
tokens and cache bytes agree.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", default="niah_single_2")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--methods", default="full,streaming,snapkv,critical_adakv,kivi2")
    p.add_argument("--budgets", default="0.1,0.25")
    args = p.parse_args(argv)

    import jaxkv
    from jaxkv.generate import generate, generate_shared
    from jaxkv.tasks.text import make_text_examples

    model = jaxkv.load(args.model, dtype="float32")
    examples = make_text_examples(args.task, model.tokenizer, args.length, args.batch, seed=0)
    prompts = [ex.prompt_ids for ex in examples]
    jobs = []
    for m in args.methods.split(","):
        for b in ([1.0] if m == "full" else [float(x) for x in args.budgets.split(",")]):
            jobs.append((m, b, jaxkv.make_policy(m, b, model)))
    policies = [pol for _, _, pol in jobs]

    def shared():
        return generate_shared(model, prompts, args.new_tokens, policies, pad_to=args.length)

    def separate():
        return [generate(model, prompts, args.new_tokens, policy=pol) for pol in policies]

    times, outs = {}, {}
    for name, fn in (("shared", shared), ("separate", separate)):
        fn()  # compile
        start = time.perf_counter()
        outs[name] = fn()
        times[name] = time.perf_counter() - start
    same = all(a.tokens == b.tokens and a.cache_bytes == b.cache_bytes
               for a, b in zip(outs["shared"], outs["separate"]))
    result = dict(model=args.model, task=args.task, length=args.length, batch=args.batch,
                  jobs=len(jobs), shared_s=round(times["shared"], 2),
                  separate_s=round(times["separate"], 2),
                  speedup=round(times["separate"] / times["shared"], 2), same_tokens=same)
    print(f"{args.model}: {len(jobs)} method/budget jobs on {args.batch} {args.task} prompts of "
          f"{args.length} tokens, {args.new_tokens} new tokens")
    print(f"  one prefill shared:   {times['shared']:8.1f} s")
    print(f"  a prefill per method: {times['separate']:8.1f} s")
    print(f"  speed-up x{result['speedup']}; same tokens and bytes: {same}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
