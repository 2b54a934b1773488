"""Pallas TPU kernel of sparse (per-head ragged) decode attention, in interpret mode on CPU.

Random ragged layouts (fresh seed per run, printed on failure) with very different per-head
counts, an empty head, padding slots, odd N, decode regions that are absent (E = 0), empty
(new_lengths 0), partial or several blocks long; checked against
`sparse_decode_attention_reference`, through the dispatcher, and through a real `SparseCache`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxkv.cache import SparseCache
from pallas_kernels import dispatch
from pallas_kernels.sparse_decode import (NEG_INF, _schedule, segments, sparse_decode_attention,
                                          sparse_decode_attention_reference)
from tests.helpers import assert_close


def _seed() -> int:
    return int(np.random.SeedSequence().entropy % (2 ** 32))


def _ragged_heads(rng, kh: int, n: int, total: int, empty_head: bool) -> np.ndarray:
    """heads [N] for one sequence: `total` slots split over kh heads with very different counts
    (weights spread over two orders of magnitude; one head empty if asked and kh > 1), then
    N - total padding slots marked kh."""
    weights = rng.uniform(0.0, 1.0, kh) ** 4 + 0.01  # very uneven
    if empty_head and kh > 1:
        weights[rng.integers(kh)] = 0.0
    counts = np.floor(weights / weights.sum() * total).astype(int)
    counts[np.argmax(weights)] += total - counts.sum()
    heads = np.full(n, kh, np.int32)
    heads[:total] = np.repeat(np.arange(kh), counts)
    return heads


def _inputs(seed, *, b, kh, g, d, n, e, totals, empty, new_lengths, dtype):
    rng = np.random.default_rng(seed)
    heads = np.stack([_ragged_heads(rng, kh, n, totals[i], empty[i]) for i in range(b)])
    draw = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    return dict(q=draw(b, kh * g, d), k=draw(b, n, d), v=draw(b, n, d), heads=jnp.asarray(heads),
                new_k=draw(b, kh, e, d), new_v=draw(b, kh, e, d),
                new_lengths=jnp.asarray(new_lengths, jnp.int32))


# A covering set rather than the cartesian product: group sizes 1, 4, 7, 8; head dims 64 and 128
# with both dtypes each; N odd and not a multiple of the block; E absent, one partial block, or
# several blocks; new_lengths 0, partial and full; an empty head and padding slots in every case.
CASES = [
    # kh, g, d, dtype, block, n, e, totals (per row), empty head (per row), new_lengths
    (3, 1, 64, jnp.float32, 8, 37, 0, (37, 30), (True, False), (0, 0)),
    (2, 4, 128, jnp.float32, 16, 45, 5, (40, 45), (False, True), (3, 0)),
    (2, 7, 64, jnp.bfloat16, 16, 41, 19, (41, 29), (True, False), (19, 7)),
    (2, 8, 128, jnp.bfloat16, 32, 71, 3, (50, 71), (True, True), (0, 2)),
]


@pytest.mark.parametrize("kh, g, d, dtype, block, n, e, totals, empty, new_lengths", CASES)
def test_kernel_matches_reference(kh, g, d, dtype, block, n, e, totals, empty, new_lengths):
    seed = _seed()
    x = _inputs(seed, b=2, kh=kh, g=g, d=d, n=n, e=e, totals=totals, empty=empty,
                new_lengths=new_lengths, dtype=dtype)
    scale = d ** -0.5
    got = sparse_decode_attention(**x, scale=scale, block_size=block,
                                  interpret=pltpu.InterpretParams(), poison=True)
    want = sparse_decode_attention_reference(**x, scale=scale)
    assert got.shape == want.shape and got.dtype == want.dtype
    msg = f"seed={seed} heads={np.asarray(x['heads']).tolist()}"
    assert np.isfinite(np.asarray(got, np.float32)).all(), msg  # every tile written
    assert_close(got, want, dtype, err_msg=msg)
    # heads with no valid slot at all (empty prompt segment, no decode tokens) give zeros
    counts = (np.asarray(x["heads"])[:, :, None] == np.arange(kh)).sum(1)  # [B, K]
    nothing = (counts == 0) & (np.asarray(x["new_lengths"])[:, None] == 0)  # [B, K]
    got_g = np.asarray(got, np.float32).reshape(2, kh, g, d)
    np.testing.assert_array_equal(got_g[nothing], 0.0, err_msg=msg)


@pytest.mark.parametrize("kh, n, block, e, decode_block", [
    (8, 101, 8, 0, 0),  # many heads, E = 0
    (3, 37, 16, 21, 16),  # decode region of two blocks, the second partial
    (1, 5, 5, 4, 4),  # one head, one block shorter than block_size
])
def test_schedule_reads_each_valid_block_once_and_fits_the_static_bound(kh, n, block, e,
                                                                         decode_block):
    """The work list: every block holding a valid slot is fetched exactly once per sequence
    (consecutive equal block indices issue no copy), each head gets exactly the blocks of its
    segment and its valid decode blocks, and the static number of steps always suffices.
    Pure jnp (no kernel), many random layouts per configuration."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    b = 32
    totals = rng.integers(0, n + 1, b)
    totals[:2] = 0, n  # all padding; no padding
    heads = np.stack([_ragged_heads(rng, kh, n, int(totals[i]), bool(rng.integers(2)))
                      for i in range(b)])  # [B, N]
    new_len = rng.integers(0, e + 1, b).astype(np.int32)  # [B]
    n_decode = -(-e // decode_block) if e else 0
    num_steps = -(-n // block) + kh - 1 + kh * n_decode  # the kernel's static bound

    @jax.jit
    def schedule(heads, new_len):
        start, count = segments(heads, kh)
        return (start, count) + _schedule(start, count, new_len, block=block,
                                          decode_block=decode_block, num_steps=num_steps)
    start, count, head, k_blk, d_blk, flags = (
        np.asarray(x) for x in schedule(jnp.asarray(heads), jnp.asarray(new_len)))
    is_set = lambda bit: (flags & bit) != 0  # [B, T]
    for i in range(b):
        msg = f"seed={seed} row={i} heads={heads[i].tolist()} new_len={new_len[i]}"
        valid_blocks = sorted({s // block for s in range(n) if heads[i, s] < kh})
        fetched = [k_blk[i, 0]] + [k_blk[i, t] for t in range(1, num_steps)
                                   if k_blk[i, t] != k_blk[i, t - 1]]
        assert sorted(fetched) == (valid_blocks or [0]), msg
        for h in range(kh):
            steps = head[i] == h
            assert is_set(1)[i][steps].sum() == 1 and is_set(2)[i][steps].sum() == 1, msg
            segment = range(start[i, h], start[i, h] + count[i, h])
            assert list(segment) == [s for s in range(n) if heads[i, s] == h], msg
            prompt = steps & is_set(4)[i]
            assert k_blk[i][prompt].tolist() == sorted({s // block for s in segment}), msg
            decode = steps & is_set(8)[i]
            n_dec = -(-int(new_len[i]) // decode_block) if e else 0
            assert d_blk[i][decode].tolist() == list(range(n_dec)), msg
        # the last real step of the last head is its LAST step: the schedule fit in num_steps
        assert is_set(2)[i][head[i] == kh - 1].any(), msg


def test_dispatcher_interpret_matches_reference():
    seed = _seed()
    x = _inputs(seed, b=2, kh=2, g=4, d=64, n=23, e=6, totals=(23, 17), empty=(True, False),
                new_lengths=(4, 6), dtype=jnp.float32)
    with dispatch.kernel_mode_override("interpret"):
        got = dispatch.sparse_decode_attention(**x, scale=0.125)
    with dispatch.kernel_mode_override("reference"):
        want = dispatch.sparse_decode_attention(**x, scale=0.125)
    assert_close(got, want, jnp.float32, err_msg=f"seed={seed}")


def _dense_attention(q, k, v, valid, scale):
    """q [B, H, D]; k, v [B, K, S, D]; valid [B, K, S] -> [B, H, D] (float32)."""
    b, h, d = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, kh, h // kh, d).astype(jnp.float32)
    s = jnp.einsum("BKGD,BKSD->BKGS", qg, k.astype(jnp.float32)) * scale
    s = jnp.where(valid[:, :, None, :], s, NEG_INF)
    p = jax.nn.softmax(s, -1) * valid[:, :, None, :]
    return jnp.einsum("BKGS,BKSD->BKGD", p, v.astype(jnp.float32)).reshape(b, h, d)


def test_sparse_cache_attend_through_the_kernel():
    """A real SparseCache (from_selection, then append) attended through the dispatcher in
    interpret mode matches dense attention over its kept and decoded tokens."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    b, kh, g, t, d, n = 2, 4, 2, 16, 64, 29
    keep = np.zeros((b, kh, t), bool)
    keep[0, 0, :13] = True  # very uneven: 13, 0, 3, 13 (29 slots, no padding)
    keep[0, 2, rng.choice(t, 3, replace=False)] = True
    keep[0, 3, rng.choice(t, 13, replace=False)] = True
    keep[1].reshape(-1)[rng.choice(kh * t, 20, replace=False)] = True  # 9 padding slots
    k = jnp.asarray(rng.normal(size=(b, kh, t, d)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(b, kh, t, d)), jnp.bfloat16)
    cache = SparseCache.from_selection(k, v, jnp.asarray(keep), n, 3)
    msg = f"seed={seed}"
    for step in range(2):  # new_lengths 0, then 1
        q = jnp.asarray(rng.normal(size=(b, kh * g, d)), jnp.bfloat16)
        with dispatch.kernel_mode_override("interpret"):
            got = cache.attend(q, 0.125)
        dk, dv, valid = cache.to_dense()
        assert_close(got, _dense_attention(q, dk, dv, valid, 0.125), jnp.bfloat16, err_msg=msg)
        new = jnp.asarray(rng.normal(size=(b, kh, d)), jnp.bfloat16)
        cache = cache.append(new, -new)


@pytest.mark.parametrize("change, match", [
    (dict(block_size=12), "block_size"),
    (dict(block_size=0), "block_size"),
    (dict(heads=jnp.zeros((1, 5), jnp.int32)), "heads"),
    (dict(new_lengths=jnp.zeros((2,), jnp.int32)), "new_lengths"),
    (dict(q=jnp.zeros((1, 3, 8))), "divide"),
])
def test_bad_input_raises(change, match):
    args = dict(q=jnp.zeros((1, 4, 8)), k=jnp.zeros((1, 40, 8)), v=jnp.zeros((1, 40, 8)),
                heads=jnp.zeros((1, 40), jnp.int32), new_k=jnp.zeros((1, 2, 3, 8)),
                new_v=jnp.zeros((1, 2, 3, 8)), new_lengths=jnp.zeros((1,), jnp.int32),
                scale=1.0, block_size=16)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        sparse_decode_attention(**args)
