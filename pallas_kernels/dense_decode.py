"""Decode attention over a dense cache with per-sequence lengths.

Reference in plain jnp (XLA). The Pallas TPU/GPU kernels live beside it (see dispatch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def dense_decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                     lengths: jax.Array, scale: float) -> jax.Array:
    """One query token per sequence.

    q: [B, H, D]; k, v: [B, K, S, D]; lengths: [B] valid slots -> out [B, H, D] (dtype of q).
    Scores and softmax in float32. A sequence with length 0 gets zeros.
    """
    b, h, d = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, kh, h // kh, d).astype(jnp.float32)  # [B, K, G, D]
    scores = jnp.einsum("BKGD,BKSD->BKGS", qg, k.astype(jnp.float32)) * scale
    valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]  # [B, S]
    scores = jnp.where(valid[:, None, None, :], scores, NEG_INF)
    m = scores.max(-1, keepdims=True)
    p = jnp.exp(scores - m) * valid[:, None, None, :]
    denom = p.sum(-1, keepdims=True)
    out = jnp.einsum("BKGS,BKSD->BKGD", p, v.astype(jnp.float32)) / jnp.maximum(denom, 1e-30)
    return out.reshape(b, h, d).astype(q.dtype)
