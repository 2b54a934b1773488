"""Quantisation baselines for RDKV, all stored in a `jaxkv.cache.QuantizedCache`:

KIVI (Liu et al. 2024), `KIVI(bits=2 | 4)`: K quantised per channel over groups of `group_size`
    consecutive tokens, V per token (over groups of min(group_size, D) channels), asymmetric RTN
    with float16 scale and zero-point (`jaxkv.cache.quant`); the last `residual` prompt tokens and
    every generated token stay in the cache dtype. (KIVI quantises the residual window in groups
    as it fills during decoding; here generated tokens all stay whole, i.e. KIVI with a residual
    that covers the generation.)
int8 (MaxText / tpu-inference layout), `Int8()`: K and V int8, symmetric, one absmax scale per
    token and KV head (float16 here), every token quantised, generated ones included.
SnapKV + KIVI-4, `SnapKVKIVI(budget)`: SnapKV's selection (pooled window attention, the window
    always kept, in the cache dtype), the other kept tokens stored KIVI-4 with their int32
    positions.

What `budget` means. KIVI and int8 have no knob: their size is fixed by the bit width (prompt
part ~ (2 * D * bits / 8 + scales) / (2 * D * itemsize) of the dense cache plus the residual), so
their factories accept a budget only to record it (`requested_budget`); `byte_fraction(t, ...)`
gives the fraction the arrays really take and the evaluation measures bytes from the arrays.
SnapKV + KIVI-4 keeps as many tokens as fit: its prompt part (codes, scales, zero-points,
positions, window, lengths) is at most `budget` of the dense prompt cache bytes; a budget above
what every token at 4 bits takes (~0.3 of a 16-bit cache with positions) keeps every token.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from jaxkv.cache import quant
from jaxkv.cache.quant import (
    QuantizedCache,
    quantize_per_channel,
    quantize_per_token,
    quantize_symmetric,
)
from jaxkv.checks import check_int
from jaxkv.policies.base import Policy, check_budget, last_positions, prompt_byte_budget
from jaxkv.policies.registry import register_method
from jaxkv.policies.snapkv import (
    check_snap_settings,
    prepare_scores,
    select_per_head,
    snapkv_scores,
    window_mask,
)


def _check_kivi_bits(bits) -> int:
    bits = quant.check_bits(bits)  # ValueError outside {0, 2, 4, 8, 16}
    if bits not in (2, 4):
        raise ValueError(f"bits={bits!r}: KIVI quantises at 2 or 4 bits")
    return bits


def _check_finite(layer, cache):
    finite = jnp.isfinite(cache.k).all() & jnp.isfinite(cache.v).all()
    if not isinstance(finite, jax.core.Tracer) and not bool(finite):
        raise ValueError(f"cache: layer {layer}'s keys/values hold NaN or Inf; refusing to "
                         f"compress them")
    return finite


def _whole_zone(k, v, lengths, n_keep, slots: int, extra: int):
    """The last n_keep[b] prompt tokens of every sequence in `slots` slots, then `extra` empty
    decode slots: (k, v [B, K, slots + extra, D], lengths [B])."""
    t = k.shape[2]
    pos = lengths[:, None] - n_keep[:, None] + jnp.arange(slots, dtype=jnp.int32)  # [B, W]
    ok = jnp.arange(slots)[None, :] < n_keep[:, None]
    idx = jnp.clip(pos, 0, max(t - 1, 0))[:, None, :, None]
    pad = [(0, 0), (0, 0), (0, extra), (0, 0)]
    take = lambda x: jnp.pad(jnp.take_along_axis(x, idx, axis=2)
                             * ok[:, None, :, None].astype(x.dtype), pad)
    return take(k), take(v), n_keep.astype(jnp.int32)


def _v_group(group_size: int, d: int) -> int:
    g = min(group_size, d)
    return g if d % g == 0 else d


def _kivi_quantize(k, v, valid, bits: int, group_size: int):
    """k, v: [B, K, N, D] slots, valid [B, K, N] -> the code/scale arrays of a KIVI cache."""
    kc, ks, kz = quantize_per_channel(k, bits, group_size, valid)
    vc, vs, vz = quantize_per_token(v, bits, _v_group(group_size, k.shape[-1]), valid)
    zero = lambda x: jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
    return dict(k_codes=kc, k_scale=ks, k_zero=kz, v_codes=zero(vc), v_scale=zero(vs),
                v_zero=zero(vz))


def kivi_token_bytes(bits: int, head_dim: int, group_size: int) -> float:
    """Bytes one KIVI-quantised token takes on average: K and V codes, V scale + zero-point per
    channel group, and its share of the K scale + zero-point of its token group."""
    nv = head_dim // _v_group(group_size, head_dim)
    return 2 * head_dim * bits / 8 + 4 * nv + 4 * head_dim / group_size


@dataclasses.dataclass(frozen=True)
class KIVI(Policy):
    """KIVI-`bits` (2 or 4): see module docstring. residual: recent prompt tokens kept whole
    (>= 0); group_size: tokens per K scale group and channels per V scale group (>= 1);
    requested_budget: recorded only (KIVI's size is fixed by `bits`)."""

    bits: int = 2
    residual: int = 32
    group_size: int = 32
    # recorded only: left out of ==/hash, so every budget shares one compilation
    requested_budget: Optional[float] = dataclasses.field(default=None, compare=False)

    name = "kivi"
    layer_invariant = True

    def __post_init__(self):
        _check_kivi_bits(self.bits)
        check_int("residual", self.residual, 0)
        check_int("group_size", self.group_size, 1)
        if self.requested_budget is not None:
            check_budget(self.requested_budget, "requested_budget")

    def n_slots(self, t: int) -> int:
        return max(t - self.residual, 0)

    def byte_fraction(self, t: int, kv_heads: int, head_dim: int, itemsize: int) -> float:
        """Prompt-part bytes of the cache / dense prompt cache bytes, for a full t-token prompt."""
        n = self.n_slots(t)
        nv = head_dim // _v_group(self.group_size, head_dim)
        per_head = (2 * n * quant.packed_length(head_dim, self.bits) + 4 * n * nv
                    + 4 * math.ceil(n / self.group_size) * head_dim
                    + 2 * min(self.residual, t) * head_dim * itemsize)
        return (kv_heads * per_head + 8) / (kv_heads * t * 2 * head_dim * itemsize + 4)

    def compress_layer(self, layer, cache, obs):
        finite = _check_finite(layer, cache)
        b, kh, t, d = cache.k.shape
        lengths = obs.lengths.astype(jnp.int32)
        n_res = jnp.minimum(self.residual, lengths)
        n = self.n_slots(t)
        q_len = lengths - n_res
        valid = jnp.broadcast_to((jnp.arange(n)[None, :] < q_len[:, None])[:, None], (b, kh, n))
        arrays = _kivi_quantize(cache.k[:, :, :n], cache.v[:, :, :n], valid, self.bits,
                                self.group_size)
        wk, wv, wl = _whole_zone(cache.k, cache.v, lengths, n_res, self.residual,
                                 obs.extra_capacity)
        arrays["k_scale"] = jnp.where(finite, arrays["k_scale"], jnp.nan)
        return QuantizedCache(**arrays, positions=None, q_lengths=q_len,
                              whole_k=jnp.where(finite, wk, jnp.nan), whole_v=wv,
                              whole_lengths=wl, k_bits=self.bits, v_bits=self.bits,
                              k_group_tokens=self.group_size)


@dataclasses.dataclass(frozen=True)
class Int8(Policy):
    """Uniform int8 (MaxText layout): symmetric, one float16 absmax scale per token and KV head
    for K and for V; generated tokens are quantised as they are written. requested_budget:
    recorded only (the size is fixed: (2 * D + 4) / (2 * D * itemsize) of the dense cache)."""

    requested_budget: Optional[float] = dataclasses.field(default=None, compare=False)

    name = "int8"
    layer_invariant = True

    def __post_init__(self):
        if self.requested_budget is not None:
            check_budget(self.requested_budget, "requested_budget")

    def byte_fraction(self, t: int, kv_heads: int, head_dim: int, itemsize: int) -> float:
        # codes + float16 scales of every token; q_lengths and whole_lengths (the zone is empty)
        dense = kv_heads * t * 2 * head_dim * itemsize + 4
        return (kv_heads * t * (2 * head_dim + 4) + 8) / dense

    def compress_layer(self, layer, cache, obs):
        finite = _check_finite(layer, cache)
        b, kh, t, d = cache.k.shape
        e = obs.extra_capacity
        lengths = obs.lengths.astype(jnp.int32)
        valid = (jnp.arange(t)[None, :] < lengths[:, None])[:, None, :, None]  # [B, 1, T, 1]
        pad = [(0, 0), (0, 0), (0, e), (0, 0)]
        kc, ks = quantize_symmetric(jnp.where(valid, cache.k, 0))  # [B,K,T,D] int8, [B,K,T,1]
        vc, vs = quantize_symmetric(jnp.where(valid, cache.v, 0))
        empty = jnp.zeros((b, kh, 0, d), cache.k.dtype)
        ks = jnp.where(finite, ks, jnp.nan)  # a non-finite input poisons the output
        return QuantizedCache(k_codes=jnp.pad(kc, pad), k_scale=jnp.pad(ks, pad),
                              k_zero=None, v_codes=jnp.pad(vc, pad), v_scale=jnp.pad(vs, pad),
                              v_zero=None, positions=None, q_lengths=lengths, whole_k=empty,
                              whole_v=empty, whole_lengths=jnp.zeros((b,), jnp.int32), k_bits=8,
                              v_bits=8, k_group_tokens=0, append_quantized=True)


@dataclasses.dataclass(frozen=True)
class SnapKVKIVI(Policy):
    """SnapKV eviction, then KIVI on the kept tokens, sized so the prompt part is at most `budget`
    of the dense prompt cache bytes. window: observation window (always kept); whole: how many of
    its last tokens stay in the cache dtype (None: all of it; the others are quantised like every
    kept token); kernel: pooling (odd); bits: KIVI width (4 in the registered "snapkv_kivi4");
    group_size: as KIVI's."""

    budget: float = 0.2
    window: int = 32
    kernel: int = 5
    bits: int = 4
    group_size: int = 32
    whole: Optional[int] = None

    name = "snapkv_kivi"
    layer_invariant = True

    def __post_init__(self):
        check_snap_settings(self.budget, self.window, self.kernel)
        whole = self.window if self.whole is None else check_int("whole", self.whole, 0)
        if whole > self.window:
            raise ValueError(f"whole={whole}: at most the window ({self.window}) is kept whole")
        object.__setattr__(self, "whole", whole)
        _check_kivi_bits(self.bits)
        check_int("group_size", self.group_size, 1)

    def observation_positions(self, lengths, t: int):
        return last_positions(lengths, self.window)

    def _bytes(self, n: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
        """Prompt-part bytes per sequence keeping n quantised tokens per head."""
        nv = head_dim // _v_group(self.group_size, head_dim)
        per_head = (2 * n * quant.packed_length(head_dim, self.bits) + 4 * n * nv + 4 * n
                    + 4 * math.ceil(n / self.group_size) * head_dim
                    + 2 * self.whole * head_dim * itemsize)
        return kv_heads * per_head + 8  # + q_lengths, whole_lengths

    def n_slots(self, t: int, kv_heads: int, head_dim: int, itemsize: int, extra: int = 0) -> int:
        """Static quantised slots per head for a padded prompt of t tokens."""
        total = math.floor(prompt_byte_budget(self.budget, t, extra, kv_heads, head_dim, itemsize))
        if self._bytes(0, kv_heads, head_dim, itemsize) > total:
            raise ValueError(
                f"budget={self.budget}: {total} bytes per sequence for a {t}-token prompt, fewer "
                f"than the tokens kept whole (whole={self.whole}) take; raise the budget or "
                f"keep fewer tokens whole")
        per = kivi_token_bytes(self.bits, head_dim, self.group_size) + 4
        n = min(max(t - self.whole, 0), int(total / (kv_heads * per)) + 1)
        while n > 0 and self._bytes(n, kv_heads, head_dim, itemsize) > total:
            n -= 1
        return n

    def compress_layer(self, layer, cache, obs):
        finite = _check_finite(layer, cache)
        b, kh, t, d = cache.k.shape
        item = jnp.dtype(cache.k.dtype).itemsize
        n = self.n_slots(t, kh, d, item, obs.extra_capacity)
        lengths = obs.lengths.astype(jnp.int32)
        n_win = jnp.minimum(self.whole, lengths)
        # per sequence: as many tokens as its own length's budget allows (float32 arithmetic)
        total = jnp.floor(prompt_byte_budget(self.budget, lengths.astype(jnp.float32),
                                             obs.extra_capacity, kh, d, item))
        avail = (total - self._bytes(0, kh, d, item)) / kh
        per = kivi_token_bytes(self.bits, d, self.group_size) + 4
        n_row = jnp.clip(jnp.floor(avail / per).astype(jnp.int32), 0,
                         jnp.minimum(n, lengths - n_win))  # [B]
        scores = prepare_scores(snapkv_scores(cache, obs, self.window, self.kernel), lengths,
                                self.window)
        keep = select_per_head(scores, n_row + n_win, n + self.whole)  # [B, K, T]
        sel = keep & ~window_mask(lengths, t, self.whole)[:, None, :]
        order = jnp.arange(t, dtype=jnp.int32)[None, None, :]
        if n:
            _, idx = jax.lax.top_k(-jnp.where(sel, order, t + order), n)  # [B, K, N] ascending
        else:
            idx = jnp.zeros((b, kh, 0), jnp.int32)
        valid = jnp.take_along_axis(sel, idx, axis=2)
        gather = lambda x: jnp.take_along_axis(x, idx[..., None], axis=2)
        arrays = _kivi_quantize(gather(cache.k), gather(cache.v), valid, self.bits,
                                self.group_size)
        wk, wv, wl = _whole_zone(cache.k, cache.v, lengths, n_win, self.whole,
                                 obs.extra_capacity)
        arrays["k_scale"] = jnp.where(finite, arrays["k_scale"], jnp.nan)
        return QuantizedCache(**arrays, positions=jnp.where(valid, idx, -1).astype(jnp.int32),
                              q_lengths=n_row, whole_k=jnp.where(finite, wk, jnp.nan),
                              whole_v=wv, whole_lengths=wl, k_bits=self.bits, v_bits=self.bits,
                              k_group_tokens=self.group_size)


# ----------------------------------------------------------------------------- registry


def _check_window(model, window, minimum: int = 0):
    check_int("window", window, minimum)
    if window > model.config.max_position_embeddings:
        raise ValueError(f"window={window}: larger than the model's context "
                         f"max_position_embeddings={model.config.max_position_embeddings}")


def _kivi_factory(bits: int):
    def factory(budget: float, model, window: int = 32, group_size: int = 32):
        _check_window(model, window)
        return KIVI(bits=bits, residual=window, group_size=group_size, requested_budget=budget)
    factory.__doc__ = (f"KIVI-{bits}: fixed size, the budget is recorded only; window: the recent "
                       f"prompt tokens kept in the cache dtype (KIVI's residual).")
    return factory


register_method("kivi2", _kivi_factory(2))
register_method("kivi4", _kivi_factory(4))


@register_method("int8")
def _int8(budget: float, model, window: Optional[int] = None):
    """Uniform int8 (MaxText layout): fixed size, the budget is recorded only. window is accepted
    (and unused) so that one `window=` setting can go to every method."""
    return Int8(requested_budget=budget)


@register_method("snapkv_kivi4")
def _snapkv_kivi4(budget: float, model, window: int = 32, kernel: int = 5,
                  group_size: int = 32, whole: Optional[int] = None):
    """SnapKV eviction + KIVI-4 on the kept tokens, at `budget` of the dense prompt cache bytes;
    whole: recent tokens kept in the cache dtype (None: the window)."""
    _check_window(model, window)
    return SnapKVKIVI(budget=budget, window=window, kernel=kernel, bits=4, group_size=group_size,
                      whole=whole)


__all__ = ["KIVI", "Int8", "SnapKVKIVI", "kivi_token_bytes"]
