"""Per-layer attention-output error of a compressed cache on held-out queries.

For a prompt, every layer's inputs are taken from the full-cache forward pass (teacher forcing, so
each layer's error is measured alone). For each layer the policy compresses that layer's prefill
cache exactly as `generate` would (`policy.compress_layer`), and queries that the policy never saw
are attended over the full and over the compressed cache. Held-out queries are post-RoPE prompt
queries re-rotated as if they stood at the last prompt position (the situation of the next
decoded token), plus the real query of the last prompt token.

    relative error = ||out_compressed - out_full||_F / ||out_full||_F   (per layer, all heads)
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache.dense import DenseCache
from jaxkv.model.decoder import Decoder, LayerObservation
from jaxkv.model.layers import causal_attention, rope_inv_freq


def layer_qkv(model, tokens: jax.Array):
    """[(q [B, T, H, D], k, v [B, T, K, D])] per layer from the full forward pass."""
    captured = []

    def attention_fn(i, q, k, v, positions):
        captured.append((q, k, v))
        return causal_attention(q, k, v, model.config.head_dim ** -0.5, positions, positions,
                                window=model.config.sliding_window)

    Decoder(model.config).apply({"params": model.params}, tokens, attention_fn,
                                method=Decoder.forward)
    return captured


def _dense_attend(q, k, v, valid, scale):
    """q [B, K, R, D]; k, v [B, K, S, D]; valid [B, K, S] -> [B, K, R, D] float32."""
    logits = jnp.einsum("BKRD,BKSD->BKRS", q, k.astype(jnp.float32)) * scale
    logits = jnp.where(valid[:, :, None, :], logits, -1e30)
    p = jax.nn.softmax(logits, -1) * valid[:, :, None, :]
    return jnp.einsum("BKRS,BKSD->BKRD", p, v.astype(jnp.float32))


@partial(jax.jit, static_argnums=(0, 1))
def _compress_to_dense(policy, layer, cache, obs):
    return policy.compress_layer(layer, cache, obs).to_dense()


def held_out_errors(model, tokens, lengths, policies: Dict[str, object],
                    held_out: jax.Array) -> Dict[str, np.ndarray]:
    """{name: relative error per layer [L]} for every policy (None = no compression).

    tokens: [B, T] right-padded prompts; lengths: [B]; held_out: [B, Q] prompt positions whose
    queries are re-rotated to the last position (choose them away from the policy's own
    reference / observation positions); the last prompt token's own query is added."""
    from jaxkv.policies.grkv import rotate_to
    cfg = model.config
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    b, t = tokens.shape
    scale = cfg.head_dim ** -0.5
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    qkv = layer_qkv(model, tokens)
    out: Dict[str, list] = {name: [] for name in policies}
    for layer, (q, k, v) in enumerate(qkv):
        kh = k.shape[2]
        k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
        cache = DenseCache.from_prefill(k_t, v_t, lengths, t)
        q_all = q.transpose(0, 2, 1, 3).astype(jnp.float32)  # [B, H, T, D]
        take = lambda pos: jnp.take_along_axis(q_all, pos[:, None, :, None], axis=2)
        q_ho = rotate_to(take(held_out), held_out, lengths - 1, inv_freq)
        q_last = take((lengths - 1)[:, None])
        qs = jnp.concatenate([q_ho, q_last], axis=2)  # [B, H, Q+1, D]
        g = qs.shape[1] // kh
        qs = qs.reshape(b, kh, g, -1, qs.shape[-1]).reshape(b, kh, -1, qs.shape[-1])
        _, _, full_valid = cache.to_dense()
        ref = _dense_attend(qs, k_t, v_t, full_valid, scale)
        for name, policy in policies.items():
            if policy is None:
                out[name].append(0.0)
                continue
            pos = policy.observation_positions(lengths, t)
            # a layer-invariant policy compiles once: layer 0 for every layer, as generate does
            static_layer = 0 if getattr(policy, "layer_invariant", False) else layer
            obs = LayerObservation(
                queries=jnp.take_along_axis(q_all, pos[:, None, :, None], axis=2).astype(q.dtype),
                query_positions=pos, lengths=lengths,
                o_proj=model.params["layers_%d" % layer]["self_attn"]["o_proj"]["kernel"],
                inv_freq=inv_freq, layer=static_layer, extra_capacity=0, scale=scale)
            ck, cv, cvalid = _compress_to_dense(policy, static_layer, cache, obs)
            got = _dense_attend(qs, ck, cv, cvalid, scale)
            err = jnp.sqrt(((got - ref) ** 2).sum()) / jnp.sqrt((ref ** 2).sum())
            out[name].append(float(err))
    return {name: np.asarray(errs) for name, errs in out.items()}


def spread_positions(lengths, n: int, avoid: Sequence[jax.Array] = (), seed: int = 0):
    """int32 [B, n] random prompt positions (in the first len - 1 tokens), avoiding the given
    position arrays [B, *] where possible."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    rows = []
    for i, n_tok in enumerate(lengths):
        banned = set()
        for a in avoid:
            banned.update(np.asarray(a)[i].tolist())
        pool = np.array([p for p in range(int(n_tok) - 1) if p not in banned] or [0])
        rows.append(np.sort(rng.choice(pool, size=n, replace=len(pool) < n)))
    return jnp.asarray(np.stack(rows), jnp.int32)


__all__ = ["layer_qkv", "held_out_errors", "spread_positions"]
