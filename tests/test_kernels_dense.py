"""Pallas TPU decode kernels over the dense and the head-split (full + sink/window) caches, run in
interpret mode on CPU against their plain-jnp references.

Every run draws fresh inputs (the seed is printed on failure). Kernels are called with
poison=True: the output buffer starts as NaN, so a tile the kernel forgets to write fails the
comparison. The parametrisations are small covering sets (group sizes 1, 4, 7, 8; head dims 64
and 128 with both float32 and bfloat16; lengths 0, odd, and the full cache; cache lengths that are
not multiples of the block) rather than full products: interpret mode is slow.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxkv.cache.dense import DenseCache
from pallas_kernels import dispatch
from pallas_kernels.dense_decode import dense_decode_attention, dense_decode_attention_reference
from pallas_kernels.headsplit_decode import (headsplit_decode_attention,
                                             headsplit_decode_attention_reference, ring_valid,
                                             sink_window_decode_attention,
                                             sink_window_decode_attention_reference)
from tests.helpers import assert_close, normal

pytestmark = pytest.mark.usefixtures("reset_tpu_interpreter")

TPU_INTERPRET = pltpu.InterpretParams()  # simulates scalar prefetch, VMEM scratch and the DMAs
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


# (group G, kv heads K, head dim D, dtype, cache slots S, block, interpret)
DENSE_CASES = [
    (1, 2, 64, "f32", 45, 16, TPU_INTERPRET),    # 3 blocks, partial tail of 13
    (4, 2, 128, "bf16", 77, 32, TPU_INTERPRET),  # partial tail of 13
    (7, 1, 64, "bf16", 50, 16, True),            # G = 7 (not a power of two); generic interpret
    (8, 1, 128, "f32", 33, 16, TPU_INTERPRET),   # tail block of a single slot
    (4, 1, 64, "f32", 20, 32, True),             # cache shorter than one block: one block
]


@pytest.mark.parametrize("group,kv,dim,dtype,slots,block,interpret", DENSE_CASES)
def test_dense_kernel(rng, group, kv, dim, dtype, slots, block, interpret):
    dt = DTYPES[dtype]
    b = 3
    q = normal(rng, (b, kv * group, dim), dt)  # [B, H, D]
    k = normal(rng, (b, kv, slots, dim), dt)  # [B, K, S, D]
    v = normal(rng, (b, kv, slots, dim), dt)
    odd = 2 * int(rng.integers(0, (slots - 1) // 2)) + 1  # an odd length in [1, S)
    lengths = jnp.asarray([0, slots, odd], jnp.int32)
    scale = dim ** -0.5
    out = dense_decode_attention(q, k, v, lengths, scale=scale, block_size=block,
                                 interpret=interpret, poison=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = dense_decode_attention_reference(q, k, v, lengths, scale)
    assert_close(out, expected, dt, f"{rng.seed_msg} lengths={lengths.tolist()}")
    assert not np.any(np.asarray(out[0], np.float32)), "length 0 must give zeros"


def test_dense_kernel_rejects_unaligned_block():
    q = jnp.zeros((1, 2, 64), jnp.bfloat16)
    k = jnp.zeros((1, 1, 40, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_size=8"):  # bf16 packs 16 rows per tile
        dense_decode_attention(q, k, k, jnp.zeros((1,), jnp.int32), scale=1.0, block_size=8,
                               interpret=True)


def test_ring_valid_is_a_prefix():
    """The sink + window kernel masks slots >= min(counts, S); that is exactly ring_valid."""
    counts = jnp.arange(0, 40, dtype=jnp.int32)
    for sink, window in ((0, 7), (3, 0), (4, 12), (5, 3)):
        prefix = jnp.arange(sink + window)[None, :] < jnp.minimum(counts, sink + window)[:, None]
        np.testing.assert_array_equal(ring_valid(counts, sink, window), prefix)


# (sink, window, group, kv heads, head dim, dtype)
SINK_CASES = [
    (4, 12, 4, 2, 64, "bf16"),
    (0, 13, 1, 2, 128, "f32"),  # ring only, odd slot count
    (5, 0, 8, 1, 64, "f32"),    # sinks only
]


@pytest.mark.parametrize("sink,window,group,kv,dim,dtype", SINK_CASES)
def test_sink_window_kernel(rng, sink, window, group, kv, dim, dtype):
    dt = DTYPES[dtype]
    slots = sink + window
    # counts: nothing seen, inside the sinks, ring partly filled, exactly full, wrapped around
    counts = jnp.asarray([0, max(sink - 1, 0), sink + window // 2 + 1, slots,
                          slots + int(rng.integers(1, 50))], jnp.int32)
    b = counts.shape[0]
    q = normal(rng, (b, kv * group, dim), dt)
    k = normal(rng, (b, kv, slots, dim), dt)
    v = normal(rng, (b, kv, slots, dim), dt)
    scale = dim ** -0.5
    out = sink_window_decode_attention(q, k, v, counts, sink=sink, window=window, scale=scale,
                                       interpret=TPU_INTERPRET, poison=True)
    expected = sink_window_decode_attention_reference(q, k, v, counts, sink, window, scale)
    assert_close(out, expected, dt, f"{rng.seed_msg} counts={counts.tolist()}")


def _headsplit_inputs(rng, full_heads, stream_heads, group, dim, dt, slots, sink, window):
    b = 3
    kv = len(full_heads) + len(stream_heads)
    q = normal(rng, (b, kv * group, dim), dt)
    parts = [None] * 6
    if full_heads:
        lengths = jnp.asarray([0, slots, int(rng.integers(1, slots))], jnp.int32)
        shape = (b, len(full_heads), slots, dim)
        parts[:3] = normal(rng, shape, dt), normal(rng, shape, dt), lengths
    if stream_heads:
        counts = jnp.asarray([0, sink + window + 9, int(rng.integers(1, sink + window))],
                             jnp.int32)
        shape = (b, len(stream_heads), sink + window, dim)
        parts[3:] = normal(rng, shape, dt), normal(rng, shape, dt), counts
    return q, parts


# (full heads, stream heads, group, head dim, dtype)
HEADSPLIT_CASES = [
    ((0, 2), (1, 3), 4, 64, "f32"),  # interleaved split
    ((), (0, 1), 7, 128, "bf16"),    # no full heads
    ((0, 1), (), 8, 128, "f32"),     # no streaming heads
]


@pytest.mark.parametrize("full_heads,stream_heads,group,dim,dtype", HEADSPLIT_CASES)
def test_headsplit_kernel(rng, full_heads, stream_heads, group, dim, dtype):
    dt = DTYPES[dtype]
    slots, sink, window = 37, 2, 9
    q, parts = _headsplit_inputs(rng, full_heads, stream_heads, group, dim, dt, slots, sink,
                                 window)
    settings = dict(full_heads=full_heads, stream_heads=stream_heads, sink=sink, window=window,
                    scale=dim ** -0.5)
    out = headsplit_decode_attention(q, *parts, **settings, block_size=16,
                                     interpret=TPU_INTERPRET, poison=True)
    expected = headsplit_decode_attention_reference(q, *parts, **settings)
    assert_close(out, expected, dt, rng.seed_msg)


def test_dispatch_interpret_matches_reference(rng):
    """kernel_mode_override("interpret") runs the Pallas kernels (a pallas_call in the trace) and
    agrees with "reference", for both dispatcher entries and through DenseCache.attend."""
    dt, dim, scale = jnp.float32, 64, 0.125
    q, parts = _headsplit_inputs(rng, (1,), (0,), 4, dim, dt, 40, 3, 5)
    settings = dict(full_heads=(1,), stream_heads=(0,), sink=3, window=5, scale=scale)
    dense = functools.partial(dispatch.dense_decode_attention, scale=scale)
    calls = {
        "dense": lambda: dense(q[:, 4:], *parts[:3]),
        "headsplit": lambda: dispatch.headsplit_decode_attention(q, *parts, **settings),
    }
    cache = DenseCache.from_prefill(parts[0][:, :, :30], parts[1][:, :, :30],
                                    jnp.asarray([0, 30, 17], jnp.int32), capacity=40)
    # a fresh jit per call: the mode is read when tracing, and a traced function is cached
    calls["DenseCache.attend"] = lambda: jax.jit(lambda c, qq: c.attend(qq, scale))(cache,
                                                                                   q[:, 4:])
    for name, call in calls.items():
        with dispatch.kernel_mode_override("interpret"):
            assert "pallas_call" in str(jax.make_jaxpr(lambda: call())()), name
            out = call()
        with dispatch.kernel_mode_override("reference"):
            assert "pallas_call" not in str(jax.make_jaxpr(lambda: call())()), name
            expected = call()
        assert_close(out, expected, dt, f"{rng.seed_msg} {name}")
