"""MixedCache (RDKV's mixed-precision layout): decode attention without dequantising equals dense
attention over the dequantised cache, appending, honest byte counts, the quantisation error bound,
record sizes worked by hand, and errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxkv.cache import MixedCache
from jaxkv.cache.mixed_format import record_bytes
from pallas_kernels.dense_decode import NEG_INF
from tests.helpers import assert_close

# one fixed shape, so every hypothesis example reuses the same compilations
B, KH, T, D, G, W, E, R = 2, 2, 24, 8, 2, 3, 3, 4  # R: K row bytes (4 bits per channel on average)
P = 260  # arena bytes per head


@functools.partial(jax.jit, static_argnames=("window", "arena_bytes", "k_row_bytes",
                                             "extra_capacity"))
def _build(k, v, lengths, token_bits, channel_bits, **static):
    return MixedCache.from_allocation(k, v, lengths, token_bits, channel_bits, **static)


@jax.jit
def _attend_and_dense(cache, q):
    return cache.attend(q, 0.35), cache.to_dense(), cache.kept_positions()


@jax.jit
def _append(cache, k, v):
    return cache.append(k, v)


def _dense_attention(q, k, v, valid, scale):
    """Plain attention of q [B, H, D] over k, v [B, K, S, D] where valid [B, K, S]."""
    b, h, d = q.shape
    kh = k.shape[1]
    s = jnp.einsum("BKGD,BKSD->BKGS", q.reshape(b, kh, h // kh, d).astype(jnp.float32), k) * scale
    s = jnp.where(valid[:, :, None, :], s, NEG_INF)
    p = jax.nn.softmax(s, -1) * valid[:, :, None, :]
    return jnp.einsum("BKGS,BKSD->BKGD", p, v).reshape(b, h, d)


def _random_allocation(rng, lengths, arena=P, row_bits=8 * R):
    """token bits [B, K, T] fitting `arena` bytes per head, channel bits [B, K, D] <= row_bits."""
    rec = {w: record_bytes(w, R, D, 4) for w in (2, 4, 8, 16)}
    bits = rng.choice([0, 2, 4, 8, 16], size=(B, KH, T), p=[0.3, 0.2, 0.2, 0.15, 0.15])
    for b in range(B):
        bits[b, :, lengths[b] - min(W, lengths[b]):] = 0  # window and padding: ignored anyway
        for h in range(KH):
            while sum(rec[w] for w in bits[b, h] if w) > arena:
                bits[b, h, rng.choice(np.flatnonzero(bits[b, h]))] = 0
    chans = rng.choice([0, 2, 4, 8], size=(B, KH, D))
    for b in range(B):
        for h in range(KH):
            while chans[b, h].sum() > row_bits:
                chans[b, h, rng.choice(np.flatnonzero(chans[b, h]))] //= 2
    chans[chans == 1] = 0
    return bits.astype(np.int32), chans.astype(np.int32)


def test_record_sizes_hand_worked():
    # K row 4 bytes + int32 position 4 + (fp16 scale + zero 4) + D=8 codes at b bits
    assert [record_bytes(w, 4, 8, 4) for w in (2, 4, 8)] == [4 + 4 + 4 + 2, 4 + 4 + 4 + 4,
                                                             4 + 4 + 4 + 8]
    # 16 bits: K row + position + 8 float32 values (the cache dtype; no scale, no zero-point)
    assert record_bytes(16, 4, 8, 4) == 4 + 4 + 32
    # the docstring's table: D = 128, R = 64 (4 K bits per channel), bfloat16
    assert [record_bytes(w, 64, 128, 2) for w in (2, 4, 8, 16)] == [104, 136, 200, 324]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), short=st.integers(1, T),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_attend_equals_dense_attention_over_to_dense(seed, short, dtype):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    lengths = np.array([T, short], np.int32)
    k = jnp.asarray(rng.normal(size=(B, KH, T, D)) * rng.uniform(0.2, 3, size=(1, 1, 1, D)), dt)
    v = jnp.asarray(rng.normal(size=(B, KH, T, D)), dt)
    bits, chans = _random_allocation(rng, lengths, arena=P if dtype == "float32" else P // 2)
    cache = _build(k, v, jnp.asarray(lengths), jnp.asarray(bits), jnp.asarray(chans), window=W,
                   arena_bytes=P if dtype == "float32" else P // 2, k_row_bytes=R,
                   extra_capacity=E)
    for step in range(E + 1):  # 0 .. E decode tokens appended to every head's whole zone
        q = jnp.asarray(rng.normal(size=(B, KH * G, D)), dt)
        out, (dk, dv, valid), pos = _attend_and_dense(cache, q)
        ref = _dense_attention(q, dk, dv, valid, 0.35)
        assert_close(out, ref, "float32" if dtype == "float32" else "bfloat16")
        # what is kept: every arena token of the allocation, the window, the decoded tokens
        pos = np.asarray(pos)
        for b in range(B):
            n = lengths[b]
            for h in range(KH):
                got = sorted(pos[b, h][np.asarray(valid)[b, h]].tolist())
                want = sorted(np.flatnonzero(bits[b, h]).tolist()
                              + list(range(n - min(W, n), n)) + list(range(n, n + step)))
                assert got == want
        if step < E:
            nk = jnp.asarray(rng.normal(size=(B, KH, D)), dt)
            cache = _append(cache, nk, -nk)


def test_dequantised_values_are_within_half_a_step():
    rng = np.random.default_rng(3)
    lengths = np.array([T, 17], np.int32)
    k = rng.normal(size=(B, KH, T, D)).astype(np.float32)
    v = rng.normal(size=(B, KH, T, D)).astype(np.float32)
    bits, chans = _random_allocation(rng, lengths)
    cache = _build(jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths), jnp.asarray(bits),
                   jnp.asarray(chans), window=W, arena_bytes=P, k_row_bytes=R, extra_capacity=E)
    _, (dk, dv, valid), pos = _attend_and_dense(cache, jnp.zeros((B, KH * G, D)))
    dk, dv, valid, pos = map(np.asarray, (dk, dv, valid, pos))
    for b in range(B):
        for h in range(KH):
            kept = bits[b, h] > 0
            lo, hi = k[b, h][kept].min(0), k[b, h][kept].max(0)  # per channel over kept tokens
            for s in np.flatnonzero(valid[b, h]):
                p = pos[b, h, s]
                if not kept[p]:  # the window: kept whole
                    np.testing.assert_array_equal(dk[b, h, s], k[b, h, p])
                    np.testing.assert_array_equal(dv[b, h, s], v[b, h, p])
                    continue
                for c in range(D):
                    w = chans[b, h, c]
                    if w == 0:
                        assert dk[b, h, s, c] == 0.0  # pruned channel
                    else:  # scale is rounded up to float16: allow its relative rounding (2^-10)
                        step = (hi[c] - lo[c]) / (2 ** w - 1) * (1 + 2 ** -10) + 1e-6
                        assert abs(dk[b, h, s, c] - k[b, h, p, c]) <= step / 2 + 1e-3 * abs(lo[c])
                wb = bits[b, h, p]
                if wb == 16:
                    np.testing.assert_array_equal(dv[b, h, s], v[b, h, p])
                else:
                    span = v[b, h, p].max() - v[b, h, p].min()
                    step = span / (2 ** wb - 1) * (1 + 2 ** -10) + 1e-6
                    assert np.abs(dv[b, h, s] - v[b, h, p]).max() <= step / 2 + 1e-3


def test_nbytes_counts_every_array_and_padding_is_reported():
    rng = np.random.default_rng(5)
    lengths = np.array([T, 10], np.int32)
    k = jnp.asarray(rng.normal(size=(B, KH, T, D)), jnp.float32)
    bits = np.zeros((B, KH, T), np.int32)
    bits[0, 0, [0, 1, 2]] = [16, 8, 2]      # 40 + 20 + 14 = 74 bytes
    bits[0, 1, [5, 6]] = [4, 4]             # 16 + 16 = 32 bytes
    bits[1, 0, [0]] = [8]                   # 20 bytes (row 1 has 10 tokens, window 7..9)
    chans = np.zeros((B, KH, D), np.int32)
    chans[:, :, :3] = [8, 4, 2]             # 14 of the row's 32 bits
    cache = _build(k, k, jnp.asarray(lengths), jnp.asarray(bits), jnp.asarray(chans), window=W,
                   arena_bytes=P, k_row_bytes=R, extra_capacity=E)
    np.testing.assert_array_equal(np.asarray(cache.used_bytes()), [[74, 32], [20, 0]])
    np.testing.assert_array_equal(np.asarray(cache.counts)[0, 0], [1, 1, 0, 1])  # 16, 8, 4, 2
    np.testing.assert_array_equal(np.asarray(cache.k_counts)[0, 0], [1, 1, 1])
    # arena [B, K, P] + counts [B, K, 4] int32 + ranks [B, K, D] uint8 + k_counts [B, K, 3]
    # int32 + K scale and zero [B, K, D] float16 + whole k, v [B, K, W + E, D] float32 + two
    # int32 [B] lengths
    expected = (B * KH * P + B * KH * 4 * 4 + B * KH * D + B * KH * 3 * 4 + 2 * B * KH * D * 2
                + 2 * B * KH * (W + E) * D * 4 + 2 * B * 4)
    assert cache.nbytes() == expected
    # padding: arena tails, unused K-row bits (32 - 14 = 18 bits per record), no empty window
    tails = [(P - 74) + (P - 32), (P - 20) + P]
    slack = [(3 + 2) * 18 // 8, 1 * 18 // 8]
    np.testing.assert_array_equal(np.asarray(cache.padding_bytes()),
                                  [tails[0] + slack[0], tails[1] + slack[1]])
    # a sequence shorter than the window leaves window slots empty: counted as padding
    short = _build(k, k, jnp.asarray([T, 2]), jnp.zeros((B, KH, T), jnp.int32),
                   jnp.asarray(chans), window=W, arena_bytes=P, k_row_bytes=R, extra_capacity=E)
    assert int(short.padding_bytes()[1]) == 2 * P + (W - 2) * KH * 2 * D * 4


@pytest.mark.parametrize("change, match", [
    (dict(token_bits=3), r"\{0, 2, 4, 8, 16\}"),
    (dict(channel_bits=16), r"capped at 8"),
    (dict(row=True), r"k_row_bytes"),
    (dict(arena=True), r"arena_bytes"),
])
def test_bad_allocations_are_refused(change, match):
    k = jnp.ones((1, 1, 8, D), jnp.float32)
    bits = np.zeros((1, 1, 8), np.int32)
    chans = np.zeros((1, 1, D), np.int32)
    if "token_bits" in change:
        bits[0, 0, 0] = change["token_bits"]
    if "channel_bits" in change:
        chans[0, 0, 0] = change["channel_bits"]
    if "row" in change:
        chans[0, 0, :5] = 8  # 40 bits > 32
    if "arena" in change:
        bits[0, 0, :4] = 16  # 4 * 40 bytes > 100
    with pytest.raises(ValueError, match=match):
        MixedCache.from_allocation(k, k, jnp.asarray([8]), jnp.asarray(bits), jnp.asarray(chans),
                                   window=2, arena_bytes=100, k_row_bytes=R, extra_capacity=1)


def test_head_dim_must_pack_into_bytes():
    k = jnp.ones((1, 1, 4, 6), jnp.float32)
    with pytest.raises(ValueError, match="head_dim=6"):
        MixedCache.from_allocation(k, k, jnp.asarray([4]), jnp.zeros((1, 1, 4), jnp.int32),
                                   jnp.zeros((1, 1, 6), jnp.int32), window=1, arena_bytes=10,
                                   k_row_bytes=1, extra_capacity=0)


def test_rdkv_caches_run_in_the_decode_loop_of_generate():
    import jaxkv
    from jaxkv.policies.registry import make_policy
    from tests.helpers import tiny_model
    model = tiny_model()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, model.config.vocab_size, size=n).tolist() for n in (70, 45)]
    got = jaxkv.generate(model, prompts, 5, policy=make_policy("rdkv", 0.2, model, window=4,
                                                                     eps="default"))
    assert all(len(t) == 5 for t in got.tokens)
    # prompt part <= 0.2 of the dense prompt cache; both sides hold the same 5 decode slots
    assert 0.15 < got.budget < 0.25
