"""SnapKV-family eviction and merging policies: budgets, hand-worked selections, window always
kept, budget 1 reproduces the full cache, merging rules, and errors."""
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv.cache import DenseCache, SparseCache
from jaxkv.policies.adakv import AdaKV, CriticalKV
from jaxkv.policies.merging import cam_merge, kvmerger_merge, nearest_merge
from jaxkv.policies.registry import make_policy
from jaxkv.policies.snapkv import (ChunkKV, PyramidKV, SnapKV, avg_pool, prepare_scores,
                                   select_headwise, select_per_head, span_scores, value_norms)
from tests.helpers import tiny_model

SPARSE_METHODS = ("snapkv", "pyramidkv", "chunkkv", "adakv", "criticalkv", "critical_adakv",
                  "cam", "nearest_merge", "kvmerger", "grkv")


def test_avg_pool_is_torch_avg_pool1d_with_same_padding():
    x = jnp.asarray([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 10.0]])
    # kernel 3: each output = (x[i-1] + x[i] + x[i+1]) / 3 with zeros outside
    np.testing.assert_allclose(np.asarray(avg_pool(x, 3)),
                               [[0, 5 / 3, 5 / 3, 5 / 3, 0, 10 / 3, 10 / 3]], rtol=1e-6)


def test_per_head_selection_hand_worked():
    # one sequence of length 6, window 2 (positions 4, 5 forced), keep 4 per head
    scores = jnp.asarray([[[0.1, 0.9, 0.3, 0.8, 0.0, 0.0],
                           [0.5, 0.1, 0.2, 0.05, 0.0, 0.0]]])
    s = prepare_scores(scores, jnp.asarray([6]), window=2)
    keep = np.asarray(select_per_head(s, jnp.asarray([4]), 4))
    # head 0: window {4, 5} + top-2 of {0.1, 0.9, 0.3, 0.8} = {1, 3}
    # head 1: window {4, 5} + top-2 of {0.5, 0.1, 0.2, 0.05} = {0, 2}
    np.testing.assert_array_equal(keep[0, 0], [0, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(keep[0, 1], [1, 0, 1, 0, 1, 1])


def test_span_selection_hand_worked():
    # spans of 2: head 0 {0.1, 0.9}=1.0, {0.3, 0.8}=1.1; head 1 {0.5, 0.1}=0.6, {0.2, 0.05}=.25
    scores = jnp.asarray([[[0.1, 0.9, 0.3, 0.8, 0.0, 0.0],
                           [0.5, 0.1, 0.2, 0.05, 0.0, 0.0]]])
    spans = np.asarray(span_scores(scores, 2))
    np.testing.assert_allclose(spans[0, 0, :4], [1.0, 1.0, 1.1, 1.1], atol=1e-5)
    assert spans[0, 0, 2] > spans[0, 0, 3]  # ties inside a span: its earlier token first
    s = prepare_scores(jnp.asarray(spans), jnp.asarray([6]), window=2)
    keep = np.asarray(select_per_head(s, jnp.asarray([4]), 4))
    # keep 2 beyond the window: head 0 the span {2, 3} (token-level would take {1, 3}),
    # head 1 the span {0, 1} (token-level {0, 2})
    np.testing.assert_array_equal(keep[0, 0], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(keep[0, 1], [1, 1, 0, 0, 1, 1])
    keep3 = np.asarray(select_per_head(s, jnp.asarray([5]), 5))  # one token more: the next
    np.testing.assert_array_equal(keep3[0, 0], [1, 0, 1, 1, 1, 1])  # span's first token
    assert span_scores(scores, 1) is scores


@pytest.mark.parametrize("method", ["snapkv", "critical_adakv", "grkv"])
def test_span_policies_keep_whole_spans(method):
    """With span 4 every head's kept prompt tokens outside the window are whole aligned spans of
    4, but for at most one partial span (the budget's cut) per head."""
    model = tiny_model()
    policy = make_policy(method, 0.3, model, window=4, kernel=3, span=4)
    lengths, t = [64, 64], 64
    cache, obs = _prefill_setup(model, lengths, t, policy)
    out = policy.compress_layer(0, cache, obs)
    heads, pos = np.asarray(out.heads), np.asarray(out.positions)
    counts = np.asarray(out.counts())
    for b in range(2):
        for h in range(model.config.num_kv_heads):
            kept = pos[b][heads[b] == h][:counts[b, h]]
            beyond = [p for p in kept.tolist() if p < 60]
            partial = [g for g in set(p // 4 for p in beyond)
                       if sum(p // 4 == g for p in beyond) != 4]
            assert len(partial) <= 1, (method, b, h, sorted(beyond))
            assert len(beyond) >= 8


def test_headwise_selection_hand_worked():
    # same scores; the layer keeps 2 heads x 4 = 8 tokens; safeguard 0.5 -> each head >= 2
    scores = jnp.asarray([[[0.1, 0.9, 0.3, 0.8, 0.0, 0.0],
                           [0.5, 0.1, 0.2, 0.05, 0.0, 0.0]]])
    s = prepare_scores(scores, jnp.asarray([6]), window=2)
    keep = np.asarray(select_headwise(s, jnp.asarray([4]), 4, safeguard=0.5, window=2))
    # forced: 4 window tokens and each head's best beyond it (floor(0.5 * (4 - 2)) = 1: 0.9 at
    # h0 p1, 0.5 at h1 p0); 2 left for the top scores over both heads (scaled by the max 0.9):
    # 0.8 (h0 p3), 0.3 (h0 p2) -> head 0 keeps 5, head 1 keeps 3
    np.testing.assert_array_equal(keep[0, 0], [0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(keep[0, 1], [1, 0, 0, 0, 1, 1])
    assert keep.sum() == 8


def test_safeguard_floor_is_a_share_of_the_budget_beyond_the_window():
    # AdaKV's floor is floor(safeguard * (n_keep - window)) tokens beyond the window: with
    # n_keep 4 and window 2, safeguard 0.5 guarantees head 1 one token beyond its window (a floor
    # of floor(0.5 * 4) = 2 counting the window would guarantee it nothing)
    scores = jnp.asarray([[[0.9, 0.8, 0.7, 0.6, 0.0, 0.0],
                           [0.1, 0.1, 0.1, 0.05, 0.0, 0.0]]])
    s = prepare_scores(scores, jnp.asarray([6]), window=2)
    keep = np.asarray(select_headwise(s, jnp.asarray([4]), 4, safeguard=0.5, window=2))
    np.testing.assert_array_equal(keep[0, 0], [1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(keep[0, 1], [1, 0, 0, 0, 1, 1])  # p0 by the floor (tie: lower)
    bare = np.asarray(select_headwise(s, jnp.asarray([4]), 4, safeguard=0.0, window=2))
    np.testing.assert_array_equal(bare[0, 1], [0, 0, 0, 0, 1, 1])


def test_criticalkv_first_stage_is_half_the_budget_beyond_the_window():
    """Stage 1 keeps the window and floor(0.5 * (n_keep - window)) tokens by score alone, even
    when their values are zero (no effect on the output, so stage 2 would drop them)."""
    from types import SimpleNamespace
    t, window, n_keep = 14, 4, 10
    raw = np.zeros((1, 1, t), np.float32)
    raw[0, 0, :10] = np.linspace(1.0, 0.1, 10)  # beyond the window, by position
    s = prepare_scores(jnp.asarray(raw), jnp.asarray([t]), window=window)
    v = np.ones((1, 1, t, 2), np.float32)
    v[0, 0, :3] = 0.0  # the three best-scored tokens carry zero values
    cache = SimpleNamespace(v=jnp.asarray(v))
    obs = SimpleNamespace(o_proj=jnp.eye(2, dtype=jnp.float32))
    policy = CriticalKV(budget=0.5, window=window, kernel=1, adaptive=False)
    keep = np.asarray(policy.select(0, s, jnp.asarray([n_keep]), n_keep, cache, obs))[0, 0]
    # stage 1: window + {0, 1, 2} (4 + floor(0.5 * 6) = 7); stage 2: {3, 4, 5} by score * |v|
    np.testing.assert_array_equal(np.flatnonzero(keep), [0, 1, 2, 3, 4, 5, 10, 11, 12, 13])


@pytest.mark.parametrize("chunk", [64, 256, 4096])
def test_value_norms_are_l1_norms_of_w_o_v_summed_over_the_query_heads(chunk):
    from types import SimpleNamespace
    rng = np.random.default_rng(0)
    b, kh, g, t, d, e = 2, 3, 2, 300, 8, 20  # 300 tokens: the last chunk is partial
    v = rng.normal(size=(b, kh, t, d)).astype(np.float32)
    wo = rng.normal(size=(kh * g * d, e)).astype(np.float32)  # rows: head h = k * g + j, then D
    got = value_norms(SimpleNamespace(v=jnp.asarray(v)), SimpleNamespace(o_proj=jnp.asarray(wo)),
                      chunk=chunk)
    want = np.zeros((b, kh, t))
    for k in range(kh):
        for j in range(g):
            w = wo[(k * g + j) * d:(k * g + j + 1) * d]  # [D, E]
            want[:, k] += np.abs(v[:, k] @ w).sum(-1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_snapkv_pools_the_prefix_only():
    """SnapKV pools the scores of the tokens before the window: the window's own attention does
    not raise the score of the tokens next to it."""
    from types import SimpleNamespace
    from jaxkv.policies.snapkv import snapkv_scores
    t, window = 8, 2
    k = np.zeros((1, 1, t, 1), np.float32)
    k[0, 0, t - window:] = 20.0  # the window queries attend (almost) only to the window
    obs = SimpleNamespace(queries=jnp.ones((1, 1, window, 1), jnp.float32),
                          query_positions=jnp.asarray([[t - 2, t - 1]]), lengths=jnp.asarray([t]),
                          scale=1.0)
    scores = np.asarray(snapkv_scores(SimpleNamespace(k=jnp.asarray(k)), obs, window, 3))[0, 0]
    assert scores[t - window - 1] < 1e-6  # pooled over the whole row it would be ~1/3
    assert (scores[t - window:] < 1e-6).all()  # the window adds nothing (it is forced later)
    np.testing.assert_allclose(scores[1:t - window - 1], scores[1], rtol=1e-5)  # flat prefix


def test_safeguard_gives_every_head_its_share():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=(1, 4, 50)).astype(np.float32)
    scores[0, 0] *= 100  # head 0 would take everything without the safeguard
    s = prepare_scores(jnp.asarray(scores), jnp.asarray([50]), window=2)
    keep = np.asarray(select_headwise(s, jnp.asarray([10]), 10, safeguard=0.2, window=2))
    assert keep.sum() == 40
    assert (keep.sum(-1) >= 3).all()  # the window + floor(0.2 * (10 - 2)) = 1
    bare = np.asarray(select_headwise(s, jnp.asarray([10]), 10, safeguard=0.0, window=2))
    assert bare[0, 0].sum() > keep[0, 1].sum()


def _prefill_setup(model, lengths, t, policy):
    """A layer-0 dense cache + observation of random prompts, as generate builds them."""
    from jaxkv.diagnostics import layer_qkv
    from jaxkv.model.decoder import LayerObservation
    from jaxkv.model.layers import rope_inv_freq
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(4, model.config.vocab_size, size=(len(lengths), t)), jnp.int32)
    q, k, v = layer_qkv(model, tokens)[0]
    lengths = jnp.asarray(lengths, jnp.int32)
    cache = DenseCache.from_prefill(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), lengths, t)
    pos = policy.observation_positions(lengths, t)
    qo = jnp.take_along_axis(q.transpose(0, 2, 1, 3), pos[:, None, :, None], axis=2)
    obs = LayerObservation(queries=qo, query_positions=pos, lengths=lengths,
                           o_proj=model.params["layers_0"]["self_attn"]["o_proj"]["kernel"],
                           inv_freq=jnp.asarray(rope_inv_freq(model.config)), layer=0,
                           extra_capacity=3, scale=model.config.head_dim ** -0.5)
    return cache, obs


@pytest.mark.parametrize("policy", [
    SnapKV(budget=0.25, window=4, kernel=3),
    AdaKV(budget=0.25, window=4, kernel=3),
    CriticalKV(budget=0.25, window=4, kernel=3, adaptive=False),
    CriticalKV(budget=0.25, window=4, kernel=3, adaptive=True),
    ChunkKV(budget=0.25, window=4, chunk_size=5),
], ids=lambda p: f"{p.name}-{getattr(p, 'adaptive', '')}")
def test_budget_window_and_padding(policy):
    model = tiny_model()
    lengths, t = [64, 40], 64
    cache, obs = _prefill_setup(model, lengths, t, policy)
    out = policy.compress_layer(0, cache, obs)
    assert isinstance(out, SparseCache)
    kh = model.config.num_kv_heads
    counts = np.asarray(out.counts())
    # a quarter of the dense bytes of 64 + 3 slots a head (head_dim 8, float32: 64 bytes a token;
    # 2 heads; an int32 length) holds 2 n (64 + 8 index bytes) + 2 * 3 * 64 + 4 -> n = 12.2 per
    # head at 64 tokens; the 40-token row keeps the same share of its prompt, floor(12 * 40 / 64)
    assert model.config.head_dim == 8 and kh == 2
    assert policy.mean_keep(64, 3, 8, 4, kh) == pytest.approx((0.25 * 8580 - 388) / 144)
    np.testing.assert_array_equal(counts.sum(-1), [12 * kh, 7 * kh])
    if not (isinstance(policy, AdaKV) and getattr(policy, "adaptive", True)):
        np.testing.assert_array_equal(counts, [[12] * kh, [7] * kh])  # uniform budgets
    # the arrays are the budget's size: N = K * 12; row 2 pads 5 * K slots
    assert out.k.shape[1] == 12 * kh
    np.testing.assert_array_equal(np.asarray(out.padding_slots()), [0, 5 * kh])
    heads, pos = np.asarray(out.heads), np.asarray(out.positions)
    for b, n in enumerate(lengths):
        for h in range(kh):
            kept = set(pos[b][heads[b] == h].tolist())
            assert set(range(n - 4, n)) <= kept  # the window is always kept
            assert max(kept) < n  # never a padding token


def test_pyramid_budgets_shrink_with_depth_and_keep_the_mean():
    p = PyramidKV(budget=0.25, window=4, num_layers=4)
    mean = p.mean_keep(200, 0, 8, 4)  # 44.4 tokens a head
    sizes = [p.n_max(layer, 200, mean) for layer in range(4)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert mean - 1 <= np.mean(sizes) <= mean
    # at 0.6 layer 0 would want more than the 200-token prompt: it keeps all of it and the
    # other layers share the rest, so the mean is still what the budget buys (it was 112.5 of 120)
    p = PyramidKV(budget=0.6, window=4, num_layers=4)
    mean = p.mean_keep(200, 0, 8, 4)
    sizes = [p.n_max(layer, 200, mean) for layer in range(4)]
    assert sizes[0] == 200 and sizes == sorted(sizes, reverse=True)
    assert mean - 1 <= np.mean(sizes) <= mean
    # a budget whose mean would exceed the prompt: every layer keeps everything
    assert p.layer_tokens(50, 60.0) == (50.0,) * 4


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_budget_one_reproduces_the_full_cache(method, monkeypatch):
    """Without the index bytes counted, budget 1 keeps every token: the sparse path (selection,
    merging, adjustment, SparseCache attention) then gives the full cache's tokens."""
    import jaxkv.policies.snapkv as snapkv_module
    monkeypatch.setattr(snapkv_module, "SLOT_INDEX_BYTES", 0)
    model = tiny_model()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, model.config.vocab_size, size=n).tolist() for n in (70, 45)]
    full = jaxkv.generate(model, prompts, 6)
    got = jaxkv.generate(model, prompts, 6, policy=make_policy(method, 1.0, model, window=4))
    assert got.tokens == full.tokens


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_compressed_cache_is_really_smaller(method):
    model = tiny_model()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, model.config.vocab_size, size=128).tolist()]
    got = jaxkv.generate(model, prompts, 4, policy=make_policy(method, 0.2, model, window=4))
    c = model.config
    kh, d, item = c.num_kv_heads, c.head_dim, 4  # float32
    policy = make_policy(method, 0.2, model, window=4)
    mean = policy.mean_keep(128, 4, d, item, kh)  # (0.2 (2 * 132 * 64 + 4) - 516) / 144 = 19.9
    if method == "pyramidkv":  # per-layer budgets: sizes from the policy itself
        slots = [policy.n_max(layer, 128, mean) for layer in range(c.num_layers)]
    else:
        slots = [19] * c.num_layers
    # kept prompt tokens (k, v + int32 head and position), 4 decode slots (k, v), int32 length
    expected = sum(kh * n * (2 * d * item + 8) + kh * 4 * 2 * d * item + 4 for n in slots)
    assert got.cache_bytes == expected
    assert got.cache_bytes <= 0.2 * got.full_cache_bytes


def test_cam_hand_worked():
    # one head, 4 tokens, keep {1, 3}; token 0 (mass 0.2) and 2 (mass 0.4) are evicted.
    v = jnp.asarray([[[[1.0], [2.0], [3.0], [4.0]]]])
    keep = jnp.asarray([[[False, True, False, True]]])
    mass = jnp.asarray([[[0.2, 0.2, 0.4, 0.4]]])
    _, out = cam_merge(v, v, keep, mass, jnp.asarray([4]), neighbours=1)
    # token 1 receives token 0: (0.2 * 2 + 0.2 * 1) / 0.4 = 1.5
    # token 3 receives token 2: (0.4 * 4 + 0.4 * 3) / 0.8 = 3.5
    np.testing.assert_allclose(np.asarray(out)[0, 0, :, 0], [1.0, 1.5, 3.0, 3.5], rtol=1e-6)


def test_nearest_merge_folds_into_the_most_similar_key():
    k = jnp.asarray([[[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]]])
    v = jnp.asarray([[[[10.0], [20.0], [30.0], [40.0]]]])
    keep = jnp.asarray([[[True, True, False, False]]])
    mass = jnp.ones((1, 1, 4))
    _, out = nearest_merge(k, v, keep, mass, jnp.asarray([4]))
    # token 2's key is closest to token 0's, token 3's to token 1's: equal-mass means
    np.testing.assert_allclose(np.asarray(out)[0, 0, :2, 0], [20.0, 30.0], rtol=1e-6)


def test_nearest_merge_on_gathered_kept_keys_equals_the_full_similarity():
    """max_kept: similarity against each head's kept keys gathered into max_kept slots, the same
    targets (ties to the earliest kept token, duplicated keys included) as against all T."""
    rng = np.random.default_rng(0)
    b, kh, t, d = 2, 3, 40, 4
    k = rng.normal(size=(b, kh, t, d)).astype(np.float32)
    k[:, :, 20] = k[:, :, 5]  # a duplicated key: ties
    v = jnp.asarray(rng.normal(size=(b, kh, t, 2)), jnp.float32)
    keep = rng.uniform(size=(b, kh, t)) < np.asarray([0.1, 0.3, 0.6])[None, :, None]
    keep[:, :, [5, 20]] = True
    lengths = jnp.asarray([t, 33])
    mass = jnp.asarray(rng.uniform(0.1, 1.0, size=(b, kh, t)), jnp.float32)
    most = int(keep.sum(-1).max())
    _, full = nearest_merge(jnp.asarray(k), v, jnp.asarray(keep), mass, lengths)
    _, gathered = nearest_merge(jnp.asarray(k), v, jnp.asarray(keep), mass, lengths, max_kept=most)
    assert most < t
    np.testing.assert_allclose(np.asarray(gathered), np.asarray(full), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(full), np.asarray(v))  # something was merged


@pytest.mark.parametrize("method", ["cam", "nearest_merge", "kvmerger"])
def test_merging_baselines_use_grkvs_span_retention(method):
    model = tiny_model()
    assert make_policy(method, 0.5, model).span == make_policy("grkv", 0.5, model).span == 10
    assert make_policy(method, 0.5, model, span=1).span == 1


def test_kvmerger_merges_only_similar_adjacent_keys():
    k = jnp.asarray([[[[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.0, -1.0]]]])
    v = jnp.asarray([[[[1.0], [3.0], [5.0], [7.0]]]])
    keep = jnp.asarray([[[True, False, False, True]]])
    k2, v2 = kvmerger_merge(k, v, keep, jnp.asarray([4]), threshold=0.5)
    # token 1 is similar to kept token 0 (cos 0.98) -> merged with Gaussian weight
    # exp(-d^2 / (2 sigma^2)) where sigma^2 = d^2 (its own distance): exp(-1/2)
    w = np.exp(-0.5)
    np.testing.assert_allclose(float(v2[0, 0, 0, 0]), (1 + w * 3) / (1 + w), rtol=1e-5)
    # token 2 ([0, 1]) is orthogonal to both neighbours: dropped, token 3 untouched
    np.testing.assert_allclose(float(v2[0, 0, 3, 0]), 7.0)
    np.testing.assert_allclose(np.asarray(k2[0, 0, 3]), [0.0, -1.0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=0.0), "budget"),
    (dict(budget=1.5), "budget"),
    (dict(budget=float("nan")), "budget"),
    (dict(window=0), "window"),
    (dict(kernel=4), "kernel"),
    (dict(span=0), "span"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SnapKV(**kwargs)


def test_budget_smaller_than_the_window_is_refused():
    model = tiny_model()
    prompts = [list(range(4, 68))]
    with pytest.raises(ValueError, match="budget=0.05"):
        jaxkv.generate(model, prompts, 2, policy=make_policy("snapkv", 0.05, model, window=8))
    with pytest.raises(ValueError, match="guard"):
        jaxkv.generate(model, prompts, 2, policy=make_policy("grkv", 0.15, model, window=9))


def test_nan_in_the_cache_is_an_error():
    policy = SnapKV(budget=0.5, window=2)
    model = tiny_model()
    cache, obs = _prefill_setup(model, [16], 16, policy)
    bad = cache.replace(k=cache.k.at[0, 0, 3, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="NaN"):
        policy.compress_layer(0, bad, obs)
    # under jit the output is poisoned, and generate's check turns that into an error
    from jaxkv.generate import check_finite_caches
    import jax
    out = jax.jit(lambda c, o: policy.compress_layer(0, c, o))(bad, obs)
    with pytest.raises(ValueError, match="NaN"):
        check_finite_caches([out])
