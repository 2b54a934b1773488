"""The GRPO pieces of RLKV's gate training (train/rlkv.py gives the recipe): group advantages,
the reward-adaptive L1 penalty, the PPO-clipped policy loss over completion tokens, the jitted
log-probability and gradient functions of the gated model, and the AdamW update of the gates
(clipped into [0, 1])."""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkv.model.config import ModelConfig
from jaxkv.model.decoder import Decoder
from jaxkv.model.gated import mixed_attention_fn

ADVANTAGE_MODES = ("group", "batch")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean")
ADV_EPS = 1e-6


def adaptive_scale(r_mean: float, tau: float) -> float:
    """The reward-adaptive L1 scale s = exp(r_mean) - 1 if r_mean > tau else 0 (s = 1 at ln 2)."""
    r_mean = float(r_mean)
    return math.expm1(r_mean) if r_mean > tau else 0.0


def l1_penalty(gates, beta: float, scale) -> jax.Array:
    """beta * mean(|gates|) * s."""
    return beta * jnp.mean(jnp.abs(gates)) * scale


def compute_advantages(rewards, group_size: int, mode: str = "group",
                       eps: float = ADV_EPS) -> np.ndarray:
    """rewards [N] (groups of `group_size` consecutive entries) -> advantages [N] (float32).

    group: (r - group mean) / (group std + eps); batch: (r - group mean) / (batch std + eps).
    std is unbiased (ddof=1). A group whose rewards are all equal gets advantages 0.
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or r.size % group_size:
        raise ValueError(f"rewards: {r.shape} is not a whole number of groups of {group_size}")
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode={mode!r}: allowed are {', '.join(ADVANTAGE_MODES)}")
    g = r.reshape(-1, group_size)
    centred = g - g.mean(axis=1, keepdims=True)
    if mode == "group":
        std = g.std(axis=1, ddof=1, keepdims=True)
    else:
        std = r.std(ddof=1) if r.size > 1 else 0.0
    return (centred / (std + eps)).reshape(-1).astype(np.float32)


def build_loss_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     pad_id: int, loss_agg: str = "token_mean", bucket: int = 64):
    """Sequences prompt + completion for the loss.

    Returns tokens int32 [N, T] (T: longest sequence rounded up to `bucket`, right-padded),
    prompt_lengths int32 [N], and weights float32 [N, T-1]: weights[i, t] > 0 iff
    tokens[i, t + 1] is a completion token (t = P_i - 1 .. P_i + C_i - 2), valued so that
    sum(weights * per_token_loss) is the requested aggregation over the batch:
    token_mean: 1 / (total completion tokens); seq_mean_token_mean: 1 / (N * C_i).
    """
    n = len(prompts)
    if n == 0 or len(completions) != n:
        raise ValueError(f"prompts ({n}) and completions ({len(completions)}): equal, non-zero")
    token_weight = _token_weights(completions, loss_agg)
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    t = max(-(-longest // bucket) * bucket, 2)
    tokens = np.full((n, t), pad_id, np.int32)
    weights = np.zeros((n, t - 1), np.float32)
    lengths = np.zeros(n, np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens[i, :len(p) + len(c)] = list(p) + list(c)
        lengths[i] = len(p)
        weights[i, len(p) - 1:len(p) + len(c) - 1] = token_weight[i]
    return tokens, lengths, weights


def _token_weights(completions: Sequence[Sequence[int]], loss_agg: str):
    """The loss weight of each completion's tokens, so that sum(weights * per_token_loss) is the
    aggregation `loss_agg` over the batch: token_mean 1 / (total completion tokens),
    seq_mean_token_mean 1 / (N * C_i). Empty completions are refused."""
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg={loss_agg!r}: allowed are {', '.join(LOSS_AGGREGATIONS)}")
    for i, c in enumerate(completions):
        if len(c) == 0:
            raise ValueError(f"completions[{i}] is empty")
    n, total = len(completions), sum(len(c) for c in completions)
    return [1.0 / total if loss_agg == "token_mean" else 1.0 / (n * len(c)) for c in completions]


def completion_logprobs(params, gates, tokens, prompt_lengths, *, config: ModelConfig, sink: int,
                        window: int, temperature: float, remat: bool = False):
    """log pi(tokens[:, t+1] | tokens[:, :t+1]) under the gated model -> float32 [N, T-1]."""
    fn = mixed_attention_fn(gates, sink, window, prompt_lengths, remat=remat)
    logits = Decoder(config).apply({"params": params}, tokens, attention_fn=fn,
                                   method=Decoder.forward)
    logits = logits[:, :-1].astype(jnp.float32) / temperature  # [N, T-1, V]
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def build_completion_batch(completions: Sequence[Sequence[int]], width: int, pad_id: int,
                           loss_agg: str = "token_mean"):
    """Completions alone, for the cached-prompt loss (`cached_completion_logprobs`): tokens int32
    [N, width] (right-padded) and weights float32 [N, width], weights[i, t] > 0 iff t < len(c_i),
    valued as `build_loss_batch`'s (so the two losses are the same number)."""
    n = len(completions)
    if n == 0:
        raise ValueError("completions: give at least one")
    for i, c in enumerate(completions):
        if not 0 < len(c) <= width:
            raise ValueError(f"completions[{i}] has {len(c)} tokens; expected 1 to {width}")
    token_weight = _token_weights(completions, loss_agg)
    tokens = np.full((n, width), pad_id, np.int32)
    weights = np.zeros((n, width), np.float32)
    for i, c in enumerate(completions):
        tokens[i, :len(c)] = list(c)
        weights[i, :len(c)] = token_weight[i]
    return tokens, weights


def cached_completion_logprobs(params, gates, first_logits, past, prompt_lengths, completions, *,
                               config: ModelConfig, sink: int, window: int, temperature: float,
                               remat: bool = True):
    """`completion_logprobs` restricted to the completion, from the prompts' cached keys and
    values: float32 [N, C], entry t = log pi(completions[:, t] | prompt, completions[:, :t]).

    first_logits: [N, V], the prefill's logits at each prompt's last token (they give token 0;
    prompt queries attend in full, so they do not depend on the gates); past: per layer (k, v)
    [N, K, P, D] of the prompts; prompt_lengths: [N]. Only the C completion tokens are computed
    (`Decoder.extend`), instead of the P + C of a forward over prompt + completion.
    """
    from jaxkv.model.gated import mixed_extend_attention_fn
    n, c = completions.shape
    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    first = jax.nn.log_softmax(first_logits.astype(jnp.float32) / temperature, axis=-1)
    logp0 = jnp.take_along_axis(first, completions[:, :1], axis=-1)  # [N, 1]
    if c == 1:
        return logp0
    positions = lengths[:, None] + jnp.arange(c - 1, dtype=jnp.int32)[None, :]
    fn = mixed_extend_attention_fn(gates, sink, window, lengths, config.head_dim ** -0.5, remat)
    logits = Decoder(config).apply({"params": params}, completions[:, :-1], positions, past, fn,
                                   method=Decoder.extend)
    logits = logits.astype(jnp.float32) / temperature  # [N, C-1, V]
    picked = jnp.take_along_axis(logits, completions[:, 1:, None], axis=-1)[..., 0]
    return jnp.concatenate([logp0, picked - jax.nn.logsumexp(logits, axis=-1)], axis=1)


@functools.lru_cache(maxsize=16)
def cached_policy_grad_fn(config: ModelConfig, sink: int, window: int, temperature: float,
                          remat: bool, eps_clip: float, with_old: bool):
    """jit value_and_grad of the clipped loss over `cached_completion_logprobs`, in the gates."""
    def loss(gates, params, first_logits, past, prompt_lengths, completions, weights,
             advantages, old_logp):
        logp = cached_completion_logprobs(params, gates, first_logits, past, prompt_lengths,
                                          completions, config=config, sink=sink, window=window,
                                          temperature=temperature, remat=remat)
        return clipped_policy_loss(logp, old_logp if with_old else None, advantages, weights,
                                   eps_clip)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@functools.lru_cache(maxsize=16)
def cached_logprob_fn(config: ModelConfig, sink: int, window: int, temperature: float,
                      remat: bool):
    return jax.jit(functools.partial(cached_completion_logprobs, config=config, sink=sink,
                                     window=window, temperature=temperature, remat=remat))


@functools.lru_cache(maxsize=8)
def prompt_prefill_fn(config: ModelConfig):
    """jit (params, tokens [P, T], lengths [P]) -> (logits at each prompt's last token [P, V],
    per layer (k, v) [P, K, T, D]): the dense prefill, once per distinct prompt of a step."""
    def prefill(params, tokens, lengths):
        logits, caches = Decoder(config).apply({"params": params}, tokens, lengths,
                                               tokens.shape[1], method=Decoder.prefill)
        return logits, tuple((c.k, c.v) for c in caches)
    return jax.jit(prefill)


@functools.lru_cache(maxsize=8)
def group_rollout_fn(config: ModelConfig, sink: int, window: int, max_new_tokens: int,
                     eos_ids: Tuple[int, ...], group: int):
    """jit (params, gates, first_logits [P, V], past, lengths [P], rng, temperature, top_p) ->
    (completions int32 [P * group, max_new_tokens], pad after EOS; bool: non-finite logits).

    The `group` samples of each prompt decode from copies of its one prefill: gated mixing per KV
    head (`GatedDenseCache`), the model `generate(..., policy=GatedMixing(gates, sink, window))`
    samples from, whose prefill attends in full and so does not depend on the gates."""
    from jaxkv.cache.dense import DenseCache
    from jaxkv.cache.gated import GatedDenseCache
    from jaxkv.generate import _sample, decode_loop

    def rollout(params, gates, first_logits, past, lengths, rng, temperature, top_p):
        rep = lambda x: jnp.repeat(x, group, axis=0)
        lengths = rep(lengths.astype(jnp.int32))
        caches = tuple(GatedDenseCache.from_dense(DenseCache(k=rep(k), v=rep(v), lengths=lengths),
                                                  gates[i], sink, window,
                                                  extra_capacity=max_new_tokens)
                       for i, (k, v) in enumerate(past))
        rng, sub = jax.random.split(rng)
        first = _sample(rep(first_logits), sub, temperature, top_p, False)
        out, _, bad = decode_loop(params, first, lengths, caches, rng, temperature, top_p,
                                  config=config, max_new_tokens=max_new_tokens, greedy=False,
                                  eos_ids=eos_ids)
        return out, bad | ~jnp.isfinite(first_logits).all()
    return jax.jit(rollout)


def clipped_policy_loss(logp, old_logp, advantages, weights, eps_clip: float):
    """sum over tokens of weights * -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A).

    logp, old_logp, weights: [N, T-1]; advantages: [N]. old_logp=None: stop_gradient(logp)
    (one update per batch: ratio == 1 in value, d ratio = d logp in gradient).
    Returns (loss, fraction of weighted tokens whose ratio was clipped).
    """
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_clip, 1.0 + eps_clip) * adv
    loss = jnp.sum(-jnp.minimum(unclipped, clipped) * weights)
    frac = jnp.sum((clipped < unclipped) * (weights > 0)) / jnp.maximum(jnp.sum(weights > 0), 1)
    return loss, frac


@functools.lru_cache(maxsize=16)
def policy_grad_fn(config: ModelConfig, sink: int, window: int, temperature: float,
                    remat: bool, eps_clip: float, with_old: bool):
    def loss(gates, params, tokens, prompt_lengths, weights, advantages, old_logp):
        logp = completion_logprobs(params, gates, tokens, prompt_lengths, config=config,
                                   sink=sink, window=window, temperature=temperature,
                                   remat=remat)
        return clipped_policy_loss(logp, old_logp if with_old else None, advantages, weights,
                                   eps_clip)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@functools.lru_cache(maxsize=16)
def logprob_fn(config: ModelConfig, sink: int, window: int, temperature: float, remat: bool):
    return jax.jit(functools.partial(completion_logprobs, config=config, sink=sink, window=window,
                                     temperature=temperature))


def make_gate_optimizer(learning_rate: float, weight_decay: float, betas=(0.9, 0.999),
                        grad_clip: Optional[float] = 1.0) -> optax.GradientTransformation:
    """AdamW at a constant lr, after a global grad-norm clip (None: no clip)."""
    adamw = optax.adamw(learning_rate, b1=betas[0], b2=betas[1], weight_decay=weight_decay)
    if grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)


@functools.lru_cache(maxsize=16)
def gate_update_fn(learning_rate: float, weight_decay: float, betas: Tuple[float, float],
                   grad_clip: Optional[float], beta: float):
    """jit (gates, opt_state, loss grads, s) -> (gates clipped into [0, 1], opt_state, penalty,
    grad norm). The L1 penalty beta * mean|gates| * s and its gradient are added here, once per
    step; the optimiser is `make_gate_optimizer(learning_rate, weight_decay, betas, grad_clip)`.
    Cached on the settings, so runs in one process share the compilation."""
    optimizer = make_gate_optimizer(learning_rate, weight_decay, betas, grad_clip)

    @jax.jit
    def apply(gates, opt_state, loss_grads, scale):
        penalty, pen_grads = jax.value_and_grad(l1_penalty)(gates, beta, scale)
        grads = loss_grads + pen_grads
        updates, opt_state = optimizer.update(grads, opt_state, gates)
        gates = jnp.clip(optax.apply_updates(gates, updates), 0.0, 1.0)
        return gates, opt_state, penalty, optax.tree.norm(grads)
    return apply
