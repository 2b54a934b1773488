"""Building blocks: RMSNorm, rotary embeddings (incl. Llama-3 scaling), SwiGLU MLP, attention math.

Parameter names mirror Hugging Face's (q_proj, input_layernorm, ...) so checkpoints map one to one;
Dense kernels are stored [in, out] (the transpose of torch's Linear.weight).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.model.config import ModelConfig

NEG_INF = -1e30


class RMSNorm(nn.Module):
    dim: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (self.dim,), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight * x32.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2] (float32), with Llama-3 / linear scaling applied."""
    d = config.head_dim
    # float32 throughout, as transformers computes it, so positions agree to the last bit.
    exponent = np.arange(0, d, 2).astype(np.float32) / np.float32(d)
    inv = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponent)).astype(np.float32)
    scaling = config.rope_scaling_dict
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "freq_factors":
        factors = np.asarray(scaling["factors"], np.float32)
        if factors.shape != inv.shape:
            raise ValueError(f"rope_scaling factors: {factors.size} values, expected {inv.size} "
                             f"(head_dim / 2)")
        inv = inv / factors
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old_ctx / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face convention).

    x: [B, T, N, D]; positions: [B, T] int -> [B, T, N, D].
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


#: Sequences longer than this attend tile by tile (`causal_attention`): TILE queries against TILE
#: keys at a time with an online softmax (flash-attention style), tiles whose every (query, key)
#: pair is masked skipped, so the float32 scores held are one tile's, not T x S, and a causal
#: prompt computes about half the score matrix. Shorter sequences (training, the embedded tasks)
#: attend in one block.
QUERY_BLOCK = 512
#: Query and key tile of the tiled path (256 was the fastest of 128/256/512 on 2 CPU cores at 2K
#: tokens); the query tile shrinks (a power of two, at least 16) when one tile's float32 scores,
#: [B, H, tile, TILE], would exceed SCORE_BLOCK_BYTES (large batches).
TILE = 256
SCORE_BLOCK_BYTES = 32 * 2**20


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                     q_positions: jax.Array, k_positions: jax.Array,
                     window: int | None = None, sink: int = 0,
                     query_block: int | None = QUERY_BLOCK) -> jax.Array:
    """Masked softmax attention with GQA.

    q: [B, T, H, D]; k, v: [B, S, K, D]; q_positions: [B, T]; k_positions: [B, S].
    A query sees keys with k_pos <= q_pos; with `window`, only keys with q_pos - k_pos < window or
    k_pos < sink (StreamingLLM sink + recent window). Returns [B, T, H, D] in q's dtype.
    When T > query_block the attention is computed tile by tile (`_tiled_attention`): the same
    softmax up to float32 rounding, without the [B, H, T, S] scores (a 32K-token prompt would
    otherwise hold 32K x 32K per head) and without the tiles the mask removes entirely.
    """
    b, t, h, d = q.shape
    if query_block is None or t <= query_block:
        return _attention_rows(q, k, v, scale, q_positions, k_positions, window, sink)
    q_tile = _fit_block(min(query_block, TILE), b * h * TILE * 4)
    return _tiled_attention(q, k, v, scale, q_positions, k_positions, window, sink, q_tile, TILE)


def _fit_block(query_block: int, row_bytes: int) -> int:
    """The largest power of two <= query_block (at least 16) whose rows of `row_bytes` scores
    fit in SCORE_BLOCK_BYTES; query_block itself when it already fits."""
    if query_block * row_bytes <= SCORE_BLOCK_BYTES:
        return query_block
    block = 1 << max(int(SCORE_BLOCK_BYTES // row_bytes).bit_length() - 1, 0)
    return max(16, min(block, query_block))


def _tiled_attention(q, k, v, scale, q_positions, k_positions, window, sink, bq, bk):
    """`_attention_rows` computed over [bq queries x bk keys] tiles with an online softmax.

    Layout [B, K, G * bq, D] x [B, K, bk, D] makes each tile one batched matmul. A tile is skipped
    (`lax.cond`) when the mask removes all of it for every sequence: its smallest key position is
    after its largest query position, or (with a window) all its keys are outside the sink and
    before every query's window. A query row that sees no key at all gives zeros here (the
    one-block path gives the mean of the values); a causal row always sees itself.
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    nq, nk = -(-t // bq), -(-s // bk)
    f32 = jnp.float32
    # padded queries repeat the last position (their rows are dropped); padded keys sit at the
    # largest position, after every query, so the causal mask removes them
    qpos = jnp.pad(q_positions, ((0, 0), (0, nq * bq - t)), mode="edge")
    k_tiles = lambda fill: jnp.pad(k_positions, ((0, 0), (0, nk * bk - s)), constant_values=fill
                                   ).reshape(b, nk, bk).swapaxes(0, 1)  # [NK, B, bk]
    info = jnp.iinfo(k_positions.dtype)
    qt = jnp.pad(q.astype(f32) * scale, ((0, 0), (0, nq * bq - t), (0, 0), (0, 0)))
    qt = qt.reshape(b, nq, bq, kh, g, d).transpose(1, 0, 3, 4, 2, 5).reshape(nq, b, kh, g * bq, d)
    kv_pad = ((0, 0), (0, nk * bk - s), (0, 0), (0, 0))
    kt = jnp.pad(k.astype(f32), kv_pad).reshape(b, nk, bk, kh, d).transpose(1, 0, 3, 2, 4)
    vt = jnp.pad(v.astype(f32), kv_pad).reshape(b, nk, bk, kh, d).transpose(1, 0, 3, 2, 4)
    qpt = qpos.reshape(b, nq, bq).swapaxes(0, 1)  # [NQ, B, bq]
    kpt = k_tiles(info.max)
    k_min = kpt.min(axis=(1, 2))
    k_max = k_tiles(info.min).max(axis=(1, 2))  # over real keys only: padding sits at the minimum

    def query_tile(xs):
        qi, qp = xs  # [B, K, G * bq, D], [B, bq]
        q_max, q_min = qp.max(), qp.min()

        def tile(j, carry):
            m, l, acc = carry
            scores = jnp.einsum("bkmd,bksd->bkms", qi, kt[j])  # [B, K, G * bq, bk]
            mask = streaming_mask(qp, kpt[j], window, sink)  # [B, bq, bk]
            mask = jnp.broadcast_to(mask[:, None, None], (b, 1, g, bq, bk)).reshape(b, 1, g * bq, bk)
            scores = jnp.where(mask, scores, NEG_INF)
            m_new = jnp.maximum(m, scores.max(-1))
            p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            return (m_new, l * corr + p.sum(-1),
                    acc * corr[..., None] + jnp.einsum("bkms,bksd->bkmd", p, vt[j]))

        def step(j, carry):
            seen = k_min[j] <= q_max
            if window is not None:
                seen = seen & ((k_min[j] < sink) | (k_max[j] > q_min - window))
            return jax.lax.cond(seen, lambda c: tile(j, c), lambda c: c, carry)

        init = (jnp.full((b, kh, g * bq), NEG_INF, f32), jnp.zeros((b, kh, g * bq), f32),
                jnp.zeros((b, kh, g * bq, d), f32))
        _, l, acc = jax.lax.fori_loop(0, nk, step, init)
        return acc / jnp.where(l > 0, l, 1.0)[..., None]

    out = jax.lax.map(query_tile, (qt, qpt))  # [NQ, B, K, G * bq, D]
    out = out.reshape(nq, b, kh, g, bq, d).transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, h, d)
    return out[:, :t].astype(q.dtype)


def _attention_rows(q, k, v, scale, q_positions, k_positions, window, sink):
    b, t, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d).astype(jnp.float32)  # [B, T, K, G, D]
    scores = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k.astype(jnp.float32)) * scale
    mask = streaming_mask(q_positions, k_positions, window, sink)  # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("BKGTS,BSKD->BTKGD", probs, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)


def streaming_mask(q_positions, k_positions, window=None, sink=0):
    """bool [B, T, S]: causal, optionally restricted to `sink` first + `window` recent keys."""
    qp = q_positions[:, :, None]
    kp = k_positions[:, None, :]
    mask = kp <= qp
    if window is not None:
        mask = mask & ((qp - kp < window) | (kp < sink))
    return mask


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=c.jnp_dtype,
                                         param_dtype=c.jnp_dtype, name=name)
        gate = dense(c.intermediate_size, "gate_proj")(x)
        up = dense(c.intermediate_size, "up_proj")(x)
        return dense(c.hidden_size, "down_proj")(nn.silu(gate) * up)
