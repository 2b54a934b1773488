"""RLKV deployment: decode throughput and cache bytes of the head-split cache against the dense
cache at long context, next to the bound 1 / ((1 - s) + s * (sink + window) / T).

  python benchmarks/rlkv_decode.py                         # contexts 8192 32768, sparsity 0.6
  python benchmarks/rlkv_decode.py --contexts 8192 --sparsity 0.4 0.6 0.8 --dtype bfloat16
  python benchmarks/rlkv_decode.py --model smollm2-135m-instruct --contexts 4096 8000 \
      --sparsity 0.5 --gates runs/rlkv_smollm2/gates.json           # a real model, its gates

Model: random Llama-style weights (benchmarks/common.py; --layers/--hidden/--heads/--kv-heads/
--head-dim). Caches of the given context are built directly from random keys/values (the layout,
not the content, sets the decode cost); the head split streams round(s * L * K) heads chosen at
random (spread over layers as the global quantile of random gates does); sink 16 + window 64
(the paper's inference setting). The jitted model decode step (all layers) is timed over --steps
tokens, median of --repeats, compilation excluded. The bound is the dense/head-split ratio of
bytes read by attention; decode also runs the MLPs and projections, which do not shrink, so the
measured speed-up sits below it by how much of a step attention is. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from common import (add_model_args, add_real_model_arg,  # benchmarks/common.py
                    config_and_params, decode_time, load_real_model)
from jaxkv.cache import DenseCache
from jaxkv.cache.headsplit import HeadSplitCache
from jaxkv.policies.rlkv import random_gates, select_heads


def caches(cfg, context, sparsity, sink, window, steps, seed, gates=None):
    rng = np.random.default_rng(seed)
    kh, d = cfg.num_kv_heads, cfg.head_dim
    if gates is None:
        gates = random_gates(cfg.num_layers, kh, seed)
    full_heads, stream_heads = select_heads(gates, sparsity)
    dense, split = [], []
    for layer in range(cfg.num_layers):
        k = jnp.asarray(rng.normal(size=(1, kh, context, d)), cfg.jnp_dtype)
        v = jnp.asarray(rng.normal(size=(1, kh, context, d)), cfg.jnp_dtype)
        base = DenseCache.from_prefill(k, v, jnp.asarray([context], jnp.int32), context)
        dense.append(DenseCache.from_prefill(k, v, base.lengths, context + steps))
        split.append(HeadSplitCache.from_dense(base, full_heads[layer], stream_heads[layer], sink,
                                               window, extra_capacity=steps))
    return tuple(dense), tuple(split)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.6])
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--window", type=int, default=64)
    add_model_args(ap)
    add_real_model_arg(ap)
    ap.add_argument("--gates", default=None,
                    help="gate file of --model choosing the streaming heads (default: random)")
    ap.add_argument("--out", default="runs/rlkv_decode.json")
    args = ap.parse_args(argv)
    if args.gates is not None and args.model is None:
        ap.error("--gates needs --model (gate files belong to one model)")
    model = load_real_model(args)
    gates = None
    if args.gates is not None:
        from jaxkv.policies.rlkv import load_gates
        gates = load_gates(args.gates, model)
    rows = []
    for context in args.contexts:
        cfg, params = config_and_params(args, model, context, args.steps)
        for s in args.sparsity:
            dense, split = caches(cfg, context, s, args.sink, args.window, args.steps, 0, gates)
            td = decode_time(cfg, params, dense, args.steps, args.repeats, context)
            ts = decode_time(cfg, params, split, args.steps, args.repeats, context)
            db = sum(c.nbytes() for c in dense)
            sb = sum(c.nbytes() for c in split)
            n_heads = cfg.num_layers * cfg.num_kv_heads
            s_real = sum(len(c.stream_heads) for c in split) / n_heads
            t_slots = context + args.steps
            bound = 1.0 / ((1 - s_real) + s_real * (args.sink + args.window) / t_slots)
            rows.append(dict(context=context, sparsity=s, sparsity_real=s_real,
                             dense_ms=td * 1e3, split_ms=ts * 1e3, dense_tok_s=1 / td,
                             split_tok_s=1 / ts, speedup=td / ts, bound=bound,
                             dense_bytes=db, split_bytes=sb, bytes_ratio=sb / db))
            del dense, split
    result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
              "model": args.model or "random weights", "gates": args.gates or "random",
              "args": vars(args), "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"decode (all {args.layers} layers, batch 1, {args.dtype}) on {result['platform']}")
    print(f"{'context':>8} {'s':>5} {'dense tok/s':>11} {'split tok/s':>11} {'speedup':>7} "
          f"{'bound':>6} {'bytes ratio':>11}")
    for r in rows:
        print(f"{r['context']:>8} {r['sparsity_real']:>5.2f} {r['dense_tok_s']:>11.1f} "
              f"{r['split_tok_s']:>11.1f} {r['speedup']:>7.2f} {r['bound']:>6.2f} "
              f"{r['bytes_ratio']:>11.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
