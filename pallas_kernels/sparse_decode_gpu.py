"""Decode attention over the sparse (per-head ragged) cache of `jaxkv.cache.SparseCache` on
NVIDIA Hopper GPUs: the Mosaic GPU counterpart of `sparse_decode.sparse_decode_attention`.

Layout and reference: `pallas_kernels.sparse_decode` (`sparse_decode_attention_reference`): the
kept prompt tokens of all KV heads in one ragged slot axis k, v [B, N, D] (each head's slots
contiguous, `heads` [B, N] naming the head of each slot, K for padding), plus the decode tokens
new_k, new_v [B, K, E, D] dense per head with new_lengths [B].

Design: two launches of the split-K "rows" kernel of `gpu_common.segment_partials` (WGMMA for
Q K^T and P V, TMA-pipelined blocks, online softmax), their partials merged by one log-sum-exp
combine:
- the ragged prompt part: the wrapper turns `heads` into per-(sequence, head) segments
  [start, start + count) (`sparse_decode.segments`, a [B, N, K] integer reduction: SparseCache
  stores no offsets) and each CTA (b, h, p) reads only its share of head h's segment of the
  shared slot axis k[b], v[b]: blocks fetched at element offsets start + j * BK (TMA boxes at any
  row offset, clamped to N - BK at the end), slots of the neighbouring heads, padding and the
  overlap of a clamped block masked by position. A head's blocks are shared evenly among its P
  splits, so a head keeping few tokens costs few steps. A block straddling two heads is read once
  by each (at most one extra block per head); no slot is copied;
- the decode part: the dense kernel's partials (`dense_decode_gpu.dense_decode_partials`) over
  new_k, new_v with new_lengths (skipped when E = 0).
A head with no valid token in either part gets zeros (every split's lse is NEG_INF).

Constraints: those of the dense kernel (float16 / bfloat16 q and caches of one dtype, D a
multiple of 64, G <= 64); `sparse_gpu_supported` says whether a call fits (the dispatcher runs
the reference otherwise).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.dense_decode_gpu import dense_decode_partials, gpu_kernel_supported
from pallas_kernels.gpu_common import merge_partials, segment_partials
from pallas_kernels.sparse_decode import check_sparse_shapes, segments


def sparse_gpu_supported(q: jax.Array, k: jax.Array, new_k: jax.Array,
                         block_kv: int = 128) -> Optional[str]:
    """None when `sparse_decode_attention_gpu` handles these shapes and dtypes, else the reason.
    q: [B, H, D]; k: [B, N, D]; new_k: [B, K, E, D]."""
    if k.dtype != new_k.dtype:
        return f"k.dtype={k.dtype}, new_k.dtype={new_k.dtype}: must be equal"
    return gpu_kernel_supported(q, new_k, block_kv)


@functools.partial(jax.jit, static_argnames=("scale", "block_kv", "num_splits", "interpret"))
def sparse_decode_attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, heads: jax.Array,
                                new_k: jax.Array, new_v: jax.Array, new_lengths: jax.Array, *,
                                scale: float, block_kv: int = 128,
                                num_splits: Optional[int] = None,
                                interpret: bool = False) -> jax.Array:
    """Mosaic GPU version of `sparse_decode_attention_reference` (same shapes and result).

    q: [B, H, D]; k, v: [B, N, D] with heads [B, N] (SparseCache's layout); new_k, new_v
    [B, K, E, D] with new_lengths [B] -> [B, H, D] in q's dtype.
    block_kv: slots per block (multiple of 64); num_splits: CTAs per (sequence, KV head) for each
    part (None: enough to fill an H100; capped at each part's block count); interpret: run in
    Pallas' Mosaic GPU interpreter (CPU tests)."""
    check_sparse_shapes(q, k, v, heads, new_k, new_v, new_lengths)
    reason = sparse_gpu_supported(q, k, new_k, block_kv)
    if reason is not None:
        raise ValueError(reason)
    b, h, d = q.shape
    n = k.shape[1]
    kh, e = new_k.shape[1], new_k.shape[2]

    def splits_for(slots):
        blocks = -(-max(slots, block_kv) // block_kv)
        return None if num_splits is None else min(int(num_splits), blocks)

    parts = []
    if n:
        start, count = segments(heads, kh)  # [B, K] each
        parts.append(segment_partials(q, k, v, start, count, scale, block_kv=block_kv,
                                      num_splits=splits_for(n), max_concurrent_steps=2,
                                      interpret=interpret))
    if e:
        lengths = jnp.clip(new_lengths.astype(jnp.int32), 0, e)
        parts.append(dense_decode_partials(q, new_k, new_v, lengths, scale, block_kv=block_kv,
                                           num_splits=splits_for(e), interpret=interpret))
    return merge_partials(parts, b, h, d, q.dtype)
