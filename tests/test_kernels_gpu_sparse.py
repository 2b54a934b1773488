"""The Mosaic GPU sparse (per-head ragged) decode kernel (`pallas_kernels.sparse_decode_gpu`)
against `sparse_decode_attention_reference`: compiled on a CUDA backend, in Pallas' Mosaic GPU
interpreter elsewhere (CPU), one test body.

The interpreter simulates shared memory, TMA, barriers and the pipeline, and fills memory the
kernel never writes with NaN (`uninitialized_memory="nan"`), so a partial output or log-sum-exp
a CTA forgets to store poisons the result. In interpret mode the Q K^T and P V WGMMAs are plain
dots (see `gpu_common`); the TMA misalignment rule the interpreter does not model (slot offsets
of a tiled copy must be multiples of 8) is covered by running both of `segment_partials`' paths:
an aligned slot axis (N % 8 == 0: blocks on BK boundaries, segments starting mid-block) and an
unaligned one (copied through registers), and by the CUDA lowering check.

Fresh random inputs every run (seed in failure messages). Cases: group sizes 1, 7, 8; head dims
64 and 128; bfloat16 and float16; per-head counts that are odd, zero, or the whole prompt part;
with and without the decode part; a prompt part shorter than one block; a sequence with no valid
token at all (zeros).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.sparse_decode import sparse_decode_attention_reference
from pallas_kernels.sparse_decode_gpu import sparse_decode_attention_gpu, sparse_gpu_supported
from tests.helpers import normal, tolerance

ON_GPU = jax.default_backend() in ("gpu", "cuda")
INTERPRET = not ON_GPU  # one test body: compiled on a GPU, interpreted on CPU
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16}
_reference = jax.jit(sparse_decode_attention_reference, static_argnames=("scale",))


@pytest.fixture(autouse=True)
def _reset_interpreter():
    yield
    if INTERPRET:  # required after a kernel raised in GPU interpret mode
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (
            reset_gpu_interpret_mode_state)
        reset_gpu_interpret_mode_state()


def ragged_heads(rng, batch: int, kv: int, n: int, empty_sequence: bool):
    """heads [B, N] int32 in SparseCache's layout: random per-head counts (one head empty, one
    sequence's heads taking all N slots), heads ascending, padding (= K) at the end."""
    heads = np.full((batch, n), kv, np.int32)
    counts = np.zeros((batch, kv), np.int64)
    for b in range(batch):
        if empty_sequence and b == 0:
            continue
        cuts = np.sort(rng.integers(0, n + 1, kv - 1)) if b % 2 else np.sort(
            rng.integers(0, n // 2, kv - 1))
        bounds = np.concatenate([[0], cuts, [n if b % 2 else rng.integers(n // 2, n)]])
        counts[b] = np.diff(bounds)
        counts[b, rng.integers(kv)] = 0  # a head that kept nothing
        at = 0
        for h in range(kv):
            heads[b, at:at + counts[b, h]] = h
            at += counts[b, h]
    return jnp.asarray(heads), counts


# (group G, kv heads K, head dim D, dtype, prompt slots N, decode slots E, splits, batch)
CASES = [
    (1, 3, 64, "bf16", 152, 70, 2, 2),     # N % 8 == 0: the aligned path; odd decode lengths
    (7, 2, 128, "f16", 99, 0, None, 2),    # unaligned path (copied through registers); no E
    (8, 2, 64, "bf16", 40, 5, 1, 2),       # N, E shorter than a block; sequence 0 all empty
]


@pytest.mark.parametrize("group,kv,dim,dtype,n,e,splits,batch", CASES)
def test_sparse_gpu_kernel_matches_reference(rng, group, kv, dim, dtype, n, e, splits, batch):
    dt = DTYPES[dtype]
    empty = n == 40
    heads, counts = ragged_heads(rng, batch, kv, n, empty_sequence=empty)
    q = normal(rng, (batch, kv * group, dim), dt)  # [B, H, D]
    k, v = normal(rng, (batch, n, dim), dt), normal(rng, (batch, n, dim), dt)  # [B, N, D]
    new_k, new_v = (normal(rng, (batch, kv, e, dim), dt) for _ in range(2))  # [B, K, E, D]
    new_lengths = 2 * rng.integers(0, max(e, 1) // 2 + 1, size=batch) + 1
    new_lengths = np.minimum(new_lengths, e).astype(np.int32)
    if empty:
        new_lengths[0] = 0
    args = (q, k, v, heads, new_k, new_v, jnp.asarray(new_lengths))
    scale = dim ** -0.5
    out = sparse_decode_attention_gpu(*args, scale=scale, block_kv=64, num_splits=splits,
                                      interpret=INTERPRET)
    ref = _reference(*args, scale=scale)
    msg = f"{rng.seed_msg} counts={counts.tolist()} new_lengths={new_lengths.tolist()}"
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               err_msg=msg, **tolerance(dt))
    if empty:
        np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0, err_msg=msg)


def test_sparse_gpu_lowers_for_cuda():
    """Both paths lower to Mosaic GPU custom calls on a CPU-only jaxlib (cross-platform lowering:
    block specs, TMA copies, register layouts and WGMMA shapes pass Mosaic GPU's lowering; PTX
    generation and the GPU run are not exercised): one launch per part."""
    s = jax.ShapeDtypeStruct
    b, kh, g, d = 2, 8, 4, 128
    for n, dt in ((4096, jnp.bfloat16), (4099, jnp.float16)):  # aligned and unaligned N
        args = (s((b, kh * g, d), dt), s((b, n, d), dt), s((b, n, d), dt), s((b, n), jnp.int32),
                s((b, kh, 64, d), dt), s((b, kh, 64, d), dt), s((b,), jnp.int32))
        fn = functools.partial(sparse_decode_attention_gpu, scale=0.1)
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("stablehlo.custom_call @mosaic_gpu") == 2


def test_sparse_dispatch_gpu_mode():
    """kernel_mode "gpu" traces the Mosaic GPU kernel (WGMMA in the jaxpr) for 16-bit caches and
    the reference for float32 ones (refused by `sparse_gpu_supported`)."""
    for dt, kernel in ((jnp.bfloat16, True), (jnp.float32, False)):
        q = jnp.zeros((1, 4, 64), dt)
        k = jnp.zeros((1, 30, 64), dt)
        nk = jnp.zeros((1, 2, 3, 64), dt)
        heads = jnp.zeros((1, 30), jnp.int32)
        assert (sparse_gpu_supported(q, k, nk) is None) == kernel
        with dispatch.kernel_mode_override("gpu"):
            text = str(jax.make_jaxpr(lambda *a: dispatch.sparse_decode_attention(
                *a, scale=0.1))(q, k, k, heads, nk, nk, jnp.ones((1,), jnp.int32)))
        assert ("wgmma" in text) == kernel
