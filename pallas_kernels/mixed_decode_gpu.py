"""Decode attention over the mixed-precision cache of `jaxkv.cache.MixedCache` (RDKV) on NVIDIA
Hopper GPUs: the Mosaic GPU counterpart of `mixed_decode.mixed_decode_attention`.

Layout: `jaxkv.cache.mixed_format` (one byte arena per sequence, the heads' sections one after the
other: V records grouped by bit width 16, 8, 4, 2, then their K rows in groups of 32 with float16
headers); reference: `mixed_decode.mixed_decode_attention_reference`.

Design: each V-width region is, once cut into views, a KIVI-like quantised zone: K codes per
channel with scales and zero-points per channel over groups of 32 records, V per token. So each
region present runs the code-block kernel `quantized_decode_gpu.codes_partials` in its "channel"
mode (the K scale rows of a block fold into the query on the query side, hi + lo cache-dtype
parts, as for KIVI; S^T = K_hat B on WGMMA, softmax along the slots, O^T += V_hat^T P^T), one
dense-kernel launch covers the whole zone, and one log-sum-exp combine merges all their split
partials. Each width's partials come out in that width's V channel order (sub-block order of its
packed codes) and are put back in natural order before the combine.

What runs in the wrapper (XLA), and why: the cut of the arena into per-width views,
`jaxkv.cache.mixed_format.mixed_views` (the reference's own, as in the TPU kernel). A region
starts at a data-dependent byte offset, its records are `v_record_bytes(w)` bytes (e.g. 22, not a
multiple of 16) and a K row's width and a K group header's size are data-dependent per head: a
TMA box needs an innermost extent of a multiple of 16 bytes and a 16-byte aligned row pitch, and
reading fields back out of a byte run needs strided per-field register loads that the Mosaic GPU
lowering of jax 0.10.2 rejects for vectorised layouts ("Vectorized dimension should not require
further tiling and have a stride of 1"). The views come out as fields: K codes uint8 [M, D] in
channel order (one byte a code: the 8-bit path of the code-block kernel), K group scales and
zero-points float16 [M / 32, D], the V codes [M, D * w / 8] (or the 16-bit record's values [M, D]
in the cache dtype) and the V scale and zero-point decoded from their float16 bytes to float32
[M]. Cost: an HBM pass over ~4 C bytes of V windows per head per call plus M D bytes of K codes
per width.

Constraints (`mixed_gpu_supported`): float16 / bfloat16 q and cache of one dtype (16-bit records
hold that dtype), D a multiple of 64, G <= 64, shared memory within 200 KiB; the dispatcher runs
the reference otherwise.

Interpret mode: as `quantized_decode_gpu` (the S^T WGMMA runs in the interpreter; the V_hat^T P^T
WGMMA is a plain dot there).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxkv.cache.mixed_format import (GROUP, VMETA_BYTES, WIDTHS, bytes_to, mixed_views,
                                     tier16_dtype)
from pallas_kernels.dense_decode_gpu import gpu_kernel_supported
from pallas_kernels.gpu_common import (WGMMA_ROWS, check_16bit, column_group_pad,
                                       default_num_splits, merge_partials, unpermute_partials)
from pallas_kernels.mixed_decode import _check_args
from pallas_kernels.quantized_decode_gpu import (BLOCK, SMEM_LIMIT, CodePlan, _k_scale_rows,
                                                 _prepare_k, codes_partials, codes_smem_bytes,
                                                 sub_order, whole_zone_partials)

B_PARTS = 2  # K scale rows folded into the query as hi + lo parts in the cache dtype


def mixed_gpu_supported(q: jax.Array, whole_k: jax.Array, whole_v: jax.Array) -> Optional[str]:
    """None when `mixed_decode_attention_gpu` handles these shapes and dtypes, else the reason.
    q: [B, H, D]; whole_k, whole_v: [B, K, Z, D] (the cache dtype, also the 16-bit records')."""
    reason = check_16bit("q", q.dtype) or gpu_kernel_supported(q, whole_k)
    if reason:
        return reason
    if whole_v.dtype != q.dtype or tier16_dtype(whole_v.dtype) != q.dtype:
        return (f"whole_v.dtype={whole_v.dtype}, q.dtype={q.dtype}: 16-bit records must hold "
                f"q's dtype")
    g, d = q.shape[1] // whole_k.shape[1], q.shape[2]
    if g > WGMMA_ROWS:
        return f"group size G={g}: at most {WGMMA_ROWS}"
    smem = codes_smem_bytes(g, d, d, d, B_PARTS, d, 0, jnp.dtype(q.dtype).itemsize)
    if smem > SMEM_LIMIT:
        return (f"head_dim={d}, G={g}: the code-block operands need ~{smem >> 10} KiB of shared "
                f"memory (at most {SMEM_LIMIT >> 10})")
    return None


@functools.partial(jax.jit, static_argnames=("scale", "head_capacity", "pos_bytes",
                                             "max_records", "num_splits", "interpret"))
def mixed_decode_attention_gpu(q: jax.Array, arena: jax.Array, counts: jax.Array,
                               k_channels: jax.Array, k_counts: jax.Array, whole_k: jax.Array,
                               whole_v: jax.Array, whole_lengths: jax.Array, *, scale: float,
                               head_capacity: int, pos_bytes: int, max_records: int,
                               num_splits: Optional[int] = None,
                               interpret: bool = False) -> jax.Array:
    """Mosaic GPU version of `mixed_decode_attention_reference` (same arguments and result).

    q: [B, H, D] -> [B, H, D] in q's dtype; layout: `jaxkv.cache.mixed_format`.
    num_splits: CTAs per (sequence, KV head) for each region and the whole zone (None: enough to
    fill an H100; capped at each part's block count). interpret: run in Pallas' Mosaic GPU
    interpreter (CPU tests)."""
    reason = mixed_gpu_supported(q, whole_k, whole_v)
    if reason is not None:
        raise ValueError(reason)
    _check_args(q, arena, counts, k_channels, k_counts, whole_k, whole_v, whole_lengths,
                head_capacity, pos_bytes, max_records)
    b, h, d = q.shape
    kh, z = whole_k.shape[1], whole_k.shape[2]
    g = h // kh
    dtype = q.dtype
    gq = column_group_pad(g)
    qg = q.reshape(b, kh, g, d).astype(jnp.float32)

    parts = []
    views = mixed_views(arena, counts, k_channels, k_counts, head_dim=d, pos_bytes=pos_bytes,
                        head_capacity=head_capacity, max_records=max_records)
    for ci, w in enumerate(WIDTHS):
        if w not in views:
            continue
        view = views[w]
        m = view.rows.shape[2]  # a multiple of GROUP
        m_pad = max(m, BLOCK)

        def pad_rows(x, n=m_pad):
            return jnp.pad(x, [(0, 0), (0, 0), (0, n - x.shape[2])] + [(0, 0)] * (x.ndim - 3))

        rows = pad_rows(view.rows)  # [B, K, M_pad, rec]
        inputs = {"count": jnp.clip(counts[..., ci].astype(jnp.int32), 0, m)}  # [B, K]
        inputs.update(_prepare_k(qg, view.k_scale, view.k_zero, m_pad, 1, GROUP, gq, dtype))
        inputs["k_codes"] = pad_rows(view.k_codes)  # [B, K, M_pad, D] uint8, channel order
        o = pos_bytes  # first V byte of a record
        if w == 16:
            inputs["v"] = bytes_to(rows[..., o:], dtype, d)  # [B, K, M_pad, D] cache dtype
            per, channels = 1, None
        else:
            meta = bytes_to(rows[..., o:o + VMETA_BYTES], jnp.float16, 2).astype(jnp.float32)
            inputs["v_codes"] = rows[..., o + VMETA_BYTES:o + VMETA_BYTES + d * w // 8]
            inputs["v_scale"], inputs["v_zero"] = meta[..., 0], meta[..., 1]  # [B, K, M_pad]
            per = 8 // w
            channels = sub_order(d // per, per)
        blocks = -(-m_pad // BLOCK)
        splits = default_num_splits(b, kh, blocks) if num_splits is None else \
            min(int(num_splits), blocks)
        plan = CodePlan(
            g=g, d=d, n=m_pad, dtype=jnp.dtype(dtype).name, k_width=d, k_signed=False,
            k_subs=((0, 8),), k_mode="channel", kg=GROUP, k_rows=_k_scale_rows(GROUP), nb=1,
            k_token_scale=False, has_kz=True, k_bias=False, v_raw=w == 16,
            v_width=d * w // 8 if w != 16 else 0, v_signed=False,
            v_subs=tuple((s * w, w) for s in range(per)) if w != 16 else (), nv=1,
            has_vz=w != 16, b_parts=B_PARTS, splits=splits, scale=float(scale))
        oo, lse = codes_partials(plan, inputs, interpret=interpret)
        parts.append(unpermute_partials(oo, lse, g, channels))
    if z:
        parts.append(whole_zone_partials(q, whole_k, whole_v, whole_lengths, scale,
                                         num_splits=num_splits, interpret=interpret))
    return merge_partials(parts, b, h, d, dtype)
