"""StreamingLLM cache: a few attention-sink tokens plus a ring buffer of the most recent tokens.

Layout of one layer (per sequence b, per KV head), S = sink + window slots:

    slots [0, sink)            the first `sink` tokens of the sequence (never overwritten)
    slots [sink, sink+window)  ring buffer: the token at position p >= sink lives in slot
                               sink + (p - sink) % window, so a new token overwrites the oldest
                               recent token once the ring is full

`counts[b]` is the number of tokens sequence b has seen (prompt + generated). It determines
everything else:

    slot i < sink valid        iff i < counts
    ring slot j valid          iff j < clip(counts - sink, 0, window)
    position held by ring slot j: the latest p < counts with (p - sink) % window == j, i.e.
                               p = counts - 1 - ((counts - 1 - sink - j) mod window)

A sequence shorter than sink + window therefore keeps every token, at slot == position. The valid
slots always form a prefix of length min(counts, S), so attention over this cache needs no
positions (keys carry RoPE of their original positions, as in DuoAttention's deployment; we do not
re-position keys inside the cache as the StreamingLLM paper does).

The same rule as `jaxkv.model.layers.streaming_mask(window=window, sink=sink)`: a query at position
p sees keys with kp < sink or p - kp < window (itself included, since decode appends first).
Memory is honest: the arrays are [B, K, sink + window, D], nothing of the full length is kept.
"""
from __future__ import annotations

from typing import Tuple

import flax.struct
import jax
import jax.numpy as jnp

from jaxkv.cache.base import array_nbytes, batched_write, positions_mask
from jaxkv.cache.dense import DenseCache


def _check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: must be an integer >= 0")
    return value


def sink_window_slot_valid(counts: jax.Array, sink: int, window: int) -> jax.Array:
    """bool [B, sink + window]: which slots hold a token, for `counts` [B] tokens seen."""
    counts = counts.astype(jnp.int32)
    n_valid = jnp.minimum(counts, sink + window)  # the valid slots are a prefix
    return jnp.arange(sink + window, dtype=jnp.int32)[None, :] < n_valid[:, None]


def sink_window_slot_positions(counts: jax.Array, sink: int, window: int) -> jax.Array:
    """int32 [B, sink + window]: sequence position held by each slot (meaningless where the slot
    is not valid, see `sink_window_slot_valid`)."""
    counts = counts.astype(jnp.int32)[:, None]  # [B, 1]
    sink_pos = jnp.broadcast_to(jnp.arange(sink, dtype=jnp.int32)[None, :],
                                (counts.shape[0], sink))
    if window == 0:
        return sink_pos
    j = jnp.arange(window, dtype=jnp.int32)[None, :]  # [1, W]
    ring_pos = counts - 1 - jnp.mod(counts - 1 - sink - j, window)  # [B, W]
    return jnp.concatenate([sink_pos, ring_pos], axis=1)


@flax.struct.dataclass
class SinkWindowCache:
    """One layer's StreamingLLM cache (see module docstring).

    k, v:   [B, K, sink + window, D]  sink slots, then the ring buffer
    counts: [B] int32                 tokens seen per sequence (prompt + generated)
    sink, window: static sizes (pytree_node=False)
    """

    k: jax.Array
    v: jax.Array
    counts: jax.Array
    sink: int = flax.struct.field(pytree_node=False)
    window: int = flax.struct.field(pytree_node=False)

    @classmethod
    def from_dense(cls, dense: DenseCache, sink: int, window: int,
                   extra_capacity: int = 0) -> "SinkWindowCache":
        """Keep the first `sink` and the last `window` valid tokens of each sequence of `dense`
        (right-padded: sequence b's tokens are slots [0, dense.lengths[b])).

        extra_capacity: tokens that will be appended while decoding. A sequence never holds more
        than C = dense.capacity + extra_capacity tokens, so the sizes are clamped to
        sink' = min(sink, C), window' = min(window, C - sink'): when sink + window >= C nothing
        is ever evicted and the cache is no larger than a dense one; otherwise they are unchanged.
        """
        _check_nonneg_int("sink", sink)
        _check_nonneg_int("window", window)
        _check_nonneg_int("extra_capacity", extra_capacity)
        c = dense.capacity + extra_capacity
        sink = min(sink, c)
        window = min(window, c - sink)
        counts = dense.lengths.astype(jnp.int32)  # [B]
        pos = sink_window_slot_positions(counts, sink, window)  # [B, S]
        valid = sink_window_slot_valid(counts, sink, window)  # [B, S]
        idx = jnp.clip(pos, 0, dense.capacity - 1)[:, None, :, None]  # [B, 1, S, 1]
        keep = valid[:, None, :, None]

        def gather(x):  # [B, K, T, D] -> [B, K, S, D], zeros in unused slots
            return jnp.where(keep, jnp.take_along_axis(x, idx, axis=2), 0).astype(x.dtype)

        return cls(k=gather(dense.k), v=gather(dense.v), counts=counts, sink=sink, window=window)

    @property
    def slots(self) -> int:
        return self.sink + self.window

    def append(self, k: jax.Array, v: jax.Array) -> "SinkWindowCache":
        """k, v: [B, K, D], the token at position counts[b]: a sink slot while counts < sink,
        else ring slot sink + (counts - sink) % window (overwriting the oldest recent token).
        With window == 0, tokens after the sinks are not stored (only counted)."""
        p = self.counts  # [B]
        if self.slots == 0:
            return self.replace(counts=p + 1)
        if self.window > 0:
            slot = jnp.where(p < self.sink, p,
                             self.sink + jnp.mod(p - self.sink, max(self.window, 1)))
            new_k, new_v = k, v
        else:  # sinks only: write a token only while there is a free sink slot
            slot = jnp.minimum(p, self.sink - 1)
            write = (p < self.sink)[:, None, None]  # [B, 1, 1]
            old_k = jnp.take_along_axis(self.k, slot[:, None, None, None], axis=2)[:, :, 0]
            old_v = jnp.take_along_axis(self.v, slot[:, None, None, None], axis=2)[:, :, 0]
            new_k, new_v = jnp.where(write, k, old_k), jnp.where(write, v, old_v)
        return self.replace(k=batched_write(self.k, new_k, slot.astype(jnp.int32)),
                            v=batched_write(self.v, new_v, slot.astype(jnp.int32)),
                            counts=p + 1)

    def attend(self, q: jax.Array, scale: float) -> jax.Array:
        """q: [B, H, D] -> [B, H, D] over the valid slots (the head-split kernel with every head
        streaming)."""
        from pallas_kernels import dispatch
        kh = self.k.shape[1]
        return dispatch.headsplit_decode_attention(
            q, None, None, None, self.k, self.v, self.counts, full_heads=(),
            stream_heads=tuple(range(kh)), sink=self.sink, window=self.window, scale=scale)

    def valid(self) -> jax.Array:
        """bool [B, S] slots that hold a token."""
        return sink_window_slot_valid(self.counts, self.sink, self.window)

    def positions(self) -> jax.Array:
        """int32 [B, S] sequence position of each slot (where valid)."""
        return sink_window_slot_positions(self.counts, self.sink, self.window)

    def nbytes(self) -> int:
        return array_nbytes(self.k, self.v, self.counts)

    def kept_positions(self, lengths, t: int) -> jax.Array:
        """The sink and window slots' positions, the same for every head."""
        pos = jnp.where(self.valid(), self.positions(), -1)
        kh = self.k.shape[1]
        return jnp.broadcast_to(positions_mask(jnp.zeros_like(pos), pos, 1, t),
                                (pos.shape[0], kh, t))

    def to_dense(self) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """(k, v [B, K, S, D] in slot order, valid bool [B, K, S])."""
        valid = jnp.broadcast_to(self.valid()[:, None, :], self.k.shape[:3])
        return self.k, self.v, valid
