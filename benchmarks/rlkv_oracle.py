"""How many full heads does a reasoning task need? A greedy search over which KV heads stream,
against the order RLKV's (and DuoAttention's) gates give.

    python benchmarks/rlkv_oracle.py --gates jaxkv/assets/tiny/gates_rlkv.json \
        --gates jaxkv/assets/tiny/gates_duo.json
    python benchmarks/rlkv_oracle.py --task var_chain --setting n_vars=16 --setting cot=backward

Score of a head set: teacher-forced exact match, the fraction of problems whose every target token
is the argmax of the model with those heads streaming (sink + window; prompt positions attend in
full, as in a deployment's prefill). When every target token is the argmax, greedy decoding writes
exactly the target, so this is greedy pass@1 of the full chain of thought (a lower bound on answer
accuracy), computed in one forward pass with the gates as traced arrays (no recompilation per set).

Greedy search: start with every head full; at each step stream the head whose streaming keeps the
score highest on a search set of problems; report the score of each prefix on a separate held-out
set, for n = 1 .. L*K streaming heads, beside the same curve for each gate file's order (lowest
gates stream first, as `RLKV(gates, sparsity)` chooses) and for random orders. Writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np


def make_scorer(model, sink: int, window: int):
    from jaxkv.model import Decoder
    from jaxkv.model.gated import mixed_attention_fn

    @jax.jit
    def score(gates, tokens, mask, prompt_lengths):
        fn = mixed_attention_fn(gates, sink, window, prompt_lengths)
        logits = Decoder(model.config).apply({"params": model.params}, tokens[:, :-1], fn,
                                             method=Decoder.forward)
        ok = logits.argmax(-1) == tokens[:, 1:]
        m = mask[:, :-1] > 0
        return jnp.all(ok | ~m, axis=1).mean(), (ok & m).sum() / m.sum()
    return score


def problems(task, n: int, seed: int):
    from jaxkv.tasks import make_training_batch, sample_examples
    examples = sample_examples(task, n, seed)
    batch = make_training_batch(examples, task.max_len)
    plen = np.array([len(e.prompt_ids) for e in examples], np.int32)
    return jnp.asarray(batch["tokens"]), jnp.asarray(batch["loss_mask"]), jnp.asarray(plen)


def curve(score, order, shape, data):
    """Scores with the first n heads of `order` streaming, n = 0 .. len(order)."""
    out = []
    gates = np.ones(shape, np.float32)
    out.append(float(score(jnp.asarray(gates), *data)[0]))
    for layer, head in order:
        gates[layer, head] = 0.0
        out.append(float(score(jnp.asarray(gates), *data)[0]))
    return out


def gate_order(gates):
    """Heads in the order RLKV streams them: ascending gate, ties in (layer, head) order."""
    flat = np.asarray(gates, np.float64).ravel()
    idx = np.argsort(flat, kind="stable")
    return [divmod(int(i), gates.shape[1]) for i in idx]


def greedy_order(score, shape, data, progress=True):
    gates = np.ones(shape, np.float32)
    order, left = [], [(l, h) for l in range(shape[0]) for h in range(shape[1])]
    while left:
        best, best_s = None, -1.0
        for lh in left:
            trial = gates.copy()
            trial[lh] = 0.0
            s = float(score(jnp.asarray(trial), *data)[0])
            if s > best_s:
                best, best_s = lh, s
        gates[best] = 0.0
        order.append(best)
        left.remove(best)
        if progress:
            print(f"  greedy: {len(order):2d} streaming, add head {best}: search score "
                  f"{best_s:.3f}", flush=True)
    return order


def main(argv=None):
    from jaxkv.embedded import load_embedded
    from jaxkv.policies.rlkv import load_gates
    from jaxkv.tasks import make_task

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gates", action="append", default=[], help="gate file(s) to compare")
    ap.add_argument("--task", default="running_sum")
    ap.add_argument("--setting", action="append", default=None,
                    help="task setting key=value (an integer or a word; repeatable; default for "
                         "running_sum: n_digits=24)")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--n", type=int, default=200, help="problems in each of the two sets")
    ap.add_argument("--random-orders", type=int, default=3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="runs/rlkv_oracle.json")
    args = ap.parse_args(argv)
    model = load_embedded(args.model)  # default: jaxkv/assets/tiny, the shipped gates' model
    if args.setting is None:
        args.setting = ["n_digits=24"] if args.task == "running_sum" else []
    settings = {k: int(v) if v.lstrip("-").isdigit() else v
                for k, v in (s.split("=", 1) for s in args.setting)}
    task = make_task(args.task, **settings)
    shape = (model.config.num_layers, model.config.num_kv_heads)
    score = make_scorer(model, args.sink, args.window)
    search, held = problems(task, args.n, 101), problems(task, args.n, 202)
    print(f"{args.task} {settings}: all heads full, held-out score "
          f"{float(score(jnp.ones(shape), *held)[0]):.3f}")
    orders = {"greedy": greedy_order(score, shape, search)}
    for path in args.gates:
        orders[os.path.basename(path)] = gate_order(load_gates(path))
    rng = np.random.default_rng(0)
    heads = [(l, h) for l in range(shape[0]) for h in range(shape[1])]
    for i in range(args.random_orders):
        orders[f"random_{i}"] = [heads[j] for j in rng.permutation(len(heads))]
    curves = {name: curve(score, order, shape, held) for name, order in orders.items()}
    total = shape[0] * shape[1]
    print(f"held-out teacher-forced exact match with n of {total} KV heads streaming "
          f"(sink {args.sink} + window {args.window}):")
    names = list(curves)
    print("  n  sparsity " + " ".join(f"{n[:16]:>16}" for n in names))
    for n in range(total + 1):
        print(f" {n:2d}  {n / total:8.3f} " + " ".join(f"{curves[k][n]:>16.3f}" for k in names))
    out = dict(task=args.task, settings=settings, sink=args.sink, window=args.window, n=args.n,
               orders={k: [list(map(int, lh)) for lh in v] for k, v in orders.items()},
               curves=curves)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
