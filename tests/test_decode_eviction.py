"""H2O and R-KV: eviction while decoding in a fixed-size cache."""
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv.cache.budget import BudgetCache, redundancy
from jaxkv.policies.h2o import H2O
from jaxkv.policies.registry import make_policy
from jaxkv.policies.rkv import RKV
from tests.helpers import tiny_model


def _cache(keys, scores, mode="h2o", window=1, keep=2, lam=0.0):
    """One sequence, one KV head, one query head; slots full with positions 0..S-1."""
    keys = jnp.asarray(keys, jnp.float32)[None, None]  # [1, 1, S, D]
    s, d = keys.shape[2], keys.shape[3]
    return BudgetCache(
        k=keys, v=keys * 10, positions=jnp.arange(s, dtype=jnp.int32)[None, None],
        scores=jnp.asarray(scores, jnp.float32)[None, None],
        queries=jnp.ones((1, 1, 1, d), jnp.float32), counts=jnp.asarray([s]),
        steps=jnp.asarray([s]), keep=keep, window=window, mode=mode, lam=lam, scale=1.0)


def test_h2o_evicts_the_lightest_token_outside_the_window():
    # 3 slots full (keep 2 + buffer 1); scores 0.5, 0.1, 0.9; position 2 is the recent window
    cache = _cache([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.5, 0.1, 0.9])
    new = cache.append(jnp.full((1, 1, 2), 7.0), jnp.full((1, 1, 2), 7.0))
    # position 1 (score 0.1) goes; kept: 0 and 2 (compacted, position order), then 3 is written
    np.testing.assert_array_equal(np.asarray(new.positions)[0, 0], [0, 2, 3])
    np.testing.assert_array_equal(np.asarray(new.k)[0, 0, 2], [7.0, 7.0])
    assert int(new.counts[0]) == 3 and int(new.steps[0]) == 4


def test_h2o_accumulates_attention_of_every_query():
    cache = _cache([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0], keep=1)
    q = jnp.asarray([[[5.0, 0.0]]])  # looks at the first key
    _, cache = cache.attend_and_update(q, 1.0)
    s = np.asarray(cache.scores)[0, 0]
    assert s[0] > 0.99 and s[1] < 0.01 and abs(s.sum() - 1.0) < 1e-6
    _, cache = cache.attend_and_update(q, 1.0)
    assert abs(float(cache.scores.sum()) - 2.0) < 1e-5


def test_redundancy_and_rkv_drop_duplicates_first():
    keys = [[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.5, 0.5]]
    red = np.asarray(redundancy(jnp.asarray(keys)[None, None], jnp.ones((1, 1, 4), bool)))[0, 0]
    assert red[0] > red[2] and red[1] > red[2]  # the near-duplicates are the redundant ones
    # lam = 0: rank by redundancy alone; window 1 protects position 3; keep 3 of 4 -> the most
    # redundant of positions 0..2 goes (position 0 or 1, never the unique key at 2)
    cache = _cache(keys, [0.0] * 4, mode="rkv", keep=3, lam=0.0)
    kept = np.asarray(cache.compact(jnp.asarray([True])).positions)[0, 0, :3].tolist()
    assert 2 in kept and 3 in kept and len({0, 1} & set(kept)) == 1


@pytest.mark.parametrize("method", ["h2o", "rkv"])
def test_generate_with_decode_time_eviction(method):
    model = tiny_model()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, model.config.vocab_size, size=n).tolist() for n in (100, 60)]
    policy = make_policy(method, 0.3, model, window=4)
    out = jaxkv.generate(model, prompts, 40, policy=policy)
    # fixed size: bytes (k, v, positions, scores, queries, counters) within one slot per head
    # and layer of 30% of the full cache
    c = model.config
    slot = c.num_layers * c.num_kv_heads * (2 * c.head_dim * 4 + 8) * len(prompts)
    assert out.cache_bytes <= 0.3 * out.full_cache_bytes + slot
    assert out.cache_bytes >= 0.3 * out.full_cache_bytes - 2 * slot
    assert all(len(t) == 40 for t in out.tokens)


def test_generous_budget_and_window_reproduce_the_full_cache():
    model = tiny_model()
    prompts = [list(range(4, 40))]
    full = jaxkv.generate(model, prompts, 8)
    # 36 + 8 tokens fit in the 62 slots budget 1.0 leaves of the 72-slot full cache (after the
    # per-slot position / score bytes): nothing is ever evicted
    for policy in (H2O(budget=1.0, window=4), RKV(budget=1.0, window=4, buffer=2)):
        assert jaxkv.generate(model, prompts, 8, policy=policy).tokens == full.tokens


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=0.0), "budget"), (dict(window=0), "window"), (dict(lam=1.5), "lam"),
    (dict(buffer=0), "buffer"), (dict(n_queries=0), "n_queries")])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RKV(**kwargs)


def test_budget_below_the_window_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="budget=0.05"):
        jaxkv.generate(model, [list(range(4, 60))], 4, policy=H2O(budget=0.05, window=16))
