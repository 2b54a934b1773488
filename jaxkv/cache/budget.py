"""Fixed-size cache with eviction while decoding (H2O, R-KV).

Layout of one layer, S = keep + buffer slots per KV head:

    k, v:       [B, K, S, D]   cached tokens (any order)
    positions:  [B, K, S] int32 sequence position of each slot, -1 when empty
    scores:     [B, K, S] float32 H2O: attention accumulated by every query so far
    queries:    [B, H, A, D]   the last A queries (R-KV's importance is measured with them)
    counts:     [B] int32       filled slots (the same for every head of a sequence)
    steps:      [B] int32       tokens seen (prompt + generated)

When a token arrives and the cache is full, it is first compacted to its best `keep` tokens by
the mode's score (the `window` most recent tokens are always kept), then the token is written.
H2O uses buffer = 1, i.e. it evicts one token per step as in the paper; R-KV compresses every
`buffer` tokens (its "decoding buffer"). Memory is exactly S slots per head, whatever the length.

Scores for compaction:
    h2o: accumulated attention (sum over the G query heads of a KV head and over all queries).
    rkv: lam * importance - (1 - lam) * redundancy, each scaled to [0, 1] per head:
         importance = attention of the last A queries (mean over them and the G heads),
         redundancy = mean cosine similarity of a key to the other cached keys of its head.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxkv.cache.base import array_nbytes, batched_write, positions_mask

NEG_INF = -1e30


def _attention(q, k, valid, scale):
    """q [B, K, G, Q, D], k [B, K, S, D], valid [B, K, S] -> probs [B, K, G, Q, S] float32."""
    logits = jnp.einsum("BKGQD,BKSD->BKGQS", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    logits = jnp.where(valid[:, :, None, None, :], logits, NEG_INF)
    return jax.nn.softmax(logits, -1) * valid[:, :, None, None, :]


def redundancy(k, valid):
    """float32 [B, K, S]: mean cosine similarity of each key to the other valid keys of its head."""
    kf = k.astype(jnp.float32)
    unit = kf / jnp.maximum(jnp.linalg.norm(kf, axis=-1, keepdims=True), 1e-12)
    sim = jnp.einsum("BKSD,BKTD->BKST", unit, unit)
    pair = valid[:, :, :, None] & valid[:, :, None, :] & ~jnp.eye(k.shape[2], dtype=bool)
    n = jnp.maximum(pair.sum(-1), 1)
    return jnp.where(pair, sim, 0.0).sum(-1) / n


def _unit_scale(x, valid):
    top = jnp.where(valid, x, -jnp.inf).max(-1, keepdims=True)
    bot = jnp.where(valid, x, jnp.inf).min(-1, keepdims=True)
    return jnp.where(valid, (x - bot) / jnp.maximum(top - bot, 1e-12), 0.0)


@flax.struct.dataclass
class BudgetCache:
    """One layer's fixed-size evicting cache (see module docstring)."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    scores: jax.Array
    queries: jax.Array
    counts: jax.Array
    steps: jax.Array
    keep: int = flax.struct.field(pytree_node=False)
    window: int = flax.struct.field(pytree_node=False)
    mode: str = flax.struct.field(pytree_node=False)
    lam: float = flax.struct.field(pytree_node=False)
    scale: float = flax.struct.field(pytree_node=False)

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def valid(self) -> jax.Array:
        return self.positions >= 0

    def kept_positions(self, lengths, t: int) -> jax.Array:
        """The filled slots' positions, per head."""
        b, kh, s = self.positions.shape
        heads = jnp.broadcast_to(jnp.arange(kh)[None, :, None], (b, kh, s)).reshape(b, kh * s)
        return positions_mask(heads, self.positions.reshape(b, kh * s), kh, t)

    def compaction_scores(self) -> jax.Array:
        """float32 [B, K, S]: higher = keep; the recent window and empty slots handled here."""
        valid = self.valid()
        if self.mode == "h2o":
            s = self.scores
        else:
            b, h, a, d = self.queries.shape
            kh = self.k.shape[1]
            q = self.queries.reshape(b, kh, h // kh, a, d)
            seen = jnp.arange(a)[None, :] < jnp.minimum(self.steps, a)[:, None]  # [B, A]
            p = _attention(q, self.k, valid, self.scale) * seen[:, None, None, :, None]
            imp = p.sum(axis=(2, 3))
            s = self.lam * _unit_scale(imp, valid) - (1.0 - self.lam) * _unit_scale(
                redundancy(self.k, valid), valid)
        recent = self.positions >= (self.steps[:, None, None] - self.window)
        s = jnp.where(recent, 1e6 + s, s)
        return jnp.where(valid, s, NEG_INF)

    def compact(self, rows: jax.Array) -> "BudgetCache":
        """Keep the best `keep` tokens of every head in the rows where rows[b] is True (moved to
        the first `keep` slots, position order); other rows unchanged."""
        s = self.compaction_scores()
        _, idx = jax.lax.top_k(s, self.keep)  # [B, K, keep]
        pos = jnp.take_along_axis(self.positions, idx, -1)
        order = jnp.argsort(jnp.where(pos >= 0, pos, jnp.iinfo(jnp.int32).max), axis=-1)
        idx = jnp.take_along_axis(idx, order, -1)
        pad = self.slots - self.keep

        def take(x, fill):
            g = jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), axis=2)
            g = jnp.pad(g, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3),
                        constant_values=fill)
            return jnp.where(rows.reshape((-1,) + (1,) * (x.ndim - 1)), g, x)
        return self.replace(k=take(self.k, 0), v=take(self.v, 0),
                            positions=take(self.positions, -1), scores=take(self.scores, 0.0),
                            counts=jnp.where(rows, jnp.minimum(self.counts, self.keep), self.counts))

    def append(self, k: jax.Array, v: jax.Array) -> "BudgetCache":
        """k, v: [B, K, D] (the token at position steps[b])."""
        full = self.counts >= self.slots
        cache = jax.lax.cond(full.any(), lambda c: c.compact(full), lambda c: c, self)
        slot = cache.counts
        kh = k.shape[1]
        write = lambda buf, x: batched_write(buf, x, slot)
        pos = jnp.broadcast_to(cache.steps[:, None], (k.shape[0], kh)).astype(jnp.int32)
        return cache.replace(
            k=write(cache.k, k), v=write(cache.v, v),
            positions=batched_write(cache.positions[..., None], pos[..., None], slot)[..., 0],
            scores=batched_write(cache.scores[..., None], jnp.zeros(pos.shape + (1,)), slot)[..., 0],
            counts=cache.counts + 1, steps=cache.steps + 1)

    def attend(self, q: jax.Array, scale: float) -> jax.Array:
        return self.attend_and_update(q, scale)[0]

    def attend_and_update(self, q: jax.Array, scale: float):
        """q: [B, H, D] -> (out [B, H, D], cache with updated statistics)."""
        b, h, d = q.shape
        kh = self.k.shape[1]
        p = _attention(q.reshape(b, kh, h // kh, 1, d), self.k, self.valid(), scale)
        out = jnp.einsum("BKGQS,BKSD->BKGQD", p, self.v.astype(jnp.float32))
        out = out.reshape(b, h, d).astype(q.dtype)
        a = self.queries.shape[2]
        slot = (self.steps - 1) % a  # the query of the token just appended
        queries = jax.vmap(lambda buf, x, i: jax.lax.dynamic_update_slice_in_dim(
            buf, x[:, None, :].astype(buf.dtype), i, axis=1))(self.queries, q, slot)
        return out, self.replace(scores=self.scores + p.sum(axis=(2, 3)), queries=queries)

    def nbytes(self) -> int:
        return array_nbytes(self.k, self.v, self.positions, self.scores, self.queries,
                            self.counts, self.steps)

    def to_dense(self):
        valid = self.valid()
        return self.k, self.v, valid
