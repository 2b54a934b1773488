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


#: Prompts longer than this attend in blocks of at most this many queries (`causal_attention`),
#: so the scores of one block, [B, K, G, block, S], are the largest intermediate instead of T x S;
#: for such prompts the block also shrinks (to a power of two, at least 16) until one block's
#: float32 scores fit in SCORE_BLOCK_BYTES, so the scores do not outgrow the KV cache at long
#: context. Shorter sequences (training, the embedded tasks) attend in one block as before.
QUERY_BLOCK = 512
SCORE_BLOCK_BYTES = 32 * 2**20


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                     q_positions: jax.Array, k_positions: jax.Array,
                     window: int | None = None, sink: int = 0,
                     query_block: int | None = QUERY_BLOCK) -> jax.Array:
    """Masked softmax attention with GQA.

    q: [B, T, H, D]; k, v: [B, S, K, D]; q_positions: [B, T]; k_positions: [B, S].
    A query sees keys with k_pos <= q_pos; with `window`, only keys with q_pos - k_pos < window or
    k_pos < sink (StreamingLLM sink + recent window). Returns [B, T, H, D] in q's dtype.
    When T > query_block the queries are processed `query_block` at a time (`lax.map`; fewer
    when one block's float32 scores would exceed SCORE_BLOCK_BYTES): each row's softmax is the
    same computation, but the scores never exceed [B, K, G, block, S] (a 32K-token prompt would
    otherwise hold 32K x 32K per head).
    """
    b, t, h, d = q.shape
    if query_block is None or t <= query_block:
        return _attention_rows(q, k, v, scale, q_positions, k_positions, window, sink)
    query_block = _fit_block(query_block, b * h * k.shape[1] * 4)
    n = -(-t // query_block)
    pad = n * query_block - t
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    pp = jnp.pad(q_positions, ((0, 0), (0, pad)))  # padded rows are dropped below
    qb = qp.reshape(b, n, query_block, h, d).swapaxes(0, 1)  # [N, B, QB, H, D]
    pb = pp.reshape(b, n, query_block).swapaxes(0, 1)  # [N, B, QB]
    out = jax.lax.map(lambda xs: _attention_rows(xs[0], k, v, scale, xs[1], k_positions,
                                                 window, sink), (qb, pb))
    return out.swapaxes(0, 1).reshape(b, n * query_block, h, d)[:, :t]


def _fit_block(query_block: int, row_bytes: int) -> int:
    """The largest power of two <= query_block (at least 16) whose rows of `row_bytes` scores
    fit in SCORE_BLOCK_BYTES; query_block itself when it already fits."""
    if query_block * row_bytes <= SCORE_BLOCK_BYTES:
        return query_block
    block = 1 << max(int(SCORE_BLOCK_BYTES // row_bytes).bit_length() - 1, 0)
    return max(16, min(block, query_block))


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
