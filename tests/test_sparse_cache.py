"""SparseCache: gather of the kept tokens, ragged decode attention against a dense reference,
appending, and honest byte counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_close
from jaxkv.cache import SparseCache
from pallas_kernels.dense_decode import NEG_INF
from pallas_kernels.sparse_decode import sparse_decode_attention_reference


def _random_selection(rng, b, kh, t, n_per_row):
    """keep [B, K, T] with exactly n_per_row[b] True entries spread unevenly over heads."""
    keep = np.zeros((b, kh, t), bool)
    for i in range(b):
        flat = rng.choice(kh * t, size=n_per_row[i], replace=False)
        keep[i].reshape(-1)[flat] = True
    return keep


def _masked_attention(q, k, v, valid, scale):
    """Plain dense attention: q [B, H, D], k, v [B, K, S, D], valid [B, K, S]."""
    b, h, d = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, kh, h // kh, d)
    s = jnp.einsum("BKGD,BKSD->BKGS", qg, k) * scale
    s = jnp.where(valid[:, :, None, :], s, NEG_INF)
    p = jax.nn.softmax(s, -1) * valid[:, :, None, :]
    return jnp.einsum("BKGS,BKSD->BKGD", p, v).reshape(b, h, d)


def test_from_selection_keeps_exactly_the_selected_tokens():
    rng = np.random.default_rng(0)
    b, kh, t, d = 2, 3, 11, 4
    k = rng.normal(size=(b, kh, t, d)).astype(np.float32)
    v = rng.normal(size=(b, kh, t, d)).astype(np.float32)
    keep = _random_selection(rng, b, kh, t, [9, 6])
    cache = SparseCache.from_selection(jnp.asarray(k), jnp.asarray(v), jnp.asarray(keep), 9, 2)
    heads, pos = np.asarray(cache.heads), np.asarray(cache.positions)
    for i in range(b):
        expected = sorted((h, p) for h, p in zip(*np.nonzero(keep[i])))
        got = [(h, p) for h, p in zip(heads[i], pos[i]) if h < kh]
        assert got == expected  # grouped by head, positions ascending
        for slot, (h, p) in enumerate(got):
            np.testing.assert_array_equal(np.asarray(cache.k)[i, slot], k[i, h, p])
            np.testing.assert_array_equal(np.asarray(cache.v)[i, slot], v[i, h, p])
    # row 1 keeps 6 of 9 slots: 3 padding slots, marked and zeroed
    np.testing.assert_array_equal(np.asarray(cache.padding_slots()), [0, 3])
    assert (pos[1, 6:] == -1).all() and (heads[1, 6:] == kh).all()
    np.testing.assert_array_equal(np.asarray(cache.counts()), keep.sum(-1))


def test_nbytes_counts_every_array_and_is_the_budget_size():
    b, kh, t, d, e = 2, 4, 64, 8, 5
    k = jnp.ones((b, kh, t, d), jnp.bfloat16)
    keep = jnp.zeros((b, kh, t), bool).at[:, :, :16].set(True)
    cache = SparseCache.from_selection(k, k, keep, kh * 16, e)
    # prompt part: 2 * B*N*D bf16 + heads, positions int32 [B, N]; decode part 2 * B*K*E*D + [B]
    n = kh * 16
    expected = 2 * b * n * d * 2 + 2 * b * n * 4 + 2 * b * kh * e * d * 2 + b * 4
    assert cache.nbytes() == expected
    assert cache.k.shape == (b, n, d)  # really smaller: 16 of 64 tokens per head


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sparse_decode_matches_dense_attention_over_the_kept_tokens(group, dtype):
    rng = np.random.default_rng(group)
    b, kh, t, d, e = 3, 2, 13, 8, 4
    h = kh * group
    k = jnp.asarray(rng.normal(size=(b, kh, t, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, kh, t, d)), dtype)
    keep = _random_selection(rng, b, kh, t, [10, 7, 1])
    cache = SparseCache.from_selection(k, v, jnp.asarray(keep), 10, e)
    for step in range(3):  # appended decode tokens join every head
        nk = jnp.asarray(rng.normal(size=(b, kh, d)), dtype)
        cache = cache.append(nk, nk * 0.5)
        q = jnp.asarray(rng.normal(size=(b, h, d)), dtype)
        got = cache.attend(q, 0.3)
        dk, dv, valid = cache.to_dense()
        want = _masked_attention(q.astype(jnp.float32), dk.astype(jnp.float32),
                                 dv.astype(jnp.float32), valid, 0.3)
        assert_close(got, want, dtype)
        assert int(cache.new_lengths[0]) == step + 1


def test_head_with_no_tokens_gives_zeros():
    k = jnp.ones((1, 2, 5, 4))
    keep = jnp.zeros((1, 2, 5), bool).at[0, 0, :3].set(True)  # head 1 keeps nothing
    cache = SparseCache.from_selection(k, k, keep, 3, 0)
    out = sparse_decode_attention_reference(jnp.ones((1, 2, 4)), cache.k, cache.v, cache.heads,
                                            cache.new_k, cache.new_v, cache.new_lengths, 1.0)
    np.testing.assert_allclose(np.asarray(out[0, 1]), 0.0)
    np.testing.assert_allclose(np.asarray(out[0, 0]), 1.0, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_slots=0), "n_slots"),
    (dict(n_slots=41), "n_slots"),
    (dict(extra_capacity=-1), "extra_capacity"),
    (dict(keep=jnp.zeros((1, 2, 3), bool)), "keep.shape"),
])
def test_from_selection_rejects_bad_input(kwargs, match):
    args = dict(k=jnp.ones((1, 2, 20, 4)), v=jnp.ones((1, 2, 20, 4)),
                keep=jnp.ones((1, 2, 20), bool), n_slots=10, extra_capacity=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SparseCache.from_selection(**args)
