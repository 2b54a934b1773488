"""RLKV's one-prefill-per-prompt step pieces (`train.grpo`): the completion's log-probabilities
from the prompt's cached keys and values equal a forward over prompt + completion, gradient
included, and the group rollouts from one prefill sample the model `generate` samples from."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.generate import generate
from jaxkv.model.config import ModelConfig
from jaxkv.model.model import Model
from jaxkv.policies.gated import GatedMixing
from tests.helpers import random_params
from train.grpo import (build_completion_batch, build_loss_batch, cached_completion_logprobs,
                        completion_logprobs, group_rollout_fn, prompt_prefill_fn)

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=256,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)
SINK, WINDOW, TEMP = 2, 4, 0.7


def _setup():
    params = random_params(CFG, 3)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 64, size=n)) for n in (13, 20)]
    comps = [list(rng.integers(3, 64, size=n)) for n in (9, 5, 11, 1)]  # two per prompt
    gates = jnp.asarray(rng.uniform(0, 1, (CFG.num_layers, CFG.num_kv_heads)), jnp.float32)
    return params, prompts, comps, gates


def _cached(params, gates, prompts, comps, width=12):
    tokens = np.zeros((len(prompts), 32), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts])
    logits, past = prompt_prefill_fn(CFG)(params, jnp.asarray(tokens), lengths)
    idx = np.repeat(np.arange(len(prompts)), 2)
    past = tuple((k[idx], v[idx]) for k, v in past)
    ctoks, weights = build_completion_batch(comps, width, CFG.pad_token_id)

    def logp(g):
        return cached_completion_logprobs(params, g, logits[idx], past, lengths[idx],
                                          jnp.asarray(ctoks), config=CFG, sink=SINK,
                                          window=WINDOW, temperature=TEMP)
    return logp, weights


def test_cached_logprobs_equal_the_full_forward():
    params, prompts, comps, gates = _setup()
    logp_c, w_c = _cached(params, gates, prompts, comps)
    seq_prompts = [prompts[i // 2] for i in range(4)]
    tokens, plens, w_f = build_loss_batch(seq_prompts, comps, CFG.pad_token_id)

    def logp_f(g):
        return completion_logprobs(params, g, jnp.asarray(tokens), jnp.asarray(plens),
                                   config=CFG, sink=SINK, window=WINDOW, temperature=TEMP)
    full = np.asarray(logp_f(gates))
    cached = np.asarray(logp_c(gates))
    for i, (p, c) in enumerate(zip(seq_prompts, comps)):
        np.testing.assert_allclose(cached[i, :len(c)], full[i, len(p) - 1:len(p) + len(c) - 1],
                                   rtol=1e-4, atol=1e-4)
        assert np.isclose(w_c[i, :len(c)].sum(), w_f[i].sum()) and w_c[i, len(c):].sum() == 0
    adv = jnp.asarray([1.0, -0.5, 0.25, -1.0])
    g_full = jax.grad(lambda g: -jnp.sum(logp_f(g) * w_f * adv[:, None]))(gates)
    g_cached = jax.grad(lambda g: -jnp.sum(logp_c(g) * w_c * adv[:, None]))(gates)
    assert float(jnp.abs(g_full).max()) > 1e-4  # the gates matter at these sizes
    np.testing.assert_allclose(np.asarray(g_cached), np.asarray(g_full), rtol=2e-3, atol=1e-5)


def test_group_rollouts_from_one_prefill_sample_generate_s_model():
    """At a vanishing temperature sampling is greedy: the group's copies all give the tokens of
    `generate` with the same gates, each prompt prefilled once."""
    params, prompts, _, gates = _setup()
    model = Model(config=CFG, params=params)
    want = generate(model, prompts, 6, policy=GatedMixing(gates, SINK, WINDOW), eos_ids=())
    tokens = np.zeros((2, 32), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts])
    logits, past = prompt_prefill_fn(CFG)(params, jnp.asarray(tokens), lengths)
    out, bad = group_rollout_fn(CFG, SINK, WINDOW, 6, (-1,), 3)(
        params, gates, logits, past, lengths, jax.random.PRNGKey(0), 1e-6, 1.0)
    assert out.shape == (6, 6) and not bool(bad)
    got = np.asarray(out).tolist()
    assert got == [want.tokens[0]] * 3 + [want.tokens[1]] * 3
