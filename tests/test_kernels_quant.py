"""Pallas TPU decode kernels over the quantised caches, run in interpret mode on CPU against their
plain-jnp references: `quantized_decode_attention` (KIVI-2/4, int8, SnapKV + KIVI, and per-token
K groups with zero-points) and `mixed_decode_attention` (RDKV's byte arena, with every V width
present, regions over one K group of 32 records, some absent, widths the head capacity cannot hold,
and heads sharing one arena).

Caches come from their own builders (the policies' `compress_layer`, `quantize_per_token`,
`MixedCache.from_allocation`), so the kernels read real layouts. Every run draws fresh inputs (the
seed is printed on failure); kernels run with poison=True (the output starts as NaN, so a tile the
kernel forgets to write fails). Parametrisations are small covering sets (group sizes 1, 4, 7, 8;
head dims 64 and 128 each with float32 and bfloat16; lengths 0, odd, full; slot counts that are not
multiples of the block) rather than full products: interpret mode is slow (seconds per shape).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxkv.cache import DenseCache, MixedCache, QuantizedCache
from jaxkv.cache.mixed import head_bytes_np
from jaxkv.cache.mixed_format import position_bytes
from jaxkv.cache.quant import quantize_per_token
from jaxkv.model.decoder import LayerObservation
from jaxkv.policies.kivi import KIVI, Int8, SnapKVKIVI
from pallas_kernels import dispatch
from pallas_kernels.mixed_decode import (
    mixed_decode_attention,
    mixed_decode_attention_reference,
)
from pallas_kernels.quantized_decode import (
    default_block_size,
    quantized_decode_attention,
    quantized_decode_attention_reference,
)
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("reset_tpu_interpreter")

TPU_INTERPRET = pltpu.InterpretParams()  # simulates scalar prefetch, VMEM scratch and the DMAs
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


# the references and the cache builders, jitted (one compile each instead of op-by-op dispatch)
_quant_reference = jax.jit(quantized_decode_attention_reference,
                           static_argnames=("scale", "k_bits", "v_bits", "k_group_tokens"))
_mixed_reference = jax.jit(mixed_decode_attention_reference,
                           static_argnames=("scale", "head_capacity", "pos_bytes",
                                            "max_records"))
_compress = jax.jit(lambda cache, obs, *, policy: policy.compress_layer(0, cache, obs),
                    static_argnames=("policy",))
_from_allocation = jax.jit(MixedCache.from_allocation,
                           static_argnames=("window", "arena_bytes", "head_capacity",
                                            "extra_capacity"))


def _run(jitted, *args, **static):
    """jitted(*args, **static) (keywords: static settings), compiled at XLA backend optimisation
    level 0: a kernel in interpret mode is a large XLA program whose CPU code generation is most
    of this file's run time; level 0 halves it and changes nothing that is computed."""
    compiled = jitted.lower(*args, **static).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(*args)


# ---- quantised caches ---------------------------------------------------------------------------

def _prefill(rng, b, kh, g, t, d, dtype, lengths, extra, window):
    """A prefill layer (DenseCache) and its observation: keys with channels of varied scale."""
    lengths = jnp.asarray(lengths, jnp.int32)
    k = rng.standard_normal((b, kh, t, d)) * rng.uniform(0.3, 3, (1, 1, 1, d))
    v = rng.standard_normal((b, kh, t, d))
    cache = DenseCache.from_prefill(jnp.asarray(k, dtype), jnp.asarray(v, dtype), lengths, t)
    pos = SnapKVKIVI(window=window).observation_positions(lengths, t)  # [B, W]
    queries = jnp.asarray(rng.standard_normal((b, kh * g, pos.shape[1], d)), dtype)
    obs = LayerObservation(queries=queries, query_positions=pos, lengths=lengths,
                           o_proj=jnp.zeros((kh * g * d, 8)), inv_freq=jnp.zeros(d // 2), layer=0,
                           extra_capacity=extra, scale=d ** -0.5)
    return cache, obs


def _per_token_cache(rng, b, kh, t, d, dtype, lengths, bits, group, extra):
    """K and V per token over groups of `group` channels with zero-points (k_group_tokens = 0),
    built with the cache's own `quantize_per_token`; a whole zone of `extra` decode slots."""
    k = jnp.asarray(rng.standard_normal((b, kh, t, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kh, t, d)), jnp.float32)
    kc, ks, kz = quantize_per_token(k, bits, group)
    vc, vs, vz = quantize_per_token(v, bits, group)
    whole = jnp.asarray(rng.standard_normal((b, kh, extra, d)), dtype)
    return QuantizedCache(k_codes=kc, k_scale=ks, k_zero=kz, v_codes=vc, v_scale=vs, v_zero=vz,
                          positions=None, q_lengths=jnp.asarray(lengths, jnp.int32),
                          whole_k=whole, whole_v=-whole,
                          whole_lengths=jnp.asarray(rng.integers(0, extra + 1, b), jnp.int32),
                          k_bits=bits, v_bits=bits, k_group_tokens=0)


def _quant_args(cache: QuantizedCache):
    return (cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale, cache.v_zero,
            cache.q_lengths, cache.whole_k, cache.whole_v, cache.whole_lengths)


def _quant_settings(cache: QuantizedCache, scale):
    return dict(scale=scale, k_bits=cache.k_bits, v_bits=cache.v_bits,
                k_group_tokens=cache.k_group_tokens)


# (name, policy, G, KV heads, D, dtype, prompt T, lengths, block)
QUANT_CASES = [
    # KIVI-2: K groups of 8 tokens, V groups of 8 channels (8 per token); residual 5 kept whole;
    # N = 45 quantised slots in blocks of 16 (partial tail of 13), a 0-length sequence
    ("kivi2", KIVI(bits=2, residual=5, group_size=8), 1, 2, 64, "f32", 50, (50, 0, 31), 16),
    # KIVI-4: groups of 4 tokens / 4 channels, blocks of 12 (3 groups), partial groups at the end
    ("kivi4", KIVI(bits=4, residual=3, group_size=4), 4, 2, 128, "bf16", 41, (41, 26), 12),
    # int8: symmetric, one scale per token and head, no zero-points, no whole zone (Z = 0)
    ("int8", Int8(), 7, 1, 64, "bf16", 37, (37, 20), 16),
    # SnapKV + KIVI-4: per-head kept tokens, q_lengths below N, groups of 8 -> one block
    ("snapkv_kivi4", SnapKVKIVI(budget=0.6, window=4, kernel=3, group_size=8), 8, 2, 128, "f32",
     40, (40, 19), 32),
]


@pytest.mark.parametrize("name,policy,group,kv,dim,dtype,t,lengths,block", QUANT_CASES,
                         ids=[c[0] for c in QUANT_CASES])
def test_quantized_kernel_on_policy_caches(rng, name, policy, group, kv, dim, dtype, t, lengths,
                                           block):
    dt = DTYPES[dtype]
    dense, obs = _prefill(rng, len(lengths), kv, group, t, dim, dt, lengths, extra=2, window=4)
    cache = _run(_compress, dense, obs, policy=policy)
    assert isinstance(cache, QuantizedCache)
    q = jnp.asarray(rng.standard_normal((len(lengths), kv * group, dim)), dt)
    scale = dim ** -0.5
    settings = _quant_settings(cache, scale)
    out = _run(quantized_decode_attention, q, *_quant_args(cache), **settings, block_size=block,
               whole_block_size=8, interpret=TPU_INTERPRET, poison=True)
    expected = _run(_quant_reference, q, *_quant_args(cache), **settings)
    assert_close(out, expected, dt, f"{rng.seed_msg} {name}")
    if 0 in lengths:  # nothing valid in either zone: zeros, like the reference
        assert not np.asarray(out[list(lengths).index(0)], np.float32).any()


def test_quantized_kernel_per_token_groups_with_zero_points(rng):
    """k_group_tokens = 0 with 4 channel groups and zero-points for K and V, 2-bit codes: the
    per-token K path (nc > 1) and the V group path (nv > 1); odd lengths, blocks of 8."""
    dim, group, kv, t = 64, 4, 2, 29
    cache = _per_token_cache(rng, 2, kv, t, dim, jnp.float32, (29, 11), bits=2, group=16,
                             extra=5)
    q = jnp.asarray(rng.standard_normal((2, kv * group, dim)), jnp.float32)
    settings = _quant_settings(cache, 0.2)
    out = _run(quantized_decode_attention, q, *_quant_args(cache), **settings, block_size=8,
               interpret=TPU_INTERPRET, poison=True)
    expected = _run(_quant_reference, q, *_quant_args(cache), **settings)
    assert_close(out, expected, jnp.float32, rng.seed_msg)


def test_quantized_block_size_must_hold_whole_scale_groups():
    b, kh, n, d, kg = 1, 1, 40, 64, 8
    codes = jnp.zeros((b, kh, n, d // 4), jnp.uint8)  # 2-bit KIVI layout, N = 40 slots
    k_scale = jnp.zeros((b, kh, n // kg, d), jnp.float16)  # per channel, groups of 8 tokens
    v_scale = jnp.zeros((b, kh, n, d // kg), jnp.float16)
    whole = jnp.zeros((b, kh, 2, d))
    args = (codes, k_scale, k_scale, codes, v_scale, v_scale, jnp.full((b,), n), whole, whole,
            jnp.zeros((b,), jnp.int32))
    with pytest.raises(ValueError, match="block_size=12: must be a multiple of k_group_tokens=8"):
        quantized_decode_attention(jnp.zeros((b, 2, d)), *args, scale=0.1, k_bits=2, v_bits=2,
                                   k_group_tokens=kg, block_size=12, interpret=True)
    for kg in (1, 7, 8, 32):  # whole groups, whole float16 (16 rows) and int8 (32 rows) tiles
        block = default_block_size(kg)
        assert block % kg == 0 and (block // kg) % 16 == 0 and block % 32 == 0


# ---- mixed-precision caches -------------------------------------------------------------------

def _mixed_cache(rng, dim, dtype, lengths, per_head_counts, k_bits, arena_extra, window=3,
                 extra=2, pooled=False):
    """MixedCache.from_allocation with, for head h of sequence b, per_head_counts[(b + h) % n]
    = {width: records} placed at random prompt positions, and random K widths per RoPE pair
    averaging about `k_bits` a channel. The head capacity is the largest head's section plus
    `arena_extra` bytes, the arena K of them (`pooled`: the heads' total, every head may span
    it, as with one water level per layer)."""
    b, kh, t = len(lengths), 2, max(lengths)
    bits = np.zeros((b, kh, t), np.int32)
    for bi in range(b):
        for h in range(kh):
            want = per_head_counts[(bi + h) % len(per_head_counts)]
            free = rng.permutation(max(lengths[bi] - window, 0))
            at = 0
            for w, n in want.items():
                bits[bi, h, free[at:at + n]] = w
                at += n
    pairs = rng.choice([0, 2, 4, 8], size=(b, kh, dim // 2))
    for bi in range(b):
        for h in range(kh):
            while pairs[bi, h].sum() > k_bits * dim // 2:
                pairs[bi, h, rng.choice(np.flatnonzero(pairs[bi, h]))] //= 2
    pairs[pairs == 1] = 0
    chans = np.concatenate([pairs, pairs], -1)
    used = head_bytes_np(bits, chans, dim, position_bytes(t))
    cap = int(used.max()) + arena_extra
    arena = int(used.sum(-1).max()) + arena_extra if pooled else kh * cap
    k = rng.standard_normal((b, kh, t, dim)) * rng.uniform(0.3, 3, (1, 1, 1, dim))
    v = rng.standard_normal((b, kh, t, dim))
    return _run(_from_allocation, jnp.asarray(k, dtype), jnp.asarray(v, dtype),
                jnp.asarray(lengths, jnp.int32), jnp.asarray(bits), jnp.asarray(chans),
                window=window, arena_bytes=arena, head_capacity=arena if pooled else cap,
                extra_capacity=extra)


def _mixed_args(cache: MixedCache):
    return (cache.arena, cache.counts, cache.k_channels, cache.k_counts, cache.whole_k,
            cache.whole_v, cache.whole_lengths)


def _mixed_static(cache: MixedCache):
    return dict(head_capacity=cache.head_capacity, pos_bytes=cache.pos_bytes,
                max_records=cache.max_records)


ALL_WIDTHS = [{16: 3, 8: 5, 4: 40, 2: 9}, {16: 1, 8: 2, 4: 3, 2: 70}]  # regions over 32 records
SOME_ABSENT = [{8: 5, 2: 3}, {16: 2, 4: 7}, {}, {2: 11}]  # a head with no record at all

# (name, G, D, dtype, lengths, counts per head, K bits a channel, arena slack, block, pooled)
MIXED_CASES = [
    ("all_widths", 4, 64, "f32", (100, 83), ALL_WIDTHS, 4, 13, 32, False),
    # ... and a 0-length sequence: nothing valid anywhere -> zeros; the heads share the arena
    ("some_absent", 7, 128, "bf16", (35, 0), SOME_ABSENT, 3, 7, 64, True),
    # capacity below one 16-bit record: no 16-bit view at all (M_16 = 0); every K channel pruned
    ("no_16bit_room", 8, 128, "f32", (21, 20), [{4: 1, 2: 1}, {2: 3}], 0, 0, 32, False),
]


@pytest.mark.parametrize("name,group,dim,dtype,lengths,counts,k_bits,slack,block,pooled",
                         MIXED_CASES, ids=[c[0] for c in MIXED_CASES])
def test_mixed_kernel_on_rdkv_arenas(rng, name, group, dim, dtype, lengths, counts, k_bits,
                                     slack, block, pooled):
    dt = DTYPES[dtype]
    cache = _mixed_cache(rng, dim, dt, lengths, counts, k_bits, slack, pooled=pooled)
    if name == "no_16bit_room":
        assert cache.head_capacity < cache.record_sizes()[0]
    q = jnp.asarray(rng.standard_normal((len(lengths), 2 * group, dim)), dt)
    out = _run(mixed_decode_attention, q, *_mixed_args(cache), scale=0.3, block_size=block,
               whole_block_size=4, interpret=TPU_INTERPRET, poison=True, **_mixed_static(cache))
    expected = _run(_mixed_reference, q, *_mixed_args(cache), scale=0.3, **_mixed_static(cache))
    assert_close(out, expected, dt, f"{rng.seed_msg} {name} counts={np.asarray(cache.counts).tolist()}")
    if 0 in lengths:
        assert not np.asarray(out[list(lengths).index(0)], np.float32).any()


# ---- dispatcher and TPU lowering ----------------------------------------------------------------

def test_dispatch_interpret_matches_reference(rng):
    """kernel_mode_override("interpret") runs both kernels (a pallas_call in the trace) through
    QuantizedCache.attend / MixedCache.attend and agrees with "reference" (G = 1, bfloat16)."""
    dt = jnp.bfloat16
    dense, obs = _prefill(rng, 2, 2, 1, 40, 64, dt, (40, 23), extra=2, window=4)
    quant = _run(_compress, dense, obs, policy=KIVI(bits=2, residual=4, group_size=8))
    mixed = _mixed_cache(rng, 64, dt, (40, 23), [{16: 2, 8: 3, 4: 1, 2: 4}], 2, 5)
    q = jnp.asarray(rng.standard_normal((2, 2, 64)), dt)
    for name, cache in (("QuantizedCache.attend", quant), ("MixedCache.attend", mixed)):
        def call():  # a fresh jit per call: the mode is read when tracing
            return _run(jax.jit(lambda c, qq: c.attend(qq, 0.125)), cache, q)

        with dispatch.kernel_mode_override("interpret"):
            assert "pallas_call" in str(jax.make_jaxpr(lambda c: c.attend(q, 0.125))(cache)), name
            out = call()
        with dispatch.kernel_mode_override("reference"):
            assert "pallas_call" not in str(jax.make_jaxpr(lambda c: c.attend(q, 0.125))(cache))
            expected = call()
        assert_close(out, expected, dt, f"{rng.seed_msg} {name}")


def test_kernels_lower_for_tpu():
    """Both kernels lower to a Mosaic TPU custom call at production shapes (cross-platform
    lowering on CPU: block shapes, index maps and every in-kernel op pass the Mosaic lowering
    rules; the Mosaic compiler itself runs only on a TPU)."""
    s = jax.ShapeDtypeStruct
    b, kh, g, d, n, z = 2, 2, 8, 128, 3000, 160
    bf16, f16, u8, i32 = jnp.bfloat16, jnp.float16, jnp.uint8, jnp.int32
    kivi = functools.partial(quantized_decode_attention, scale=0.1, k_bits=2, v_bits=2,
                             k_group_tokens=32, block_size=default_block_size(32),
                             whole_block_size=128)
    codes, vs = s((b, kh, n, d // 4), u8), s((b, kh, n, 4), f16)  # 2-bit codes; V groups of 32
    ks = s((b, kh, -(-n // 32), d), f16)  # K per channel over groups of 32 tokens
    args = (s((b, kh * g, d), bf16), codes, ks, ks, codes, vs, vs, s((b,), i32),
            s((b, kh, z, d), bf16), s((b, kh, z, d), bf16), s((b,), i32))
    text = jax.jit(kivi).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
    mixed = functools.partial(mixed_decode_attention, scale=0.1, head_capacity=40000,
                              pos_bytes=2, max_records=n, whole_block_size=128)
    args = (s((b, kh * g, d), bf16), s((b, 120000), u8), s((b, kh, 4), i32), s((b, kh, d), u8),
            s((b, kh, 3), i32), s((b, kh, z, d), bf16), s((b, kh, z, d), bf16), s((b,), i32))
    text = jax.jit(mixed).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
