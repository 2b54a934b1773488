"""The Mosaic GPU quantised-cache decode kernel (`pallas_kernels.quantized_decode_gpu`: KIVI 2/4
bits, int8, per-token groups) against `quantized_decode_attention_reference`: compiled on a CUDA
backend, in Pallas' Mosaic GPU interpreter elsewhere (CPU), one test body.

The interpreter fills memory the kernel never writes with NaN (`uninitialized_memory="nan"`), so
a partial a CTA forgets to store fails the comparison. What runs as on the GPU in interpret mode:
the TMA pipeline over code / scale blocks (element offsets, flat per-slot scale runs), the integer
decoding, the scale folding into the B matrices, the S^T = K_hat B WGMMAs (the interpreter's own
wgmma: both operands in shared memory, untransposed; `test_score_wgmmas_run_in_the_interpreter`
counts them), the column softmax, the split partials and their combine with the whole zone's
dense-kernel partials. What does not: the O^T += V_hat^T P^T WGMMA (a transposed operand: a plain
dot there) and the dense kernel's WGMMAs (plain dots), register layouts (annotations only), and
the speed of anything.

Fresh random inputs every run (seed in failure messages). Cases: group sizes 4, 7, 1, 8; head
dims 64 and 128; bfloat16 and float16; KIVI-2 (K groups of 32 slots, a block touching 3 scale
rows), KIVI-4 (groups of 16), symmetric int8, 2-bit per-token K and V over 4 channel groups with
zero-points; quantised lengths that are 0, odd and full; slot counts that are not multiples of
the block (a clamped, overlapping last block) and shorter than one block; whole zones that are
empty, partial and absent (Z = 0); a sequence with no valid slot at all (zeros).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache.quant import (
    quantize_per_channel,
    quantize_per_token,
    quantize_symmetric,
)
from pallas_kernels import dispatch
from pallas_kernels.quantized_decode import quantized_decode_attention_reference
from pallas_kernels.quantized_decode_gpu import (
    quantized_decode_attention_gpu,
    quantized_gpu_supported,
)
from tests.helpers import normal, tolerance

ON_GPU = jax.default_backend() in ("gpu", "cuda")
INTERPRET = not ON_GPU  # one test body: compiled on a GPU, interpreted on CPU
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16}
STATIC = ("scale", "k_bits", "v_bits", "k_group_tokens")
_reference = jax.jit(quantized_decode_attention_reference, static_argnames=STATIC)


@pytest.fixture(autouse=True)
def _reset_interpreter():
    yield
    if INTERPRET:  # required after a kernel raised in GPU interpret mode
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (
            reset_gpu_interpret_mode_state,
        )
        reset_gpu_interpret_mode_state()


@functools.partial(jax.jit, static_argnames=("kind", "bits", "group"))
def _quantise(k, v, *, kind: str, bits: int, group: int):
    """The cache's own quantisers: (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)."""
    if kind == "kivi":  # K per channel over `group` slots, V per token over `group` channels
        kc, ks, kz = quantize_per_channel(k, bits, group, jnp.ones(k.shape[:3], bool))
        vc, vs, vz = quantize_per_token(v, bits, group)
    elif kind == "int8":  # symmetric, one scale per token and head
        (kc, ks), kz = quantize_symmetric(k, 1), None
        (vc, vs), vz = quantize_symmetric(v, 1), None
    else:  # asymmetric per token over `group` channels, K and V
        kc, ks, kz = quantize_per_token(k, bits, group)
        vc, vs, vz = quantize_per_token(v, bits, group)
    return kc, ks, kz, vc, vs, vz


def _layer(rng, kind, bits, group, batch, kv, g, d, n, z, dt, q_lengths, whole_lengths):
    """(q, positional arguments, settings) of one quantised layer with a whole zone."""
    k = normal(rng, (batch, kv, n, d), jnp.float32) * jnp.asarray(
        rng.uniform(0.3, 3, (1, 1, 1, d)), jnp.float32)  # channels of varied scale
    v = normal(rng, (batch, kv, n, d), jnp.float32)
    codes = _quantise(k, v, kind=kind, bits=bits, group=group)
    whole_k, whole_v = normal(rng, (batch, kv, z, d), dt), normal(rng, (batch, kv, z, d), dt)
    q = normal(rng, (batch, kv * g, d), dt)
    args = (q, *codes, jnp.asarray(q_lengths, jnp.int32), whole_k, whole_v,
            jnp.asarray(whole_lengths, jnp.int32))
    bits = 8 if kind == "int8" else bits
    settings = dict(scale=d ** -0.5, k_bits=bits, v_bits=bits,
                    k_group_tokens=group if kind == "kivi" else 0)
    return args, settings


# (kind, bits, scale group, G, K, D, dtype, N, Z, q_lengths, whole_lengths)
CASES = [
    ("kivi", 2, 32, 4, 2, 64, "bf16", 150, 40, (0, 149, 150), (0, 17, 40)),
    ("kivi", 4, 16, 7, 1, 128, "f16", 77, 9, (77, 31), (9, 2)),
    ("int8", 8, 0, 1, 2, 128, "bf16", 100, 0, (67, 100), (0, 0)),
    ("token", 2, 16, 8, 1, 64, "f16", 45, 5, (45, 13), (3, 0)),
]


@pytest.mark.parametrize("kind,bits,group,g,kv,d,dtype,n,z,q_lengths,whole_lengths", CASES)
def test_quantized_gpu_kernel_matches_reference(rng, kind, bits, group, g, kv, d, dtype, n, z,
                                                q_lengths, whole_lengths):
    dt = DTYPES[dtype]
    args, settings = _layer(rng, kind, bits, group, len(q_lengths), kv, g, d, n, z, dt,
                            q_lengths, whole_lengths)
    assert quantized_gpu_supported(args[0], args[1], args[2], args[4], args[5], args[8],
                                   k_bits=settings["k_bits"], v_bits=settings["v_bits"],
                                   k_group_tokens=settings["k_group_tokens"]) is None
    out = quantized_decode_attention_gpu(*args, **settings, num_splits=2, interpret=INTERPRET)
    ref = _reference(*args, **settings)
    msg = f"{rng.seed_msg} {kind}-{bits}"
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               err_msg=msg, **tolerance(dt))
    if q_lengths[0] == 0 and whole_lengths[0] == 0:  # nothing valid: zeros
        np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0, err_msg=msg)


@pytest.mark.skipif(ON_GPU, reason="counts the GPU interpreter's wgmma callbacks")
def test_score_wgmmas_run_in_the_interpreter(rng, monkeypatch):
    """The S^T = K_hat B_j products are real WGMMAs in interpret mode: the interpreter's wgmma
    callback runs once per (valid block, K scale row it can touch, bf16 part of B_j: hi and lo),
    [64, D] x [D, 16] each."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    calls = []
    original = gpu_callbacks.wgmma

    def counting(**kw):
        calls.append(1)
        return original(**kw)
    monkeypatch.setattr(gpu_callbacks, "wgmma", counting)
    # a shape used nowhere else in this session: the kernel is traced with the counter in place
    args, settings = _layer(rng, "kivi", 2, 32, 1, 1, 2, 64, 130, 0, jnp.bfloat16, (130,), (0,))
    out = quantized_decode_attention_gpu(*args, **settings, num_splits=2, interpret=True)
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(_reference(*args, **settings), np.float32),
                               err_msg=rng.seed_msg, **tolerance(jnp.bfloat16))
    blocks, rows_per_block, parts = 3, 3, 2  # 130 slots in blocks of 64; rows of 32 slots
    assert len(calls) == blocks * rows_per_block * parts


def test_quantized_gpu_lowers_for_cuda():
    """Every code path lowers to Mosaic GPU custom calls on a CPU-only jaxlib (block specs, TMA
    copies, register layouts and WGMMA shapes pass Mosaic GPU's lowering; PTX generation and the
    GPU run are not exercised): the quantised zone's launch plus the whole zone's."""
    s = jax.ShapeDtypeStruct
    b, kh, g, d, n, z = 2, 8, 4, 128, 3001, 161  # odd slot counts
    bf16, f16, u8, i8, i32 = jnp.bfloat16, jnp.float16, jnp.uint8, jnp.int8, jnp.int32
    q, whole, lens = s((b, kh * g, d), bf16), s((b, kh, z, d), bf16), s((b,), i32)
    layouts = {
        "kivi2": (s((b, kh, n, d // 4), u8), s((b, kh, -(-n // 32), d), f16), True,
                  s((b, kh, n, 4), f16), 2, 32),
        "kivi4": (s((b, kh, n, d // 2), u8), s((b, kh, -(-n // 32), d), f16), True,
                  s((b, kh, n, 4), f16), 4, 32),
        "int8": (s((b, kh, n, d), i8), s((b, kh, n, 1), f16), False, s((b, kh, n, 1), f16), 8, 0),
        "token2": (s((b, kh, n, d // 4), u8), s((b, kh, n, 4), f16), True, s((b, kh, n, 4), f16),
                   2, 0),
    }
    for name, (codes, ks, zero, vs, bits, kg) in layouts.items():
        fn = functools.partial(quantized_decode_attention_gpu, scale=0.1, k_bits=bits,
                               v_bits=bits, k_group_tokens=kg)
        args = (q, codes, ks, ks if zero else None, codes, vs, vs if zero else None, lens, whole,
                whole, lens)
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("stablehlo.custom_call @mosaic_gpu") == 2, name


def test_quantized_dispatch_gpu_mode(rng):
    """kernel_mode "gpu" traces the Mosaic GPU kernel for a bfloat16 KIVI layer and the reference
    for a float32 one (refused by `quantized_gpu_supported`)."""
    for dt, kernel in ((jnp.bfloat16, True), (jnp.float32, False)):
        args, settings = _layer(rng, "kivi", 2, 32, 1, 1, 4, 64, 40, 3, dt, (40,), (1,))
        with dispatch.kernel_mode_override("gpu"):
            text = str(jax.make_jaxpr(lambda *a: dispatch.quantized_decode_attention(
                *a, **settings))(*args))
        assert ("wgmma" in text) == kernel
