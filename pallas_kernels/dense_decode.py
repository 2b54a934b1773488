"""Decode attention over a dense cache with per-sequence lengths.

Reference in plain jnp (XLA) and the Pallas TPU kernel beside it (see dispatch). The kernel's
pallas_call is shared with the sink + window kernel of `pallas_kernels.headsplit_decode`, whose
valid slots are also a prefix of the cache.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG_INF = -1e30


def dense_decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                     lengths: jax.Array, scale: float,
                                     window: int | None = None) -> jax.Array:
    """One query token per sequence.

    q: [B, H, D]; k, v: [B, K, S, D]; lengths: [B] valid slots -> out [B, H, D] (dtype of q).
    Scores and softmax in float32. A sequence with length 0 gets zeros. `window` (a sliding-window
    model, e.g. Mistral): only the last `window` valid slots are seen.
    """
    b, h, d = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, kh, h // kh, d).astype(jnp.float32)  # [B, K, G, D]
    scores = jnp.einsum("BKGD,BKSD->BKGS", qg, k.astype(jnp.float32)) * scale
    slots = jnp.arange(k.shape[2])[None, :]
    valid = slots < lengths[:, None]  # [B, S]
    if window is not None:
        valid = valid & (slots >= lengths[:, None] - window)
    scores = jnp.where(valid[:, None, None, :], scores, NEG_INF)
    m = scores.max(-1, keepdims=True)
    p = jnp.exp(scores - m) * valid[:, None, None, :]
    denom = p.sum(-1, keepdims=True)
    out = jnp.einsum("BKGS,BKSD->BKGD", p, v.astype(jnp.float32)) / jnp.maximum(denom, 1e-30)
    return out.reshape(b, h, d).astype(q.dtype)


# ---- Pallas TPU kernel ---------------------------------------------------------------------------
# Grid (B, K, n_blocks): one program per (sequence, KV head) walks the cache axis in blocks of
# `block` slots along the last, "arbitrary" axis. The G query heads of the KV head form one [G, D]
# tile, so every cache block is read from HBM once per KV head. Per-sequence lengths are scalar
# prefetched (SMEM): blocks past a sequence's length skip their compute (`pl.when`) and their
# index_map repeats the last valid block, so the pipeline issues no DMA for them. Running max m,
# denominator l and the accumulator live in VMEM as float32 for the whole walk; the output tile is
# written once, on the last block.


def _sublane_multiple(dtype) -> int:
    """Second-minor tile of a TPU VMEM array: 8 rows of 32-bit words, packed for narrow dtypes."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _valid_len(lengths_ref, b, slots: int):
    """Valid slots of sequence b, clipped to [0, slots] (the reference treats longer as full)."""
    return jnp.clip(lengths_ref[b], 0, slots)


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref, *rest, scale: float, block: int, slots: int):
    """One (b, kv head, cache block) step.

    lengths_ref: SMEM [B] int32; q_ref: [G, D]; k_ref, v_ref: [block, D]; rest = ([poison_ref,]
    o_ref [G, D], m_ref [G, 1] f32, l_ref [G, 1] f32, acc_ref [G, D] f32).
    """
    o_ref, m_ref, l_ref, acc_ref = rest[-4:]  # a poison input (aliased to o_ref) is never read
    b, i = pl.program_id(0), pl.program_id(2)
    length = _valid_len(lengths_ref, b, slots)
    start = i * block

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(start < length)
    def _step():
        q = q_ref[...]  # [G, D]
        k = k_ref[...]  # [T, D]
        # Scores in float32 (the MXU accumulates bf16 products exactly in f32).
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale  # [G, T]
        # Slots at or past the length: the tail of the last valid block, including rows past the
        # end of the cache in a partial final block (whose contents are undefined, maybe NaN).
        valid_t = start + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1) < length  # [1, T]
        valid_d = start + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0) < length  # [T, 1]
        s = jnp.where(valid_t, s, NEG_INF)
        m_prev = m_ref[...]  # [G, 1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))  # [G, 1]; finite: >=1 valid
        alpha = jnp.exp(m_prev - m_new)  # [G, 1]; 0 on the first valid block
        p = jnp.where(valid_t, jnp.exp(s - m_new), 0.0)  # [G, T]
        l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
        v = jnp.where(valid_d, v_ref[...], jnp.zeros((), v_ref.dtype))  # [T, D]; 0 * NaN guard
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)  # [G, D]
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = m_new

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        # No valid slot: acc = 0 and l = 0 -> zeros, like the reference.
        o_ref[...] = (acc_ref[...] / jnp.maximum(l_ref[...], 1e-30)).astype(o_ref.dtype)


def prefix_decode_call(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                       scale: float, block: int, interpret, poison: bool) -> jax.Array:
    """The pallas_call of the dense kernel, shared with the sink + window kernel (any cache whose
    valid slots are a per-sequence prefix).

    q: [B, H, D]; k, v: [B, K, S, D]; lengths: [B] valid slots (slot s valid iff s < lengths[b])
    -> [B, H, D]. `block` divides into S with a cdiv grid; the partial tail block is masked.
    """
    b, h, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = h // kh
    n_blocks = pl.cdiv(s, block)
    qg = q.reshape(b, kh, g, d)  # [B, K, G, D]; free (row-major split of H)

    def kv_index(bi, hi, i, lengths_ref):
        # Past the length: repeat the last valid block (same block index -> no new DMA).
        last = jnp.maximum(pl.cdiv(_valid_len(lengths_ref, bi, s), block) - 1, 0)
        return bi, hi, jnp.minimum(i, last), 0

    def head_index(bi, hi, i, lengths_ref):
        return bi, hi, 0, 0

    sq = pl.squeezed
    head_spec = pl.BlockSpec((sq, sq, g, d), head_index)  # [G, D] tile of one KV head
    kv_spec = pl.BlockSpec((sq, sq, block, d), kv_index)  # [block, D]
    in_specs = [head_spec, kv_spec, kv_spec]
    args = [lengths.astype(jnp.int32), qg, k, v]
    aliases = {}
    if poison:  # tests: the output starts as NaN, so any tile the kernel fails to write shows up
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        args.append(jnp.full(qg.shape, jnp.nan, q.dtype))
        aliases = {len(args) - 1: 0}  # operand index counts the scalar-prefetch operand too
    out = pl.pallas_call(
        functools.partial(_decode_kernel, scale=float(scale), block=block, slots=s),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kh, n_blocks),
            in_specs=in_specs,
            out_specs=head_spec,
            scratch_shapes=[pltpu.VMEM((g, 1), jnp.float32),  # running max m
                            pltpu.VMEM((g, 1), jnp.float32),  # denominator l
                            pltpu.VMEM((g, d), jnp.float32)]),  # accumulator
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        input_output_aliases=aliases,
        cost_estimate=pl.CostEstimate(  # upper bound: every slot valid
            flops=4 * b * h * s * d, transcendentals=b * h * s,
            bytes_accessed=2 * k.size * k.dtype.itemsize + 2 * q.size * q.dtype.itemsize),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*args)
    return out.reshape(b, h, d)


def check_decode_shapes(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> None:
    """ValueError unless q [B, H, D], k = v [B, K, S, D], lengths [B] and K divides H."""
    if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q [B, H, D] and "
                         f"k, v [B, K, S, D] of one shape")
    b, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"q {q.shape}, k {k.shape}: batch and head_dim must match and the "
                         f"{k.shape[1]} KV heads must divide the {h} query heads")
    if lengths.shape != (b,):
        raise ValueError(f"lengths has shape {lengths.shape}; expected ({b},)")


def dense_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                           scale: float, block_size: int = 512, interpret=False,
                           poison: bool = False) -> jax.Array:
    """Pallas TPU kernel of `dense_decode_attention_reference` (same shapes and result).

    q: [B, H, D]; k, v: [B, K, S, D]; lengths: [B] int32 -> [B, H, D] in q's dtype.
    block_size: cache slots per grid step (static); a cache shorter than it is one block, else it
      must be a multiple of the sublane tile (8 rows for 32-bit, 16 for 16-bit dtypes). S need not
      be a multiple of it: the partial last block is masked, nothing is padded.
    interpret: False (Mosaic TPU), True or a `pltpu.InterpretParams` (CPU interpret mode).
    poison: tests only; pre-fill the output with NaN (aliased) so unwritten tiles show.
    """
    check_decode_shapes(q, k, v, lengths)
    s = k.shape[2]
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: must be positive")
    if s == 0:
        return jnp.zeros(q.shape, q.dtype)
    block = min(block_size, s)
    tile = _sublane_multiple(k.dtype)
    if block < s and block % tile:
        raise ValueError(f"block_size={block_size}: must be a multiple of {tile} for "
                         f"{jnp.dtype(k.dtype).name} caches longer than one block (S={s})")
    return prefix_decode_call(q, k, v, lengths, scale=scale, block=block, interpret=interpret,
                              poison=poison)
