"""Decode attention over a head-split cache (full KV heads + sink/window streaming heads) on
NVIDIA Hopper GPUs: the Mosaic GPU counterpart of `headsplit_decode.headsplit_decode_attention`.

Layout and reference: `pallas_kernels.headsplit_decode` (`headsplit_decode_attention_reference`).
The valid slots of a streaming head are the prefix [0, min(counts, sink + window)) of its
sink + window cache (see that module's docstring), so both parts are dense caches with
per-sequence lengths: the full heads with `full_lengths`, the streaming heads with
min(stream_counts, sink + window). Each part runs the dense Mosaic GPU kernel
(`dense_decode_gpu`, split-K over the "rows" orientation of `gpu_common.segment_partials`, WGMMA
for Q K^T and P V) on its own query heads, two launches, and the query heads are put back in
their original order (`headsplit_decode.split_heads`, shared with the TPU version). A streaming
cache shorter than one block (sink + window < block_kv) is padded to one block (a copy smaller
than one block per head).

Constraints: those of the dense kernel (`dense_decode_gpu.gpu_kernel_supported`) for each part
with heads: float16 / bfloat16 q and caches of one dtype, D a multiple of 64, G <= 64;
`headsplit_gpu_supported` says whether a call fits (the dispatcher runs the reference otherwise).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.dense_decode_gpu import dense_decode_attention_gpu, gpu_kernel_supported
from pallas_kernels.headsplit_decode import check_ring_slots, split_heads


def headsplit_gpu_supported(q: jax.Array, full_k: Optional[jax.Array],
                            stream_k: Optional[jax.Array], *, full_heads: Sequence[int],
                            stream_heads: Sequence[int], block_kv: int = 128) -> Optional[str]:
    """None when `headsplit_decode_attention_gpu` handles these shapes and dtypes, else the
    reason. q: [B, H, D]; full_k [B, Kf, S, D] or None; stream_k [B, Ks, sink + window, D] or
    None."""
    kv = len(tuple(full_heads)) + len(tuple(stream_heads))
    if kv == 0 or q.shape[1] % kv:
        return f"q has {q.shape[1]} heads: must be a multiple of the {kv} KV heads"
    g = q.shape[1] // kv
    for heads, k, name in ((full_heads, full_k, "full"), (stream_heads, stream_k, "stream")):
        if not tuple(heads):
            continue
        if k is None:
            return f"{name}_k is None but {name}_heads={tuple(heads)}"
        qq = jax.ShapeDtypeStruct((q.shape[0], g * k.shape[1], q.shape[2]), q.dtype)
        reason = gpu_kernel_supported(qq, k, block_kv)
        if reason is not None:
            return f"{name} part: {reason}"
    return None


@functools.partial(jax.jit, static_argnames=("full_heads", "stream_heads", "sink", "window",
                                             "scale", "block_kv", "num_splits", "interpret"))
def headsplit_decode_attention_gpu(
        q: jax.Array,
        full_k: Optional[jax.Array], full_v: Optional[jax.Array],
        full_lengths: Optional[jax.Array],
        stream_k: Optional[jax.Array], stream_v: Optional[jax.Array],
        stream_counts: Optional[jax.Array], *,
        full_heads: Sequence[int], stream_heads: Sequence[int], sink: int, window: int,
        scale: float, block_kv: int = 128, num_splits: Optional[int] = None,
        interpret: bool = False) -> jax.Array:
    """Mosaic GPU version of `headsplit_decode_attention_reference` (same arguments and result).

    q: [B, H, D]; full_k/v [B, Kf, S, D] + full_lengths [B] (None if no full heads); stream_k/v
    [B, Ks, sink + window, D] + stream_counts [B] tokens seen (None if no streaming heads);
    full_heads, stream_heads: static KV-head indices of each part -> [B, H, D] in q's dtype.
    block_kv, num_splits: of the dense kernel, for both parts (num_splits None: the default of
    each part; an explicit value is capped at each part's block count). interpret: run in Pallas'
    Mosaic GPU interpreter (CPU tests)."""
    full_heads, stream_heads = tuple(full_heads), tuple(stream_heads)
    reason = headsplit_gpu_supported(q, full_k, stream_k, full_heads=full_heads,
                                     stream_heads=stream_heads, block_kv=block_kv)
    if reason is not None:
        raise ValueError(reason)

    def run(qq, k, v, lengths):
        blocks = -(-max(k.shape[2], block_kv) // block_kv)
        splits = None if num_splits is None else min(int(num_splits), blocks)
        return dense_decode_attention_gpu(qq, k, v, lengths, scale, block_kv=block_kv,
                                          num_splits=splits, interpret=interpret)

    def run_stream(qq):
        check_ring_slots(stream_k.shape[2], sink, window)
        if stream_k.shape[2] == 0:
            return jnp.zeros(qq.shape, qq.dtype)
        lengths = jnp.minimum(stream_counts.astype(jnp.int32), sink + window)
        return run(qq, stream_k, stream_v, lengths)

    return split_heads(q, full_heads, stream_heads,
                        lambda qq: run(qq, full_k, full_v, full_lengths), run_stream)
