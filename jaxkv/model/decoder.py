"""A decoder-only transformer compatible with HF Llama / Qwen2 / Qwen3 / Mistral (Flax Linen).

Three entry methods, all pure (the cache is passed in and returned):
  forward  full sequence, causal, no cache        tokens [B, T] -> logits [B, T, V]
  prefill  prompt -> last-token logits and a per-layer cache (optionally compressed per layer
           by a policy, right after that layer is done, so a full cache of all layers never exists)
  decode   one token per sequence over the caches -> logits [B, V] and the new caches
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxkv.cache.dense import DenseCache
from jaxkv.model.config import ModelConfig
from jaxkv.model.layers import MLP, RMSNorm, apply_rope, causal_attention, rope_inv_freq

# attention_fn(layer, q [B,T,H,D], k [B,T,K,D], v [B,T,K,D], positions [B,T]) -> [B,T,H,D]
AttentionFn = Callable[[int, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class LayerObservation:
    """What a compression policy sees of one layer at the end of prefill.

    queries:         [B, H, Q, D] post-RoPE queries at `query_positions` (Q may be 0)
    query_positions: [B, Q] int32 positions the policy asked for
    lengths:         [B] int32 prompt lengths
    o_proj:          [H*D, E] output projection kernel of this layer (value-norm scoring)
    inv_freq:        [D/2] RoPE inverse frequencies (to re-rotate queries to another position)
    extra_capacity:  static number of slots to leave for tokens generated while decoding
    """

    queries: jax.Array
    query_positions: jax.Array
    lengths: jax.Array
    o_proj: jax.Array
    inv_freq: jax.Array
    layer: int = flax.struct.field(pytree_node=False)
    extra_capacity: int = flax.struct.field(pytree_node=False)
    scale: float = flax.struct.field(pytree_node=False)


class Attention(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        dense = lambda n, bias, name: nn.Dense(n, use_bias=bias, dtype=c.jnp_dtype,
                                               param_dtype=c.jnp_dtype, name=name)
        self.q_proj = dense(c.num_heads * c.head_dim, c.attention_bias, "q_proj")
        self.k_proj = dense(c.num_kv_heads * c.head_dim, c.attention_bias, "k_proj")
        self.v_proj = dense(c.num_kv_heads * c.head_dim, c.attention_bias, "v_proj")
        self.o_proj = dense(c.hidden_size, False, "o_proj")
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.jnp_dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.jnp_dtype)
        self.inv_freq = rope_inv_freq(c)

    def project(self, x, positions):
        """x: [B, T, E]; positions: [B, T] -> q [B, T, H, D], k, v [B, T, K, D] (RoPE applied)."""
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq), v

    def output(self, attn):
        """attn: [B, T, H, D] -> [B, T, E]."""
        b, t = attn.shape[:2]
        return self.o_proj(attn.reshape(b, t, -1))

    def __call__(self, x, positions):  # used only by `init`
        q, k, v = self.project(x, positions)
        return self.output(q)


class Block(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.jnp_dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.jnp_dtype)

    def qkv(self, x, positions):
        return self.self_attn.project(self.input_layernorm(x), positions)

    def finish(self, x, attn):
        x = x + self.self_attn.output(attn)
        return x + self.mlp(self.post_attention_layernorm(x))

    def __call__(self, x, positions):  # used only by `init`
        q, k, v = self.qkv(x, positions)
        return self.finish(x, q)


class Decoder(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.jnp_dtype,
                                     param_dtype=c.jnp_dtype,
                                     embedding_init=nn.initializers.normal(0.02))
        self.layers = [Block(c) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.jnp_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=c.jnp_dtype,
                                    param_dtype=c.jnp_dtype)

    @property
    def scale(self) -> float:
        return self.config.head_dim ** -0.5

    def _logits(self, h):
        h = self.norm(h)
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(h)
        return self.lm_head(h)

    def __call__(self, tokens):
        return self.forward(tokens)

    def forward(self, tokens, attention_fn: Optional[AttentionFn] = None,
                return_hidden: bool = False, positions: Optional[jax.Array] = None):
        """tokens: [B, T] -> logits [B, T, V] (and final hidden states [B, T, E] if asked).

        positions: [B, T] int RoPE positions, increasing along T (default 0..T-1). Training
        with skips in them (`train.pretrain.Stage.position_span`) shows the model relative
        distances longer than the sequence it computes.
        """
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, positions)
            if attention_fn is None:
                attn = causal_attention(q, k, v, self.scale, positions, positions,
                                        window=self.config.sliding_window)
            else:
                attn = attention_fn(i, q, k, v, positions)
            x = layer.finish(x, attn)
        logits = self._logits(x)
        if return_hidden:
            return logits, self.norm(x)
        return logits

    def extend(self, tokens, positions, past: Sequence[Any], attention_fn: Callable):
        """Forward of tokens [B, C] that continue cached prompts -> logits [B, C, V].

        positions: [B, C] RoPE positions of the new tokens; past: per layer (k, v), the prompts'
        post-RoPE keys and values [B, K, P, D] (as `DenseCache` holds them; prefill's caches give
        them). attention_fn(layer, q, k, v, positions, past_k, past_v) -> [B, C, H, D] with q
        [B, C, H, D] and k, v [B, C, K, D] of the new tokens. The prompts' keys and values do not
        depend on what the new tokens attend to, so this gives the logits `forward` gives at
        those positions whenever the prompt queries attended in full (RLKV's gated training:
        `train.grpo.cached_completion_logprobs`), at the cost of C tokens instead of P + C.
        """
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, positions)
            attn = attention_fn(i, q, k, v, positions, *past[i])
            x = layer.finish(x, attn)
        return self._logits(x)

    def prefill(self, tokens, lengths, capacity: int, policy: Any = None,
                query_positions: Optional[jax.Array] = None):
        """tokens: [B, T] right-padded; lengths: [B] -> (logits [B, V] at lengths-1, caches).

        capacity: total slots of each dense cache (T + tokens to generate). With a policy, each
        layer's dense cache is handed to `policy.compress_layer(layer, cache, observation)` as
        soon as that layer's attention is done, and only the compressed cache is kept.
        """
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if query_positions is None:
            query_positions = jnp.zeros((b, 0), jnp.int32)
        x = self.embed_tokens(tokens)
        caches = []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, positions)
            attn = causal_attention(q, k, v, self.scale, positions, positions,
                                    window=self.config.sliding_window)
            k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
            if policy is None:
                cache = DenseCache.from_prefill(k_t, v_t, lengths, capacity)
            else:
                q_obs = jnp.take_along_axis(q, query_positions[:, :, None, None], axis=1)
                obs = LayerObservation(
                    queries=q_obs.transpose(0, 2, 1, 3),  # [B, H, Q, D]
                    query_positions=query_positions, lengths=lengths.astype(jnp.int32),
                    o_proj=layer.self_attn.o_proj.variables["params"]["kernel"],
                    inv_freq=jnp.asarray(rope_inv_freq(self.config)),
                    layer=i, extra_capacity=capacity - t, scale=self.scale)
                cache = policy.compress_layer(i, DenseCache.from_prefill(k_t, v_t, lengths, t), obs)
            x = layer.finish(x, attn)
            if policy is not None:
                x = depend_on(x, cache)
            caches.append(cache)
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)
        return self._logits(last[:, 0]), tuple(caches)

    def decode(self, tokens, positions, caches: Sequence[Any]):
        """tokens, positions: [B] -> (logits [B, V], new caches). Appends, then attends."""
        x = self.embed_tokens(tokens[:, None])  # [B, 1, E]
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            q, k, v = layer.qkv(x, positions[:, None])
            cache = cache.append(k[:, 0], v[:, 0])  # [B, K, D]
            if hasattr(cache, "attend_and_update"):  # caches that learn from queries (H2O)
                attn, cache = cache.attend_and_update(q[:, 0], self.scale)
            elif self.config.sliding_window is not None and isinstance(cache, DenseCache):
                attn = cache.attend(q[:, 0], self.scale, window=self.config.sliding_window)
            else:
                attn = cache.attend(q[:, 0], self.scale)  # [B, H, D]
            new_caches.append(cache)
            x = layer.finish(x, attn[:, None])
        return self._logits(x[:, 0]), tuple(new_caches)


def depend_on(x: jax.Array, cache: Any) -> jax.Array:
    """`x`, made to depend on every array of `cache` (adds zero times a sum over each).

    Layer-by-layer prefill: the next layer's input then needs this layer's whole compressed cache,
    so XLA cannot schedule a layer's compression after later layers (on CPU it does, which keeps
    every layer's dense keys and values and compression temporaries alive at once: RDKV's prefill
    temporaries grew by 57 MiB a layer at 4K tokens). Optimisation barriers are removed before
    the CPU scheduler runs, and a dependency on one element is fused into its producer; a sum over
    each array (the compressed cache is small) is a real dependency. A non-finite sum adds 0.
    """
    dep = jnp.zeros((), jnp.float32)
    for leaf in jax.tree_util.tree_leaves(cache):
        if leaf.size:
            dep = dep + jnp.sum(leaf, dtype=jnp.float32)
    dep = jnp.where(jnp.isfinite(dep), dep, 0.0)
    return x + (dep * 0.0).astype(x.dtype)


def init_params(config: ModelConfig, seed: int = 0, kernel_std: Optional[float] = None):
    """Random parameters for `config` (the pytree `Decoder(config).init` builds).

    kernel_std: None keeps Flax's lecun_normal projection kernels (std 1/sqrt(fan_in)); a float
    redraws every projection kernel from normal(kernel_std) (`normal_kernels`, key seed + 1), the
    Hugging Face `initializer_range` init (0.02 there). Embeddings are normal(0.02) either way."""
    try:
        init = _init_fn(config)
    except TypeError:  # a config built with an unhashable field (a list): not cached
        init = _init_fn.__wrapped__(config)
    params = init(jax.random.PRNGKey(seed))
    if kernel_std is None:
        return params
    if not (isinstance(kernel_std, (int, float)) and kernel_std > 0):
        raise ValueError(f"kernel_std={kernel_std!r} is not allowed; expected None or a positive "
                         f"float")
    return normal_kernels(params, float(kernel_std), seed + 1)


def normal_kernels(params, std: float, seed: int):
    """`params` with every projection kernel (every leaf named `kernel`) redrawn from
    normal(std), one key per leaf from PRNGKey(seed); embeddings and norms unchanged."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [
        std * jax.random.normal(k, x.shape, x.dtype) if "kernel" in jax.tree_util.keystr(p) else x
        for (p, x), k in zip(leaves, keys)])


@functools.lru_cache(maxsize=16)
def _init_fn(config: ModelConfig):
    """One jitted init per config, kept: eager init would compile every small op separately, and
    a fresh jit per call would compile it again for every model of the same config."""
    # The dummy tokens are made inside the traced function: one made here, on a first call under
    # a trace (load_hf's eval_shape), would be a tracer the cached function keeps and leaks later.
    return jax.jit(lambda rng: Decoder(config).init(rng, jnp.zeros((1, 2), jnp.int32))["params"])
