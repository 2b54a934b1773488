"""The Mosaic GPU head-split decode kernel (`pallas_kernels.headsplit_decode_gpu`: full heads +
sink/window streaming heads, each part through the dense GPU kernel) against
`headsplit_decode_attention_reference`: compiled on a CUDA backend, in Pallas' Mosaic GPU
interpreter elsewhere (CPU), one test body.

The interpreter fills memory the kernel never writes with NaN, so a missing partial fails. In
interpret mode the WGMMAs are plain dots (see `gpu_common`). Fresh random inputs every run (seed
in failure messages). Cases: group sizes 4, 8 and 1; head dims 64 and 128; bfloat16 and float16;
a full part whose slot count is not a multiple of 8 (the register-copy path) and one that is;
streaming caches of sink + window = 64 (aligned) and 38 (shorter than a block); counts of 0,
inside the sink, inside a wrapped ring, and past sink + window; all heads in one part.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.headsplit_decode import headsplit_decode_attention_reference
from pallas_kernels.headsplit_decode_gpu import (headsplit_decode_attention_gpu,
                                                 headsplit_gpu_supported)
from tests.helpers import normal, tolerance

ON_GPU = jax.default_backend() in ("gpu", "cuda")
INTERPRET = not ON_GPU  # one test body: compiled on a GPU, interpreted on CPU
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16}
_reference = jax.jit(headsplit_decode_attention_reference,
                     static_argnames=("full_heads", "stream_heads", "sink", "window", "scale"))


@pytest.fixture(autouse=True)
def _reset_interpreter():
    yield
    if INTERPRET:  # required after a kernel raised in GPU interpret mode
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (
            reset_gpu_interpret_mode_state)
        reset_gpu_interpret_mode_state()


# (group G, head dim D, dtype, full heads, stream heads, full slots S, sink, window, batch)
CASES = [
    (4, 64, "bf16", (1,), (0, 2), 130, 4, 60, 3),       # S % 8 != 0; ring of 64 slots
    (8, 128, "f16", (), (0, 1), 0, 3, 35, 2),           # streaming only, 38 slots (< a block)
    (1, 128, "bf16", (0, 1), (), 200, 0, 0, 2),         # full only, S % 8 == 0
]


@pytest.mark.parametrize("group,dim,dtype,full,stream,slots,sink,window,batch", CASES)
def test_headsplit_gpu_kernel_matches_reference(rng, group, dim, dtype, full, stream, slots,
                                                sink, window, batch):
    dt = DTYPES[dtype]
    kv = len(full) + len(stream)
    q = normal(rng, (batch, kv * group, dim), dt)  # [B, H, D]
    fk = fv = fl = sk = sv = sc = None
    if full:
        fk, fv = (normal(rng, (batch, len(full), slots, dim), dt) for _ in range(2))
        fl = 2 * rng.integers(0, (slots - 1) // 2, size=batch) + 1  # odd lengths in [1, S)
        fl[0] = 0
        fl[-1] = slots
        fl = jnp.asarray(fl, jnp.int32)
    if stream:
        ring = sink + window
        sk, sv = (normal(rng, (batch, len(stream), ring, dim), dt) for _ in range(2))
        # 0 tokens, a count inside the sink, and one far past sink + window (a wrapped ring)
        sc = jnp.asarray([0, max(sink - 1, 1), 3 * ring + 5][:batch], jnp.int32)
    args = (q, fk, fv, fl, sk, sv, sc)
    kw = dict(full_heads=full, stream_heads=stream, sink=sink, window=window, scale=dim ** -0.5)
    out = headsplit_decode_attention_gpu(*args, **kw, block_kv=64, interpret=INTERPRET)
    ref = _reference(*args, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               err_msg=rng.seed_msg, **tolerance(dt))


def test_headsplit_gpu_lowers_for_cuda():
    """Lowers to one Mosaic GPU custom call per part on a CPU-only jaxlib (the production
    sink 4 + window 256 ring has 260 slots: not a multiple of 8, the register-copy path)."""
    s = jax.ShapeDtypeStruct
    b, g, d, bf16 = 2, 4, 128, jnp.bfloat16
    fn = functools.partial(headsplit_decode_attention_gpu, full_heads=(0, 3),
                           stream_heads=(1, 2, 4, 5, 6, 7), sink=4, window=256, scale=0.1)
    args = (s((b, 8 * g, d), bf16), s((b, 2, 4096, d), bf16), s((b, 2, 4096, d), bf16),
            s((b,), jnp.int32), s((b, 6, 260, d), bf16), s((b, 6, 260, d), bf16),
            s((b,), jnp.int32))
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 2


def test_headsplit_dispatch_gpu_mode():
    """kernel_mode "gpu" traces the Mosaic GPU kernels for 16-bit caches and the reference when
    `headsplit_gpu_supported` refuses (head dim 32)."""
    for d, kernel in ((64, True), (32, False)):
        q = jnp.zeros((1, 4, d), jnp.bfloat16)
        fk = jnp.zeros((1, 1, 20, d), jnp.bfloat16)
        sk = jnp.zeros((1, 1, 6, d), jnp.bfloat16)
        heads = dict(full_heads=(0,), stream_heads=(1,))
        assert (headsplit_gpu_supported(q, fk, sk, **heads) is None) == kernel
        with dispatch.kernel_mode_override("gpu"):
            text = str(jax.make_jaxpr(lambda *a: dispatch.headsplit_decode_attention(
                *a, **heads, sink=2, window=4, scale=0.1))(
                    q, fk, fk, jnp.ones((1,), jnp.int32), sk, sk, jnp.ones((1,), jnp.int32)))
        assert ("wgmma" in text) == kernel
