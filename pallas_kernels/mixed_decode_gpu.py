"""Decode attention over the mixed-precision cache of `jaxkv.cache.MixedCache` (RDKV) on NVIDIA
Hopper GPUs: the Mosaic GPU counterpart of `mixed_decode.mixed_decode_attention`.

Layout and reference: `pallas_kernels.mixed_decode` (`mixed_decode_attention_reference`): one
byte arena per (sequence, KV head) of token records grouped by V bit width (16, 8, 4, 2), per-head
K channel ranks / widths / scales, and a whole zone in the cache dtype.

Design: one launch of the code-block kernel `quantized_decode_gpu.codes_partials` per V width
present in the arena (the "columns" orientation of `gpu_common`: S^T = K_hat B, softmax along the
slots, O^T += V_hat^T P^T, all on WGMMA), one dense-kernel launch over the whole zone, and one
log-sum-exp combine of all their split partials. Each width's partials come out in that width's
V channel order (sub-block order of its packed codes) and are put back in natural order before
the combine, so regions of different widths never share an accumulator.

What runs in the wrapper (XLA), and why:
  - the cut of the arena into per-width row views, `jaxkv.cache.mixed_format.region_views` (the
    reference's own gather, as in the TPU kernel): a region starts at a data-dependent byte
    offset and its records are `record_bytes(w)` bytes (e.g. 104), not a multiple of 16. A TMA
    box needs an innermost extent of a multiple of 16 bytes and a 16-byte aligned row pitch, so
    a [rows, record] box cannot be cut from the flat arena; a 1-D byte run could be fetched, but
    reading its fields back as a [rows, record_bytes] view needs a reshape of shared memory to a
    non-16-byte-aligned row pitch and then strided per-field register loads, which the Mosaic GPU
    lowering of jax 0.10.2 rejects for vectorised layouts ("Vectorized dimension should not
    require further tiling and have a stride of 1"). The views are then split into fields in the
    same XLA pass: the K row bytes [M, R] (padded to R16 = R rounded up to 16 bytes, the TMA
    minimum), the V codes [M, D * w / 8] (or the 16-bit record's values [M, D] in the cache
    dtype), and the V scale and zero-point decoded from their float16 bytes to float32 [M].
    Cost: about 4 P bytes read and written per head per call (one window of P bytes per width),
    as in the TPU kernel;
  - the query side of K, once per call and head ([G, D] work): q in rank order, the rank-order
    K scales and zero-points folded into it, and the coefficient rows of the seven K sub-blocks
    (8-bit, 4-bit x 2 shifts, 2-bit x 4 shifts of the K row bytes, `mixed_decode.K_SUBS`) as one
    B matrix [7 * R16, Gq] in the cache dtype, plus the zero-point term q . z [Gq] (float32) added
    to every score.
In the kernel: the K row bytes of a block are unpacked (shift, mask: seven column slabs of
K_hat [BK, 7 * R16], small integers exact in bf16 / f16) and S^T = K_hat B is one WGMMA; the V
codes are decoded with the record's scale and zero-point (V_hat = code * s + z, in V's
sub-block order), or taken as they are for 16-bit records (transposed straight from the
pipeline's swizzled shared-memory stage); O^T += V_hat^T P^T on WGMMA.

Constraints (`mixed_gpu_supported`): float16 / bfloat16 q and cache of one dtype (16-bit records
hold that dtype), D a multiple of 64, G <= 64, and shared memory for K_hat [64, 7 * R16] plus the
two parts of B [7 * R16, Gq] within 200 KiB (RDKV's 4-bit K rows, R = D / 2, fit up to G = 32 at
D = 128; 8-bit K rows, R = D = 128, do not); the dispatcher runs the reference otherwise.

Interpret mode: as `quantized_decode_gpu` (the S^T WGMMA runs in the interpreter; the V_hat^T P^T
WGMMA is a plain dot there).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxkv.cache.mixed_format import (META_BYTES, VMETA_BYTES, WIDTHS, bytes_to, k_view_ranks,
                                     region_views)
from pallas_kernels.dense_decode_gpu import gpu_kernel_supported
from pallas_kernels.gpu_common import (WGMMA_ROWS, check_16bit, column_group_pad,
                                       default_num_splits, merge_partials, split_16bit,
                                       unpermute_partials)
from pallas_kernels.mixed_decode import K_SUBS
from pallas_kernels.quantized_decode_gpu import (BLOCK, SMEM_LIMIT, CodePlan, codes_partials,
                                                 codes_smem_bytes, sub_order,
                                                 whole_zone_partials)

ROW_ALIGN = 16  # bytes: the TMA minimum innermost extent
B_PARTS = 2  # the coefficient matrix as hi + lo parts in the cache dtype (`split_16bit`)


def _row_bytes(k_row_bytes: int) -> int:
    """K row bytes as fetched: rounded up to the TMA minimum (at least one 16-byte run)."""
    return max(ROW_ALIGN, -(-int(k_row_bytes) // ROW_ALIGN) * ROW_ALIGN)


def mixed_gpu_supported(q: jax.Array, whole_k: jax.Array, whole_v: jax.Array,
                        k_row_bytes: int) -> Optional[str]:
    """None when `mixed_decode_attention_gpu` handles these shapes and dtypes, else the reason.
    q: [B, H, D]; whole_k, whole_v: [B, K, Z, D] (their dtype is the 16-bit records' dtype)."""
    reason = check_16bit("q", q.dtype) or gpu_kernel_supported(q, whole_k)
    if reason:
        return reason
    if whole_v.dtype != q.dtype:
        return (f"whole_v.dtype={whole_v.dtype}, q.dtype={q.dtype}: 16-bit records must hold "
                f"q's dtype")
    g, d = q.shape[1] // whole_k.shape[1], q.shape[2]
    if g > WGMMA_ROWS:
        return f"group size G={g}: at most {WGMMA_ROWS}"
    rp = _row_bytes(k_row_bytes)
    smem = codes_smem_bytes(g, d, len(K_SUBS) * rp, len(K_SUBS) * rp, B_PARTS, rp, 0,
                            jnp.dtype(q.dtype).itemsize)
    if smem > SMEM_LIMIT:
        return (f"k_row_bytes={k_row_bytes}, G={g}: the K sub-block operands need ~{smem >> 10} "
                f"KiB of shared memory (at most {SMEM_LIMIT >> 10})")
    return None


def _k_side(q, k_channels, k_counts, k_scale, k_zero, k_row_bytes: int, rp: int, gq: int):
    """(bmat [B, K, 7 * rp, Gq] float32, bias [B, K, Gq] float32): the coefficient rows of the
    seven K sub-blocks of the K row bytes (slab order of K_SUBS) and the zero-point term."""
    b, kh, g, d = q.shape
    chan = k_channels.astype(jnp.int32)  # [B, K, D]
    q_rank = jnp.take_along_axis(q, chan[:, :, None, :], axis=3)  # [B, K, G, D]
    n_stored = k_counts.astype(jnp.int32).sum(-1, keepdims=True)  # [B, K, 1]
    stored = jnp.arange(d)[None, None, :] < n_stored  # [B, K, D]
    q_s = q_rank * jnp.where(stored, k_scale.astype(jnp.float32), 0.0)[:, :, None, :]
    zp = jnp.einsum("BKGD,BKD->BKG", q_rank,
                    jnp.where(stored, k_zero.astype(jnp.float32), 0.0))  # [B, K, G]
    coef = {}
    for w, (rank, valid) in k_view_ranks(k_counts, k_row_bytes).items():  # [B, K, J_w]
        c = jnp.take_along_axis(q_s, rank[:, :, None, :], axis=3)  # [B, K, G, J_w]
        coef[w] = jnp.where(valid[:, :, None, :], c, 0.0)
    pad = [(0, 0)] * 3
    slabs = [jnp.pad(coef[w][..., s::8 // w], pad + [(0, rp - k_row_bytes)])  # [B, K, G, rp]
             for w, s in K_SUBS]
    bm = jnp.concatenate(slabs, axis=-1)  # [B, K, G, 7 rp]
    bmat = jnp.pad(jnp.swapaxes(bm, 2, 3), pad + [(0, gq - g)])
    return bmat, jnp.pad(zp, [(0, 0), (0, 0), (0, gq - g)])


@functools.partial(jax.jit, static_argnames=("scale", "k_row_bytes", "num_splits", "interpret"))
def mixed_decode_attention_gpu(q: jax.Array, arena: jax.Array, counts: jax.Array,
                               k_channels: jax.Array, k_counts: jax.Array, k_scale: jax.Array,
                               k_zero: jax.Array, whole_k: jax.Array, whole_v: jax.Array,
                               whole_lengths: jax.Array, *, scale: float, k_row_bytes: int,
                               num_splits: Optional[int] = None,
                               interpret: bool = False) -> jax.Array:
    """Mosaic GPU version of `mixed_decode_attention_reference` (same arguments and result).

    q: [B, H, D] -> [B, H, D] in q's dtype; layout: `pallas_kernels.mixed_decode`.
    num_splits: CTAs per (sequence, KV head) for each region and the whole zone (None: enough to
    fill an H100; capped at each part's block count). interpret: run in Pallas' Mosaic GPU
    interpreter (CPU tests)."""
    reason = mixed_gpu_supported(q, whole_k, whole_v, k_row_bytes)
    if reason is not None:
        raise ValueError(reason)
    b, h, d = q.shape
    kh, z = whole_k.shape[1], whole_k.shape[2]
    g = h // kh
    r = int(k_row_bytes)
    if arena.shape[:2] != (b, kh) or counts.shape != (b, kh, 4) or k_counts.shape != (b, kh, 3) \
            or k_channels.shape != (b, kh, d) or k_scale.shape != (b, kh, d) \
            or k_zero.shape != (b, kh, d) or whole_lengths.shape != (b,):
        raise ValueError(f"arena {arena.shape}, counts {counts.shape}, k_channels "
                         f"{k_channels.shape}, k_counts {k_counts.shape}, k_scale "
                         f"{k_scale.shape}, whole_lengths {whole_lengths.shape}: expected "
                         f"[B, K, P], [B, K, 4], [B, K, D], [B, K, 3], [B, K, D], [B] with "
                         f"B={b}, K={kh}, D={d}")
    if r < 0 or r > d:
        raise ValueError(f"k_row_bytes={k_row_bytes}: must be in [0, D={d}] (<= 8 bits a channel)")
    dtype = q.dtype
    gq = column_group_pad(g)
    rp = _row_bytes(r)

    parts = []
    views = region_views(arena, counts, r, d, whole_v.dtype)
    present = [(ci, w) for ci, w in enumerate(WIDTHS) if views[w][0].shape[2]]
    if present:
        bmat, bias = _k_side(q.reshape(b, kh, g, d).astype(jnp.float32), k_channels, k_counts,
                             k_scale, k_zero, r, rp, gq)
        # hi + lo parts in the cache dtype: bfloat16's 8 significant bits alone would put errors
        # of ~2^-9 |q . s code| on scores whose zero-point term cancels most of them
        bmat = jnp.stack(split_16bit(bmat, dtype, B_PARTS), axis=2)  # [B, K, 2, 7 rp, Gq]
    for ci, w in present:
        rows = views[w][0]  # [B, K, M, rec] uint8, rows past the count zeroed
        m = rows.shape[2]
        m_pad = -(-max(m, BLOCK) // 8) * 8  # 16-bit V blocks are TMA-tiled: rows in 8s
        rows = jnp.pad(rows, [(0, 0), (0, 0), (0, m_pad - m), (0, 0)])
        inputs = {"count": jnp.clip(counts[..., ci].astype(jnp.int32), 0, m),  # [B, K]
                  "bmat": bmat, "bias": bias,
                  "k_codes": jnp.pad(rows[..., :r], [(0, 0)] * 3 + [(0, rp - r)])}
        o = r + META_BYTES  # first byte after the K row and the position
        if w == 16:
            inputs["v"] = bytes_to(rows[..., o:], dtype, d)  # [B, K, M, D] cache dtype
            per, channels = 1, None
        else:
            meta = bytes_to(rows[..., o:o + VMETA_BYTES], jnp.float16, 2).astype(jnp.float32)
            inputs["v_codes"] = rows[..., o + VMETA_BYTES:o + VMETA_BYTES + d * w // 8]
            inputs["v_scale"], inputs["v_zero"] = meta[..., 0], meta[..., 1]  # [B, K, M]
            per = 8 // w
            channels = sub_order(d // per, per)
        blocks = -(-m_pad // BLOCK)
        splits = default_num_splits(b, kh, blocks) if num_splits is None else \
            min(int(num_splits), blocks)
        plan = CodePlan(
            g=g, d=d, n=m_pad, dtype=jnp.dtype(dtype).name, k_width=rp, k_signed=False,
            k_subs=tuple((s * kw, kw) for kw, s in K_SUBS), k_mode="token", kg=0, k_rows=0,
            nb=1, k_token_scale=False, has_kz=False, k_bias=True, v_raw=w == 16,
            v_width=d * w // 8 if w != 16 else 0, v_signed=False,
            v_subs=tuple((s * w, w) for s in range(per)) if w != 16 else (), nv=1,
            has_vz=w != 16, b_parts=B_PARTS, splits=splits, scale=float(scale))
        oo, lse = codes_partials(plan, inputs, interpret=interpret)
        parts.append(unpermute_partials(oo, lse, g, channels))
    if z:
        parts.append(whole_zone_partials(q, whole_k, whole_v, whole_lengths, scale,
                                         num_splits=num_splits, interpret=interpret))
    return merge_partials(parts, b, h, d, dtype)
