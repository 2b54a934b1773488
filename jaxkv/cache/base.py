"""The protocol every per-layer cache follows, and helpers shared by all cache types.

A model's cache is a tuple with one per-layer cache per decoder layer (layers may hold different
cache types or sizes, e.g. PyramidKV budgets). Every per-layer cache is a pytree
(`flax.struct.dataclass`) and supports:

  append(k, v) -> cache     k, v: [B, K, D], one new token per sequence, written after the others
  attend(q, scale) -> out   q: [B, H, D] -> out [B, H, D], via `pallas_kernels.dispatch`
  nbytes() -> int           every byte the arrays hold: codes, scales, indices, padding
  to_dense() -> (k, v, valid)   k, v: [B, K, S, D] and valid: bool [B, K, S] (for tests)
  kept_positions(lengths, t) -> bool [B, K, t]   the prompt positions whose key and value the
                            cache holds (at any precision), given the prompt lengths [B]; asked
                            right after compression, before decoding (positions at or past a
                            sequence's length are False)
"""
from __future__ import annotations

from typing import Protocol, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


class LayerCache(Protocol):
    def append(self, k: jax.Array, v: jax.Array) -> "LayerCache": ...

    def attend(self, q: jax.Array, scale: float) -> jax.Array: ...

    def nbytes(self) -> int: ...

    def to_dense(self) -> Tuple[jax.Array, jax.Array, jax.Array]: ...


def array_nbytes(*arrays) -> int:
    """Bytes held by the given arrays (static: read from shapes and dtypes, works under jit)."""
    total = 0
    for a in jax.tree_util.tree_leaves(arrays):
        total += int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
    return total


def positions_mask(heads: jax.Array, positions: jax.Array, num_kv_heads: int, t: int) -> jax.Array:
    """bool [B, K, t]: True at (heads[b, n], positions[b, n]) for every slot n; a slot whose
    head is out of [0, K) or whose position is out of [0, t) marks nothing.
    heads, positions: int [B, N] (or heads broadcastable to positions)."""
    b = positions.shape[0]
    heads = jnp.broadcast_to(heads, positions.shape)
    ok = (heads >= 0) & (heads < num_kv_heads) & (positions >= 0) & (positions < t)
    bi = jnp.broadcast_to(jnp.arange(b)[:, None], positions.shape)
    h = jnp.where(ok, heads, num_kv_heads)
    p = jnp.where(ok, positions, t)
    mask = jnp.zeros((b, num_kv_heads + 1, t + 1), bool).at[bi, h, p].set(True)
    return mask[:, :num_kv_heads, :t]


def prefix_mask(lengths: jax.Array, num_kv_heads: int, t: int) -> jax.Array:
    """bool [B, K, t]: positions < lengths[b] for every head."""
    m = jnp.arange(t)[None, None, :] < jnp.asarray(lengths)[:, None, None]
    return jnp.broadcast_to(m, (m.shape[0], num_kv_heads, t))


def cache_nbytes(caches: Sequence[LayerCache]) -> int:
    """Bytes of a whole model cache (tuple of per-layer caches)."""
    return sum(c.nbytes() for c in caches)


def batched_write(buf: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    """Write update[b] into buf[b, :, index[b]] for every batch row.

    buf: [B, K, S, D]; update: [B, K, D]; index: [B] int32 slot per sequence.
    """
    def one(b_buf, b_upd, b_idx):  # [K, S, D], [K, D], []
        return jax.lax.dynamic_update_slice_in_dim(b_buf, b_upd[:, None, :].astype(b_buf.dtype),
                                                   b_idx, axis=1)
    return jax.vmap(one)(buf, update, index)
