"""The Mosaic GPU dense decode kernel (`pallas_kernels.dense_decode_gpu`) against the plain-jnp
reference: compiled on a CUDA backend, in Pallas' Mosaic GPU interpreter elsewhere (CPU).

The interpreter simulates shared memory, TMA copies, barriers and the emit_pipeline of the kernel,
and fills memory the kernel never writes with NaN (`uninitialized_memory="nan"`), so a partial
output or log-sum-exp that a CTA forgets to store poisons the combined result and fails the
comparison. In interpret mode the two WGMMAs are plain dots (jax 0.10.2's interpreter cannot run
a WGMMA with a transposed operand or an operand in registers; see `gpu_common`'s docstring);
everything else is the code the GPU runs. `test_gpu_kernel_lowers_for_cuda` lowers the compiled
path for CUDA on the CPU.

Every run draws fresh inputs (seed printed on failure). Cases are a small covering set: group
sizes 1, 4, 7, 8; head dims 64 and 128 with both bfloat16 and float16 (the kernel's WGMMA dtypes;
float32 is refused, see test_float32_refused); lengths 0, odd, and the full cache; cache lengths
that are not multiples of the block (the clamped, overlapping last block); slot counts that are
multiples of 8 (TMA straight into the swizzled buffers: S = 200, 40 padded to 64) and that are
not (plain buffers copied through registers: 130, 257); a cache shorter than a block; one split,
several, and the default split count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dense_decode import dense_decode_attention_reference
from pallas_kernels.dense_decode_gpu import (NEG_INF, combine_splits, default_num_splits,
                                             dense_decode_attention_gpu, gpu_kernel_supported)
from tests.helpers import normal, tolerance

ON_GPU = jax.default_backend() in ("gpu", "cuda")
INTERPRET = not ON_GPU  # one test body: compiled on a GPU, interpreted on CPU
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16}


@pytest.fixture(autouse=True)
def _reset_interpreter():
    yield
    if INTERPRET:  # required after a kernel raised in GPU interpret mode
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (
            reset_gpu_interpret_mode_state)
        reset_gpu_interpret_mode_state()


# (group G, kv heads K, head dim D, dtype, cache slots S, block, splits, batch)
CASES = [
    (1, 2, 64, "bf16", 200, 64, 2, 2),    # 4 blocks, the last clamped to S - 64 (overlap 56)
    (7, 1, 128, "bf16", 130, 64, None, 2),  # G = 7; default splits (3, one block each)
    (8, 2, 64, "f16", 40, 64, 1, 2),      # cache shorter than one block (padded to 64)
    (4, 1, 128, "f16", 257, 128, 2, 3),   # tail block of one slot; length S lands on it
]


@pytest.mark.parametrize("group,kv,dim,dtype,slots,block,splits,batch", CASES)
def test_gpu_kernel_matches_reference(rng, group, kv, dim, dtype, slots, block, splits, batch):
    dt = DTYPES[dtype]
    q = normal(rng, (batch, kv * group, dim), dt)  # [B, H, D]
    k = normal(rng, (batch, kv, slots, dim), dt)  # [B, K, S, D]
    v = normal(rng, (batch, kv, slots, dim), dt)
    odd = 2 * rng.integers(0, (slots - 1) // 2, size=batch) + 1  # odd lengths in [1, S)
    lengths = np.asarray(odd, np.int32)
    lengths[0] = 0  # empty sequence -> zeros
    if batch > 2:
        lengths[1] = slots  # full cache
    lengths = jnp.asarray(lengths)
    scale = dim ** -0.5
    out = dense_decode_attention_gpu(q, k, v, lengths, scale, block_kv=block, num_splits=splits,
                                     interpret=INTERPRET)
    ref = dense_decode_attention_reference(q, k, v, lengths, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    msg = f"{rng.seed_msg} lengths={np.asarray(lengths).tolist()}"
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               err_msg=msg, **tolerance(dt))
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0, err_msg=msg)


def test_float32_refused():
    """float32 needs TF32 WGMMA with a K-major V ([D, S]); the cache is [S, D]: refused with the
    reason, and `gpu_kernel_supported` tells the dispatcher beforehand."""
    q = jnp.zeros((1, 4, 64), jnp.float32)
    k = jnp.zeros((1, 1, 64, 64), jnp.float32)
    assert "float16 or bfloat16" in gpu_kernel_supported(q, k)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        dense_decode_attention_gpu(q, k, k, jnp.ones((1,), jnp.int32), 0.125, interpret=True)
    assert gpu_kernel_supported(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)) is None
    assert "multiple of 64" in gpu_kernel_supported(jnp.zeros((1, 4, 32), jnp.bfloat16),
                                                    jnp.zeros((1, 1, 64, 32), jnp.bfloat16))
    assert "at most 64" in gpu_kernel_supported(jnp.zeros((1, 65, 64), jnp.bfloat16),
                                                jnp.zeros((1, 1, 64, 64), jnp.bfloat16))


def test_combine_splits_by_hand():
    """Two splits of one head. Split 0 saw scores (log2 units) {1, 1}: lse = 1 + log2(2) = 2,
    normalised output 3. Split 1 saw {2}: lse = 2, output 5. Equal weights -> (3 + 5) / 2 = 4.
    An empty third split (lse NEG_INF, output 0) has weight exp2(NEG_INF - 2) = 0."""
    o = jnp.asarray([3.0, 5.0, 0.0]).reshape(1, 1, 3, 1, 1)  # [B, K, P, G, D]
    lse = jnp.asarray([2.0, 2.0, NEG_INF]).reshape(1, 1, 3, 1)  # [B, K, P, G]
    np.testing.assert_allclose(np.asarray(combine_splits(o, lse)).ravel(), [4.0])
    # every split empty (a sequence of length 0): weights 1 each, outputs 0 -> 0
    empty = combine_splits(jnp.zeros((1, 1, 2, 1, 1)), jnp.full((1, 1, 2, 1), NEG_INF))
    np.testing.assert_array_equal(np.asarray(empty), 0.0)


def test_default_num_splits():
    # batch 1 x 8 KV heads -> 264 / 8 = 33 splits to fill 132 SMs twice; never more than blocks
    assert default_num_splits(1, 8, 1024) == 33
    assert default_num_splits(1, 8, 4) == 4
    assert default_num_splits(64, 8, 1024) == 1


def test_gpu_kernel_lowers_for_cuda():
    """The kernel lowers to a Mosaic GPU custom call on a CPU-only jaxlib (cross-platform
    lowering: TMA copies, register layouts and WGMMA shapes pass Mosaic GPU's lowering rules;
    PTX generation and the GPU run are not exercised), for a slot count that is a multiple of 8
    (TMA straight into the swizzled operand buffers) and one that is not (plain buffers copied
    through registers: a tiled TMA needs the slot axis and offsets in multiples of 8)."""
    import functools
    s = jax.ShapeDtypeStruct
    for slots in (4096, 4097):
        args = (s((2, 32, 128), jnp.bfloat16), s((2, 8, slots, 128), jnp.bfloat16),
                s((2, 8, slots, 128), jnp.bfloat16), s((2,), jnp.int32))
        fn = functools.partial(dense_decode_attention_gpu, scale=0.1)
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
