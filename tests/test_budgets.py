"""One meaning of `budget` for every registered method: a fraction of the bytes of the dense cache
(same batch, same capacity: padded prompt + decode slots, same dtype). Each method at 0.05, 0.25
and 0.6 either builds caches whose arrays hold at most that share, or raises a ValueError naming
the budget; fixed-width methods (full, KIVI, int8) ignore it and report their own size.

The caches are traced, not compiled (`jax.eval_shape` of the prefill): bytes are static shapes,
so this is the same count `jaxkv.generate` reports as `cache_bytes`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache.base import cache_nbytes
from jaxkv.policies.registry import available_methods, make_policy
from jaxkv.policies.rlkv import random_gates
from tests.helpers import tiny_model

BUDGETS = (0.05, 0.25, 0.6)
FIXED_WIDTH = {"full", "kivi2", "kivi4", "int8"}
LENGTHS, T, EXTRA = (60, 45), 64, 4


def _settings(method, model):
    c = model.config
    if method in ("rlkv", "duo"):
        return dict(gates=random_gates(c.num_layers, c.num_kv_heads, seed=1), sink=2, window=4)
    if method.startswith("random_heads"):
        return dict(sink=2, window=4)
    if method == "streaming":
        return dict(sink=2)
    if method == "rdkv":
        return dict(eps="default", window=4)  # a random-weight model has no calibrated table
    if method in FIXED_WIDTH:
        return {}
    return dict(window=4)


def _bytes(model, policy):
    """(cache bytes, dense cache bytes) of `jaxkv.generate` on prompts of LENGTHS tokens (padded
    to T) with EXTRA new tokens, traced, not run."""
    from jaxkv.generate import _compiled, rng_key, split_policy
    from pallas_kernels.dispatch import kernel_mode
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(4, model.config.vocab_size, (len(LENGTHS), T)), jnp.int32)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    static, leaves = split_policy(policy)
    fn = _compiled(model.config, static, EXTRA, True, (), kernel_mode())
    _, caches, _ = jax.eval_shape(fn, model.params, leaves, tokens, lengths, rng_key(0),
                                  jnp.float32(1.0), jnp.float32(1.0))
    c = model.config
    full = c.kv_bytes_per_token() * len(LENGTHS) * (T + EXTRA) + 4 * c.num_layers * len(LENGTHS)
    return cache_nbytes(caches), full


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_method_meets_or_refuses_its_budget(method):
    model = tiny_model()
    measured = {}
    for budget in BUDGETS:
        try:
            policy = make_policy(method, budget, model, **_settings(method, model))
            kept, full = _bytes(model, policy)
        except ValueError as e:
            assert f"budget={budget}" in str(e), str(e)
            measured[budget] = None
            continue
        measured[budget] = kept / full
        if method not in FIXED_WIDTH:
            assert kept <= budget * full, (method, budget, kept / full)
    if method in FIXED_WIDTH:  # their own size, whatever was asked
        assert len(set(measured.values())) == 1 and None not in measured.values(), measured
    else:  # 0.6 of a 64-token prompt is within every method's reach
        assert measured[0.6] is not None, measured
        assert measured[0.6] > 0.25, measured
