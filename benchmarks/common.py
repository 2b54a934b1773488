"""Shared by the decode benchmarks: timing, a random Llama-style config, a jitted decode loop."""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from jaxkv.model import ModelConfig
from jaxkv.model.decoder import Decoder, init_params


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


def add_real_model_arg(ap) -> None:
    """--model: a real model (name or path `jaxkv.load` takes) instead of random weights."""
    ap.add_argument("--model", default=None,
                    help="a real model (name or path): its weights and config, not random ones")


def load_real_model(args):
    """The model --model names, in --dtype, with args.layers set to its depth; None without
    --model."""
    if args.model is None:
        return None
    import jaxkv
    model = jaxkv.load(args.model, dtype=args.dtype)
    args.layers = model.config.num_layers
    return model


def config_and_params(args, model, context: int, extra: int):
    """(config, params) for `context` prompt tokens and `extra` decode slots: --model's (its
    position limit raised to fit, for timing past it) or a random model from the shape
    arguments."""
    if model is None:
        cfg = bench_config(args, context)
        return cfg, init_params(cfg, 0)
    cfg = dataclasses.replace(model.config, max_position_embeddings=max(
        model.config.max_position_embeddings, context + extra))
    return cfg, model.params


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
