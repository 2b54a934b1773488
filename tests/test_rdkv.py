"""RDKV: the byte budget is met per layer (within 1%, never exceeded, per head or with one water
level per layer, any K/V split), the window is kept whole, RoPE pairs share a K width, more budget
gives lower attention-output error, the arena is used and K takes its share at a real head shape,
short prompts weigh with their distinct queries, a generous budget reproduces full-cache greedy
decoding, calibration files are tied to their model and their K grouping, and bad settings are
refused."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxkv
from jaxkv.cache import DenseCache, MixedCache
from jaxkv.model.decoder import LayerObservation
from jaxkv.policies.rdkv import (DEFAULT_EPS, RDKV, calibrate_model, model_fingerprint,
                                 save_calibration)
from jaxkv.policies.registry import make_policy
from pallas_kernels.dense_decode import NEG_INF
from tests.helpers import random_params, tiny_model

B, KH, H, T, D, WIN = 2, 2, 8, 96, 8, 4
SCALE = D ** -0.5


def _layer(seed=0):
    """A dense prefill layer with peaky attention: a few 'heavy' keys point along the queries."""
    rng = np.random.default_rng(seed)
    lengths = jnp.asarray([T, 61], jnp.int32)
    q = rng.normal(size=(B, H, T, D)).astype(np.float32)
    k = rng.normal(size=(B, KH, T, D)).astype(np.float32) * np.array([3, 2, 1, 1, .5, .5, .3, .2])
    heavy = rng.uniform(size=(B, KH, T)) < 0.15
    k += heavy[..., None] * 2.0 * q.reshape(B, KH, H // KH, T, D).mean((2, 3))[:, :, None, :]
    v = rng.normal(size=(B, KH, T, D)).astype(np.float32)
    cache = DenseCache.from_prefill(jnp.asarray(k), jnp.asarray(v), lengths, T)
    pos = RDKV(window=WIN).observation_positions(lengths, T)
    qo = jnp.take_along_axis(jnp.asarray(q), pos[:, None, :, None], axis=2)
    obs = LayerObservation(queries=qo, query_positions=pos, lengths=lengths,
                           o_proj=jnp.zeros((H * D, 16)), inv_freq=jnp.zeros(D // 2), layer=0,
                           extra_capacity=2, scale=SCALE)
    held_out = jnp.asarray(rng.normal(size=(B, H, D)).astype(np.float32)) + jnp.asarray(q[:, :, -1])
    return cache, obs, held_out


@functools.partial(jax.jit, static_argnums=0)
def _compress(policy, cache, obs):
    return policy.compress_layer(0, cache, obs)


@jax.jit
def _attend(cache, q):
    return cache.attend(q, SCALE)


@functools.partial(jax.jit, static_argnums=0)
def _bits_and_weights(policy, out, cache, obs):
    return out.token_bits(T), policy.token_weights(cache, obs)


def _full_attention(cache, q):
    k, v = cache.k, cache.v
    qg = q.reshape(B, KH, H // KH, D)
    s = jnp.einsum("BKGD,BKSD->BKGS", qg, k) * SCALE
    valid = jnp.arange(T)[None, :] < cache.lengths[:, None]
    s = jnp.where(valid[:, None, None, :], s, NEG_INF)
    return jnp.einsum("BKGS,BKSD->BKGD", jax.nn.softmax(s, -1), v).reshape(B, H, D)


@pytest.mark.parametrize("water", ["head", "layer"])
def test_budget_is_met_per_layer_and_more_budget_lowers_the_error(water):
    cache, obs, q = _layer()
    full = _full_attention(cache, q)
    e = obs.extra_capacity
    dense = KH * (T + e) * 2 * D * 4 + 4  # bytes per sequence of the dense cache (prompt + E)
    decode = KH * e * 2 * D * 4  # the E decode slots, dense in both caches
    errors = []
    for budget in (0.15, 0.3, 0.6):
        policy = RDKV(budget=budget, window=WIN, kernel=3, water=water)
        out = _compress(policy, cache, obs)
        assert isinstance(out, MixedCache)
        # the arrays are the budget's size: a sequence's bytes <= budget x its dense cache,
        # within one byte per head of rounding
        per_sequence = out.nbytes() / B
        assert budget * dense - KH - 1 <= per_sequence <= budget * dense
        # per sequence (and head, with a per-head split) the sections never exceed that
        # sequence's share of the arena
        used = np.asarray(out.used_bytes())  # [B, K]
        fixed = policy.fixed_bytes_per_sequence(KH, D, 4)
        for b, n in enumerate(np.asarray(obs.lengths)):
            share = np.floor(budget * (KH * (n + e) * 2 * D * 4 + 4) - decode) - fixed
            assert used[b].sum() <= share
            if water == "head":
                assert (used[b] <= share // KH).all()
        # the window is kept whole; heavier tokens get more bits than evicted ones
        bits, w = map(np.asarray, _bits_and_weights(policy, out, cache, obs))
        for b, n in enumerate(np.asarray(obs.lengths)):
            assert (bits[b, :, n - WIN:n] == 16).all() and (bits[b, :, n:] == 0).all()
            for h in range(KH):
                kept, gone = bits[b, h, :n - WIN] > 0, bits[b, h, :n - WIN] == 0
                if kept.any() and gone.any():
                    assert w[b, h, :n - WIN][kept].mean() > w[b, h, :n - WIN][gone].mean()
        # both channels of a RoPE pair share a width
        cb = np.asarray(out.channel_bits())
        np.testing.assert_array_equal(cb[..., :D // 2], cb[..., D // 2:])
        got = _attend(out, q)
        errors.append(float(jnp.linalg.norm(got - full) / jnp.linalg.norm(full)))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.1, errors


@settings(max_examples=6, deadline=None)  # each example compiles its own policy (~6 s)
@given(budget=st.floats(0.06, 1.0), k_share=st.floats(0.0, 0.9),
       water=st.sampled_from(["head", "layer"]), short=st.integers(1, T))
def test_budget_is_met_within_one_percent_and_never_exceeded(budget, k_share, water, short):
    """Any budget, K/V split, water level and sequence length: the cache's arrays take at most
    `budget` of the dense cache's bytes and at least 99% of them (what `generate` reports), and
    each sequence's sections fit its own share of the arena."""
    cache, obs, _ = _layer()
    lengths = jnp.asarray([T, short], jnp.int32)
    cache = cache.replace(lengths=lengths)
    pos = RDKV(window=WIN).observation_positions(lengths, T)
    obs = obs.replace(lengths=lengths, query_positions=pos)
    e = obs.extra_capacity
    dense = KH * (T + e) * 2 * D * 4 + 4
    policy = RDKV(budget=budget, window=WIN, kernel=3, k_share=k_share, water=water, whole=0)
    out = _compress(policy, cache, obs)
    per_sequence = out.nbytes() / B
    assert 0.99 * budget * dense <= per_sequence <= budget * dense
    used = np.asarray(out.used_bytes())
    s, c = policy.arena_sizes(T, e, KH, D, 4)
    fixed = policy.fixed_bytes_per_sequence(KH, D, 4)
    for b, n in enumerate(np.asarray(lengths)):
        share = np.floor(budget * (KH * (n + e) * 2 * D * 4 + 4) - KH * e * 2 * D * 4) - fixed
        assert used[b].sum() <= min(max(share, 0), s) and (used[b] <= c).all()


def test_arena_use_and_k_share_at_a_real_shape():
    """SmolLM2's head shape (D = 64, G = 3), bfloat16, 1024 tokens: the sections use at least 97%
    of the arena and K takes about k_share of it."""
    rng = np.random.default_rng(1)
    b, kh, g, t, d = 1, 3, 3, 1024, 64
    q = rng.normal(size=(b, kh * g, t, d)).astype(np.float32)
    k = rng.normal(size=(b, kh, t, d)) * rng.uniform(0.1, 3, size=d)
    k = k + (rng.uniform(size=(b, kh, t)) < 0.05)[..., None] * 2 * q.reshape(
        b, kh, g, t, d).mean((2, 3))[:, :, None, :]
    v = rng.normal(size=(b, kh, t, d))
    lengths = jnp.asarray([t], jnp.int32)
    dense = DenseCache.from_prefill(jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16),
                                    lengths, t)
    for water, r in (("head", 0.5), ("layer", 0.3)):
        policy = RDKV(budget=0.1, k_share=r, water=water)
        pos = policy.observation_positions(lengths, t)
        obs = LayerObservation(
            queries=jnp.take_along_axis(jnp.asarray(q, jnp.bfloat16), pos[:, None, :, None], 2),
            query_positions=pos, lengths=lengths, o_proj=jnp.zeros((kh * g * d, 16)),
            inv_freq=jnp.zeros(d // 2), layer=0, extra_capacity=8, scale=d ** -0.5)
        out = _compress(policy, dense, obs)
        s, _ = policy.arena_sizes(t, 8, kh, d, 2)
        lay = out.layout()
        used = np.asarray(lay.total).sum()
        k_bytes = np.asarray(lay.total - lay.k_start).sum()
        assert 0.97 * s <= used <= s, (water, used / s)
        assert abs(k_bytes / used - r) < 0.05, (water, k_bytes / used)


def test_short_prompts_weigh_with_their_distinct_queries():
    """A prompt shorter than the window: the window positions repeat position 0
    (`last_positions`), and those repeats count once, so the weights equal those of a window of
    the prompt's length."""
    cache, obs, _ = _layer()
    lengths = jnp.asarray([3, 2], jnp.int32)
    cache = cache.replace(lengths=lengths)

    def weights(window):
        policy = RDKV(window=window, whole=0, kernel=1)
        pos = policy.observation_positions(lengths, T)
        full_q = jnp.asarray(np.random.default_rng(0).normal(size=(B, H, T, D)), jnp.float32)
        o = obs.replace(queries=jnp.take_along_axis(full_q, pos[:, None, :, None], axis=2),
                         query_positions=pos, lengths=lengths)
        kept = jnp.arange(T)[None, None, :] < lengths[:, None, None]
        return policy.token_weights(cache, o), policy.channel_weights(cache, o, kept)

    (w4, u4), (w3, u3) = weights(WIN), weights(3)
    np.testing.assert_allclose(np.asarray(w4)[0], np.asarray(w3)[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u4)[0], np.asarray(u3)[0], rtol=1e-6)


def test_nothing_whole_fits_a_budget_below_the_window():
    cache, obs, q = _layer()
    dense = KH * (T + obs.extra_capacity) * 2 * D * 4 + 4
    with pytest.raises(ValueError, match="whole=4"):  # 0.05 of 12548 - 256 = 371 < 592
        _compress(RDKV(budget=0.05, window=WIN, kernel=3), cache, obs)
    policy = RDKV(budget=0.05, window=WIN, kernel=3, whole=0)
    out = _compress(policy, cache, obs)
    assert out.nbytes() / B <= 0.05 * dense
    assert (np.asarray(out.whole_lengths) == 0).all()
    bits, w = map(np.asarray, _bits_and_weights(policy, out, cache, obs))
    assert (bits < 16).all() and (bits > 0).any()  # the window competes for bits like the rest
    for b, n in enumerate(np.asarray(obs.lengths)):
        assert (w[b, :, n - WIN:n] > 0).all()  # the window tokens are candidates now
    assert np.isfinite(np.asarray(_attend(out, q))).all()


def _prompts(model):
    rng = np.random.default_rng(0)
    return [rng.integers(4, model.config.vocab_size, size=n).tolist() for n in (70, 45)]


def test_generous_budget_reproduces_full_cache_greedy_tokens():
    model = tiny_model()
    prompts = _prompts(model)
    full = jaxkv.generate(model, prompts, 6)
    # budget 1: every token fits, V in the 16-bit tier (bfloat16), K at 8 bits per channel over
    # groups of 32 tokens (V takes its half first, then K at 8 bits leaves bytes to spare, so V
    # is solved again with each token paying its 8-bit K row)
    got = jaxkv.generate(model, prompts, 6, policy=make_policy("rdkv", 1.0, model, window=4,
                                                               eps="default"))
    assert got.tokens == full.tokens
    assert got.cache_bytes <= full.full_cache_bytes


def test_calibration_file_is_tied_to_its_model(tmp_path):
    model = tiny_model()
    prompts = [p[:40] for p in _prompts(model)]  # one length: one compilation
    eps = calibrate_model(model, prompts)
    for name in ("k", "v"):  # more bits, less distortion, roughly 4x per extra bit
        assert 1 > eps[name][2] > eps[name][4] > eps[name][8] > 0
        assert eps[name][2] / eps[name][4] > 4
    path = tmp_path / "rdkv_eps.json"
    save_calibration(model, prompts[:1], path)
    doc = json.loads(path.read_text())
    assert doc["model_fingerprint"] == model_fingerprint(model)
    assert doc["k_group_tokens"] == 32  # K calibrated over the groups the cache stores
    policy = make_policy("rdkv", 0.3, model, window=4, eps_path=str(path))
    assert policy.eps_table["v"][2] == pytest.approx(doc["eps"]["v"]["2"])
    # beside the model: picked up without naming it
    model.path = str(tmp_path)
    assert make_policy("rdkv", 0.3, model, window=4).eps == policy.eps
    other = dataclasses.replace(model, params=random_params(model.config, seed=1))  # new weights
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(ValueError, match="calibrated for model_fingerprint"):
        make_policy("rdkv", 0.3, other, window=4, eps_path=str(path))
    # a table from before K groups (no k_group_tokens) still loads, with a warning naming the
    # command that measures a new one
    del doc["k_group_tokens"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="python -m train calibrate"):
        make_policy("rdkv", 0.3, model, window=4, eps_path=str(old))


@pytest.mark.parametrize("water", ["head", "layer"])
def test_spans_are_kept_or_evicted_together(water):
    """span > 1: every token of a span weighs the span's summed weight, so the allocator keeps or
    evicts spans as units (at most the one span where a head's bytes run out is split), within
    the same bytes as span 1."""
    cache, obs, _ = _layer(3)
    span = 8
    for budget in (0.15, 0.25):
        single, spans = RDKV(budget=budget, window=WIN, water=water), \
            RDKV(budget=budget, window=WIN, water=water, span=span)
        out = _compress(spans, cache, obs)
        kept = np.asarray(out.token_bits(T)) > 0
        w = np.asarray(spans.token_weights(cache, obs))
        assert out.nbytes() == _compress(single, cache, obs).nbytes()
        for b, n in enumerate(np.asarray(obs.lengths)):
            arena_end = n - WIN  # the rest is the whole zone
            for h in range(KH):
                n_split = 0
                for s0 in range(0, arena_end - span + 1, span):
                    block = kept[b, h, s0:s0 + span]
                    n_split += int(0 < block.sum() < span)
                    # equal weights up to the tie-break that prefers a span's earlier tokens
                    np.testing.assert_allclose(w[b, h, s0:s0 + span], w[b, h, s0], rtol=1e-4)
                assert n_split <= (2 if water == "layer" else 1)
                assert kept[b, h, :arena_end].any() and not kept[b, h, :arena_end].all()


def test_default_span_sums_the_per_token_weights():
    """span=1 is the recipe's per-token weighting (pooled attention); the default, span 5, gives
    every token its span's sum of those weights."""
    cache, obs, _ = _layer(4)
    assert RDKV().span == 5
    w1 = np.asarray(RDKV(budget=0.15, window=WIN, span=1).token_weights(cache, obs))
    w5 = np.asarray(RDKV(budget=0.15, window=WIN).token_weights(cache, obs))
    assert not np.allclose(w1[..., 0], w1[..., 1])  # per token: neighbours differ
    for s0 in range(0, 50, 5):  # inside the arena candidates of both sequences
        want = w1[..., s0:s0 + 5].sum(-1, keepdims=True)
        np.testing.assert_allclose(w5[..., s0:s0 + 5], np.broadcast_to(want, w5[..., :5].shape),
                                   rtol=1e-4)


def test_default_eps_is_the_published_table():
    assert RDKV().eps_table == DEFAULT_EPS


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=0.0), "budget"),
    (dict(budget=1.5), "budget"),
    (dict(budget=float("nan")), "budget"),
    (dict(bit_widths=(0, 3, 16)), r"bit width must be one of \{0, 2, 4, 8, 16\}"),
    (dict(bit_widths=(2, 4, 8)), "must contain 0"),
    (dict(k_share=1.0), "k_share"),
    (dict(k_share=-0.1), "k_share"),
    (dict(k_share=float("nan")), "k_share"),
    (dict(water="all"), "water"),
    (dict(kernel=4), "kernel"),
    (dict(window=0), "window"),
    (dict(whole=-1), "whole"),
    (dict(span=0), "span"),
    (dict(eps={"k": {2: 0.1, 4: 0.01, 8: 1e-4}, "v": {3: 0.1}}), r"\{0, 2, 4, 8, 16\}"),
    (dict(eps={"k": {2: 0.1, 4: 0.01, 8: 1e-4}, "v": {2: 0.1}}), "bits=4"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RDKV(**kwargs)


def test_bad_factory_settings_and_a_budget_below_the_window(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="budget"):
        make_policy("rdkv", 0.0, model)
    with pytest.raises(ValueError, match="one of them"):
        make_policy("rdkv", 0.5, model, eps=DEFAULT_EPS, eps_path=str(tmp_path / "x.json"))
    with pytest.raises(FileNotFoundError):
        make_policy("rdkv", 0.5, model, eps_path=str(tmp_path / "missing.json"))
    # no table for this model: the error names the command that measures one
    with pytest.raises(ValueError, match="python -m train calibrate --model"):
        make_policy("rdkv", 0.5, model)
    with pytest.raises(ValueError, match="eps='nope'"):
        make_policy("rdkv", 0.5, model, eps="nope")
    # 1% of a 64-token prompt cannot even hold the 4-token window whole
    with pytest.raises(ValueError, match="whole=4"):
        jaxkv.generate(model, [list(range(4, 68))], 2, policy=make_policy("rdkv", 0.01, model,
                                                                          window=4, eps="default"))


def test_layer_by_layer_prefill_does_not_hold_every_layers_cache():
    """XLA's accounting of the compiled prefill (compiled from abstract parameters, never run):
    going from 1 to 3 layers, RDKV's peak grows by well under what the dense prefill's does (the
    dense caches of 2 more layers): 0.68 of it. Before the next layer's input depended on the
    compressed cache (`decoder.depend_on`), XLA on CPU scheduled compressions late and it was 1.70."""
    from jaxkv.model import ModelConfig
    from jaxkv.model.decoder import Decoder, init_params
    t = 2048

    def peak(layers, policy):
        cfg = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                          num_layers=layers, num_heads=4, num_kv_heads=4, head_dim=64,
                          max_position_embeddings=t + 64)
        shapes = jax.eval_shape(lambda: init_params(cfg, 0))

        def run(params, tokens, lengths):
            qp = None if policy is None else policy.observation_positions(lengths, t)
            return Decoder(cfg).apply({"params": params}, tokens, lengths, t + 16, policy, qp,
                                      method=Decoder.prefill)
        m = jax.jit(run).lower(shapes, jax.ShapeDtypeStruct((1, t), jnp.int32),
                               jax.ShapeDtypeStruct((1,), jnp.int32)).compile().memory_analysis()
        return m.temp_size_in_bytes + m.output_size_in_bytes

    policy = RDKV(budget=0.05, window=16)
    dense = peak(3, None) - peak(1, None)
    assert dense >= 2 * 2 * 4 * t * 64 * 4  # at least 2 layers' float32 K and V
    assert peak(3, policy) - peak(1, policy) < 0.8 * dense
