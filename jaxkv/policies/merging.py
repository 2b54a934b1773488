"""Merging baselines: instead of dropping the evicted prompt tokens, fold them into kept ones.

All three use GRKV's retention (Critical-AdaKV in spans of `span` tokens, 10 by default as
GRKV's) so that they differ from GRKV only in how the kept keys/values are changed, and all work
per layer, sequence and KV head in the dense prefill layout (k, v [B, K, T, D], keep [B, K, T])
before the kept tokens are gathered into a SparseCache. The "attention mass" of a token is its
SnapKV score (window attention, pooled).

* CaM (Zhang et al. 2024, "cache merging"): an evicted value is spread over the next
  `neighbours` kept tokens after it (keys untouched); each receiver's value becomes the
  mass-weighted mean of its own value and what it received.
* Nearest survivor (kvpress-style merging): an evicted value is folded into the kept token of the
  same head whose key is most cosine-similar (values only, mass-weighted mean).
* KVMerger (Wang et al. 2024): an evicted token whose key is similar (cosine >= `threshold`) to an
  adjacent kept token (the nearest kept token before or after it) joins that token's merge set;
  each set collapses to its pivot (the kept token) with Gaussian-kernel weights
  exp(-||k_i - k_pivot||^2 / (2 sigma^2)), sigma^2 the mean squared distance in the set, applied to
  keys and values alike.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxkv.checks import check_int
from jaxkv.policies.adakv import CriticalKV
from jaxkv.policies.registry import register_method
from jaxkv.policies.snapkv import kept_first, snap_settings


def _valid(lengths, t):
    return jnp.arange(t)[None, None, :] < lengths[:, None, None]  # [B, 1, T]


def _scatter_add(target: jax.Array, x: jax.Array) -> jax.Array:
    """Sum x [B, K, T, ...] into slot target [B, K, T] (T = dropped) -> [B, K, T, ...]."""
    b, kh, t = target.shape
    out = jnp.zeros(x.shape, x.dtype)
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(kh)[None, :, None]
    return out.at[bi, hi, target].add(x, mode="drop")


def _fold(v, mass, keep, target, weight):
    """Mass-weighted fold: v_j' = (m_j v_j + sum_e w_e v_e) / (m_j + sum_e w_e) over the evicted e
    with target[e] == j; weight [B, K, T] is w_e (0 for tokens that move nowhere)."""
    num = _scatter_add(target, weight[..., None] * v)
    den = _scatter_add(target, weight)
    m = mass * keep
    new = (m[..., None] * v + num) / jnp.maximum(m + den, 1e-30)[..., None]
    return jnp.where(((den > 0) & keep)[..., None], new, v)


def kept_rank_positions(keep: jax.Array):
    """(rank [B, K, T]: number of kept tokens before each position, pos_of_rank [B, K, T]:
    position of the r-th kept token of a head, T past the end)."""
    b, kh, t = keep.shape
    rank = jnp.cumsum(keep, axis=-1) - keep  # kept tokens strictly before t
    pos = jnp.broadcast_to(jnp.arange(t), keep.shape)
    idx = jnp.where(keep, rank, t)
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(kh)[None, :, None]
    pos_of_rank = jnp.full(keep.shape, t, jnp.int32).at[bi, hi, idx].set(pos, mode="drop")
    return rank.astype(jnp.int32), pos_of_rank


def cam_merge(k, v, keep, mass, lengths, neighbours: int):
    """CaM: returns (k, v') with evicted values spread over the next `neighbours` kept tokens."""
    t = k.shape[2]
    evicted = _valid(lengths, t) & ~keep
    rank, pos_of_rank = kept_rank_positions(keep)
    vf = v.astype(jnp.float32)
    num = jnp.zeros(vf.shape, jnp.float32)
    den = jnp.zeros(mass.shape, jnp.float32)
    n_kept = keep.sum(-1, keepdims=True)
    for j in range(neighbours):
        r = rank + j  # rank of the j-th kept token after each evicted one
        ok = evicted & (r < n_kept)
        target = jnp.where(ok, jnp.take_along_axis(pos_of_rank, jnp.minimum(r, t - 1), -1), t)
        w = jnp.where(ok, mass / neighbours, 0.0)
        num = num + _scatter_add(target, w[..., None] * vf)
        den = den + _scatter_add(target, w)
    m = mass * keep
    new = (m[..., None] * vf + num) / jnp.maximum(m + den, 1e-30)[..., None]
    return k, jnp.where(((den > 0) & keep)[..., None], new, vf).astype(v.dtype)


def _cosine(a, b):
    """a: [..., T, D], b: [..., S, D] -> [..., T, S] cosine similarity (float32)."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return jnp.einsum("...TD,...SD->...TS", a, b)


def nearest_merge(k, v, keep, mass, lengths, max_kept=None):
    """Each evicted value folds into the kept token (same head) with the most cosine-similar key
    (ties: the earliest). One KV head at a time (lax.map) so the similarity stays per head; with
    max_kept (a static bound on the tokens any head keeps) it is taken against each head's kept
    keys only, gathered into max_kept slots ([T, max_kept] instead of [T, T]: the same targets at
    max_kept / T of the work)."""
    t = k.shape[2]
    evicted = _valid(lengths, t) & ~keep
    if max_kept is not None and max_kept < t:
        idx, ok = kept_first(keep, max_kept)  # [B, K, S], kept positions in order first
        kept_keys = jnp.take_along_axis(k, idx[..., None], axis=2)  # [B, K, S, D]
    else:
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), keep.shape)
        ok, kept_keys = keep, k

    def per_head(args):  # k [B, T, D], kept keys [B, S, D], ok [B, S], idx [B, S] -> [B, T]
        kh_, kk_, ok_, idx_ = args
        sim = jnp.where(ok_[:, None, :], _cosine(kh_, kk_), -jnp.inf)  # [B, T, S]
        return jnp.take_along_axis(idx_, jnp.argmax(sim, axis=-1), axis=-1).astype(jnp.int32)
    heads_first = lambda x: jnp.moveaxis(x, 1, 0)
    target = jax.lax.map(per_head, (heads_first(k), heads_first(kept_keys), heads_first(ok),
                                    heads_first(idx)))
    target = jnp.where(evicted, heads_first(target), t)
    w = jnp.where(evicted, mass, 0.0)
    return k, _fold(v.astype(jnp.float32), mass, keep, target, w).astype(v.dtype)


def kvmerger_merge(k, v, keep, lengths, threshold: float):
    """KVMerger: Gaussian-weighted merge of evicted tokens into an adjacent similar kept token."""
    b, kh, t, d = k.shape
    evicted = _valid(lengths, t) & ~keep
    pos = jnp.broadcast_to(jnp.arange(t), keep.shape)
    # nearest kept position before / after every token
    prev = jax.lax.cummax(jnp.where(keep, pos, -1), axis=2)
    nxt = jax.lax.cummin(jnp.where(keep, pos, t), axis=2, reverse=True)
    kf = k.astype(jnp.float32)
    gather = lambda idx: jnp.take_along_axis(kf, jnp.clip(idx, 0, t - 1)[..., None], axis=2)
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    cos_prev = jnp.where(prev >= 0, (unit(kf) * unit(gather(prev))).sum(-1), -jnp.inf)
    cos_next = jnp.where(nxt < t, (unit(kf) * unit(gather(nxt))).sum(-1), -jnp.inf)
    use_next = cos_next > cos_prev
    target = jnp.where(use_next, nxt, prev)
    best = jnp.maximum(cos_prev, cos_next)
    joins = evicted & (best >= threshold)
    target = jnp.where(joins, target, t)
    dist2 = ((kf - gather(target)) ** 2).sum(-1)  # [B, K, T]
    n = _scatter_add(target, joins.astype(jnp.float32))
    sigma2 = _scatter_add(target, jnp.where(joins, dist2, 0.0)) / jnp.maximum(n, 1.0)
    sig_e = jnp.take_along_axis(sigma2, jnp.clip(target, 0, t - 1), axis=2)
    g = jnp.where(joins, jnp.exp(-dist2 / jnp.maximum(2.0 * sig_e, 1e-12)), 0.0)
    ones = keep.astype(jnp.float32)  # the pivot's own weight is exp(0) = 1
    k_new = _fold(kf, ones, keep, target, g)
    v_new = _fold(v.astype(jnp.float32), ones, keep, target, g)
    return k_new.astype(k.dtype), v_new.astype(v.dtype)


@dataclasses.dataclass(frozen=True)
class CaM(CriticalKV):
    """Critical-AdaKV retention + CaM value merging into the next `neighbours` kept tokens."""

    neighbours: int = 3

    name = "cam"

    def __post_init__(self):
        super().__post_init__()
        check_int("neighbours", self.neighbours, 1)

    def adjust(self, layer, k, v, keep, scores, cache, obs):
        return cam_merge(k, v, keep, scores, obs.lengths, self.neighbours)


@dataclasses.dataclass(frozen=True)
class NearestMerge(CriticalKV):
    """Critical-AdaKV retention + evicted values folded into the most key-similar survivor."""

    name = "nearest_merge"

    def adjust(self, layer, k, v, keep, scores, cache, obs):
        return nearest_merge(k, v, keep, scores, obs.lengths,
                             max_kept=self.max_kept(layer, k.shape[2], cache, obs))


@dataclasses.dataclass(frozen=True)
class KVMerger(CriticalKV):
    """Critical-AdaKV retention + KVMerger Gaussian merging of similar adjacent keys."""

    threshold: float = 0.5

    name = "kvmerger"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.threshold, (int, float)) or not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r}: a cosine similarity in [-1, 1]")

    def adjust(self, layer, k, v, keep, scores, cache, obs):
        return kvmerger_merge(k, v, keep, obs.lengths, self.threshold)


@register_method("cam")
def _cam(budget: float, model, window: int = 32, kernel: int = 5, neighbours: int = 3,
         span: int = 10):
    """CaM merging over GRKV's retention (Critical-AdaKV in spans of `span` tokens)."""
    return CaM(budget=budget, neighbours=neighbours, **snap_settings(model, window, kernel, span))


@register_method("nearest_merge")
def _nearest(budget: float, model, window: int = 32, kernel: int = 5, span: int = 10):
    """Nearest-survivor value merging over GRKV's retention (Critical-AdaKV in spans of `span`
    tokens)."""
    return NearestMerge(budget=budget, **snap_settings(model, window, kernel, span))


@register_method("kvmerger")
def _kvmerger(budget: float, model, window: int = 32, kernel: int = 5, threshold: float = 0.5,
              span: int = 10):
    """KVMerger Gaussian merging over GRKV's retention (Critical-AdaKV in spans of `span`
    tokens)."""
    return KVMerger(budget=budget, threshold=threshold,
                    **snap_settings(model, window, kernel, span))


__all__ = ["CaM", "NearestMerge", "KVMerger", "cam_merge", "nearest_merge", "kvmerger_merge",
           "kept_rank_positions"]
