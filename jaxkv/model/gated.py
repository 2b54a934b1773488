"""Gated mixed attention: the trainable module of RLKV and DuoAttention (docs/methods.md, RLKV).

Each KV head (l, k) has a raw scalar gate `alpha = gates[l, k]` in [0, 1] (no sigmoid), shared by
the G query heads of its group. The head's attention output is

    out = alpha * attn_full + (1 - alpha) * attn_streaming

where `attn_streaming` sees only the first `sink` and the last `window` tokens (causal; the query's
own token is the newest of the window, as in `jaxkv.model.layers.streaming_mask`). Both branches
come from one score matrix: the two softmaxes are taken over the same scores under two masks and
their probabilities are mixed before the single product with V (mixing probabilities and mixing
outputs are the same thing, since attention is linear in the probabilities).

  mixed_attention_fn(gates, sink, window, prompt_lengths=None) -> AttentionFn for Decoder.forward
  init_gates(config, value=1.0) -> [L, K] float32
  check_gates(gates, config) -> gates as float32 [L, K] (ValueError naming the shape otherwise)
  gate_stats(gates) -> {"mean_gate", "sparsity"} (sparsity: fraction of gates below 0.5)
  save_gates(path, gates, model=None) / load_gates(path, model=None): `jaxkv.policies.rlkv`'s gate
      files (re-exported here), e.g. OUT/gates.json of `python -m train rlkv|duo`: float64
      [L, K], written atomically, recording the model's fingerprint

Granularity: sink and window are counted in tokens (the RLKV paper trains with 128-token blocks;
a block-granular window is a window rounded up to a block multiple, which the configs can express).
Sliding-window models (Mistral) are not special-cased: `generate` refuses sequences longer than
their window, so within what can be generated their full attention is plain causal attention.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.model.layers import NEG_INF, streaming_mask
# the one gate-file API (float64 [L, K], atomic, the model's fingerprint recorded), re-exported
from jaxkv.policies.rlkv import load_gates, save_gates


def check_streaming(sink, window) -> tuple:
    """Validate the static streaming settings: sink >= 0 and window >= 1 (ints)."""
    if isinstance(sink, bool) or not isinstance(sink, (int, np.integer)) or sink < 0:
        raise ValueError(f"sink={sink!r}: must be an integer >= 0 (attention-sink tokens kept)")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window={window!r}: must be an integer >= 1 (recent tokens kept, "
                         f"the current one included)")
    return int(sink), int(window)


def mix_softmax(scores: jax.Array, full_mask: jax.Array, stream_mask: jax.Array,
                alpha: jax.Array) -> jax.Array:
    """alpha * softmax(scores | full_mask) + (1 - alpha) * softmax(scores | stream_mask).

    scores: float32 [B, K, G, T, S]; masks: bool, broadcastable to scores, stream_mask a subset
    of full_mask; alpha: [K] (per KV head). Rows with an empty mask get zero probabilities.

    Each branch is shifted by its own row max, so both are exact whatever the gap between the
    full row max and the best streaming score. (A single shared exp, shifted by
    min(full max, streaming max + 64), overflowed once that gap passed ~150 nats: the trained
    embedded model's look-up heads reach it, and DuoAttention's training went NaN at step 36.)
    """
    full_mask = jnp.broadcast_to(full_mask, scores.shape)
    stream_mask = jnp.broadcast_to(stream_mask, scores.shape)
    masked = jnp.where(full_mask, scores, NEG_INF)
    masked_stream = jnp.where(stream_mask, scores, NEG_INF)
    # any shift gives the same probabilities: no gradient through it
    m_full = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
    m_stream = jax.lax.stop_gradient(jnp.max(masked_stream, axis=-1, keepdims=True))
    e = jnp.where(full_mask, jnp.exp(masked - m_full), 0.0)
    e_stream = jnp.where(stream_mask, jnp.exp(masked_stream - m_stream), 0.0)
    z_full = jnp.maximum(e.sum(-1, keepdims=True), 1e-30)
    z_stream = jnp.maximum(e_stream.sum(-1, keepdims=True), 1e-30)
    a = alpha.astype(jnp.float32)[:, None, None, None]  # [K, 1, 1, 1] against [B, K, G, T, S]
    return e * (a / z_full) + e_stream * ((1.0 - a) / z_stream)


def mixed_attention_fn(gates, sink: int, window: int, prompt_lengths=None, remat: bool = False):
    """An `AttentionFn` (see jaxkv.model.decoder) mixing full and streaming attention per KV head.

    gates: [L, K] (float; traced: differentiate through it); sink, window: static ints.
    prompt_lengths: optional [B] int. Queries at positions < prompt_lengths[b] attend in full
    (every head), as a rollout's prefill does; later queries are mixed, as its decode steps are.
    So `Decoder.forward(prompt + completion, attention_fn=mixed_attention_fn(g, s, w, P))` gives
    the log-probabilities of exactly the model that `generate(..., policy=GatedMixing(g, s, w))`
    sampled from. Without prompt_lengths every query is mixed (DuoAttention training).
    remat: recompute the attention in the backward pass instead of keeping its [B, K, G, T, S]
    probabilities (`jax.checkpoint`): memory of q/k/v per layer instead of T^2 per head.
    On TPU (`pallas_kernels.dispatch.kernel_mode() == "tpu"`) the attention is the one-pass
    flash-style kernel of `pallas_kernels.mixed_prefill` (its backward never holds T^2 either).
    """
    sink, window = check_streaming(sink, window)
    if getattr(gates, "ndim", None) != 2:
        raise ValueError(f"gates: expected shape [layers, kv_heads], got "
                         f"{getattr(gates, 'shape', type(gates).__name__)}")
    from pallas_kernels import dispatch
    if dispatch.kernel_mode() == "tpu":  # one-pass Pallas kernel: both branches from one score tile
        from pallas_kernels.mixed_prefill import mixed_prefill_attention_fn
        return mixed_prefill_attention_fn(gates, sink, window, prompt_lengths)

    def attention(layer, q, k, v, positions):
        kh = k.shape[2]
        if gates.shape[1] != kh or not 0 <= layer < gates.shape[0]:
            raise ValueError(f"gates: shape {tuple(gates.shape)} does not fit layer {layer} with "
                             f"{kh} KV heads")
        lengths = None if prompt_lengths is None else jnp.asarray(prompt_lengths)
        fn = jax.checkpoint(_mixed_attention, static_argnums=(6, 7)) if remat else _mixed_attention
        return fn(gates[layer], q, k, v, positions, lengths, sink, window)

    return attention


def _mixed_attention(alpha, q, k, v, positions, prompt_lengths, sink, window):
    """alpha: [K]; q: [B, T, H, D]; k, v: [B, T, K, D]; positions: [B, T] -> [B, T, H, D]."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d).astype(jnp.float32)  # [B, T, K, G, D]
    scores = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k.astype(jnp.float32)) * d ** -0.5
    full = streaming_mask(positions, positions)  # [B, T, S] causal
    stream = streaming_mask(positions, positions, window, sink)  # [B, T, S]
    if prompt_lengths is not None:
        in_prompt = positions < prompt_lengths[:, None]  # [B, T]
        stream = stream | (full & in_prompt[:, :, None])
    probs = mix_softmax(scores, full[:, None, None], stream[:, None, None], alpha)
    out = jnp.einsum("BKGTS,BSKD->BTKGD", probs, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)


# ---- gates: creation, checks, statistics, files --------------------------------------------------

def init_gates(config, value: float = 1.0) -> jax.Array:
    """[L, K] float32 gates, all `value` (1.0: every head full, the RLKV/DuoAttention start)."""
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"value={value!r}: initial gates must lie in [0, 1]")
    return jnp.full((config.num_layers, config.num_kv_heads), float(value), jnp.float32)


def check_gates(gates, config) -> jax.Array:
    """gates as float32 [L, K] for `config`; ValueError naming the shape otherwise."""
    arr = jnp.asarray(gates, jnp.float32)
    want = (config.num_layers, config.num_kv_heads)
    if arr.shape != want:
        raise ValueError(f"gates: shape {tuple(arr.shape)} does not fit this model; expected "
                         f"[layers, kv_heads] = {list(want)}")
    return arr


def gate_stats(gates, threshold: float = 0.5) -> dict:
    """mean gate and sparsity (fraction of KV heads whose gate is below `threshold`)."""
    g = np.asarray(gates, np.float64)
    return {"mean_gate": float(g.mean()), "sparsity": float((g < threshold).mean())}


__all__ = ["mixed_attention_fn", "mix_softmax", "check_streaming", "init_gates", "check_gates",
           "gate_stats", "save_gates", "load_gates"]
