"""The protocol every per-layer cache follows, and helpers shared by all cache types.

A model's cache is a tuple with one per-layer cache per decoder layer (layers may hold different
cache types or sizes, e.g. PyramidKV budgets). Every per-layer cache is a pytree
(`flax.struct.dataclass`) and supports:

  append(k, v) -> cache     k, v: [B, K, D], one new token per sequence, written after the others
  attend(q, scale) -> out   q: [B, H, D] -> out [B, H, D], via `pallas_kernels.dispatch`
  nbytes() -> int           every byte the arrays hold: codes, scales, indices, padding
  to_dense() -> (k, v, valid)   k, v: [B, K, S, D] and valid: bool [B, K, S] (for tests)
"""
from __future__ import annotations

from typing import Protocol, Sequence, Tuple

import jax
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
