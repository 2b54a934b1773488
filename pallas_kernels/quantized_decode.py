"""Decode attention over the uniformly quantised cache of `jaxkv.cache.QuantizedCache` (KIVI,
int8, SnapKV + KIVI), plus its zone of tokens kept in the cache dtype.

Layout of one layer (N quantised slots per head, Z whole slots):
    k_codes:   uint8 [B, K, N, D * k_bits / 8] packed codes (asymmetric) | int8 [B, K, N, D]
               (symmetric, zero-point None)
    k_scale:   float16 [B, K, ceil(N / kg), D] per channel over groups of kg = k_group_tokens
               tokens (KIVI), or, when k_group_tokens == 0, float16 [B, K, N, D / cg] per token
               over groups of cg channels (int8: cg = D)
    k_zero:    like k_scale, or None (symmetric)
    v_codes:   like k_codes;  v_scale, v_zero: float16 [B, K, N, D / vg] per token
    q_lengths: int32 [B] valid quantised slots (the same for every head)
    whole_k, whole_v: [B, K, Z, D];  whole_lengths: int32 [B]

No dequantised cache is built: the K scales fold into the query (per channel group: q * s, then
a dot with the codes; per token: the score of the codes times the token's scale), zero-points
give a per-query term, and the V scales multiply the probabilities:
    out = sum_t (p_t * s_t) * code_t + sum_t p_t * z_t.
Scores and softmax in float32; one softmax over the quantised slots and the whole zone.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.dense_decode import NEG_INF


def unpack_codes(codes: jax.Array, bits: int, d: int) -> jax.Array:
    """Packed uint8 [..., d * bits / 8] -> uint8 [..., d]; int8 codes are returned as they are."""
    if codes.dtype == jnp.int8 or bits == 8:
        return codes
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    out = (codes[..., None] >> shifts) & jnp.uint8(2 ** bits - 1)
    return out.reshape(codes.shape[:-1] + (codes.shape[-1] * per,))[..., :d]


def _grouped_scores(qg, codes, k_scale, k_zero, kg: int):
    """K per channel over token groups: qg [B, K, G, D] f32, codes [B, K, N, D] -> [B, K, G, N]."""
    b, kh, n, d = codes.shape
    full = (n // kg) * kg
    pieces = []
    for lo, hi in ((0, full), (full, n)):
        if hi == lo:
            continue
        j0, j1 = lo // kg, -(-hi // kg)
        c = codes[:, :, lo:hi].astype(jnp.float32)
        size = hi - lo if hi - lo < kg else kg
        c = c.reshape(b, kh, j1 - j0, size, d)
        qs = qg[:, :, :, None, :] * k_scale[:, :, None, j0:j1].astype(jnp.float32)  # [B,K,G,J,D]
        s = jnp.einsum("BKGJD,BKJiD->BKGJi", qs, c)
        if k_zero is not None:
            z = k_zero[:, :, j0:j1].astype(jnp.float32)  # [B, K, J, D]
            s = s + jnp.einsum("BKGD,BKJD->BKGJ", qg, z)[..., None]
        pieces.append(s.reshape(b, kh, qg.shape[2], hi - lo))
    if not pieces:
        return jnp.zeros((b, kh, qg.shape[2], 0), jnp.float32)
    return jnp.concatenate(pieces, axis=-1)


def quantized_decode_attention_reference(q: jax.Array, k_codes: jax.Array, k_scale: jax.Array,
                                         k_zero: Optional[jax.Array], v_codes: jax.Array,
                                         v_scale: jax.Array, v_zero: Optional[jax.Array],
                                         q_lengths: jax.Array, whole_k: jax.Array,
                                         whole_v: jax.Array, whole_lengths: jax.Array, *,
                                         scale: float, k_bits: int, v_bits: int,
                                         k_group_tokens: int) -> jax.Array:
    """q: [B, H, D] -> out [B, H, D] (dtype of q). See the module docstring for the layout."""
    b, h, d = q.shape
    kh = whole_k.shape[1]
    g = h // kh
    n = k_codes.shape[2]
    qg = q.reshape(b, kh, g, d).astype(jnp.float32)  # [B, K, G, D]
    kc = unpack_codes(k_codes, k_bits, d)  # [B, K, N, D] small ints
    if k_group_tokens:
        s_q = _grouped_scores(qg, kc, k_scale, k_zero, k_group_tokens)
    else:
        nc = k_scale.shape[-1]
        qc = qg.reshape(b, kh, g, nc, d // nc)
        part = jnp.einsum("BKGjc,BKNjc->BKGNj", qc,
                          kc.reshape(b, kh, n, nc, d // nc).astype(jnp.float32))
        s_q = (part * k_scale[:, :, None].astype(jnp.float32)).sum(-1)  # [B, K, G, N]
        if k_zero is not None:
            s_q = s_q + jnp.einsum("BKGj,BKNj->BKGN", qc.sum(-1), k_zero.astype(jnp.float32))
    q_valid = jnp.arange(n)[None, :] < q_lengths[:, None]  # [B, N]
    s_q = jnp.where(q_valid[:, None, None, :], s_q * scale, NEG_INF)
    s_w = jnp.einsum("BKGD,BKZD->BKGZ", qg, whole_k.astype(jnp.float32)) * scale
    w_valid = jnp.arange(whole_k.shape[2])[None, :] < whole_lengths[:, None]  # [B, Z]
    s_w = jnp.where(w_valid[:, None, None, :], s_w, NEG_INF)

    m = jnp.maximum(s_q.max(-1, initial=NEG_INF), s_w.max(-1, initial=NEG_INF))[..., None]
    p_q = jnp.exp(s_q - m) * q_valid[:, None, None, :]  # [B, K, G, N]
    p_w = jnp.exp(s_w - m) * w_valid[:, None, None, :]  # [B, K, G, Z]
    denom = p_q.sum(-1) + p_w.sum(-1)  # [B, K, G]

    nv = v_scale.shape[-1]
    vc = unpack_codes(v_codes, v_bits, d).reshape(b, kh, n, nv, d // nv).astype(jnp.float32)
    pv = p_q[..., None] * v_scale[:, :, None].astype(jnp.float32)  # [B, K, G, N, nv]
    num = jnp.einsum("BKGNj,BKNjc->BKGjc", pv, vc).reshape(b, kh, g, d)
    if v_zero is not None:
        zt = jnp.einsum("BKGN,BKNj->BKGj", p_q, v_zero.astype(jnp.float32))  # [B, K, G, nv]
        num = num + jnp.repeat(zt, d // nv, axis=-1)
    num = num + jnp.einsum("BKGZ,BKZD->BKGD", p_w, whole_v.astype(jnp.float32))
    out = num / jnp.maximum(denom, 1e-30)[..., None]
    return out.reshape(b, h, d).astype(q.dtype)
