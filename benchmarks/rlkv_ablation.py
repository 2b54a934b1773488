"""Do the heads RLKV keeps matter? Stream one KV head at a time (sink + window), every other head
full, and compare the accuracy lost for heads RLKV keeps against heads it drops.

    python benchmarks/rlkv_ablation.py --sparsity 0.5                  # tiny model, its gates
    python benchmarks/rlkv_ablation.py --model smollm2-135m-instruct --n 20 --batch-size 10 \
        --out runs/rlkv_ablation_smollm2.json                          # SmolLM2, shipped gates

For each of the L * K heads: greedy pass@1 with only that head streaming, on the same --n problems
for every head: the in-house reasoning tasks (running_sum, var_chain) for the tiny model, RLKV's
training task for real models (copy_list, 5 numbers, --length tokens, chat template; sink 16 +
window 64). Heads are "kept" / "dropped" by RLKV's selection at --sparsity (global quantile of the
gates). Prints per-head drops and the mean drop of each group; writes JSON (--out).
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
    import jaxkv
    from jaxkv.eval.prompts import task_suite
    from jaxkv.policies.rlkv import shipped_gate_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny",
                    help="registered name or path (default: the in-house tiny model)")
    ap.add_argument("--gates", default=None,
                    help="gate file (default: the RLKV gates shipped for the model)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--sink", type=int, default=None, help="default: 4 tiny, 16 real models")
    ap.add_argument("--window", type=int, default=None, help="default: 16 tiny, 64 real models")
    ap.add_argument("--length", type=int, default=1024, help="prompt tokens (real models)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--out", default="runs/rlkv_ablation.json")
    args = ap.parse_args(argv)
    model = jaxkv.load(args.model)
    text = task_suite(model) == "text"
    sink = args.sink if args.sink is not None else (16 if text else 4)
    window = args.window if args.window is not None else (64 if text else 16)
    if args.gates is None:
        args.gates = shipped_gate_file("rlkv", model)
        if args.gates is None:
            raise SystemExit(f"no RLKV gates shipped for {args.model}: give --gates DIR/gates.json "
                             f"(python -m train rlkv --model {args.model} writes it)")
    gates = load_gates(args.gates, model)
    layers, kv = gates.shape
    full_heads, _ = select_heads(tuple(map(tuple, gates.tolist())), args.sparsity)
    kept = {(l, h) for l in range(layers) for h in full_heads[l]}
    if text:  # the generation task RLKV trains on for real models, in the chat template
        sets = {"copy_list": prompt_set(model, "copy_list", args.length, args.n, 1,
                                        {"num_items": 5}, True, None)}
    else:
        from configs.tiny import BENCHMARK_TASKS
        sets = {t.name: prompt_set(model, t.name, None, args.n, 1, dict(t.settings), False, None)
                for t in BENCHMARK_TASKS if t.name in ("running_sum", "var_chain")}
    heads = [(layer, head) for layer in range(layers) for head in range(kv)]
    policies = [None]
    for layer, head in heads:
        g = np.ones((layers, kv))
        g[layer, head] = 0.0
        policies.append(RLKV(g, sparsity=1.0 / (layers * kv), sink=sink, window=window))
    acc = {name: accuracies(model, pset, policies, args.batch_size) for name, pset in sets.items()}
    base = {name: a[0] for name, a in acc.items()}
    rows = []
    for j, (layer, head) in enumerate(heads, start=1):
        head_acc = {name: a[j] for name, a in acc.items()}
        drop = float(np.mean([base[n] - head_acc[n] for n in sets]))
        rows.append(dict(layer=layer, head=head, gate=float(gates[layer, head]),
                         kept=(layer, head) in kept, accuracy=head_acc, drop=drop))
        print(f"layer {layer} head {head} gate {gates[layer, head]:.3f} "
              f"{'kept   ' if (layer, head) in kept else 'dropped'} drop {drop:+.3f}", flush=True)
    mean_kept = float(np.mean([r["drop"] for r in rows if r["kept"]]))
    mean_dropped = float(np.mean([r["drop"] for r in rows if not r["kept"]]))
    out = dict(model=args.model, gates=args.gates, sparsity=args.sparsity, sink=sink, window=window,
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
