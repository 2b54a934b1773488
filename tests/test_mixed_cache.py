"""MixedCache (RDKV's mixed-precision layout, `jaxkv.cache.mixed_format`): the packing round-trips
(every kept token at its position and widths, K within half a step of its group's grid, V within
half a step of its own), decode attention without dequantising equals dense attention over the
dequantised cache, appending, honest byte counts worked by hand, and errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxkv.cache import MixedCache
from jaxkv.cache.mixed import head_bytes_np
from jaxkv.cache.mixed_format import (GROUP, head_layout, k_header_bytes, k_row_bytes,
                                     position_bytes, tier16_dtype, v_record_bytes)
from pallas_kernels.dense_decode import NEG_INF
from tests.helpers import assert_close

# one fixed shape, so every hypothesis example reuses the same compilations; T > 2 * GROUP so a
# region can hold more than one K group
B, KH, T, D, G, W, E = 2, 2, 80, 8, 2, 3, 3
C = 900  # head capacity (bytes)
S = 1700  # arena bytes per sequence (< 2 C: the heads share it)


@functools.partial(jax.jit, static_argnames=("window", "arena_bytes", "head_capacity",
                                             "extra_capacity"))
def _build(k, v, lengths, token_bits, channel_bits, **static):
    return MixedCache.from_allocation(k, v, lengths, token_bits, channel_bits, **static)


@jax.jit
def _attend_and_dense(cache, q):
    return (cache.attend(q, 0.35), cache.to_dense(), cache.slot_positions(),
            cache.token_bits(T), cache.channel_bits())


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


def _random_allocation(rng, lengths, capacity=C, arena=S):
    """token bits [B, K, T] (whole zone and padding 0) and channel bits [B, K, D] (one width per
    RoPE pair) whose sections fit `capacity` bytes a head and `arena` a sequence."""
    bits = rng.choice([0, 2, 4, 8, 16], size=(B, KH, T), p=[0.3, 0.25, 0.2, 0.15, 0.1])
    pairs = rng.choice([0, 2, 4, 8], size=(B, KH, D // 2))
    chans = np.concatenate([pairs, pairs], -1).astype(np.int32)
    for b in range(B):
        bits[b, :, lengths[b] - min(W, lengths[b]):] = 0  # whole zone and padding
    pb = position_bytes(T)
    while True:
        used = head_bytes_np(bits, chans, D, pb)
        over = (used > capacity) | (used.sum(-1, keepdims=True) > arena)
        if not over.any():
            return bits.astype(np.int32), chans
        for b, h in zip(*np.nonzero(over)):
            bits[b, h, rng.choice(np.flatnonzero(bits[b, h]))] = 0


def test_record_and_group_sizes_hand_worked():
    # int16 position 2 + (float16 scale, zero 4) + D=8 codes at b bits; 16 bits: bfloat16 values
    assert [v_record_bytes(w, 8, 2) for w in (2, 4, 8)] == [2 + 4 + 2, 2 + 4 + 4, 2 + 4 + 8]
    assert v_record_bytes(16, 8, 2) == 2 + 16
    # the docstring's table: D = 64, int16 positions
    assert [v_record_bytes(w, 64, 2) for w in (2, 4, 8, 16)] == [22, 38, 70, 130]
    assert position_bytes(32768) == 2 and position_bytes(32769) == 4
    assert tier16_dtype(jnp.float32) == jnp.bfloat16 and tier16_dtype(jnp.float16) == jnp.float16
    # K: 2 channels at 8 bits, 4 at 4, 2 at 2 -> 16 + 16 + 4 = 36 bits -> 5 bytes a row; 8
    # stored channels -> 32 header bytes a group
    kc = jnp.asarray([2, 4, 2])
    assert int(k_row_bytes(kc)) == 5 and int(k_header_bytes(kc)) == 32
    # a head with 33 records at 4 bits and 1 at 16: V 33 * 10 + 18; K groups: 2 (4-bit region)
    # + 1 (16-bit region) headers; 34 rows
    lay = head_layout(jnp.asarray([1, 0, 33, 0]), kc, 8, 2)
    assert int(lay.k_start) == 33 * 10 + 18
    assert int(lay.total) == 33 * 10 + 18 + 3 * 32 + 34 * 5
    assert lay.v_offsets.tolist() == [0, 18, 18, 348] and lay.group_base.tolist() == [0, 1, 1, 3]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), short=st.integers(1, T),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_packing_round_trips_and_attend_equals_dense_attention(seed, short, dtype):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    lengths = np.array([T, short], np.int32)
    k = rng.normal(size=(B, KH, T, D)) * rng.uniform(0.2, 3, size=(1, 1, 1, D))
    v = rng.normal(size=(B, KH, T, D))
    k32, v32 = (np.asarray(jnp.asarray(x, dt), np.float32) for x in (k, v))  # stored values
    bits, chans = _random_allocation(rng, lengths)
    cache = _build(jnp.asarray(k, dt), jnp.asarray(v, dt), jnp.asarray(lengths),
                   jnp.asarray(bits), jnp.asarray(chans), window=W, arena_bytes=S,
                   head_capacity=C, extra_capacity=E)
    np.testing.assert_array_equal(np.asarray(cache.used_bytes()),
                                  head_bytes_np(bits, chans, D, position_bytes(T)))
    terms = cache.byte_terms()  # every byte in one term, none negative, V codes by the widths
    assert sum(terms.values()) == cache.nbytes() and min(terms.values()) >= 0
    assert terms["v_codes"] == sum(int((bits == w).sum()) * (2 * D if w == 16 else D * w // 8)
                                   for w in (2, 4, 8, 16))
    assert terms["positions"] == int((bits > 0).sum()) * position_bytes(T)
    q = jnp.asarray(rng.normal(size=(B, KH * G, D)), dt)
    out, (dk, dv, valid), pos, tbits, cbits = _attend_and_dense(cache, q)
    assert_close(out, _dense_attention(q, dk, dv, valid, 0.35),
                 "float32" if dtype == "float32" else "bfloat16")
    kept = np.asarray(cache.kept_positions(jnp.asarray(lengths), T))
    np.testing.assert_array_equal(np.asarray(cbits), chans)
    dk, dv, valid, pos, tbits = map(np.asarray, (dk, dv, valid, pos, tbits))
    for b in range(B):
        n = lengths[b]
        win = list(range(n - min(W, n), n))
        want = np.where(np.arange(T) < n, bits[b], 0)
        want[:, win] = 16
        np.testing.assert_array_equal(tbits[b], want)
        np.testing.assert_array_equal(kept[b], want > 0)  # the LayerCache protocol
        for h in range(KH):
            got = sorted(pos[b, h][valid[b, h]].tolist())
            assert got == sorted(np.flatnonzero(bits[b, h]).tolist() + win)
            slots = {int(p): s for s, p in enumerate(pos[b, h]) if valid[b, h, s]}
            for p in win:  # the whole zone: exact
                np.testing.assert_array_equal(dk[b, h, slots[p]], k32[b, h, p])
                np.testing.assert_array_equal(dv[b, h, slots[p]], v32[b, h, p])
            # K groups: 32 consecutive records of a region, positions ascending
            for w in (16, 8, 4, 2):
                members = np.flatnonzero(bits[b, h] == w)
                for g0 in range(0, len(members), GROUP):
                    group = members[g0:g0 + GROUP]
                    lo, hi = k32[b, h, group].min(0), k32[b, h, group].max(0)
                    for p in group:
                        got_k = dk[b, h, slots[p]]
                        for c in range(D):
                            if chans[b, h, c] == 0:
                                assert got_k[c] == 0.0  # pruned channel
                                continue
                            step_k = (hi[c] - lo[c]) / (2 ** chans[b, h, c] - 1) \
                                * (1 + 2 ** -10) + 1e-6
                            assert abs(got_k[c] - k32[b, h, p, c]) <= step_k / 2 + 1e-3 * \
                                abs(lo[c]), (w, p, c)
                for p in members:
                    got_v = dv[b, h, slots[p]]
                    if w == 16:  # the 16-bit tier: bfloat16 (exact for a bfloat16 cache)
                        np.testing.assert_allclose(got_v, v32[b, h, p], rtol=2 ** -8)
                        continue
                    span = v32[b, h, p].max() - v32[b, h, p].min()
                    step_v = span / (2 ** w - 1) * (1 + 2 ** -10) + 1e-6
                    assert np.abs(got_v - v32[b, h, p]).max() <= step_v / 2 + 1e-3


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_appended_tokens_are_attended(seed):
    rng = np.random.default_rng(seed)
    lengths = np.array([T, 30], np.int32)
    k = jnp.asarray(rng.normal(size=(B, KH, T, D)), jnp.float32)
    bits, chans = _random_allocation(rng, lengths)
    cache = _build(k, -k, jnp.asarray(lengths), jnp.asarray(bits), jnp.asarray(chans), window=W,
                   arena_bytes=S, head_capacity=C, extra_capacity=E)
    for step in range(E):
        nk = jnp.asarray(rng.normal(size=(B, KH, D)), jnp.float32)
        cache = _append(cache, nk, -nk)
        q = jnp.asarray(rng.normal(size=(B, KH * G, D)), jnp.float32)
        out, (dk, dv, valid), pos, *_ = _attend_and_dense(cache, q)
        assert_close(out, _dense_attention(q, dk, dv, valid, 0.35), "float32")
        pos = np.asarray(pos)
        for b in range(B):
            assert set(range(lengths[b], lengths[b] + step + 1)) <= set(pos[b, 0].tolist())


def test_nbytes_counts_every_array_and_padding_is_reported():
    rng = np.random.default_rng(5)
    lengths = np.array([T, 10], np.int32)
    k = jnp.asarray(rng.normal(size=(B, KH, T, D)), jnp.float32)
    bits = np.zeros((B, KH, T), np.int32)
    bits[0, 0, [0, 1, 2]] = [16, 8, 2]      # V: 18 + 14 + 8 = 40 bytes
    bits[0, 1, [5, 6]] = [4, 4]             # V: 10 + 10 = 20 bytes
    bits[1, 0, [0]] = [8]                   # V: 14 bytes (row 1 has 10 tokens, window 7..9)
    chans = np.zeros((B, KH, D), np.int32)
    chans[:, :, [0, 4]] = 8                 # one RoPE pair at 8 bits (channels 0 and 4 = 0 + D/2)
    chans[:, :, [1, 5]] = 2                 # one at 2: 20 of the row's bits -> 3 bytes
    cache = _build(k, k, jnp.asarray(lengths), jnp.asarray(bits), jnp.asarray(chans), window=W,
                   arena_bytes=S, head_capacity=C, extra_capacity=E)
    # K: 4 stored channels -> 16-byte headers, one per group (a region's records: one group each)
    np.testing.assert_array_equal(np.asarray(cache.used_bytes()),
                                  [[40 + 3 * 16 + 3 * 3, 20 + 16 + 2 * 3], [14 + 16 + 3, 0]])
    np.testing.assert_array_equal(np.asarray(cache.counts)[0, 0], [1, 1, 0, 1])  # 16, 8, 4, 2
    np.testing.assert_array_equal(np.asarray(cache.k_counts)[0, 0], [2, 0, 2])
    # arena [B, S] + counts [B, K, 4] int32 + ranks [B, K, D] uint8 + k_counts [B, K, 3] int32
    # + whole k, v [B, K, W + E, D] float32 + two int32 [B] lengths
    expected = (B * S + B * KH * 4 * 4 + B * KH * D + B * KH * 3 * 4
                + 2 * B * KH * (W + E) * D * 4 + 2 * B * 4)
    assert cache.nbytes() == expected
    # padding: the arena tail, the rows' rounding (24 - 20 = 4 bits a row), no empty window
    used = np.asarray(cache.used_bytes()).sum(-1)
    slack = [(3 + 2) * 4 // 8, 1 * 4 // 8]
    np.testing.assert_array_equal(np.asarray(cache.padding_bytes()), S - used + slack)
    # where the bytes go: V 16 + 2 * 8 + 2 * 4 + 2 code bytes, 5 quantised records' scales,
    # 6 int16 positions; K rows 18 bytes less 2 of rounding, 5 groups x 16-byte headers
    terms = cache.byte_terms()
    assert terms == dict(v_codes=42, v_scales=20, positions=12, k_codes=16, k_headers=80,
                         whole=2 * B * KH * (W + E) * D * 4,
                         metadata=B * KH * 4 * 4 + B * KH * D + B * KH * 3 * 4 + 2 * B * 4,
                         padding=int(np.asarray(cache.padding_bytes()).sum()))
    assert sum(terms.values()) == cache.nbytes()
    # a sequence shorter than the window leaves window slots empty: counted as padding
    short = _build(k, k, jnp.asarray([T, 2]), jnp.zeros((B, KH, T), jnp.int32),
                   jnp.asarray(chans), window=W, arena_bytes=S, head_capacity=C,
                   extra_capacity=E)
    assert int(short.padding_bytes()[1]) == S + (W - 2) * KH * 2 * D * 4
    # ...but byte_terms keeps them in `whole` (the arrays hold them): padding is the arena
    assert short.byte_terms()["padding"] == 2 * S and sum(short.byte_terms().values()) \
        == short.nbytes()


@pytest.mark.parametrize("change, match", [
    (dict(token_bits=3), r"\{0, 2, 4, 8, 16\}"),
    (dict(channel_bits=16), r"capped at 8"),
    (dict(capacity=True), r"head_capacity"),
    (dict(arena=True), r"arena_bytes"),
])
def test_bad_allocations_are_refused(change, match):
    k = jnp.ones((1, 2, 8, D), jnp.float32)
    bits = np.zeros((1, 2, 8), np.int32)
    chans = np.zeros((1, 2, D), np.int32)
    if "token_bits" in change:
        bits[0, 0, 0] = change["token_bits"]
    if "channel_bits" in change:
        chans[0, 0, 0] = change["channel_bits"]
    if "capacity" in change:
        bits[0, 0, :4] = 16  # 4 * 18 bytes > 60
    if "arena" in change:
        bits[0, :, :3] = 16  # 2 heads * 3 * 18 bytes > 100
    with pytest.raises(ValueError, match=match):
        MixedCache.from_allocation(k, k, jnp.asarray([8]), jnp.asarray(bits), jnp.asarray(chans),
                                   window=2, arena_bytes=100, head_capacity=60, extra_capacity=1)


def test_head_dim_must_pack_into_bytes():
    k = jnp.ones((1, 1, 4, 6), jnp.float32)
    with pytest.raises(ValueError, match="head_dim=6"):
        MixedCache.from_allocation(k, k, jnp.asarray([4]), jnp.zeros((1, 1, 4), jnp.int32),
                                   jnp.zeros((1, 1, 6), jnp.int32), window=1, arena_bytes=10,
                                   head_capacity=10, extra_capacity=0)


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

