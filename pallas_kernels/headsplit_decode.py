"""Decode attention over a head-split cache: full KV heads (dense, per-sequence lengths) and
streaming KV heads (sink tokens + a ring buffer of recent tokens).

Reference in plain jnp (XLA) and the Pallas TPU kernels beside it (see dispatch).

Streaming layout (jaxkv.cache.streaming.SinkWindowCache), S = sink + window slots per head:
slots [0, sink) hold the first tokens, slots [sink, S) a ring buffer of the most recent ones;
with `counts[b]` tokens seen, sink slot i is valid iff i < counts and ring slot j iff
j < clip(counts - sink, 0, window). Keys carry RoPE of their original positions, so attention
over the valid slots needs no positions. Since j < window, "j < clip(counts - sink, 0, window)"
is "sink + j < counts": the valid slots are exactly the prefix [0, min(counts, sink + window)),
which is what lets the sink + window kernel share the dense kernel's pallas_call.

GQA: query heads h*G .. h*G + G - 1 read KV head h (G = H / K).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.dense_decode import (NEG_INF, check_decode_shapes, dense_decode_attention,
                                         dense_decode_attention_reference, prefix_decode_call)


def ring_valid(counts: jax.Array, sink: int, window: int) -> jax.Array:
    """bool [B, sink + window]: slots of a sink + ring cache holding a token (see module doc)."""
    counts = counts.astype(jnp.int32)[:, None]  # [B, 1]
    sink_ok = jnp.arange(sink, dtype=jnp.int32)[None, :] < counts  # [B, sink]
    ring_ok = jnp.arange(window, dtype=jnp.int32)[None, :] < jnp.clip(counts - sink, 0, window)
    return jnp.concatenate([sink_ok, ring_ok], axis=1)


def check_ring_slots(slots: int, sink: int, window: int) -> None:
    if sink < 0 or window < 0 or slots != sink + window:
        raise ValueError(f"k has {slots} slots; a sink={sink} + window={window} cache needs "
                         f"{sink + window}")


def sink_window_decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                           counts: jax.Array, sink: int, window: int,
                                           scale: float) -> jax.Array:
    """q: [B, H, D]; k, v: [B, K, sink + window, D]; counts: [B] tokens seen -> [B, H, D].

    Softmax in float32 over the valid slots; a sequence with no valid slot gets zeros."""
    b, h, d = q.shape
    kh = k.shape[1]
    check_ring_slots(k.shape[2], sink, window)
    qg = q.reshape(b, kh, h // kh, d).astype(jnp.float32)  # [B, K, G, D]
    scores = jnp.einsum("BKGD,BKSD->BKGS", qg, k.astype(jnp.float32)) * scale
    valid = ring_valid(counts, sink, window)[:, None, None, :]  # [B, 1, 1, S]
    scores = jnp.where(valid, scores, NEG_INF)
    m = scores.max(-1, keepdims=True)
    p = jnp.exp(scores - m) * valid
    denom = p.sum(-1, keepdims=True)
    out = jnp.einsum("BKGS,BKSD->BKGD", p, v.astype(jnp.float32)) / jnp.maximum(denom, 1e-30)
    return out.reshape(b, h, d).astype(q.dtype)


def _query_heads(kv_heads: Sequence[int], group: int) -> np.ndarray:
    """Query-head indices of the given KV heads, in order: [h*G, ..., h*G + G - 1, ...]."""
    return np.asarray([h * group + g for h in kv_heads for g in range(group)], np.int32)


def sink_window_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, counts: jax.Array, *,
                                 sink: int, window: int, scale: float, interpret=False,
                                 poison: bool = False) -> jax.Array:
    """Pallas TPU kernel of `sink_window_decode_attention_reference` (same shapes and result).

    q: [B, H, D]; k, v: [B, K, sink + window, D]; counts: [B] tokens seen -> [B, H, D].
    The whole sink + window cache of one (sequence, KV head) is one [sink + window, D] block, so
    the grid is (B, K, 1); counts are scalar prefetched and the valid slots are the prefix
    [0, min(counts, sink + window)) (see module doc), masked in the kernel.
    interpret: False (Mosaic TPU), True or a `pltpu.InterpretParams`. poison: tests only (NaN
    output buffer aliased in, so unwritten tiles show).
    """
    check_decode_shapes(q, k, v, counts)
    s = k.shape[2]
    check_ring_slots(s, sink, window)
    if s == 0:
        return jnp.zeros(q.shape, q.dtype)
    return prefix_decode_call(q, k, v, counts, scale=scale, block=s, interpret=interpret,
                              poison=poison)


def headsplit_decode_attention_reference(
        q: jax.Array,
        full_k: Optional[jax.Array], full_v: Optional[jax.Array],
        full_lengths: Optional[jax.Array],
        stream_k: Optional[jax.Array], stream_v: Optional[jax.Array],
        stream_counts: Optional[jax.Array], *,
        full_heads: Sequence[int], stream_heads: Sequence[int], sink: int, window: int,
        scale: float) -> jax.Array:
    """One query token per sequence over a head-split cache.

    q:            [B, H, D]
    full_k/v:     [B, Kf, S_full, D] (None when full_heads is empty); full_lengths [B]
    stream_k/v:   [B, Ks, sink + window, D] (None when stream_heads is empty); stream_counts [B]
    full_heads, stream_heads: static KV-head indices of each part (disjoint, together 0..K-1)
    -> out [B, H, D] in q's dtype, query heads in their original order.
    """
    return split_heads(
        q, full_heads, stream_heads,
        lambda qq: dense_decode_attention_reference(qq, full_k, full_v, full_lengths, scale),
        lambda qq: sink_window_decode_attention_reference(qq, stream_k, stream_v, stream_counts,
                                                          sink, window, scale))


def split_heads(q: jax.Array, full_heads: Sequence[int], stream_heads: Sequence[int],
                 run_full: Callable[[jax.Array], jax.Array],
                 run_stream: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Check the head split, run each part on its query heads and put them back in order.

    q: [B, H, D]; run_full / run_stream: q of that part's query heads [B, Hpart, D] -> [B, Hpart,
    D] (called only when the part has heads) -> out [B, H, D], query heads in original order.
    """
    full_heads, stream_heads = tuple(full_heads), tuple(stream_heads)
    kv = len(full_heads) + len(stream_heads)
    if sorted(full_heads + stream_heads) != list(range(kv)):
        raise ValueError(f"full_heads={full_heads}, stream_heads={stream_heads}: must split "
                         f"0..{kv - 1}")
    h = q.shape[1]
    if kv == 0 or h % kv:
        raise ValueError(f"q has {h} heads: must be a multiple of the {kv} KV heads")
    group = h // kv
    outs, order = [], []
    for heads, run in ((full_heads, run_full), (stream_heads, run_stream)):
        if not heads:
            continue
        qidx = _query_heads(heads, group)
        whole = len(heads) == kv  # identity gather: skip it
        outs.append(run(q if whole else jnp.take(q, jnp.asarray(qidx), axis=1)))
        order.extend(qidx.tolist())
    if len(outs) == 1:
        return outs[0]
    inverse = np.argsort(np.asarray(order))  # position of query head i in the concatenation
    return jnp.take(jnp.concatenate(outs, axis=1), jnp.asarray(inverse, jnp.int32), axis=1)


def headsplit_decode_attention(
        q: jax.Array,
        full_k: Optional[jax.Array], full_v: Optional[jax.Array],
        full_lengths: Optional[jax.Array],
        stream_k: Optional[jax.Array], stream_v: Optional[jax.Array],
        stream_counts: Optional[jax.Array], *,
        full_heads: Sequence[int], stream_heads: Sequence[int], sink: int, window: int,
        scale: float, block_size: int = 512, interpret=False, poison: bool = False) -> jax.Array:
    """Pallas TPU kernel version of `headsplit_decode_attention_reference` (same arguments and
    result): the dense kernel (blocks of `block_size` slots) on the full heads and the sink +
    window kernel on the streaming heads, two launches, query heads reassembled in order.
    interpret: False (Mosaic TPU), True or a `pltpu.InterpretParams`. poison: tests only."""
    return split_heads(
        q, full_heads, stream_heads,
        lambda qq: dense_decode_attention(qq, full_k, full_v, full_lengths, scale=scale,
                                          block_size=block_size, interpret=interpret,
                                          poison=poison),
        lambda qq: sink_window_decode_attention(qq, stream_k, stream_v, stream_counts, sink=sink,
                                                window=window, scale=scale, interpret=interpret,
                                                poison=poison))
