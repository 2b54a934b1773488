"""Sparse (per-head ragged) cache against the dense cache: bytes, decode time at long context, and
the compression overhead (scores + GRKV solve) relative to prefill.

  python benchmarks/sparse_decode.py                       # contexts 8192 16384, budgets 0.1 0.2
  python benchmarks/sparse_decode.py --contexts 8192 32768 --overhead-context 4096
  python benchmarks/sparse_decode.py --model smollm2-135m-instruct --no-decode   # real model
  python benchmarks/sparse_decode.py --model smollm2-135m-instruct --no-decode \
      --overhead-methods critical_adakv "grkv[bucketed=False]" grkv      # GRKV's bucketed solve

Model: random Llama-style weights (ModelConfig below; --layers/--hidden/--heads/--kv-heads/
--head-dim). Decode: caches of the given context are built directly (random keys/values; a
random head-wise selection of budget * T tokens per head for the sparse cache, every head a
different count) because the layout, not the content, sets the decode cost; then the jitted
model decode step (all layers: append + attention + MLP) is timed over --steps tokens, median of
--repeats, compilation excluded. Overhead: jitted prefill of a --overhead-context prompt with no
policy against prefill with SnapKV / Critical-AdaKV / GRKV compressing each layer; overhead =
(t_policy - t_dense) / t_dense, all measured in one run: --repeats rounds of dense then each
method, interleaved; the median over rounds of each round's ratio, the ratio of the fastest
runs, and the median ratio of this process's CPU time (compilation excluded). With --model (a
name or path `jaxkv.load` takes) the overhead uses that model's weights and a real passkey
prompt of --overhead-context tokens instead of random weights. Prints a table and writes JSON
(--out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache import DenseCache, SparseCache
from jaxkv.eval.config import split_method
from jaxkv.model.decoder import Decoder, init_params
from jaxkv.policies.registry import make_policy

from common import add_model_args, bench_config, decode_time  # benchmarks/common.py


def _caches(cfg, context, budget, steps, rng):
    """(dense caches, sparse caches) for every layer, batch 1."""
    kh, d = cfg.num_kv_heads, cfg.head_dim
    dtype = cfg.jnp_dtype
    dense, sparse = [], []
    n = int(round(budget * context))
    for _ in range(cfg.num_layers):
        k = jnp.asarray(rng.normal(size=(1, kh, context, d)), dtype)
        v = jnp.asarray(rng.normal(size=(1, kh, context, d)), dtype)
        lengths = jnp.asarray([context], jnp.int32)
        dense.append(DenseCache.from_prefill(k, v, lengths, context + steps))
        # head-wise budgets: head h keeps a share proportional to a random weight (sum = K * n)
        share = rng.dirichlet(np.ones(kh)) * 0.8 + 0.2 / kh
        counts = np.floor(share * kh * n).astype(int)
        counts[0] += kh * n - counts.sum()
        keep = np.zeros((1, kh, context), bool)
        for h in range(kh):
            keep[0, h, rng.choice(context, size=min(counts[h], context), replace=False)] = True
        sparse.append(SparseCache.from_selection(k, v, jnp.asarray(keep), int(keep.sum()), steps))
    return tuple(dense), tuple(sparse)


def overhead(args, methods):
    t = args.overhead_context
    if args.model:
        import jaxkv
        from jaxkv.tasks.text import make_text_examples
        model = jaxkv.load(args.model, dtype=args.dtype)  # --dtype, as for random weights
        cfg, params = model.config, model.params
        ids = make_text_examples("passkey", model.tokenizer, t, 1, 0)[0].prompt_ids
        t = len(ids)
        tokens = jnp.asarray([ids], jnp.int32)
    else:
        cfg = bench_config(args, t)
        params = init_params(cfg, 0)
        rng = np.random.default_rng(0)
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(1, t)), jnp.int32)
    module = Decoder(cfg)
    lengths = jnp.asarray([t], jnp.int32)

    def prefill_fn(policy):
        @jax.jit
        def run(params, tokens, lengths):
            qp = None if policy is None else policy.observation_positions(lengths, t)
            return module.apply({"params": params}, tokens, lengths, t + 8, policy, qp,
                                method=Decoder.prefill)
        return run

    class _M:  # what make_policy needs of a model
        config = cfg
    _M.params = params
    if args.model:
        _M = model  # the real model, for make_policy
    fns = {None: prefill_fn(None)}
    for m in methods:
        name, settings = split_method(m)
        fns[m] = prefill_fn(make_policy(name, args.overhead_budget, _M,
                                        **{"window": args.window, **settings}))
    for fn in fns.values():  # compile everything first
        jax.block_until_ready(fn(params, tokens, lengths))
    # rounds of (dense, each method) interleaved, medians over rounds: a shared machine's load
    # drifts over minutes, and timing one after the other put that drift into the ratios
    times = {m: [] for m in fns}
    cpu = {m: [] for m in fns}  # this process's CPU seconds: what other tenants' load leaves out
    for _ in range(args.repeats):
        for m, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(params, tokens, lengths))
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    base = statistics.median(times[None])
    out = {"prefill_s": base, "prefill_cpu_s": statistics.median(cpu[None]),
           "rounds": args.repeats}
    ratio = lambda x, y: [(a - b) / b for a, b in zip(x, y)]
    for m in methods:
        per_round = ratio(times[m], times[None])
        out[m] = {"prefill_with_policy_s": statistics.median(times[m]),
                  "overhead": statistics.median(per_round), "overhead_per_round": per_round,
                  "overhead_of_fastest": (min(times[m]) - min(times[None])) / min(times[None]),
                  "cpu_overhead": statistics.median(ratio(cpu[m], cpu[None]))}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2])
    add_model_args(ap)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--overhead-context", type=int, default=4096)
    ap.add_argument("--overhead-budget", type=float, default=0.1)
    ap.add_argument("--overhead-methods", nargs="+", default=["snapkv", "critical_adakv", "grkv"],
                    help="methods (labels such as grkv[bucketed=False] too) timed for overhead")
    ap.add_argument("--no-overhead", action="store_true")
    ap.add_argument("--no-decode", action="store_true", help="only the compression overhead")
    ap.add_argument("--model", default=None,
                    help="overhead on this model (name or path) and a real prompt, not random")
    ap.add_argument("--out", default="runs/sparse_decode.json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for context in [] if args.no_decode else args.contexts:
        cfg = bench_config(args, context)
        params = init_params(cfg, 0)
        for budget in args.budgets:
            dense, sparse = _caches(cfg, context, budget, args.steps, rng)
            td = decode_time(cfg, params, dense, args.steps, args.repeats, context)
            ts = decode_time(cfg, params, sparse, args.steps, args.repeats, context)
            db = sum(c.nbytes() for c in dense)
            sb = sum(c.nbytes() for c in sparse)
            pad = sum(int(c.padding_slots().sum()) for c in sparse)
            rows.append(dict(context=context, budget=budget, dense_ms=td * 1e3, sparse_ms=ts * 1e3,
                             speedup=td / ts, dense_bytes=db, sparse_bytes=sb,
                             bytes_ratio=sb / db, padding_slots=pad))
            del dense, sparse
    result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
              "args": vars(args), "decode": rows}
    if not args.no_overhead:
        result["overhead"] = overhead(args, args.overhead_methods)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if rows:
        print(f"decode step (all {args.layers} layers, batch 1) on {result['platform']}")
        print(f"{'context':>8} {'budget':>6} {'dense ms':>9} {'sparse ms':>9} {'speedup':>7} "
              f"{'bytes ratio':>11} {'padding':>7}")
    for r in rows:
        print(f"{r['context']:>8} {r['budget']:>6} {r['dense_ms']:>9.3f} {r['sparse_ms']:>9.3f} "
              f"{r['speedup']:>7.2f} {r['bytes_ratio']:>11.4f} {r['padding_slots']:>7}")
    if "overhead" in result:
        o = result["overhead"]
        print(f"compression overhead at {args.overhead_context} tokens, budget "
              f"{args.overhead_budget}, on "
              f"{args.model or 'random weights'} (prefill {o['prefill_s']:.3f} s):")
        for m in args.overhead_methods:
            rounds = ", ".join(f"{x:.3f}" for x in o[m]["overhead_per_round"])
            print(f"  {m:24s} {o[m]['overhead']:.3f}  fastest {o[m]['overhead_of_fastest']:.3f}  "
                  f"CPU time {o[m]['cpu_overhead']:.3f}  (rounds: {rounds})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
