"""Head-split cache (RLKV / DuoAttention deployment): some KV heads of a layer keep the full cache,
the others a constant-size StreamingLLM cache (sink + recent window).

The two groups live in separate arrays, so memory really shrinks:

    full:   DenseCache of the full heads only       k, v [B, Kf, C, D]   (C = prompt + decode room)
    stream: SinkWindowCache of the streaming heads  k, v [B, Ks, sink + window, D]

`full_heads` / `stream_heads` are static tuples of KV-head indices (sorted, disjoint, together
0..K-1). Either may be empty; the matching part is then None. With GQA, query heads
h*G .. h*G + G - 1 read KV head h; `attend` runs both parts through the head-split kernel and puts
the outputs back into query-head order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from jaxkv.cache.dense import DenseCache
from jaxkv.cache.streaming import SinkWindowCache


def check_head_split(full_heads, stream_heads, num_kv_heads: int) -> Tuple[tuple, tuple]:
    """Validate and normalise a split of range(num_kv_heads) into two sorted int tuples."""
    full = tuple(int(h) for h in full_heads)
    stream = tuple(int(h) for h in stream_heads)
    if sorted(full + stream) != list(range(num_kv_heads)):
        raise ValueError(f"full_heads={full}, stream_heads={stream}: together they must list every "
                         f"KV head 0..{num_kv_heads - 1} exactly once")
    return tuple(sorted(full)), tuple(sorted(stream))


@flax.struct.dataclass
class HeadSplitCache:
    """One layer's cache with full heads and streaming heads (see module docstring).

    full:   DenseCache [B, Kf, C, D] of `full_heads`, or None when Kf == 0
    stream: SinkWindowCache [B, Ks, sink + window, D] of `stream_heads`, or None when Ks == 0
    """

    full: Optional[DenseCache]
    stream: Optional[SinkWindowCache]
    full_heads: tuple = flax.struct.field(pytree_node=False)
    stream_heads: tuple = flax.struct.field(pytree_node=False)

    @classmethod
    def from_dense(cls, dense: DenseCache, full_heads, stream_heads, sink: int, window: int,
                   extra_capacity: int = 0) -> "HeadSplitCache":
        """Split a prefill cache by head: the full heads get `extra_capacity` more slots, the
        streaming heads keep their first `sink` and last `window` tokens
        (`SinkWindowCache.from_dense`, which also clamps the sizes to what can ever be used)."""
        full_heads, stream_heads = check_head_split(full_heads, stream_heads, dense.k.shape[1])
        if isinstance(extra_capacity, bool) or not isinstance(extra_capacity, int) \
                or extra_capacity < 0:
            raise ValueError(f"extra_capacity={extra_capacity!r}: must be an integer >= 0")
        full = stream = None
        if full_heads:
            idx = jnp.asarray(full_heads, jnp.int32)
            full = DenseCache.from_prefill(dense.k[:, idx], dense.v[:, idx], dense.lengths,
                                           dense.capacity + extra_capacity)
        if stream_heads:
            idx = jnp.asarray(stream_heads, jnp.int32)
            part = DenseCache(k=dense.k[:, idx], v=dense.v[:, idx], lengths=dense.lengths)
            stream = SinkWindowCache.from_dense(part, sink, window, extra_capacity)
        return cls(full=full, stream=stream, full_heads=full_heads, stream_heads=stream_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.full_heads) + len(self.stream_heads)

    def append(self, k: jax.Array, v: jax.Array) -> "HeadSplitCache":
        """k, v: [B, K, D] in KV-head order; each part gets its own heads."""
        full, stream = self.full, self.stream
        if full is not None:
            idx = jnp.asarray(self.full_heads, jnp.int32)
            full = full.append(k[:, idx], v[:, idx])
        if stream is not None:
            idx = jnp.asarray(self.stream_heads, jnp.int32)
            stream = stream.append(k[:, idx], v[:, idx])
        return self.replace(full=full, stream=stream)

    def attend(self, q: jax.Array, scale: float) -> jax.Array:
        """q: [B, H, D] -> [B, H, D] (query heads in their original order)."""
        from pallas_kernels import dispatch
        f, s = self.full, self.stream
        return dispatch.headsplit_decode_attention(
            q,
            None if f is None else f.k, None if f is None else f.v,
            None if f is None else f.lengths,
            None if s is None else s.k, None if s is None else s.v,
            None if s is None else s.counts,
            full_heads=self.full_heads, stream_heads=self.stream_heads,
            sink=0 if s is None else s.sink, window=0 if s is None else s.window, scale=scale)

    def kept_positions(self, lengths, t: int) -> jax.Array:
        """Each part's kept positions, KV heads in their original order."""
        b = jnp.asarray(lengths).shape[0]
        out = jnp.zeros((b, self.num_kv_heads, t), bool)
        for heads, part in ((self.full_heads, self.full), (self.stream_heads, self.stream)):
            if part is not None:
                out = out.at[:, jnp.asarray(heads, jnp.int32)].set(part.kept_positions(lengths, t))
        return out

    def nbytes(self) -> int:
        """Bytes of both parts (their k, v and int32 lengths / counts)."""
        return sum(part.nbytes() for part in (self.full, self.stream) if part is not None)

    def to_dense(self) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """(k, v [B, K, S, D], valid bool [B, K, S]) with S = the larger part's slots; KV heads in
        their original order. Streaming heads are in slot order (sinks, then the ring)."""
        parts = [(h, p.to_dense()) for h, p in ((self.full_heads, self.full),
                                                 (self.stream_heads, self.stream)) if p is not None]
        s = max(kv[0].shape[2] for _, kv in parts)
        ks, vs, valids = [], [], []
        for _, (k, v, valid) in parts:
            pad = s - k.shape[2]
            ks.append(jnp.pad(k, [(0, 0), (0, 0), (0, pad), (0, 0)]))
            vs.append(jnp.pad(v, [(0, 0), (0, 0), (0, pad), (0, 0)]))
            valids.append(jnp.pad(valid, [(0, 0), (0, 0), (0, pad)]))
        order = [head for heads, _ in parts for head in heads]  # concatenated head order
        inverse = jnp.asarray([order.index(h) for h in range(len(order))], jnp.int32)
        cat = lambda xs: jnp.concatenate(xs, axis=1)[:, inverse]
        return cat(ks), cat(vs), cat(valids)
