"""SnapKV-family prompt eviction after prefill: SnapKV, PyramidKV, ChunkKV, and the shared
machinery (observation-window scores, pooling, per-head and head-wise top-k) that AdaKV,
CriticalKV, the merging baselines and GRKV build on.

Every policy here keeps, per layer, the prompt tokens (on average over the KV heads of the layer)
whose SparseCache holds `budget` of the dense cache's bytes: keys, values and 8 index bytes per
kept token, next to the dense slots for the tokens generated while decoding (all kept), against
the dense cache of the prompt and those slots (`SnapKV.mean_keep`). The last `window` prompt
tokens of every head are always kept; a budget that cannot hold them is a ValueError. The
`SparseCache` arrays are that size (its docstring: the only padding is a sequence shorter than
the padded prompt).

Scores (SnapKV, Li et al. 2024): the attention of the last `window` prompt queries onto every
earlier token, averaged over those queries and over the G query heads of a KV head, then 1-D
average-pooled with `kernel` (which is what makes the kept tokens come in spans).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import jax
import jax.numpy as jnp

from jaxkv.cache.sparse import SparseCache
from jaxkv.checks import check_int
from jaxkv.policies.base import Policy, check_budget, last_positions, prompt_byte_budget
from jaxkv.policies.registry import register_method

NEG_INF = -1e30
# prepare_scores scales each sequence's scores into [0, 1]; adding FORCED (or 2 * FORCED) puts a
# token above every unforced one while keeping the order among forced tokens.
FORCED = 2.0


# ----------------------------------------------------------------------------- scores


def window_attention(cache, obs, window: int) -> jax.Array:
    """Attention probabilities of the last `window` prompt queries: float32 [B, K, G, W, T].

    obs.queries[:, :, :window] must be the post-RoPE queries at `last_positions(lengths, window)`.
    Causal: a query at position p sees keys at positions <= p (and < length)."""
    k = cache.k  # [B, K, T, D]
    b, kh, t, d = k.shape
    q = obs.queries[:, :, :window]  # [B, H, W, D]
    g = q.shape[1] // kh
    qg = q.reshape(b, kh, g, window, d).astype(jnp.float32)
    logits = jnp.einsum("BKGWD,BKTD->BKGWT", qg, k.astype(jnp.float32)) * obs.scale
    qpos = obs.query_positions[:, :window]  # [B, W]
    visible = jnp.arange(t)[None, None, :] <= qpos[:, :, None]  # [B, W, T]
    visible &= jnp.arange(t)[None, None, :] < obs.lengths[:, None, None]
    logits = jnp.where(visible[:, None, None], logits, NEG_INF)
    return jax.nn.softmax(logits, axis=-1) * visible[:, None, None]


def avg_pool(x: jax.Array, kernel: int) -> jax.Array:
    """1-D average pooling along the last axis, stride 1, same length (zero padding, divided by
    the kernel size, as torch's avg_pool1d with padding=kernel//2 does)."""
    if kernel <= 1:
        return x
    pad = kernel // 2
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, kernel - 1 - pad)])
    windows = jnp.stack([xp[..., i:i + x.shape[-1]] for i in range(kernel)], axis=0)
    return windows.sum(0) / kernel


def snapkv_scores(cache, obs, window: int, kernel: int) -> jax.Array:
    """float32 [B, K, T]: window attention averaged over the window queries and the G query heads
    of each KV head, then average-pooled with `kernel` over the prefix only (SnapKV pools the
    scores of the tokens before the window, zero-padded at the prefix's end: the window's own
    high self-attention does not spill onto the tokens just before it). The window's own
    attention counts for nothing here; `prepare_scores` forces the window in."""
    probs = window_attention(cache, obs, window).mean(axis=(2, 3))  # [B, K, T]
    prefix = jnp.arange(probs.shape[-1])[None, :] < (obs.lengths - window)[:, None]  # [B, T]
    return avg_pool(jnp.where(prefix[:, None, :], probs, 0.0), kernel)


def value_norms(cache, obs, chunk: int = 512) -> jax.Array:
    """float32 [B, K, T]: ||W_o v||_1 of each value, summed over the G query heads that read it
    (CriticalKV's measure of a value's effect on the layer output). Per KV head, chunks of
    `chunk` tokens times that head's [D, G*E] slice of W_o, so the [chunk, G*E] projection
    stays small and its |.| sum runs along contiguous memory (a [B, K, G, T, E] einsum made
    XLA:CPU transpose every chunk's projection before summing: 1.5x the time at 4K tokens)."""
    v = cache.v  # [B, K, T, D]
    b, kh, t, d = v.shape
    wo = obs.o_proj.astype(jnp.float32)  # [H*D, E]
    g = wo.shape[0] // (kh * d)
    wo = wo.reshape(kh, g, d, -1).transpose(0, 2, 1, 3).reshape(kh, d, -1)  # [K, D, G*E]
    chunk = min(chunk, t)
    n_chunks = -(-t // chunk)
    vp = jnp.pad(v.astype(jnp.float32), [(0, 0), (0, 0), (0, n_chunks * chunk - t), (0, 0)])
    heads = []
    for h in range(kh):
        x = vp[:, h].reshape(b * n_chunks, chunk, d)
        norms = jax.lax.map(lambda xc, w=wo[h]: jnp.abs(xc @ w).sum(-1), x)  # [B*C, chunk]
        heads.append(norms.reshape(b, n_chunks * chunk)[:, :t])
    return jnp.stack(heads, axis=1)


# ----------------------------------------------------------------------------- selection


def window_mask(lengths: jax.Array, t: int, window: int) -> jax.Array:
    """bool [B, T]: the last `window` prompt tokens of each sequence."""
    pos = jnp.arange(t)[None, :]
    return (pos < lengths[:, None]) & (pos >= lengths[:, None] - window)


def per_row_keep(fraction: float, lengths: jax.Array, minimum: int) -> jax.Array:
    """int32 [B]: tokens kept per head for each sequence: round(fraction * length), at least
    `minimum` (the window) and at most the length (fraction: of the padded prompt, so the
    longest row keeps the static slots)."""
    n = jnp.floor(fraction * lengths.astype(jnp.float32) + 1e-6).astype(jnp.int32)
    return jnp.minimum(jnp.maximum(n, minimum), lengths.astype(jnp.int32))


def _rank_keep(scores: jax.Array, n_max: int, n_keep: jax.Array) -> jax.Array:
    """bool mask like scores [B, X, N]: the top min(n_keep[b], n_max) entries of each row (ties:
    lower index first), never an entry scored NEG_INF."""
    n_max = min(n_max, scores.shape[-1])
    vals, idx = jax.lax.top_k(scores, n_max)  # [B, X, n_max]
    take = (jnp.arange(n_max)[None, None, :] < n_keep[:, None, None]) & (vals > NEG_INF / 2)
    b, x = scores.shape[:2]
    bi = jnp.broadcast_to(jnp.arange(b)[:, None, None], idx.shape)
    xi = jnp.broadcast_to(jnp.arange(x)[None, :, None], idx.shape)
    return jnp.zeros(scores.shape, bool).at[bi, xi, idx].set(take)


def span_scores(scores: jax.Array, span: int) -> jax.Array:
    """Span-aware scores [B, K, T]: each token gets the sum of its span's scores (spans of `span`
    consecutive positions, 0..span-1, span..2 span-1, ...), less a tie-break that prefers the
    span's earlier tokens, so a top-k over them takes whole spans per head (ChunkKV's selection,
    per KV head instead of per layer). span 1: the scores unchanged."""
    if span == 1:
        return scores
    b, kh, t = scores.shape
    n = -(-t // span)
    summed = jnp.pad(scores, [(0, 0), (0, 0), (0, n * span - t)]).reshape(b, kh, n, span).sum(-1)
    per_token = jnp.repeat(summed, span, axis=-1)[..., :t]
    offset = (jnp.arange(t) % span).astype(scores.dtype)
    tie = 1e-6 * offset * jnp.maximum(jnp.max(jnp.abs(summed), axis=-1, keepdims=True), 1e-30)
    return per_token - tie


def prepare_scores(scores: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
    """Nonnegative scores [B, K, T] scaled into [0, 1] per sequence, the window forced
    (FORCED + score) and padding excluded (NEG_INF)."""
    t = scores.shape[-1]
    valid = jnp.arange(t)[None, :] < lengths[:, None]  # [B, T]
    forced = window_mask(lengths, t, window)
    top = jnp.where(valid[:, None, :], scores, 0.0).max(axis=(1, 2), keepdims=True)
    s = scores / jnp.maximum(top, 1e-30)
    s = jnp.where(forced[:, None, :], FORCED + s, s)
    return jnp.where(valid[:, None, :], s, NEG_INF)


def select_per_head(scores: jax.Array, n_keep: jax.Array, n_max: int) -> jax.Array:
    """bool [B, K, T]: each head keeps its top n_keep[b] tokens (scores from prepare_scores)."""
    return _rank_keep(scores, n_max, n_keep)


def kept_first(keep: jax.Array, s: int):
    """The first s positions of each head with its kept tokens first, in position order:
    (idx int32 [B, K, s], valid bool [B, K, s]); valid counts the kept ones (all of them when a
    head keeps at most s)."""
    t = keep.shape[-1]
    order = jnp.arange(t, dtype=jnp.int32)
    _, idx = jax.lax.top_k(-jnp.where(keep, order, t + order), s)
    return idx, jnp.take_along_axis(keep, idx, axis=-1)


def select_headwise(scores: jax.Array, n_keep: jax.Array, n_max: int,
                    safeguard: float, window: int) -> jax.Array:
    """AdaKV (Feng et al. 2024): one top-k over all heads of the layer for K * n_keep[b] tokens,
    after guaranteeing each head its window and the top floor(safeguard * (n_keep[b] - window))
    tokens beyond it (AdaKV's floor is a share of the budget without the observation window:
    its `base_capacity - window_size`). scores: [B, K, T] from prepare_scores (the window
    forced) -> bool [B, K, T]."""
    b, kh, t = scores.shape
    beyond = jnp.maximum(n_keep - window, 0).astype(jnp.float32)
    n_safe = jnp.minimum(window + jnp.floor(safeguard * beyond + 1e-6).astype(jnp.int32), n_keep)
    safe = _rank_keep(scores, n_max, n_safe)
    boosted = jnp.where(safe, scores + 2 * FORCED, scores).reshape(b, 1, kh * t)
    keep = _rank_keep(boosted, kh * n_max, kh * n_keep)
    return keep.reshape(b, kh, t)


# ----------------------------------------------------------------------------- policies


def check_snap_settings(budget, window, kernel) -> None:
    """The settings every SnapKV-scored policy shares: budget in (0, 1], window >= 1, odd kernel."""
    check_budget(budget)
    check_int("window", window, 1)
    check_int("kernel", kernel, 1)
    if kernel % 2 == 0:
        raise ValueError(f"kernel={kernel}: the pooling kernel must be odd")


#: bytes a SparseCache stores per kept slot besides its key and value: int32 head id + position
SLOT_INDEX_BYTES = 8


@dataclasses.dataclass(frozen=True)
class SnapKV(Policy):
    """SnapKV: every KV head keeps its top prompt tokens by pooled window attention.

    budget: fraction of the dense cache's bytes, in (0, 1] (the prompt and the decode slots, in
    the cache dtype): each head keeps, on average, the prompt tokens whose keys, values and slot
    indices fit in it next to the dense decode slots (`mean_keep`); window: observation window
    (always kept); kernel: pooling size (odd, >= 1); span: select whole spans of `span`
    consecutive prompt tokens per head by their summed scores (`span_scores`; 1: single tokens,
    the method as published), so a multi-token answer is kept or dropped whole."""

    budget: float = 0.2
    window: int = 32
    kernel: int = 5
    span: int = 1  # > 1: select whole spans of this many consecutive tokens per head

    name = "snapkv"
    layer_invariant = True

    def __post_init__(self):
        check_snap_settings(self.budget, self.window, self.kernel)
        check_int("span", self.span, 1)

    # -- shared -------------------------------------------------------------------------------
    def observation_positions(self, lengths, t: int):
        return last_positions(lengths, self.window)

    def min_keep(self) -> int:
        """Tokens a head must be able to keep: the window (subclasses add their frozen guard)."""
        return self.window

    def mean_keep(self, t: int, extra: int, head_dim: int, itemsize: int,
                  kv_heads: int = 1) -> float:
        """Prompt tokens per head, on average, whose SparseCache holds `budget` of the bytes of
        the dense cache (t + extra slots per head, an int32 length per sequence), per sequence:
        K n (2 D s + 8) + K extra 2 D s + 4 = budget (K (t + extra) 2 D s + 4)."""
        prompt = prompt_byte_budget(self.budget, t, extra, kv_heads, head_dim, itemsize)
        return (prompt - 4) / (kv_heads * (2 * head_dim * itemsize + SLOT_INDEX_BYTES))

    def _mean(self, cache, obs) -> float:
        b, kh, t, d = cache.k.shape
        return self.mean_keep(t, obs.extra_capacity, d, jnp.dtype(cache.k.dtype).itemsize, kh)

    def n_max(self, layer: int, t: int, mean: float) -> int:
        """Static per-head slots of layer `layer` for a padded prompt of t tokens, when a head
        keeps `mean` tokens on average (`mean_keep`)."""
        n = min(t, int(math.floor(mean + 1e-9)))
        if n < self.min_keep():
            raise ValueError(
                f"budget={self.budget}: {max(n, 0)} of {t} prompt tokens per head fit in that "
                f"share of the cache's bytes next to its decode slots, fewer than the "
                f"{self.min_keep()} that are always kept (window={self.window}"
                f"{self._guard_text()}); raise the budget or shrink the window")
        return n

    def _guard_text(self) -> str:
        return ""

    def max_kept(self, layer: int, t: int, cache, obs) -> int:
        """Static bound on the tokens any one head of layer `layer` keeps: the layer's K * n_max
        slots (head-wise budgets may give them all to one head), at most the t prompt tokens."""
        return min(t, cache.k.shape[1] * self.n_max(layer, t, self._mean(cache, obs)))

    def scores(self, cache, obs) -> jax.Array:
        return snapkv_scores(cache, obs, self.window, self.kernel)

    def n_keep(self, layer: int, lengths, t: int, n_max: int) -> jax.Array:
        """int32 [B]: tokens each sequence keeps per head, its share of the layer's n_max."""
        return per_row_keep(n_max / t, lengths, self.window)

    def select(self, layer: int, scores, n_keep, n_max: int, cache, obs) -> jax.Array:
        return select_per_head(scores, n_keep, n_max)

    def adjust(self, layer: int, k, v, keep, scores, cache, obs) -> Tuple[jax.Array, jax.Array]:
        """Hook for merging policies: new keys/values [B, K, T, D] of the kept tokens."""
        return k, v

    def compress_layer(self, layer, cache, obs):
        finite = jnp.isfinite(cache.k).all() & jnp.isfinite(cache.v).all()
        if not isinstance(finite, jax.core.Tracer) and not bool(finite):
            raise ValueError(f"cache: layer {layer}'s keys/values hold NaN or Inf; refusing to "
                             f"compress them")
        t = cache.k.shape[2]
        mean = self._mean(cache, obs)
        n_max = self.n_max(layer, t, mean)
        raw = self.scores(cache, obs)  # [B, K, T]
        scores = prepare_scores(span_scores(raw, self.span), obs.lengths, self.window)
        n_keep = self.n_keep(layer, obs.lengths, t, n_max)
        keep = self.select(layer, scores, n_keep, n_max, cache, obs)
        k, v = self.adjust(layer, cache.k, cache.v, keep, raw, cache, obs)
        # a non-finite input poisons the output (generate then raises, see check_finite_caches)
        k = jnp.where(finite, k, jnp.nan)
        return SparseCache.from_selection(k, v, keep, cache.k.shape[1] * n_max,
                                          obs.extra_capacity)


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al. 2024): SnapKV scores, per-layer budgets that shrink linearly from the
    first layer to the last (same mean). Outside the window, layer l keeps
    c_l = c_max - l * (c_max - c_min) / (L - 1) with c_min = c / beta, c_max = 2c - c_min, where
    c = mean_keep - window is the mean (the reference implementation's rule); a layer whose c_l
    exceeds its prompt keeps all of it and passes the rest to the others (`layer_tokens`)."""

    num_layers: int = 1
    beta: float = 20.0

    name = "pyramidkv"
    layer_invariant = False  # per-layer budgets

    def __post_init__(self):
        super().__post_init__()
        check_int("num_layers", self.num_layers, 1)
        if not self.beta >= 1.0:
            raise ValueError(f"beta={self.beta!r}: must be >= 1")

    def _fraction(self, layer: int) -> float:
        """Layer budget outside the window as a multiple of the mean (1 on average)."""
        if self.num_layers == 1:
            return 1.0
        lo = 1.0 / self.beta
        hi = 2.0 - lo
        return hi - layer * (hi - lo) / (self.num_layers - 1)

    def layer_tokens(self, t: int, mean: float) -> Tuple[float, ...]:
        """Tokens per head of every layer: window + (mean - window) * fraction(l), capped at the
        prompt; what a capped layer cannot use goes to the uncapped ones in proportion to their
        fractions, so the layers keep `mean` on average whenever that fits."""
        c = max(mean - self.window, 0.0)
        share = [self._fraction(i) for i in range(self.num_layers)]
        alloc = [0.0] * self.num_layers
        room = float(t - self.window)
        free, left = set(range(self.num_layers)), c * self.num_layers
        while free and left > 1e-9:
            weight = sum(share[i] for i in free)
            capped = set()
            for i in free:
                alloc[i] += left * share[i] / weight
                if alloc[i] >= room:
                    capped.add(i)
            left = sum(alloc[i] - room for i in capped)
            for i in capped:
                alloc[i] = room
            free -= capped
            if not capped:
                break
        return tuple(self.window + a for a in alloc)

    def n_max(self, layer: int, t: int, mean: float) -> int:
        super().n_max(layer, t, mean)  # the mean itself must hold the window
        return min(t, int(math.floor(self.layer_tokens(t, mean)[layer] + 1e-9)))


@dataclasses.dataclass(frozen=True)
class ChunkKV(SnapKV):
    """ChunkKV (Liu et al. 2025): keep whole chunks of `chunk_size` consecutive tokens. A chunk's
    score is the sum of its tokens' (unpooled) window-attention scores over all KV heads of the
    layer, so every head of a layer keeps the same chunks; the window is always kept and the last
    chunk taken may be cut to meet the budget exactly."""

    chunk_size: int = 10

    name = "chunkkv"

    def __post_init__(self):
        super().__post_init__()
        check_int("chunk_size", self.chunk_size, 1)

    def scores(self, cache, obs) -> jax.Array:
        probs = window_attention(cache, obs, self.window).mean(axis=(2, 3))  # [B, K, T]
        b, kh, t = probs.shape
        c = self.chunk_size
        n = -(-t // c)
        per_chunk = jnp.pad(probs.sum(1), [(0, 0), (0, n * c - t)]).reshape(b, n, c).sum(-1)
        tok = jnp.repeat(per_chunk, c, axis=1)[:, :t]  # [B, T] chunk score of each token
        # inside a chunk prefer earlier tokens (ties are broken by index anyway)
        return jnp.broadcast_to(tok[:, None, :], (b, kh, t))


# ----------------------------------------------------------------------------- registry


def snap_settings(model, window, kernel, span: int = 1):
    """The observation settings of a SnapKV-family method, checked against the model (span:
    the span-aware selection, `SnapKV.span`)."""
    if window > model.config.max_position_embeddings:
        raise ValueError(f"window={window}: larger than the model's context "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    return dict(window=window, kernel=kernel, span=span)


@register_method("snapkv")
def _snapkv(budget: float, model, window: int = 32, kernel: int = 5, span: int = 1):
    """SnapKV at `budget` of the prompt per head (span > 1: whole spans of that many tokens)."""
    return SnapKV(budget=budget, **snap_settings(model, window, kernel, span))


@register_method("pyramidkv")
def _pyramidkv(budget: float, model, window: int = 32, kernel: int = 5, beta: float = 20.0,
               span: int = 1):
    """PyramidKV: SnapKV with per-layer budgets shrinking with depth (mean = budget)."""
    return PyramidKV(budget=budget, num_layers=model.config.num_layers, beta=beta,
                     **snap_settings(model, window, kernel, span))


@register_method("chunkkv")
def _chunkkv(budget: float, model, window: int = 32, kernel: int = 5, chunk_size: int = 10):
    """ChunkKV: whole chunks of `chunk_size` tokens, the same for every head of a layer."""
    return ChunkKV(budget=budget, chunk_size=chunk_size, **snap_settings(model, window, kernel))


__all__ = ["SnapKV", "PyramidKV", "ChunkKV", "snapkv_scores", "window_attention", "avg_pool",
           "value_norms", "span_scores", "prepare_scores", "select_per_head", "select_headwise",
           "per_row_keep", "window_mask", "kept_first"]
