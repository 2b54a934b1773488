"""R-KV (Cai et al. 2025): redundancy-aware KV eviction for reasoning models, while decoding.

Every head keeps S = round(budget * T) slots (T = prompt + generated, as for every method).
Once `buffer` new tokens have filled the cache past its `keep = S - buffer` tokens, it is
compressed back to `keep`: the `window` most recent tokens stay, the others are ranked by

    lam * importance - (1 - lam) * redundancy        (each scaled to [0, 1] per head)

importance = attention of the last `n_queries` queries (mean over them and the G query heads of
the KV head), redundancy = mean cosine similarity of a key to the other cached keys of its head
(the paper's lam = 0.1 weighs redundancy heavily). The cache holds the last `n_queries` queries
for this, counted in its bytes. At prefill the prompt is compressed the same way with the last
`n_queries` prompt queries.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxkv.checks import check_int
from jaxkv.policies.base import last_positions
from jaxkv.policies.h2o import H2O
from jaxkv.policies.registry import register_method


@dataclasses.dataclass(frozen=True)
class RKV(H2O):
    """budget, window as H2O; buffer: tokens between compressions; n_queries: observation queries;
    lam: weight of importance against redundancy, in [0, 1]."""

    buffer: int = 16
    n_queries: int = 8
    lam: float = 0.1

    name = "rkv"
    mode = "rkv"

    def __post_init__(self):
        super().__post_init__()
        check_int("buffer", self.buffer, 1)
        check_int("n_queries", self.n_queries, 1)
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) \
                or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam={self.lam!r}: must be a number in [0, 1]")

    def observation_positions(self, lengths, t: int):
        return last_positions(lengths, self.n_queries)

    def n_queries_held(self) -> int:
        return self.n_queries

    def _initial(self, cache, obs):
        b, kh, t, d = cache.k.shape
        return jnp.zeros((b, kh, t), jnp.float32), obs.queries  # [B, H, A, D]


@register_method("rkv")
def _rkv(budget: float, model, window: int = 16, buffer: int = 16, n_queries: int = 8,
         lam: float = 0.1):
    """R-KV at `budget` of the full cache per head."""
    return RKV(budget=budget, window=window, buffer=buffer, n_queries=n_queries, lam=lam)


__all__ = ["RKV"]
