"""A dense cache whose attention mixes full and streaming attention per KV head (RLKV rollouts).

This is the training-time cache: it holds every token (nothing is saved), and its `attend` gives
what the gated model of `jaxkv.model.gated.mixed_attention_fn` computes for a decode query, so
rollouts are sampled from exactly the model whose log-probabilities the RLKV loss differentiates.
The deployment cache (full heads and streaming heads in separate arrays) is a different layout.

Slot s holds the token at position s (as in DenseCache); after `append`, the newest token, the
query's own, is at slot lengths - 1. The streaming branch sees slots s < lengths with
s < sink or (lengths - 1) - s < window.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache.base import array_nbytes, batched_write, prefix_mask
from jaxkv.cache.dense import DenseCache

NEG_INF = -1e30  # as jaxkv.model.layers.NEG_INF


def check_streaming(sink, window) -> tuple:
    """Validate the static streaming settings: sink >= 0 and window >= 1 (ints)."""
    if isinstance(sink, bool) or not isinstance(sink, (int, np.integer)) or sink < 0:
        raise ValueError(f"sink={sink!r}: must be an integer >= 0 (attention-sink tokens kept)")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window={window!r}: must be an integer >= 1 (recent tokens kept, "
                         f"the current one included)")
    return int(sink), int(window)


def mix_softmax(scores: jax.Array, full_mask: jax.Array, stream_mask: jax.Array,
                alpha: jax.Array) -> jax.Array:
    """alpha * softmax(scores | full_mask) + (1 - alpha) * softmax(scores | stream_mask).

    scores: float32 [B, K, G, T, S]; masks: bool, broadcastable to scores, stream_mask a subset
    of full_mask; alpha: [K] (per KV head). Rows with an empty mask get zero probabilities.

    Each branch is shifted by its own row max, so both are exact whatever the gap between the
    full row max and the best streaming score. (A single shared exp, shifted by
    min(full max, streaming max + 64), overflowed once that gap passed ~150 nats: the trained
    embedded model's look-up heads reach it, and DuoAttention's training went NaN at step 36.)
    """
    full_mask = jnp.broadcast_to(full_mask, scores.shape)
    stream_mask = jnp.broadcast_to(stream_mask, scores.shape)
    masked = jnp.where(full_mask, scores, NEG_INF)
    masked_stream = jnp.where(stream_mask, scores, NEG_INF)
    # any shift gives the same probabilities: no gradient through it
    m_full = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
    m_stream = jax.lax.stop_gradient(jnp.max(masked_stream, axis=-1, keepdims=True))
    e = jnp.where(full_mask, jnp.exp(masked - m_full), 0.0)
    e_stream = jnp.where(stream_mask, jnp.exp(masked_stream - m_stream), 0.0)
    z_full = jnp.maximum(e.sum(-1, keepdims=True), 1e-30)
    z_stream = jnp.maximum(e_stream.sum(-1, keepdims=True), 1e-30)
    a = alpha.astype(jnp.float32)[:, None, None, None]  # [K, 1, 1, 1] against [B, K, G, T, S]
    return e * (a / z_full) + e_stream * ((1.0 - a) / z_stream)


def mixed_attention(q: jax.Array, k: jax.Array, v: jax.Array, full: jax.Array,
                    stream: jax.Array, alpha: jax.Array, scale: float) -> jax.Array:
    """Gated mixed attention from one float32 score matrix: q [B, T, H, D] over k, v [B, K, S, D]
    (the G = H / K query heads of a KV head share it), with bool masks full and stream [B, T, S]
    (stream a subset of full) mixed per KV head by `mix_softmax` with alpha [K] -> [B, T, H, D]
    in q's dtype. The decode step, the training prefill's reference and the completion's extend
    all compute their attention here; they differ only in their masks."""
    b, t, h, d = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, t, kh, h // kh, d).astype(jnp.float32)  # [B, T, K, G, D]
    scores = jnp.einsum("BTKGD,BKSD->BKGTS", qg, k.astype(jnp.float32)) * scale
    probs = mix_softmax(scores, full[:, None, None], stream[:, None, None], alpha)
    out = jnp.einsum("BKGTS,BKSD->BTKGD", probs, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)


def gated_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                           alpha: jax.Array, *, sink: int, window: int,
                           scale: float) -> jax.Array:
    """One query per sequence over a dense cache, mixed per KV head.

    q: [B, H, D]; k, v: [B, K, S, D]; lengths: [B] valid slots (the query is the token at slot
    lengths - 1); alpha: [K] -> out [B, H, D] (dtype of q). Scores once, in float32.
    """
    s = k.shape[2]
    slot = jnp.arange(s, dtype=jnp.int32)[None, :]  # [1, S]
    full = slot < lengths[:, None]  # [B, S]
    newest = (lengths - 1)[:, None]
    stream = full & ((slot < sink) | (newest - slot < window))  # [B, S]
    # one query row (T = 1)
    return mixed_attention(q[:, None], k, v, full[:, None], stream[:, None], alpha, scale)[:, 0]


@flax.struct.dataclass
class GatedDenseCache:
    """One layer's dense cache with per-KV-head gates.

    k, v:    [B, K, S, D]   slot s of sequence b holds the token at position s
    lengths: [B] int32      valid slots per sequence
    alpha:   [K] float32    gate per KV head: 1 = full attention, 0 = sink + window only
    sink, window: static ints (tokens)
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    alpha: jax.Array
    sink: int = flax.struct.field(pytree_node=False)
    window: int = flax.struct.field(pytree_node=False)

    def kept_positions(self, lengths, t: int) -> jax.Array:
        """Every prompt position (the gates mix, they do not evict)."""
        return prefix_mask(lengths, self.k.shape[1], t)

    @classmethod
    def from_dense(cls, cache: DenseCache, alpha, sink: int, window: int,
                   extra_capacity: int = 0) -> "GatedDenseCache":
        """Wrap a DenseCache, adding `extra_capacity` empty slots for decoded tokens."""
        sink, window = check_streaming(sink, window)
        if extra_capacity < 0:
            raise ValueError(f"extra_capacity={extra_capacity}: must be >= 0")
        kh = cache.k.shape[1]
        alpha = jnp.asarray(alpha, jnp.float32)
        if alpha.shape != (kh,):
            raise ValueError(f"alpha: shape {tuple(alpha.shape)}, expected [kv_heads] = [{kh}]")
        pad = [(0, 0), (0, 0), (0, extra_capacity), (0, 0)]
        return cls(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad),
                   lengths=cache.lengths.astype(jnp.int32), alpha=alpha, sink=sink, window=window)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k: jax.Array, v: jax.Array) -> "GatedDenseCache":
        """k, v: [B, K, D] written at slot lengths[b] (as DenseCache.append)."""
        return self.replace(k=batched_write(self.k, k, self.lengths),
                            v=batched_write(self.v, v, self.lengths),
                            lengths=jnp.minimum(self.lengths + 1, self.capacity))

    def attend(self, q: jax.Array, scale: float) -> jax.Array:
        """q: [B, H, D] -> [B, H, D]: alpha * full + (1 - alpha) * streaming, per KV head."""
        return gated_decode_attention(q, self.k, self.v, self.lengths, self.alpha,
                                      sink=self.sink, window=self.window, scale=scale)

    def nbytes(self) -> int:
        return array_nbytes(self.k, self.v, self.lengths, self.alpha)

    def to_dense(self):
        s = self.capacity
        valid = jnp.arange(s)[None, None, :] < self.lengths[:, None, None]
        return self.k, self.v, jnp.broadcast_to(valid, self.k.shape[:3])


__all__ = ["GatedDenseCache", "gated_decode_attention", "mixed_attention"]
