"""Decode attention over a dense cache on NVIDIA Hopper GPUs (Pallas, Mosaic GPU lowering).

The Triton lowering of Pallas is deprecated, so this kernel is written for Mosaic GPU
(`jax.experimental.pallas.mosaic_gpu`), in the style of JAX's own FlashAttention-3 kernel
(`jax/experimental/pallas/ops/gpu/attention_mgpu.py`): TMA copies into swizzled shared memory,
WGMMA on the tensor cores, an online softmax with float32 statistics in registers.

Notation: B batch, H query heads, K KV heads, G = H / K query heads per KV head, Gp = G padded to
the 64 rows of a WGMMA tile, S cache slots, D head dim, BK cache slots per block, P splits.

Work decomposition (split-K, "flash decoding"): one CTA (one warpgroup) per (sequence b, KV head
h, split p). The G query heads of KV head h form one [Gp, D] tile, so every cache block is read
once per KV head. Split p owns cache blocks [p * per_split, (p + 1) * per_split); blocks at or
past the sequence's valid length are never fetched: the CTA reads lengths[b] from global memory
and runs `plgpu.emit_pipeline` over only its valid blocks (a dynamic trip count), TMA-prefetching
`max_concurrent_steps` blocks ahead. Each split writes its normalised partial output [G, D] and
its log-sum-exp [Gp] (float32, base 2); a tiny XLA epilogue combines the P partials.

Cache lengths that are not a multiple of BK: the last block is fetched at element offset S - BK
(overlapping the previous block, never out of bounds) and slots before the block's nominal start
or at/after the sequence's length are masked, so the cache is never padded or copied (only when
S < BK, where the copy is smaller than one block).

Constraints (those of Mosaic GPU's WGMMA path, as in attention_mgpu.py): float16 / bfloat16
inputs (float32 would need TF32 WGMMA with a K-major V, which the [S, D] cache layout is not),
D a multiple of 64, G <= 64, BK a multiple of 64. `gpu_kernel_supported` says whether a call fits;
the dispatcher falls back to the XLA reference otherwise.

Interpret mode: `interpret=True` runs the kernel through Pallas' Mosaic GPU interpreter
(`InterpretGPUParams`, jax >= 0.10), which simulates shared memory, TMA and barriers on CPU and
leaves unwritten outputs NaN, so tests see every element the kernel fails to write.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -1e30  # finite: exp2(NEG_INF - m) == 0 with no inf - inf = NaN
LOG2E = math.log2(math.e)
WGMMA_ROWS = 64  # rows of one WGMMA tile (one warpgroup)
SUPPORTED_DTYPES = ("float16", "bfloat16")
H100_SMS = 132


def gpu_kernel_supported(q: jax.Array, k: jax.Array, block_kv: int = 128) -> Optional[str]:
    """None when `dense_decode_attention_gpu` handles these shapes and dtypes, else the reason.

    q: [B, H, D]; k: [B, K, S, D]."""
    b, h, d = q.shape
    kh = k.shape[1]
    if jnp.dtype(k.dtype).name not in SUPPORTED_DTYPES or q.dtype != k.dtype:
        return (f"q.dtype={q.dtype}, k.dtype={k.dtype}: the Mosaic GPU kernel needs float16 or "
                f"bfloat16 q and cache of one dtype (WGMMA)")
    if d % 64:
        return f"head_dim={d}: must be a multiple of 64 (128-byte swizzled WGMMA tiles)"
    if kh < 1 or h % kh:
        return f"num_heads={h}, num_kv_heads={kh}: num_heads must be a multiple of num_kv_heads"
    if h // kh > WGMMA_ROWS:
        return f"group size G={h // kh}: at most {WGMMA_ROWS} query heads per KV head"
    if block_kv % 64 or block_kv < 64:
        return f"block_kv={block_kv}: must be a positive multiple of 64"
    return None


def _interpret_params():
    """Pallas' Mosaic GPU interpreter (CPU simulation of SMEM, TMA, barriers), NaN-filled
    uninitialised memory so that unwritten outputs fail the tests."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:  # jax < 0.10: no GPU interpreter
        raise NotImplementedError("interpret=True needs jax >= 0.10 (Pallas' Mosaic GPU "
                                  "interpreter, InterpretGPUParams)") from e
    return InterpretGPUParams(uninitialized_memory="nan")


def default_num_splits(batch: int, kv_heads: int, num_blocks: int,
                       target_ctas: int = 2 * H100_SMS) -> int:
    """Splits of the cache axis so that B * K * P CTAs fill the GPU (about two per SM), and no
    split is empty when every sequence is full."""
    return int(max(1, min(num_blocks, -(-target_ctas // max(batch * kv_heads, 1)))))


@functools.partial(jax.jit, static_argnames=("scale", "block_kv", "num_splits",
                                             "max_concurrent_steps", "interpret"))
def dense_decode_attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                               scale: float, *, block_kv: int = 128,
                               num_splits: Optional[int] = None, max_concurrent_steps: int = 2,
                               interpret: bool = False) -> jax.Array:
    """One query token per sequence over a dense cache (Mosaic GPU kernel + XLA combine).

    q: [B, H, D]; k, v: [B, K, S, D]; lengths: [B] valid slots -> out [B, H, D] (dtype of q).
    Scores, softmax statistics and accumulation in float32. A sequence with length 0 gets zeros.
    block_kv: cache slots per block (multiple of 64); num_splits: CTAs per (sequence, KV head)
    along the cache axis (None: enough to fill an H100); max_concurrent_steps: blocks in flight
    per CTA; interpret: run in Pallas' Mosaic GPU interpreter (CPU tests).
    Shared memory per CTA: 2 * max_concurrent_steps * block_kv * D * itemsize (K and V stages)
    + 64 * D * itemsize (q) = 144 KiB at the defaults with D = 128 bf16.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    reason = gpu_kernel_supported(q, k, block_kv)
    if reason is not None:
        raise ValueError(reason)
    if k.shape != v.shape:
        raise ValueError(f"k.shape={k.shape}, v.shape={v.shape}: must be equal")
    if max_concurrent_steps < 1:
        raise ValueError(f"max_concurrent_steps={max_concurrent_steps}: must be >= 1")
    b, h, d = q.shape
    _, kh, s, _ = k.shape
    g = h // kh
    gp = WGMMA_ROWS
    if s < block_kv:  # a cache shorter than one block: pad it (copies < one block)
        pad = [(0, 0), (0, 0), (0, block_kv - s), (0, 0)]
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    s_pad = k.shape[2]
    num_blocks = -(-s_pad // block_kv)
    splits = default_num_splits(b, kh, num_blocks) if num_splits is None else int(num_splits)
    if not 1 <= splits <= num_blocks:
        raise ValueError(f"num_splits={num_splits}: must be in [1, {num_blocks}] (cache blocks)")
    per_split = -(-num_blocks // splits)
    dtype = k.dtype
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(d * itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle * 8 // (itemsize * 8))),
                  plgpu.SwizzleTransform(swizzle))
    qk_scale = float(scale) * LOG2E  # softmax in base 2: exp(x) = exp2(x * log2(e))

    qg = q.reshape(b, kh, g, d)
    qg = jnp.pad(qg, [(0, 0), (0, 0), (0, gp - g), (0, 0)])  # [B, K, Gp, D] (zero rows)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s)  # [B]
    # Register layouts are a compile-time annotation (identity on values); jax 0.10.2's Mosaic
    # GPU interpreter has no CPU rule for the `layout_cast` primitive, so it is left out there.
    if interpret:
        cast = lambda x, layout: x
        iota = lambda dt, shape, dim, layout: lax.broadcasted_iota(dt, shape, dim)
    else:
        cast = plgpu.layout_cast
        iota = lambda dt, shape, dim, layout: plgpu.broadcasted_iota(dt, shape, dim, layout=layout)

    def qk_product(q_smem, k_smem):  # [Gp, D] x [BK, D] (SMEM) -> [Gp, BK] f32
        if interpret:  # see _interpret_products
            return _interpret_products.qk(q_smem[...], k_smem[...])

        def scope(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
            return acc_ref[...]
        return pl.run_scoped(scope, plgpu.ACC((gp, block_kv), jnp.float32))

    def pv_product(p, v_smem):  # [Gp, BK] (registers, cache dtype) x [BK, D] -> [Gp, D] f32
        if interpret:
            return _interpret_products.pv(p, v_smem[...])

        # Into a fresh zero accumulator, added to the running one in registers (rather than
        # `pl.run_state(...)(plgpu.ACC.init(acc))`): same WGMMA, one register add.
        def scope(acc_ref):
            plgpu.wgmma(acc_ref, p, v_smem)
            return acc_ref[...]
        return pl.run_scoped(scope, plgpu.ACC((gp, d), jnp.float32))

    def kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        # len_ref [B] i32, q_ref [B, K, Gp, D], k_ref / v_ref [B, K, S, D]: GMEM
        # o_ref [B, K, P, G, D] f32, lse_ref [B, K, P, Gp] f32: GMEM
        bi = lax.axis_index("b")
        hi = lax.axis_index("h")
        pi = lax.axis_index("p")
        length = len_ref[bi]
        first = pi * per_split  # first block of this split
        valid_blocks = lax.div(length + (block_kv - 1), jnp.int32(block_kv))
        n = jnp.clip(valid_blocks - first, 0, per_split)  # blocks this CTA reads

        def with_q(q_smem, q_bar):
            plgpu.copy_gmem_to_smem(q_ref.at[bi, hi], q_smem, q_bar.at[0])
            plgpu.barrier_wait(q_bar.at[0])

            def body(idx, k_smem, v_smem, carry):  # k_smem, v_smem: [BK, D]
                acc, m_i, l_i = carry  # [Gp, D], [Gp], [Gp] f32
                blk = first + idx[0]
                nominal = blk * block_kv  # this block's own slots: [nominal, nominal + BK)
                start = jnp.minimum(nominal, s_pad - block_kv)  # where it was fetched from
                qk = qk_product(q_smem, k_smem)  # [Gp, BK] f32
                pos = start + iota(jnp.int32, (gp, block_kv), 1, plgpu.Layout.WGMMA)
                valid = (pos >= nominal) & (pos < length)
                sc = jnp.where(valid, qk * qk_scale, NEG_INF)  # [Gp, BK], log2 units
                m_new = jnp.maximum(m_i, sc.max(axis=1))  # [Gp]
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
                l_new = l_i * alpha + p.sum(axis=1)
                pv = pv_product(p.astype(dtype), v_smem)  # [Gp, D] f32
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
                return acc, m_new, l_new

            init = (
                cast(jnp.full((gp, d), 0.0, jnp.float32), plgpu.Layout.WGMMA),
                cast(jnp.full((gp,), NEG_INF, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
                cast(jnp.full((gp,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            )
            block = lambda i: (jnp.minimum((first + i) * block_kv, s_pad - block_kv), 0)
            spec = plgpu.BlockSpec((pl.Element(block_kv), d), block, transforms=transforms)
            return plgpu.emit_pipeline(body, grid=(n,), in_specs=[spec, spec],
                                       max_concurrent_steps=max_concurrent_steps,
                                       init_carry=init)(k_ref.at[bi, hi], v_ref.at[bi, hi])

        acc, m_i, l_i = pl.run_scoped(
            with_q, plgpu.SMEM((gp, d), dtype, transforms=transforms),
            plgpu.Barrier(num_barriers=1))
        l_safe = jnp.where(l_i > 0.0, l_i, 1.0)  # empty split: acc == 0, lse ~ NEG_INF
        out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])  # [Gp, D]
        lse = m_i + jnp.log(l_safe) * (1.0 / math.log(2.0))  # [Gp], log2 units

        def store(o_smem, lse_smem):
            o_smem[...] = out
            lse_smem[...] = lse
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, g)], o_ref.at[bi, hi, pi])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pi])
            plgpu.wait_smem_to_gmem(0)
        pl.run_scoped(store, plgpu.SMEM((gp, d), jnp.float32), plgpu.SMEM((gp,), jnp.float32))

    o, lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((b, kh, splits, g, d), jnp.float32),
                  jax.ShapeDtypeStruct((b, kh, splits, gp), jnp.float32)),
        grid=(b, kh, splits),
        grid_names=("b", "h", "p"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        interpret=_interpret_params() if interpret else None,
    )(lengths, qg, k, v)
    return combine_splits(o, lse[..., :g]).reshape(b, h, d).astype(q.dtype)


def combine_splits(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Merge per-split softmax results. o: [B, K, P, G, D] (each split normalised by its own
    denominator), lse: [B, K, P, G] base-2 log-sum-exp (NEG_INF for an empty split)
    -> [B, K, G, D] float32. All splits empty: zeros (o is zero there)."""
    mx = lse.max(axis=2, keepdims=True)  # [B, K, 1, G]
    w = jnp.exp2(lse - mx)  # [B, K, P, G]
    num = jnp.einsum("BKPG,BKPGD->BKGD", w, o)
    return num / w.sum(axis=2)[..., None]


class _interpret_products:
    """The two matrix products as plain dots, used only under interpret=True.

    jax 0.10.2's Mosaic GPU interpreter cannot run this kernel's WGMMAs: its `wgmma` callback
    reads both operands as shared-memory allocations and drops only tiling / swizzle transforms,
    so a transposed operand (`plgpu.transpose_ref(k_smem, (1, 0))`, AttributeError
    'TransposeTransform' object has no attribute 'indices') and an A operand in registers (the
    softmax probabilities P) are not supported. Interpret mode therefore loads the SMEM blocks
    and multiplies them with `lax.dot_general` (float32 accumulation, the same operand dtypes);
    everything else (TMA pipeline over the valid blocks, clamped last block, masking, online
    softmax, split-K outputs and combine) is the code the GPU runs."""

    @staticmethod
    def qk(q, k):  # [Gp, D], [BK, D] -> [Gp, BK] f32
        return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    @staticmethod
    def pv(p, v):  # [Gp, BK], [BK, D] -> [Gp, D] f32
        return lax.dot_general(p, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
