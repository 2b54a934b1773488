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
  mixed_extend_attention_fn(gates, sink, window, prompt_lengths, scale) -> the same mixing for
      Decoder.extend (a completion over its prompt's cached keys and values)
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

# the mixing math lives with the cache that decodes with it (kernels read it from there too)
from jaxkv.cache.gated import check_streaming, mix_softmax, mixed_attention
# the one gate-file API (float64 [L, K], atomic, the model's fingerprint recorded), re-exported
from jaxkv.policies.rlkv import load_gates, save_gates


def mixed_attention_fn(gates, sink: int, window: int, prompt_lengths=None, remat: bool = False):
    """An `AttentionFn` (see jaxkv.model.decoder) mixing full and streaming attention per KV head.

    gates: [L, K] (float; traced: differentiate through it); sink, window: static ints.
    prompt_lengths: optional [B] int. Queries at positions < prompt_lengths[b] attend in full
    (every head), as a rollout's prefill does; later queries are mixed, as its decode steps are.
    So `Decoder.forward(prompt + completion, attention_fn=mixed_attention_fn(g, s, w, P))` gives
    the log-probabilities of exactly the model that `generate(..., policy=GatedMixing(g, s, w))`
    sampled from. Without prompt_lengths every query is mixed (DuoAttention training).
    remat: recompute the attention in the backward pass instead of keeping its [B, K, G, T, S]
    probabilities (`jax.checkpoint`). Measured on XLA:CPU (jax 0.10) it does not lower the
    compiled gradient's temporaries (SmolLM2, one 1,088-token sequence: 7.4 GB with and without;
    a 30-layer toy the same), so on CPU train in passes of fewer sequences
    (`DuoConfig.microbatch`, `RLKVConfig.microbatch`).
    On TPU (`pallas_kernels.dispatch.kernel_mode() == "tpu"`) the attention is the one-pass
    flash-style kernel of `pallas_kernels.mixed_prefill` (its backward never holds T^2 either).
    """
    sink, window = check_streaming(sink, window)
    if getattr(gates, "ndim", None) != 2:
        raise ValueError(f"gates: expected shape [layers, kv_heads], got "
                         f"{getattr(gates, 'shape', type(gates).__name__)}")
    from pallas_kernels import dispatch
    on_kernel = dispatch.kernel_mode() == "tpu"  # one-pass Pallas kernel, both branches per tile

    def mixed(alpha, q, k, v, positions, lengths):
        if on_kernel:
            return dispatch.mixed_prefill_attention(alpha, q, k, v, positions, lengths,
                                                    sink=sink, window=window)
        return dispatch.mixed_prefill_attention_reference(alpha, q, k, v, positions, lengths,
                                                          sink=sink, window=window)

    def attention(layer, q, k, v, positions):
        kh = k.shape[2]
        if gates.shape[1] != kh or not 0 <= layer < gates.shape[0]:
            raise ValueError(f"gates: shape {tuple(gates.shape)} does not fit layer {layer} with "
                             f"{kh} KV heads")
        lengths = None if prompt_lengths is None else jnp.asarray(prompt_lengths)
        fn = jax.checkpoint(mixed) if remat and not on_kernel else mixed
        return fn(gates[layer], q, k, v, positions, lengths)

    return attention


def mixed_extend_attention_fn(gates, sink: int, window: int, prompt_lengths, scale: float,
                              remat: bool = True):
    """The attention of `Decoder.extend` under gated mixing: the new tokens (a completion after
    its prompt) attend to the prompt's cached keys and values and, causally, to each other; each
    KV head mixes full and streaming attention with its gate, as `mixed_attention_fn` does for
    queries past `prompt_lengths`. Prompt slot j holds position j (valid below
    prompt_lengths[b]); the new tokens' positions are `Decoder.extend`'s.

    gates: [L, K] (traced); prompt_lengths: [B] int; scale: the model's 1/sqrt(head_dim).
    remat (default): recompute each layer's [B, K, G, C, P + C] probabilities in the backward
    pass instead of keeping them for all layers.
    """
    from jaxkv.model.layers import streaming_mask
    sink, window = check_streaming(sink, window)
    lengths = jnp.asarray(prompt_lengths, jnp.int32)

    def attend(alpha, q, k, v, positions, past_k, past_v):
        b, c = q.shape[:2]
        p = past_k.shape[2]
        keys = jnp.concatenate([past_k, k.transpose(0, 2, 1, 3).astype(past_k.dtype)], axis=2)
        vals = jnp.concatenate([past_v, v.transpose(0, 2, 1, 3).astype(past_v.dtype)], axis=2)
        slots = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        k_pos = jnp.concatenate([slots, positions.astype(jnp.int32)], axis=1)  # [B, P + C]
        valid = jnp.concatenate([slots < lengths[:, None], jnp.ones((b, c), bool)], axis=1)
        full = streaming_mask(positions, k_pos) & valid[:, None, :]  # [B, C, P + C]
        stream = streaming_mask(positions, k_pos, window, sink) & full
        return mixed_attention(q, keys, vals, full, stream, alpha, scale)

    fn = jax.checkpoint(attend) if remat else attend

    def attention(layer, q, k, v, positions, past_k, past_v):
        if gates.shape[1] != past_k.shape[1] or not 0 <= layer < gates.shape[0]:
            raise ValueError(f"gates: shape {tuple(gates.shape)} does not fit layer {layer} with "
                             f"{past_k.shape[1]} KV heads")
        return fn(gates[layer], q, k, v, positions, past_k, past_v)

    return attention


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


__all__ = ["mixed_attention_fn", "mixed_extend_attention_fn", "mix_softmax", "check_streaming", "init_gates", "check_gates",
           "gate_stats", "save_gates", "load_gates"]
