"""Sparse cache: per layer and KV head, only the prompt tokens a policy kept, with a different
number kept per head (AdaKV-style budgets), plus a dense region for tokens generated while decoding.

Layout of one layer (the ragged, "flattened" layout AdaKV uses with variable-length attention):

    k, v:         [B, N, D]     kept prompt tokens of all KV heads of the layer, grouped by head
                                (head 0's tokens first, positions ascending inside a head)
    heads:        [B, N] int32  KV head of each slot; K (num_kv_heads) marks a padding slot
    positions:    [B, N] int32  original prompt position of each slot (-1 for padding)
    new_k, new_v: [B, K, E, D]  tokens generated while decoding, appended to every head
    new_lengths:  [B] int32     how many decode slots are written

N is static: the largest total number of tokens the policy may keep per sequence in this layer
(sum over heads). Heads share it, so a head-wise budget costs no padding; the only padding is a
sequence keeping fewer than N tokens (a prompt shorter than the padded prompt length), which
`padding_slots` reports. `nbytes` counts every array above, padding and indices included.
"""
from __future__ import annotations

from typing import Tuple

import flax.struct
import jax
import jax.numpy as jnp

from jaxkv.cache.base import array_nbytes, batched_write, positions_mask


@flax.struct.dataclass
class SparseCache:
    """One layer's sparse cache (see module docstring)."""

    k: jax.Array
    v: jax.Array
    heads: jax.Array
    positions: jax.Array
    new_k: jax.Array
    new_v: jax.Array
    new_lengths: jax.Array

    @classmethod
    def from_selection(cls, k: jax.Array, v: jax.Array, keep: jax.Array, n_slots: int,
                       extra_capacity: int) -> "SparseCache":
        """Gather the kept tokens of a prefill cache.

        k, v: [B, K, T, D] prefill keys/values (possibly already merged/adjusted by a policy);
        keep: bool [B, K, T], at most `n_slots` True per sequence (the rest would be dropped);
        extra_capacity: decode slots to allocate per head.
        """
        b, kh, t, d = k.shape
        if keep.shape != (b, kh, t):
            raise ValueError(f"keep.shape={keep.shape}: must be {(b, kh, t)} (batch, kv_heads, tokens)")
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or not 1 <= n_slots <= kh * t:
            raise ValueError(f"n_slots={n_slots!r}: must be an integer in [1, {kh * t}]")
        if isinstance(extra_capacity, bool) or not isinstance(extra_capacity, int) \
                or extra_capacity < 0:
            raise ValueError(f"extra_capacity={extra_capacity!r}: must be an integer >= 0")
        flat_keep = keep.reshape(b, kh * t)
        order_key = jnp.arange(kh * t, dtype=jnp.int32)[None, :]  # head * T + position
        # kept slots first, in (head, position) order; top_k of the negated key is ascending
        key = jnp.where(flat_keep, order_key, kh * t + order_key)
        _, idx = jax.lax.top_k(-key, n_slots)  # [B, N]
        valid = jnp.take_along_axis(flat_keep, idx, axis=1)  # [B, N]
        gather = lambda x: jnp.take_along_axis(x.reshape(b, kh * t, d), idx[:, :, None], axis=1)
        valid_f = valid[:, :, None].astype(k.dtype)
        return cls(
            k=gather(k) * valid_f, v=gather(v) * valid_f,
            heads=jnp.where(valid, idx // t, kh).astype(jnp.int32),
            positions=jnp.where(valid, idx % t, -1).astype(jnp.int32),
            new_k=jnp.zeros((b, kh, extra_capacity, d), k.dtype),
            new_v=jnp.zeros((b, kh, extra_capacity, d), v.dtype),
            new_lengths=jnp.zeros((b,), jnp.int32))

    @property
    def num_kv_heads(self) -> int:
        return self.new_k.shape[1]

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    def counts(self) -> jax.Array:
        """[B, K] int32 kept prompt tokens per head."""
        onehot = self.heads[:, :, None] == jnp.arange(self.num_kv_heads)[None, None, :]
        return onehot.sum(1).astype(jnp.int32)

    def padding_slots(self) -> jax.Array:
        """[B] int32 prompt slots holding nothing (allocated, counted in nbytes)."""
        return (self.heads >= self.num_kv_heads).sum(1).astype(jnp.int32)

    def append(self, k: jax.Array, v: jax.Array) -> "SparseCache":
        """k, v: [B, K, D], one token per sequence for every head, at decode slot new_lengths[b].
        `generate` sizes extra_capacity so it is never exceeded (a full region keeps its length)."""
        return self.replace(new_k=batched_write(self.new_k, k, self.new_lengths),
                            new_v=batched_write(self.new_v, v, self.new_lengths),
                            new_lengths=jnp.minimum(self.new_lengths + 1, self.new_k.shape[2]))

    def attend(self, q: jax.Array, scale: float) -> jax.Array:
        """q: [B, H, D] -> [B, H, D]."""
        from pallas_kernels import dispatch
        return dispatch.sparse_decode_attention(q, self.k, self.v, self.heads, self.new_k,
                                                self.new_v, self.new_lengths, scale=scale)

    def nbytes(self) -> int:
        return array_nbytes(self.k, self.v, self.heads, self.positions, self.new_k, self.new_v,
                            self.new_lengths)

    def kept_positions(self, lengths, t: int) -> jax.Array:
        """The kept prompt slots' (head, position) pairs as a mask [B, K, t]."""
        return positions_mask(self.heads, self.positions, self.num_kv_heads, t)

    def to_dense(self) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """(k, v [B, K, S, D], valid [B, K, S]) with S = N + E: head h's kept prompt tokens in
        position order, then its decoded tokens (for tests)."""
        b, n, d = self.k.shape
        kh, e = self.num_kv_heads, self.new_k.shape[2]
        valid = self.heads < kh
        onehot = (self.heads[:, :, None] == jnp.arange(kh)[None, None, :]).astype(jnp.int32)
        rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=1) - 1,
                                   jnp.minimum(self.heads, kh - 1)[:, :, None], axis=2)[..., 0]
        head = jnp.where(valid, self.heads, kh)  # out of range -> dropped by the scatter
        bidx = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))

        def scatter(x):  # [B, N, D] -> [B, K, N, D]
            out = jnp.zeros((b, kh, n, d), x.dtype)
            return out.at[bidx, head, rank].set(x, mode="drop")
        pk, pv = scatter(self.k), scatter(self.v)
        pvalid = jnp.zeros((b, kh, n), bool).at[bidx, head, rank].set(valid, mode="drop")
        counts = self.counts()  # [B, K]
        # move each head's decode tokens right after its prompt tokens
        s = n + e
        pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, e)] + [(0, 0)] * (x.ndim - 3))
        out_k, out_v, out_valid = pad(pk), pad(pv), pad(pvalid)
        slot = counts[:, :, None] + jnp.arange(e)[None, None, :]  # [B, K, E]
        dvalid = jnp.broadcast_to(jnp.arange(e)[None, None, :] < self.new_lengths[:, None, None],
                                  slot.shape)
        bi = jnp.broadcast_to(jnp.arange(b)[:, None, None], slot.shape)
        hi = jnp.broadcast_to(jnp.arange(kh)[None, :, None], slot.shape)
        slot = jnp.where(dvalid, slot, s)  # invalid -> dropped
        out_k = out_k.at[bi, hi, slot].set(self.new_k, mode="drop")
        out_v = out_v.at[bi, hi, slot].set(self.new_v, mode="drop")
        out_valid = out_valid.at[bi, hi, slot].set(dvalid, mode="drop")
        return out_k, out_v, out_valid
