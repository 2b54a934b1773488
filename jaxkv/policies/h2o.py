"""H2O (Zhang et al. 2023): heavy-hitter eviction while decoding. Every head keeps a fixed number
of tokens: the `window` most recent plus those with the largest attention accumulated over all
queries so far (prompt queries at prefill, then every decoded query); one token is evicted per
step once the cache is full. Shared machinery for R-KV (`jaxkv.policies.rkv`).

Sizing by budget (fraction of the full cache's bytes, as for every method): the full cache holds
T = prompt + generated slots per head; this cache holds S token slots per head with S chosen so
that its bytes, counted honestly (k, v, an int32 position and a float32 score per slot, plus the
queries R-KV keeps), equal budget * the full cache's bytes (`H2O.slots`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxkv.cache.budget import BudgetCache
from jaxkv.checks import check_int
from jaxkv.policies.base import Policy, check_budget
from jaxkv.policies.registry import register_method


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
    """budget: fraction of the full cache kept, in (0, 1]; window: recent tokens always kept."""

    budget: float = 0.2
    window: int = 16

    name = "h2o"
    layer_invariant = True
    mode = "h2o"
    buffer = 1  # evict one token per step

    def __post_init__(self):
        check_budget(self.budget)
        check_int("window", self.window, 1)

    def n_queries_held(self) -> int:
        return 1

    def observation_positions(self, lengths, t: int):
        # every prompt query: H2O's scores start as the prompt's accumulated attention
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (lengths.shape[0], t))

    def slots(self, capacity: int, head_dim: int = 0, itemsize: int = 4, group: int = 1) -> int:
        """Token slots per head so that the cache's bytes match budget * the full cache's:
        a slot holds k, v (2 * head_dim * itemsize) plus an int32 position and a float32 score,
        and each KV head also holds `n_queries_held()` queries of its `group` query heads."""
        slot = 2 * head_dim * itemsize
        if slot:
            extra = self.n_queries_held() * group * head_dim * itemsize
            s = int((self.budget * capacity * slot - extra) // (slot + 8))
        else:
            s = int(round(self.budget * capacity))
        need = self.window + self.buffer + 1
        if s < need:
            raise ValueError(f"budget={self.budget}: {s} slots of {capacity} per head, fewer than "
                             f"the window ({self.window}) + buffer ({self.buffer}) + 1; raise "
                             f"the budget or shrink the window")
        return s

    def _initial(self, cache, obs):
        """(scores [B, K, T], queries [B, H, A, D]) from the prompt."""
        k = cache.k
        b, kh, t, d = k.shape
        q = obs.queries  # [B, H, T, D] all prompt positions
        g = q.shape[1] // kh
        valid = jnp.broadcast_to((jnp.arange(t)[None, :] < obs.lengths[:, None])[:, None], (b, kh, t))
        qv = q.reshape(b, kh, g, t, d)
        logits = jnp.einsum("BKGQD,BKSD->BKGQS", qv.astype(jnp.float32), k.astype(jnp.float32))
        causal = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])  # [Q, S]
        qvalid = jnp.arange(t)[None, :] < obs.lengths[:, None]  # [B, Q]
        mask = causal[None] & qvalid[:, :, None] & valid[:, 0, None, :]  # [B, Q, S]
        logits = jnp.where(mask[:, None, None], logits * obs.scale, -1e30)
        p = jax.nn.softmax(logits, -1) * mask[:, None, None]
        return p.sum(axis=(2, 3)), jnp.zeros((b, q.shape[1], 1, d), q.dtype)

    def compress_layer(self, layer, cache, obs):
        b, kh, t, d = cache.k.shape
        capacity = t + obs.extra_capacity
        g = obs.queries.shape[1] // kh
        s = min(self.slots(capacity, d, jnp.dtype(cache.k.dtype).itemsize, g), capacity)
        scores, queries = self._initial(cache, obs)
        lengths = obs.lengths
        pos = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], jnp.arange(t)[None, :], -1)
        full = BudgetCache(
            k=cache.k, v=cache.v, positions=jnp.broadcast_to(pos[:, None], (b, kh, t)).astype(jnp.int32),
            scores=scores, queries=queries, counts=lengths, steps=lengths,
            keep=min(s, t), window=self.window, mode=self.mode, lam=getattr(self, "lam", 0.0),
            scale=obs.scale)
        if t > s:
            full = full.compact(lengths > s)
        head = lambda x, fill: jnp.pad(x[:, :, :s], [(0, 0), (0, 0), (0, max(0, s - t))]
                                       + [(0, 0)] * (x.ndim - 3), constant_values=fill)
        return BudgetCache(
            k=head(full.k, 0), v=head(full.v, 0), positions=head(full.positions, -1),
            scores=head(full.scores, 0.0), queries=full.queries,
            counts=jnp.minimum(lengths, s), steps=lengths, keep=s - self.buffer,
            window=self.window, mode=self.mode, lam=getattr(self, "lam", 0.0), scale=obs.scale)


@register_method("h2o")
def _h2o(budget: float, model, window: int = 16):
    """H2O at `budget` of the full cache (prompt + generated) per head."""
    return H2O(budget=budget, window=window)


__all__ = ["H2O"]
