"""Dense KV cache with per-sequence lengths (right-padded batch)."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxkv.cache.base import array_nbytes, batched_write, prefix_mask


@flax.struct.dataclass
class DenseCache:
    """One layer's uncompressed cache.

    k, v:    [B, K, S, D]   slot s of sequence b holds the token at position s
    lengths: [B] int32      number of valid slots per sequence
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def from_prefill(cls, k: jax.Array, v: jax.Array, lengths: jax.Array,
                     capacity: int) -> "DenseCache":
        """k, v: [B, K, T, D] prefill keys/values; capacity >= T total slots to allocate."""
        b, kh, t, d = k.shape
        if capacity < t:
            raise ValueError(f"capacity={capacity}: must be >= the prompt length {t}")
        pad = [(0, 0), (0, 0), (0, capacity - t), (0, 0)]
        return cls(k=jnp.pad(k, pad), v=jnp.pad(v, pad), lengths=lengths.astype(jnp.int32))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k: jax.Array, v: jax.Array) -> "DenseCache":
        """k, v: [B, K, D] written at slot lengths[b]. `generate` sizes the capacity so that it is
        never exceeded; a full cache keeps its length (the write lands on the last slot)."""
        return self.replace(k=batched_write(self.k, k, self.lengths),
                            v=batched_write(self.v, v, self.lengths),
                            lengths=jnp.minimum(self.lengths + 1, self.capacity))

    def attend(self, q: jax.Array, scale: float, window: int | None = None) -> jax.Array:
        """q: [B, H, D] -> [B, H, D]. `window`: a sliding-window model's attention span (the
        last `window` slots; the XLA reference, which the kernels do not cover)."""
        from pallas_kernels import dispatch
        return dispatch.dense_decode_attention(q, self.k, self.v, self.lengths, scale=scale,
                                               window=window)

    def nbytes(self) -> int:
        return array_nbytes(self.k, self.v, self.lengths)

    def kept_positions(self, lengths, t: int) -> jax.Array:
        """Every prompt position (the cache keeps them all)."""
        return prefix_mask(lengths, self.k.shape[1], t)

    def to_dense(self):
        s = self.capacity
        valid = jnp.arange(s)[None, None, :] < self.lengths[:, None, None]
        valid = jnp.broadcast_to(valid, self.k.shape[:3])
        return self.k, self.v, valid
