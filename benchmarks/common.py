"""Shared by the decode benchmarks: timing, a random Llama-style config, a jitted decode loop."""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from jaxkv.model import ModelConfig
from jaxkv.model.decoder import Decoder


def timed(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call (compilation)."""
    jax.block_until_ready(fn())  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_model_args(ap, kv_heads: int = 4) -> None:
    """The random model's shape: --layers --hidden --heads --kv-heads --head-dim --dtype."""
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=kv_heads)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed")
    ap.add_argument("--repeats", type=int, default=3)


def bench_config(args, context: int) -> ModelConfig:
    """Random Llama-style model from --layers/--hidden/--heads/--kv-heads/--head-dim/--dtype."""
    return ModelConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       head_dim=args.head_dim, max_position_embeddings=context + 1024,
                       architecture="LlamaForCausalLM", dtype=args.dtype)


def decode_time(cfg, params, caches, steps: int, repeats: int, start: int = 0) -> float:
    """Seconds per decode step (all layers, batch 1) of `steps` greedy steps from position
    `start` over `caches`, median of `repeats` after a compiling warm-up."""
    module = Decoder(cfg)

    @jax.jit
    def run(params, caches):
        def body(i, state):
            tok, caches = state
            logits, caches = module.apply({"params": params}, tok, jnp.full((1,), start + i, jnp.int32),
                                          caches, method=Decoder.decode)
            return jnp.argmax(logits, -1).astype(jnp.int32), caches
        return jax.lax.fori_loop(0, steps, body, (jnp.zeros((1,), jnp.int32), caches))[0]
    return timed(lambda: run(params, caches), repeats) / steps
