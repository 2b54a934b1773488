"""Do the heads RLKV keeps matter? Stream one KV head at a time (sink + window), every other head
full, and compare the accuracy lost for heads RLKV keeps against heads it drops.

    python benchmarks/rlkv_ablation.py [--gates jaxkv/assets/tiny/gates_rlkv.json] --sparsity 0.5

For each of the L * K heads: greedy pass@1 on the embedded reasoning tasks (the same --n problems
for every head) with only that head streaming. Heads are "kept" / "dropped" by RLKV's selection at
--sparsity (global quantile of the gates). Prints per-head drops and the mean drop of each group;
writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from jaxkv.eval.prompts import batches, prompt_set
from jaxkv.generate import generate_shared
from jaxkv.policies.rlkv import RLKV, load_gates, select_heads


def accuracies(model, pset, policies, batch_size):
    """Mean score of each policy on the prompt set, one shared prefill per batch."""
    scores = [[] for _ in policies]
    for idx in batches(pset.prompts, batch_size):
        gens = generate_shared(model, [pset.prompts[i] for i in idx], pset.max_new_tokens,
                               policies, eos_ids=pset.eos_ids)
        for out, gen in zip(scores, gens):
            out += [pset.score(i, t)[0] for i, t in zip(idx, gen.tokens)]
    return [float(np.mean(s)) for s in scores]


def main(argv=None):
    from configs.tiny import BENCHMARK_TASKS
    from jaxkv.embedded import ASSET_DIR, load_embedded

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gates", default=os.path.join(ASSET_DIR, "gates_rlkv.json"),
                    help="gate file (default: the RLKV gates shipped with the embedded model)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="runs/rlkv_ablation.json")
    args = ap.parse_args(argv)
    model = load_embedded(args.model)  # default: jaxkv/assets/tiny, the gates' model
    gates = load_gates(args.gates)
    layers, kv = gates.shape
    full_heads, _ = select_heads(tuple(map(tuple, gates.tolist())), args.sparsity)
    kept = {(l, h) for l in range(layers) for h in full_heads[l]}
    settings = {t.name: dict(t.settings) for t in BENCHMARK_TASKS
                if t.name in ("running_sum", "var_chain")}
    heads = [(layer, head) for layer in range(layers) for head in range(kv)]
    policies = [None]
    for layer, head in heads:
        g = np.ones((layers, kv))
        g[layer, head] = 0.0
        policies.append(RLKV(g, sparsity=1.0 / (layers * kv), sink=args.sink, window=args.window))
    acc = {name: accuracies(model, prompt_set(model, name, None, args.n, 1, s, False, None),
                            policies, args.batch_size) for name, s in settings.items()}
    base = {name: a[0] for name, a in acc.items()}
    rows = []
    for j, (layer, head) in enumerate(heads, start=1):
        head_acc = {name: a[j] for name, a in acc.items()}
        drop = float(np.mean([base[n] - head_acc[n] for n in settings]))
        rows.append(dict(layer=layer, head=head, gate=float(gates[layer, head]),
                         kept=(layer, head) in kept, accuracy=head_acc, drop=drop))
        print(f"layer {layer} head {head} gate {gates[layer, head]:.3f} "
              f"{'kept   ' if (layer, head) in kept else 'dropped'} drop {drop:+.3f}", flush=True)
    mean_kept = float(np.mean([r["drop"] for r in rows if r["kept"]]))
    mean_dropped = float(np.mean([r["drop"] for r in rows if not r["kept"]]))
    out = dict(gates=args.gates, sparsity=args.sparsity, sink=args.sink, window=args.window,
               n=args.n, full_accuracy=base, heads=rows, mean_drop_kept=mean_kept,
               mean_drop_dropped=mean_dropped)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"full cache: {base}")
    print(f"mean accuracy drop streaming one head: RLKV-kept heads {mean_kept:+.3f}, "
          f"RLKV-dropped heads {mean_dropped:+.3f} (sparsity {args.sparsity})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
