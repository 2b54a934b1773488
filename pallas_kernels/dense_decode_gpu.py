"""Decode attention over a dense cache on NVIDIA Hopper GPUs (Pallas, Mosaic GPU lowering).

The Triton lowering of Pallas is deprecated, so this kernel is written for Mosaic GPU
(`jax.experimental.pallas.mosaic_gpu`), in the style of JAX's own FlashAttention-3 kernel
(`jax/experimental/pallas/ops/gpu/attention_mgpu.py`): TMA copies into swizzled shared memory,
WGMMA on the tensor cores, an online softmax with float32 statistics in registers.

Notation: B batch, H query heads, K KV heads, G = H / K query heads per KV head, Gp = G padded to
the 64 rows of a WGMMA tile, S cache slots, D head dim, BK cache slots per block, P splits.

Work decomposition (split-K, "flash decoding"): one CTA (one warpgroup) per (sequence b, KV head
h, split p). The G query heads of KV head h form one [Gp, D] tile, so every cache block is read
once per KV head. The valid blocks of sequence b, [0, ceil(lengths[b] / BK)), are shared evenly
among the P splits (`gpu_common.split_share`); blocks at or past the valid length are never
fetched: the CTA reads lengths[b] from global memory and runs `plgpu.emit_pipeline` over only its
blocks (a dynamic trip count), TMA-prefetching `max_concurrent_steps` blocks ahead. Each split
writes its normalised partial output [G, D] and its log-sum-exp [G] (float32, base 2); a tiny XLA
epilogue combines the P partials. The kernel body is `gpu_common.segment_partials` (the "rows"
orientation), shared with the head-split and sparse kernels.

Cache lengths that are not a multiple of BK: the last block is fetched at element offset S - BK
(overlapping the previous block, never out of bounds) and slots before the block's nominal start
or at/after the sequence's length are masked, so the cache is never padded or copied (only when
S < BK, where the copy is smaller than one block). A TMA copy into swizzled shared memory needs
S and every slot offset in multiples of 8 (Mosaic GPU tiles the global array too); S % 8 == 0
copies blocks straight into the WGMMA operand buffers, any other S copies them into plain
buffers and through registers into the operand buffers (see `gpu_common.segment_partials`).

Constraints (those of Mosaic GPU's WGMMA path, as in attention_mgpu.py): float16 / bfloat16
inputs (float32 would need TF32 WGMMA with a K-major V, which the [S, D] cache layout is not),
D a multiple of 64, G <= 64, BK a multiple of 64. `gpu_kernel_supported` says whether a call fits;
the dispatcher falls back to the XLA reference otherwise.

Interpret mode: `interpret=True` runs the kernel through Pallas' Mosaic GPU interpreter
(`InterpretGPUParams`, jax >= 0.10), which simulates shared memory, TMA and barriers on CPU and
leaves unwritten outputs NaN, so tests see every element the kernel fails to write. jax 0.10.2's
interpreter cannot run this kernel's two WGMMAs (Q K^T has a transposed operand, P V an operand
in registers): interpret mode computes them as plain dots of the same operands (float32
accumulation), everything else (TMA pipeline over the valid blocks, clamped last block,
masking, online softmax, split-K outputs and combine) is the code the GPU runs; see
`gpu_common`'s docstring for the exact substitutions.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.gpu_common import (H100_SMS, LOG2E, NEG_INF, SUPPORTED_DTYPES,  # noqa: F401
                                       WGMMA_ROWS, combine_splits, default_num_splits,
                                       segment_partials)


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


def dense_decode_partials(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                          scale: float, *, block_kv: int = 128, num_splits: Optional[int] = None,
                          max_concurrent_steps: int = 2, interpret: bool = False):
    """The kernel's split partials, before the combine (for layouts that add other parts):
    q: [B, H, D]; k, v: [B, K, S, D]; lengths: [B] -> (o [B, K, P, G, D], lse [B, K, P, G]),
    both float32 (see `gpu_common.segment_partials`)."""
    reason = gpu_kernel_supported(q, k, block_kv)
    if reason is not None:
        raise ValueError(reason)
    if k.shape != v.shape:
        raise ValueError(f"k.shape={k.shape}, v.shape={v.shape}: must be equal")
    b, kh, s = k.shape[0], k.shape[1], k.shape[2]
    count = jnp.broadcast_to(jnp.clip(lengths.astype(jnp.int32), 0, s)[:, None], (b, kh))
    return segment_partials(q, k, v, jnp.zeros((b, kh), jnp.int32), count, scale,
                            block_kv=block_kv, num_splits=num_splits,
                            max_concurrent_steps=max_concurrent_steps, interpret=interpret)


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
    + 64 * D * itemsize (q) = 144 KiB at the defaults with D = 128 bf16, plus 2 * block_kv * D
    * itemsize (swizzled operand buffers, 64 KiB) when S is not a multiple of 8.
    """
    o, lse = dense_decode_partials(q, k, v, lengths, scale, block_kv=block_kv,
                                   num_splits=num_splits,
                                   max_concurrent_steps=max_concurrent_steps, interpret=interpret)
    return combine_splits(o, lse).reshape(q.shape).astype(q.dtype)

