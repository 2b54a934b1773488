"""Uniformly quantised cache: every stored token at one bit width (the baselines RDKV is compared
with: KIVI, MaxText-style int8, SnapKV eviction + KIVI), plus a zone of tokens kept in the cache
dtype (KIVI's 16-bit recent window, SnapKV's observation window, tokens generated while decoding).

Layout of one layer (B batch, K KV heads, N quantised slots, Z whole slots, D head dim):

    k_codes:       uint8 [B, K, N, D * k_bits / 8]  packed codes, asymmetric (KIVI), or
                   int8 [B, K, N, D]                symmetric absmax codes (int8)
    k_scale:       float16 [B, K, ceil(N / kg), D]  K per channel over groups of kg tokens (KIVI),
                   float16 [B, K, N, D / cg]        or per token over groups of cg channels (int8:
                                                    cg = D, one scale per token and head)
    k_zero:        like k_scale, or None            (None: symmetric, no zero-point)
    v_codes:       like k_codes
    v_scale,
    v_zero:        float16 [B, K, N, D / vg]        V per token over groups of vg channels
    positions:     int32 [B, K, N] or None          prompt position of each slot (None: slot n
                                                    holds position n, no eviction)
    q_lengths:     int32 [B]                        filled quantised slots (same for every head)
    whole_k,
    whole_v:       [B, K, Z, D]                     tokens in the cache dtype
    whole_lengths: int32 [B]

`nbytes` counts every array: codes, scales, zero-points, positions, lengths and the padding of
sequences shorter than the padded prompt. Appended tokens go to the whole zone, except with
`append_quantized` (int8, as MaxText quantises every token it writes), where each new token is
quantised per token into the next quantised slot.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from jaxkv.cache import quant
from jaxkv.cache.base import array_nbytes, batched_write


def quantize_symmetric(x: jax.Array, groups: int = 1) -> Tuple[jax.Array, jax.Array]:
    """Absmax int8 per token: x [..., D] -> (codes int8 [..., D], scale float16 [..., groups]).

    scale = max |x| / 127 over each group of D / groups channels, rounded up to float16 so that
    |x| / scale <= 127; code = round(x / scale); x_hat = code * scale. A zero group gets scale 0."""
    d = x.shape[-1]
    xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, d // groups))
    amax = jnp.abs(xf).max(-1, keepdims=True) / 127.0
    s16 = jnp.clip(amax, 0, 65504).astype(jnp.float16)
    s16 = jnp.where(s16.astype(jnp.float32) < amax, jnp.nextafter(s16, jnp.float16(jnp.inf)), s16)
    s = s16.astype(jnp.float32)
    codes = jnp.where(s > 0, jnp.round(xf / jnp.where(s > 0, s, 1.0)), 0.0)
    codes = jnp.clip(codes, -127, 127).astype(jnp.int8).reshape(x.shape)
    return codes, s16[..., 0]


def quantize_per_token(x: jax.Array, bits: int, group: int, where=None):
    """Asymmetric RTN per token over groups of `group` channels: x [..., N, D] ->
    (packed uint8 [..., N, D * bits / 8], scale, zero float16 [..., N, D / group])."""
    d = x.shape[-1]
    xg = x.reshape(x.shape[:-1] + (d // group, group))
    w = None if where is None else where[..., None, None]
    qz = quant.quantize(xg, bits, axis=-1, where=w)
    codes = qz.codes.reshape(x.shape)
    return quant.pack(codes, bits), qz.scale[..., 0], qz.zero_point[..., 0]


def quantize_per_channel(x: jax.Array, bits: int, group: int, valid: jax.Array):
    """Asymmetric RTN per channel over groups of `group` consecutive slots (KIVI's keys):
    x [B, K, N, D], valid bool [B, K, N] (slots entering min / max) ->
    (packed uint8 [B, K, N, D * bits / 8], scale, zero float16 [B, K, ceil(N / group), D])."""
    b, kh, n, d = x.shape
    j = -(-n // group)
    pad = j * group - n
    xp = jnp.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]).reshape(b, kh, j, group, d)
    vp = jnp.pad(valid, [(0, 0), (0, 0), (0, pad)]).reshape(b, kh, j, group, 1)
    qz = quant.quantize(xp, bits, axis=3, where=vp)
    codes = qz.codes.reshape(b, kh, j * group, d)[:, :, :n]
    return quant.pack(codes, bits), qz.scale[:, :, :, 0], qz.zero_point[:, :, :, 0]


@flax.struct.dataclass
class QuantizedCache:
    """One layer's uniformly quantised cache (see module docstring)."""

    k_codes: jax.Array
    k_scale: jax.Array
    k_zero: Optional[jax.Array]
    v_codes: jax.Array
    v_scale: jax.Array
    v_zero: Optional[jax.Array]
    positions: Optional[jax.Array]
    q_lengths: jax.Array
    whole_k: jax.Array
    whole_v: jax.Array
    whole_lengths: jax.Array
    k_bits: int = flax.struct.field(pytree_node=False)
    v_bits: int = flax.struct.field(pytree_node=False)
    k_group_tokens: int = flax.struct.field(pytree_node=False)
    append_quantized: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def head_dim(self) -> int:
        return self.whole_k.shape[3]

    @property
    def n_slots(self) -> int:
        return self.k_codes.shape[2]

    def append(self, k: jax.Array, v: jax.Array) -> "QuantizedCache":
        """k, v: [B, K, D]. Whole zone at whole_lengths[b], or (append_quantized) quantised per
        token into slot q_lengths[b]. `generate` sizes the arrays so they never overflow."""
        if not self.append_quantized:
            return self.replace(whole_k=batched_write(self.whole_k, k, self.whole_lengths),
                                whole_v=batched_write(self.whole_v, v, self.whole_lengths),
                                whole_lengths=jnp.minimum(self.whole_lengths + 1,
                                                          self.whole_k.shape[2]))
        if self.k_zero is not None or self.k_group_tokens:
            raise NotImplementedError("append_quantized supports symmetric per-token caches")
        kc, ks = quantize_symmetric(k, self.k_scale.shape[-1])  # [B, K, D], [B, K, groups]
        vc, vs = quantize_symmetric(v, self.v_scale.shape[-1])
        at = self.q_lengths
        return self.replace(k_codes=batched_write(self.k_codes, kc, at),
                            k_scale=batched_write(self.k_scale, ks, at),
                            v_codes=batched_write(self.v_codes, vc, at),
                            v_scale=batched_write(self.v_scale, vs, at),
                            q_lengths=jnp.minimum(at + 1, self.n_slots))

    def attend(self, q: jax.Array, scale: float) -> jax.Array:
        """q: [B, H, D] -> [B, H, D] (pallas_kernels.quantized_decode), no dequantised copy."""
        from pallas_kernels import dispatch
        return dispatch.quantized_decode_attention(
            q, self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero,
            self.q_lengths, self.whole_k, self.whole_v, self.whole_lengths, scale=scale,
            k_bits=self.k_bits, v_bits=self.v_bits, k_group_tokens=self.k_group_tokens)

    def nbytes(self) -> int:
        return array_nbytes(self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale,
                            self.v_zero, self.positions, self.q_lengths, self.whole_k,
                            self.whole_v, self.whole_lengths)

    def _dequantized(self):
        """(k, v) float32 [B, K, N, D] of the quantised slots (for tests)."""
        from jaxkv.cache.quant import unpack_codes
        d, n = self.head_dim, self.n_slots
        b, kh = self.k_codes.shape[:2]
        kc = unpack_codes(self.k_codes, self.k_bits, d).astype(jnp.float32)
        vc = unpack_codes(self.v_codes, self.v_bits, d).astype(jnp.float32)
        if self.k_group_tokens:
            rep = lambda x: jnp.repeat(x.astype(jnp.float32), self.k_group_tokens, axis=2)[:, :, :n]
            k = kc * rep(self.k_scale) + (0.0 if self.k_zero is None else rep(self.k_zero))
        else:
            nc = self.k_scale.shape[-1]
            rep = lambda x: jnp.repeat(x.astype(jnp.float32), d // nc, axis=-1)
            k = kc * rep(self.k_scale) + (0.0 if self.k_zero is None else rep(self.k_zero))
        nv = self.v_scale.shape[-1]
        rep = lambda x: jnp.repeat(x.astype(jnp.float32), d // nv, axis=-1)
        v = vc * rep(self.v_scale) + (0.0 if self.v_zero is None else rep(self.v_zero))
        return k, v

    def to_dense(self) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """(k, v float32 [B, K, N + Z, D] dequantised, valid [B, K, N + Z]): the quantised slots,
        then the whole zone (for tests)."""
        k, v = self._dequantized()
        b, kh, n, d = k.shape
        z = self.whole_k.shape[2]
        qv = jnp.arange(n)[None, :] < self.q_lengths[:, None]
        qv = jnp.broadcast_to(qv[:, None], (b, kh, n))
        wv = jnp.broadcast_to((jnp.arange(z)[None, :] < self.whole_lengths[:, None])[:, None],
                              (b, kh, z))
        k = jnp.concatenate([jnp.where(qv[..., None], k, 0.0), self.whole_k.astype(jnp.float32)], 2)
        v = jnp.concatenate([jnp.where(qv[..., None], v, 0.0), self.whole_v.astype(jnp.float32)], 2)
        return k, v, jnp.concatenate([qv, wv], 2)
