"""The Mosaic GPU mixed-precision decode kernel (`pallas_kernels.mixed_decode_gpu`: RDKV's byte
arena, one code-block launch per V width plus the whole zone's dense launch) against
`mixed_decode_attention_reference`: compiled on a CUDA backend, in Pallas' Mosaic GPU interpreter
elsewhere (CPU), one test body.

Arenas come from `MixedCache.from_allocation` (the TPU kernel tests' builder, `_mixed_cache`), so
the kernel reads the real byte layout (K groups of 32 with their headers, heads sharing an arena). The interpreter fills memory the kernel never writes with
NaN, so a missing partial fails. In interpret mode the S^T = K_hat B WGMMA runs in the
interpreter; O^T += V_hat^T P^T and the whole zone's dense-kernel products are plain dots (see
`gpu_common`). Fresh random inputs every run (seed in failure messages). Cases: group sizes 4 and
7; head dims 64 and 128; bfloat16 and float16; every V width present (8- and 4-bit regions
longer than one block and one K group), some absent, a head with no record, a sequence of length 0
(zeros), one arena shared by the heads.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.mixed_decode import mixed_decode_attention_reference
from pallas_kernels.mixed_decode_gpu import mixed_decode_attention_gpu, mixed_gpu_supported
from tests.helpers import tolerance
from tests.test_kernels_quant import SOME_ABSENT, _mixed_args, _mixed_cache, _mixed_static

ON_GPU = jax.default_backend() in ("gpu", "cuda")
INTERPRET = not ON_GPU  # one test body: compiled on a GPU, interpreted on CPU
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16}
_reference = jax.jit(mixed_decode_attention_reference,
                     static_argnames=("scale", "head_capacity", "pos_bytes", "max_records"))


@pytest.fixture(autouse=True)
def _reset_interpreter():
    yield
    if INTERPRET:  # required after a kernel raised in GPU interpret mode
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (
            reset_gpu_interpret_mode_state)
        reset_gpu_interpret_mode_state()


LONG_REGIONS = [{16: 3, 8: 70, 4: 30, 2: 9}, {16: 1, 8: 2, 4: 3, 2: 5}]

# (name, G, D, dtype, lengths, records per head, K bits a channel, arena slack, pooled)
CASES = [
    ("all_widths", 4, 64, "bf16", (120, 33), LONG_REGIONS, 3, 13, False),
    ("some_absent", 7, 128, "f16", (35, 0), SOME_ABSENT, 5, 7, True),
]


@pytest.mark.parametrize("name,group,dim,dtype,lengths,counts,k_bits,slack,pooled", CASES,
                         ids=[c[0] for c in CASES])
def test_mixed_gpu_kernel_matches_reference(rng, name, group, dim, dtype, lengths, counts,
                                            k_bits, slack, pooled):
    dt = DTYPES[dtype]
    cache = _mixed_cache(rng, dim, dt, lengths, counts, k_bits, slack, pooled=pooled)
    q = jnp.asarray(rng.standard_normal((len(lengths), 2 * group, dim)), dt)
    assert mixed_gpu_supported(q, cache.whole_k, cache.whole_v) is None
    out = mixed_decode_attention_gpu(q, *_mixed_args(cache), scale=0.3, num_splits=2,
                                     interpret=INTERPRET, **_mixed_static(cache))
    ref = _reference(q, *_mixed_args(cache), scale=0.3, **_mixed_static(cache))
    msg = f"{rng.seed_msg} {name} counts={np.asarray(cache.counts).tolist()}"
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               err_msg=msg, **tolerance(dt))
    if 0 in lengths:
        np.testing.assert_array_equal(np.asarray(out[lengths.index(0)], np.float32), 0.0,
                                      err_msg=msg)


def test_mixed_gpu_lowers_for_cuda():
    """Lowers on a CPU-only jaxlib to five Mosaic GPU custom calls (16-, 8-, 4-, 2-bit regions and
    the whole zone) at a production shape (PTX generation and the GPU run are not exercised)."""
    s = jax.ShapeDtypeStruct
    b, kh, g, d, z = 2, 8, 4, 128, 161
    bf16, u8, i32 = jnp.bfloat16, jnp.uint8, jnp.int32
    fn = functools.partial(mixed_decode_attention_gpu, scale=0.1, head_capacity=40000,
                           pos_bytes=2, max_records=3000)
    args = (s((b, kh * g, d), bf16), s((b, kh * 40000), u8), s((b, kh, 4), i32),
            s((b, kh, d), u8), s((b, kh, 3), i32), s((b, kh, z, d), bf16),
            s((b, kh, z, d), bf16), s((b,), i32))
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 5


def test_mixed_dispatch_gpu_mode(rng):
    """kernel_mode "gpu" traces the Mosaic GPU kernels through MixedCache.attend for a bfloat16
    cache and the reference for a float32 one (refused by `mixed_gpu_supported`)."""
    for dt, kernel in ((jnp.bfloat16, True), (jnp.float32, False)):
        cache = _mixed_cache(rng, 64, dt, (12,), [{16: 1, 4: 2}], 2, 0)
        q = jnp.zeros((1, 2, 64), dt)
        with dispatch.kernel_mode_override("gpu"):
            text = str(jax.make_jaxpr(lambda c: c.attend(q, 0.125))(cache))
        assert ("wgmma" in text) == kernel
