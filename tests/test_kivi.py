"""Quantisation baselines (KIVI-2/4, MaxText-style int8, SnapKV + KIVI-4) in a QuantizedCache:
decode without dequantising equals dense attention over the dequantised cache, error bounds,
honest bytes, SnapKV's selection and budget, every registered method inside `generate`, and
layer-by-layer compression during prefill."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv.cache import DenseCache, MixedCache, QuantizedCache, SparseCache
from jaxkv.model.decoder import Decoder, LayerObservation
from jaxkv.policies.kivi import KIVI, Int8, SnapKVKIVI
from jaxkv.policies.rdkv import RDKV
from jaxkv.policies.registry import make_policy
from jaxkv.policies.snapkv import SnapKV, prepare_scores, select_per_head, snapkv_scores
from pallas_kernels.dense_decode import NEG_INF
from tests.helpers import assert_close, tiny_model

B, KH, H, T, D, WIN = 2, 2, 8, 50, 8, 4
LENGTHS = (50, 37)
SCALE = D ** -0.5


def _layer(seed=0, extra=3):
    rng = np.random.default_rng(seed)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    q = rng.normal(size=(B, H, T, D)).astype(np.float32)
    k = (rng.normal(size=(B, KH, T, D)) * rng.uniform(0.3, 3, size=(1, 1, 1, D))).astype(np.float32)
    v = rng.normal(size=(B, KH, T, D)).astype(np.float32)
    cache = DenseCache.from_prefill(jnp.asarray(k), jnp.asarray(v), lengths, T)
    pos = SnapKV(window=WIN).observation_positions(lengths, T)
    qo = jnp.take_along_axis(jnp.asarray(q), pos[:, None, :, None], axis=2)
    obs = LayerObservation(queries=qo, query_positions=pos, lengths=lengths,
                           o_proj=jnp.zeros((H * D, 16)), inv_freq=jnp.zeros(D // 2), layer=0,
                           extra_capacity=extra, scale=SCALE)
    return cache, obs, k, v


@functools.partial(jax.jit, static_argnums=0)
def _compress(policy, cache, obs):
    return policy.compress_layer(0, cache, obs)


@jax.jit
def _attend_and_dense(cache, q):
    return cache.attend(q, SCALE), cache.to_dense()


@jax.jit
def _append(cache, k, v):
    return cache.append(k, v)


def _dense_attention(q, k, v, valid):
    b, h, d = q.shape
    kh = k.shape[1]
    s = jnp.einsum("BKGD,BKSD->BKGS", q.reshape(b, kh, h // kh, d), k) * SCALE
    s = jnp.where(valid[:, :, None, :], s, NEG_INF)
    p = jax.nn.softmax(s, -1) * valid[:, :, None, :]
    return jnp.einsum("BKGS,BKSD->BKGD", p, v).reshape(b, h, d)


POLICIES = [KIVI(bits=2, residual=WIN, group_size=8), KIVI(bits=4, residual=WIN, group_size=16),
            Int8(), SnapKVKIVI(budget=0.3, window=WIN, kernel=3, group_size=8)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.name}{getattr(p, 'bits', '')}")
def test_decode_equals_dense_attention_over_the_dequantised_cache(policy):
    rng = np.random.default_rng(1)
    cache, obs, _, _ = _layer()
    out = _compress(policy, cache, obs)
    assert isinstance(out, QuantizedCache)
    for step in range(obs.extra_capacity + 1):
        q = jnp.asarray(rng.normal(size=(B, H, D)), jnp.float32)
        got, (k, v, valid) = _attend_and_dense(out, q)
        assert_close(got, _dense_attention(q, k, v, valid), "float32")
        # every prompt token is there (KIVI, int8) or SnapKV's share of it; decoded ones too
        n_valid = np.asarray(valid).sum(-1)
        if isinstance(policy, SnapKVKIVI):
            assert (n_valid[:, 0] == n_valid[:, 1]).all()
        else:
            np.testing.assert_array_equal(n_valid, np.broadcast_to(np.array(LENGTHS)[:, None] + step,
                                                                   n_valid.shape))
        if step < obs.extra_capacity:
            nk = jnp.asarray(rng.normal(size=(B, KH, D)), jnp.float32)
            out = _append(out, nk, 2 * nk)


def test_kivi_error_bounds_and_the_residual_window():
    cache, obs, k, v = _layer()
    out = _compress(KIVI(bits=2, residual=WIN, group_size=8), cache, obs)
    _, (dk, dv, valid) = _attend_and_dense(out, jnp.zeros((B, H, D)))
    dk, dv = np.asarray(dk), np.asarray(dv)
    n_slots = T - WIN  # quantised slots; the whole zone (residual + 3 decode slots) follows
    for b, n in enumerate(LENGTHS):
        nq = n - WIN
        # the residual: the last 4 prompt tokens, exactly
        np.testing.assert_array_equal(dk[b, :, n_slots:n_slots + WIN], k[b, :, nq:n])
        np.testing.assert_array_equal(dv[b, :, n_slots:n_slots + WIN], v[b, :, nq:n])
        for j in range(0, nq, 8):  # K per channel over groups of 8 tokens (the last one partial)
            x = k[b, :, j:min(j + 8, nq)]  # [K, g, D]
            step = (x.max(1) - x.min(1)) / 3 * (1 + 2 ** -10) + 1e-6  # 2 bits: 3 steps
            err = np.abs(dk[b, :, j:min(j + 8, nq)] - x)
            assert (err <= step[:, None] / 2 + 1e-3 * np.abs(x).max()).all()
        x = v[b, :, :nq]  # V per token over its 8 channels
        step = (x.max(-1) - x.min(-1)) / 3 * (1 + 2 ** -10) + 1e-6
        assert (np.abs(dv[b, :, :nq] - x) <= step[..., None] / 2 + 1e-3).all()


def test_int8_is_absmax_per_token_and_head():
    cache, obs, k, v = _layer()
    out = _compress(Int8(), cache, obs)
    assert out.k_codes.dtype == jnp.int8 and out.k_zero is None
    assert out.k_scale.shape == (B, KH, T + obs.extra_capacity, 1)  # one scale per token, head
    _, (dk, dv, valid) = _attend_and_dense(out, jnp.zeros((B, H, D)))
    for x, dx in ((k, dk), (v, dv)):
        for b, n in enumerate(LENGTHS):
            amax = np.abs(x[b, :, :n]).max(-1, keepdims=True)
            err = np.abs(np.asarray(dx)[b, :, :n] - x[b, :, :n])
            assert (err <= amax / 127 * (1 + 2 ** -10) / 2 + 1e-7).all()


def test_nbytes_counts_every_array_and_matches_byte_fraction():
    cache, obs, _, _ = _layer()
    e = obs.extra_capacity
    kivi = _compress(KIVI(bits=2, residual=WIN, group_size=8), cache, obs)
    n = T - WIN  # 46 quantised slots per head, 6 K groups (the last with 6 tokens)
    expected = (2 * B * KH * n * D * 2 // 8       # K and V codes, 2 bits
                + 2 * B * KH * 6 * D * 2           # K scale and zero per group and channel
                + 2 * B * KH * n * 1 * 2           # V scale and zero per token (8 channels)
                + B * 4                            # q_lengths
                + 2 * B * KH * (WIN + e) * D * 4   # whole zone, float32
                + B * 4)                           # whole_lengths
    assert kivi.nbytes() == expected
    dense_prompt = KH * T * 2 * D * 4 + 4
    prompt_part = (expected - 2 * B * KH * e * D * 4) / B
    policy = KIVI(bits=2, residual=WIN, group_size=8)
    assert policy.byte_fraction(T, KH, D, 4) == pytest.approx(prompt_part / dense_prompt)
    int8 = _compress(Int8(), cache, obs)
    # every slot (prompt + decode): int8 K and V codes + float16 scales; q_lengths, whole_lengths
    assert int8.nbytes() == 2 * B * KH * (T + e) * (D + 2) + 2 * B * 4


def test_snapkv_kivi_keeps_snapkvs_tokens_within_the_budget():
    cache, obs, _, _ = _layer()
    policy = SnapKVKIVI(budget=0.3, window=WIN, kernel=3, group_size=8)
    out = _compress(policy, cache, obs)
    e = obs.extra_capacity
    dense = KH * (T + e) * 2 * D * 4 + 4  # the dense cache of a sequence: prompt + E slots
    decode = KH * e * 2 * D * 4  # the E decode slots, dense in both caches
    assert out.nbytes() / B <= 0.3 * dense
    n = out.n_slots
    assert policy._bytes(n + 1, KH, D, 4) > 0.3 * dense - decode  # as many tokens as fit
    # the quantised tokens are SnapKV's choice at the same count, minus the window
    q_len = np.asarray(out.q_lengths)
    scores = prepare_scores(snapkv_scores(cache, obs, WIN, 3), obs.lengths, WIN)
    keep = np.asarray(select_per_head(scores, jnp.asarray(q_len + WIN), n + WIN))
    pos = np.asarray(out.positions)
    for b, length in enumerate(LENGTHS):
        assert 0 < q_len[b] <= n
        for h in range(KH):
            want = [p for p in np.flatnonzero(keep[b, h]) if p < length - WIN]
            assert pos[b, h][pos[b, h] >= 0].tolist() == want


@pytest.mark.parametrize("method", ["kivi2", "kivi4", "int8", "snapkv_kivi4"])
def test_registered_methods_run_in_generate(method):
    model = tiny_model()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, model.config.vocab_size, size=n).tolist() for n in (70, 45)]
    policy = make_policy(method, 0.2, model, window=4)
    got = jaxkv.generate(model, prompts, 5, policy=policy)
    assert all(len(t) == 5 for t in got.tokens)
    c = model.config
    if method == "snapkv_kivi4":
        assert got.budget < 0.25  # prompt part <= 0.2; both sides hold the same decode slots
    else:  # fixed size: the measured bytes are the policy's own fraction (+ decode slots)
        t, e = 128, 5
        item = 4
        decode = e * 2 * c.head_dim * item * c.num_kv_heads
        if method == "int8":
            decode = e * (2 * c.head_dim + 4) * c.num_kv_heads
        per_seq = policy.byte_fraction(t, c.num_kv_heads, c.head_dim, item) * (
            c.num_kv_heads * t * 2 * c.head_dim * item + 4) + decode
        assert got.cache_bytes == pytest.approx(per_seq * 2 * c.num_layers)
    if method == "int8":  # 8 bits per value barely moves a tiny float32 model
        assert got.tokens == jaxkv.generate(model, prompts, 5).tokens


_CALLS = []


def _recording(cls):
    """A subclass of policy class `cls` whose compress_layer logs (layer, input type, shape)."""
    class Recording(cls):
        def compress_layer(self, layer, cache, obs):
            _CALLS.append((layer, type(cache), tuple(cache.k.shape)))
            return super().compress_layer(layer, cache, obs)
    return Recording


@pytest.mark.parametrize("cls, kwargs, out_type", [
    (RDKV, dict(budget=0.3, window=4), MixedCache),
    (KIVI, dict(bits=2, residual=4, group_size=8), QuantizedCache),
    (Int8, {}, QuantizedCache),
    (SnapKVKIVI, dict(budget=0.3, window=4, group_size=8), QuantizedCache),
    (SnapKV, dict(budget=0.3, window=4), SparseCache),
])
def test_prefill_compresses_layer_by_layer(cls, kwargs, out_type):
    model = tiny_model()
    c = model.config
    policy = _recording(cls)(**kwargs)
    tokens = jnp.ones((2, 64), jnp.int32)
    lengths = jnp.asarray([64, 40], jnp.int32)
    qp = policy.observation_positions(lengths, 64)
    _CALLS.clear()
    _, caches = jax.eval_shape(  # traces prefill (no compile): compress_layer runs per layer
        lambda p: Decoder(c).apply({"params": p}, tokens, lengths, 64 + 3, policy, qp,
                                   method=Decoder.prefill), model.params)
    # one call per layer, in order, each on that layer's own prompt-sized dense cache
    assert [(layer, typ) for layer, typ, _ in _CALLS] == [(i, DenseCache) for i in
                                                           range(c.num_layers)]
    assert all(shape == (2, c.num_kv_heads, 64, c.head_dim) for _, _, shape in _CALLS)
    assert len(caches) == c.num_layers and all(type(x) is out_type for x in caches)
    dense = DenseCache.from_prefill(jnp.zeros((2, c.num_kv_heads, 64, c.head_dim)),
                                    jnp.zeros((2, c.num_kv_heads, 64, c.head_dim)),
                                    lengths, 64 + 3)
    assert all(x.nbytes() < dense.nbytes() for x in caches)  # really compressed


@pytest.mark.parametrize("make, match", [
    (lambda: KIVI(bits=3), r"\{0, 2, 4, 8, 16\}"),
    (lambda: KIVI(bits=8), "2 or 4"),
    (lambda: KIVI(bits=16), "2 or 4"),
    (lambda: KIVI(residual=-1), "residual"),
    (lambda: KIVI(group_size=0), "group_size"),
    (lambda: SnapKVKIVI(budget=0.0), "budget"),
    (lambda: SnapKVKIVI(budget=2.0), "budget"),
    (lambda: SnapKVKIVI(bits=5), r"\{0, 2, 4, 8, 16\}"),
    (lambda: SnapKVKIVI(kernel=2), "kernel"),
    (lambda: make_policy("kivi2", 1.5, tiny_model()), "budget"),
    (lambda: make_policy("int8", 0.0, tiny_model()), "budget"),
])
def test_bad_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_snapkv_kivi_budget_below_the_window_is_refused():
    with pytest.raises(ValueError, match="whole=4"):
        SnapKVKIVI(budget=0.01, window=4).n_slots(64, 2, 8, 4)
    with pytest.raises(ValueError, match="whole=5"):
        SnapKVKIVI(window=4, whole=5)


def test_snapkv_kivi_with_nothing_whole_fits_a_tiny_budget():
    cache, obs, _, _ = _layer()
    policy = SnapKVKIVI(budget=0.1, window=WIN, kernel=3, group_size=8, whole=0)
    out = _compress(policy, cache, obs)
    dense = KH * (T + obs.extra_capacity) * 2 * D * 4 + 4
    assert 0 < out.n_slots and out.nbytes() / B <= 0.1 * dense
    assert (np.asarray(out.whole_lengths) == 0).all()
    # the window is still always kept: quantised now, among the kept positions
    pos = np.asarray(out.positions)
    q_len = np.asarray(out.q_lengths)
    for b, length in enumerate(LENGTHS):
        if q_len[b] >= WIN:
            for h in range(KH):
                assert set(range(length - WIN, length)) <= set(pos[b, h].tolist())
