"""RDKV: peak memory of layer-by-layer compressed prefill against dense prefill, and decode time
over the mixed-precision cache against the dense cache.

  python benchmarks/rdkv.py                                 # context 8192, budgets 0.05 0.1
  python benchmarks/rdkv.py --context 16384 --budgets 0.025 0.05 0.25 --dtype bfloat16
  python benchmarks/rdkv.py --memory-layers               # skip the compile-only depth sweep
  python benchmarks/rdkv.py --model smollm2-135m-instruct --dtype bfloat16 --context 8192 \
      --memory-layers                                     # the real model, its own table

Model: random Llama-style weights (benchmarks/common.py), or --model's weights (a name or path;
RDKV then uses the model's calibrated table when it has one, the published default otherwise;
the position limit is raised past the model's for timing at its limit and beyond). Memory: XLA's own accounting of the
compiled prefill (`compiled.memory_analysis()`: arguments excluded; outputs = the caches of every
layer plus logits; temp = the peak of intermediate buffers) with no policy (dense caches of all
layers are outputs) and with RDKV compressing each layer as soon as it is done. Decode: the
caches a real prefill produced, then --steps jitted decode steps (all layers), median of
--repeats. The eps table is the published default (this benchmark measures memory and speed).
Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from common import (add_model_args, add_real_model_arg,  # benchmarks/common.py
                    config_and_params, decode_time, load_real_model)
from jaxkv.cache import cache_nbytes
from jaxkv.model.decoder import Decoder, init_params
from jaxkv.policies.rdkv import RDKV


def prefill_fn(cfg, t, extra, policy):
    module = Decoder(cfg)

    def run(params, tokens, lengths):
        qp = None if policy is None else policy.observation_positions(lengths, t)
        return module.apply({"params": params}, tokens, lengths, t + extra, policy, qp,
                            method=Decoder.prefill)
    return jax.jit(run)


def memory(fn, *args):
    m = fn.lower(*args).compile().memory_analysis()
    if m is None:
        return None
    return dict(output_bytes=int(m.output_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
                peak_bytes=int(m.output_size_in_bytes + m.temp_size_in_bytes))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1])
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--memory-layers", type=int, nargs="*", default=[4, 16, 32],
                    help="also compile (not run) prefill at these depths and report its peak")
    add_model_args(ap)
    add_real_model_arg(ap)
    ap.add_argument("--out", default="runs/rdkv_bench.json")
    args = ap.parse_args(argv)
    t = args.context
    model = load_real_model(args)
    cfg, params = config_and_params(args, model, t, args.steps)
    eps = None
    if model is not None:
        from jaxkv.policies.rdkv import find_calibration, load_calibration
        path = find_calibration(model)
        eps = load_calibration(path, model) if path else None
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(1, t)), jnp.int32)
    lengths = jnp.asarray([t], jnp.int32)
    dense_fn = prefill_fn(cfg, t, args.steps, None)
    rows = []
    dense_mem = memory(dense_fn, params, tokens, lengths)
    _, dense_caches = dense_fn(params, tokens, lengths)
    td = decode_time(cfg, params, dense_caches, args.steps, args.repeats, t)
    dense_bytes = cache_nbytes(dense_caches)
    del dense_caches
    for b in args.budgets:
        policy = RDKV(budget=b, window=args.window, eps=eps)
        fn = prefill_fn(cfg, t, args.steps, policy)
        mem = memory(fn, params, tokens, lengths)
        _, caches = fn(params, tokens, lengths)
        tm = decode_time(cfg, params, caches, args.steps, args.repeats, t)
        rows.append(dict(budget=b, cache_bytes=cache_nbytes(caches), dense_cache_bytes=dense_bytes,
                         prefill_memory=mem, dense_prefill_memory=dense_mem,
                         dense_decode_ms=td * 1e3, rdkv_decode_ms=tm * 1e3, speedup=td / tm))
        del caches
    depth = []
    for n_layers in args.memory_layers:  # abstract parameters: compiled, never run
        dcfg = dataclasses.replace(cfg, num_layers=n_layers)
        shapes = jax.eval_shape(lambda: init_params(dcfg, 0))
        row = dict(layers=n_layers, dense=memory(prefill_fn(dcfg, t, args.steps, None), shapes,
                                                 tokens, lengths))
        for b in args.budgets:
            pol = RDKV(budget=b, window=args.window, eps=eps)
            row[f"rdkv_{b}"] = memory(prefill_fn(dcfg, t, args.steps, pol), shapes, tokens,
                                      lengths)
        depth.append(row)
    result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
              "model": args.model or "random weights", "args": vars(args), "rows": rows, "peak_by_depth": depth}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    mb = lambda x: f"{x / 2**20:.1f}"
    print(f"RDKV at {t} tokens, {result['model']}, {args.layers} layers, {args.dtype}, "
          f"on {result['platform']}")
    if dense_mem:
        print(f"dense prefill: peak {mb(dense_mem['peak_bytes'])} MiB "
              f"(outputs {mb(dense_mem['output_bytes'])}, temp {mb(dense_mem['temp_bytes'])})")
    print(f"{'budget':>7} {'cache ratio':>11} {'peak MiB':>9} {'peak ratio':>10} "
          f"{'dense ms':>9} {'rdkv ms':>8} {'speedup':>7}")
    for r in rows:
        m = r["prefill_memory"]
        peak = m["peak_bytes"] if m else float("nan")
        ratio = peak / dense_mem["peak_bytes"] if m and dense_mem else float("nan")
        print(f"{r['budget']:>7} {r['cache_bytes'] / r['dense_cache_bytes']:>11.4f} "
              f"{mb(peak):>9} {ratio:>10.3f} {r['dense_decode_ms']:>9.3f} "
              f"{r['rdkv_decode_ms']:>8.3f} {r['speedup']:>7.2f}")
    if depth and depth[0]["dense"]:
        print("peak MiB of the compiled prefill by depth (dense / RDKV at each budget):")
        print(f"{'layers':>6} {'dense':>8} " + " ".join(f"{'rdkv ' + str(b):>11}"
                                                      for b in args.budgets))
        for row in depth:
            print(f"{row['layers']:>6} {mb(row['dense']['peak_bytes']):>8} " + " ".join(
                f"{mb(row[f'rdkv_{b}']['peak_bytes']):>6} {row[f'rdkv_{b}']['peak_bytes'] / row['dense']['peak_bytes']:.2f}"
                for b in args.budgets))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
