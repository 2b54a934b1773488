"""Decode attention over the sparse (per-head ragged) cache of `jaxkv.cache.SparseCache`.

Layout (one layer):
    k, v:          [B, N, D]     kept prompt tokens of all KV heads, grouped by head
    heads:         [B, N] int32  KV head of each slot; K marks a padding slot
    new_k, new_v:  [B, K, E, D]  tokens generated while decoding (dense per head)
    new_lengths:   [B] int32     valid decode slots

Query head h reads KV head h // G. The reference gathers, for every prompt slot, the G queries of
that slot's head, so it does the work of the ragged layout (N * G dot products) rather than
K times that; softmax statistics are combined per head with segment reductions. Scores and
softmax in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def sparse_decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, heads: jax.Array,
                                      new_k: jax.Array, new_v: jax.Array, new_lengths: jax.Array,
                                      scale: float) -> jax.Array:
    """q: [B, H, D] -> out [B, H, D] (dtype of q). A head with no valid token gets zeros."""
    b, h, d = q.shape
    kh = new_k.shape[1]
    g = h // kh
    qg = q.reshape(b, kh, g, d).astype(jnp.float32)  # [B, K, G, D]
    valid = heads < kh  # [B, N]
    seg = jnp.where(valid, heads, kh)  # padding goes to an extra segment, dropped below
    q_slot = jnp.take_along_axis(qg, jnp.minimum(seg, kh - 1)[:, :, None, None], axis=1)  # [B, N, G, D]
    s_p = jnp.einsum("BNGD,BND->BNG", q_slot, k.astype(jnp.float32)) * scale
    s_p = jnp.where(valid[:, :, None], s_p, NEG_INF)
    # decode part
    s_d = jnp.einsum("BKGD,BKED->BKGE", qg, new_k.astype(jnp.float32)) * scale
    d_valid = jnp.arange(new_k.shape[2])[None, :] < new_lengths[:, None]  # [B, E]
    s_d = jnp.where(d_valid[:, None, None, :], s_d, NEG_INF)

    seg_max = jax.vmap(lambda s, i: jax.ops.segment_max(s, i, num_segments=kh + 1))(s_p, seg)
    m = seg_max[:, :kh]  # [B, K, G]
    if new_k.shape[2]:
        m = jnp.maximum(m, s_d.max(-1))
    m = jnp.maximum(m, NEG_INF)  # segment_max of an empty segment is -inf
    m_slot = jnp.take_along_axis(m, jnp.minimum(seg, kh - 1)[:, :, None], axis=1)  # [B, N, G]
    p_p = jnp.exp(s_p - m_slot) * valid[:, :, None]  # [B, N, G]
    p_d = jnp.exp(s_d - m[..., None]) * d_valid[:, None, None, :]  # [B, K, G, E]
    seg_sum = lambda x: jax.vmap(lambda a, i: jax.ops.segment_sum(a, i, num_segments=kh + 1))(x, seg)
    denom = seg_sum(p_p)[:, :kh] + p_d.sum(-1)  # [B, K, G]
    num = seg_sum(p_p[..., None] * v.astype(jnp.float32)[:, :, None, :])[:, :kh]  # [B, K, G, D]
    num = num + jnp.einsum("BKGE,BKED->BKGD", p_d, new_v.astype(jnp.float32))
    out = num / jnp.maximum(denom, 1e-30)[..., None]
    return out.reshape(b, h, d).astype(q.dtype)
