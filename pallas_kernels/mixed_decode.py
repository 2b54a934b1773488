"""Decode attention over the mixed-precision cache of `jaxkv.cache.MixedCache` (RDKV). The byte
layout of its arena (the arrays of a layer, a record's bytes, the K row's packed channel codes) is
`jaxkv.cache.mixed_format`: the cache writes it, this module reads it.

Decoding never dequantises the cache. For the G queries of a KV head:
    score(t) = sum_c (q_c * s_c) * code_{t,c} + sum_c q_c * z_c     (K scale folded into q,
                                                                     zero-point a per-query term)
    out = sum_t (p_t * s_t) * code_t + sum_t p_t * z_t              (V scale folded into p)
The reference reads each width's region as a static-size view of the arena (a gather of
P // record_bytes(bits) records from the region's start; rows past the region's count are masked),
unpacks its codes to uint8, and contracts them with the folded coefficients. Scores and softmax
in float32; one softmax over all regions and the whole zone.

`mixed_decode_attention` is the Pallas TPU kernel of the same math: it decodes codes, float16 V
scales / zero-points and 16-bit raw values from the record bytes in VMEM; only the cut of the
arena into per-width row views (`region_views`) runs outside it, in XLA (see the comment above it
for why).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxkv.cache.mixed_format import (K_WIDTHS, META_BYTES, VMETA_BYTES, WIDTHS, bytes_to,
                                     k_view_ranks, region_views, unpack_bits)
from pallas_kernels.dense_decode import NEG_INF
from pallas_kernels.quantized_decode import EXACT, col_iota, dot_nn, dot_nt, row_iota


def mixed_decode_attention_reference(q: jax.Array, arena: jax.Array, counts: jax.Array,
                                     k_channels: jax.Array, k_counts: jax.Array,
                                     k_scale: jax.Array, k_zero: jax.Array, whole_k: jax.Array,
                                     whole_v: jax.Array, whole_lengths: jax.Array, *,
                                     scale: float, k_row_bytes: int) -> jax.Array:
    """q: [B, H, D] -> out [B, H, D] (dtype of q). See the module docstring for the layout."""
    b, h, d = q.shape
    kh = whole_k.shape[1]
    g = h // kh
    vdt = whole_v.dtype
    qg = q.reshape(b, kh, g, d).astype(jnp.float32)  # [B, K, G, D]
    # K folded into the query, in rank order: q_rank[r] = q[channel(r)]
    chan = k_channels.astype(jnp.int32)  # [B, K, D]
    q_rank = jnp.take_along_axis(qg, chan[:, :, None, :], axis=3)  # [B, K, G, D]
    ks, kz = k_scale.astype(jnp.float32), k_zero.astype(jnp.float32)  # [B, K, D]
    n_stored = k_counts.astype(jnp.int32).sum(-1, keepdims=True)  # [B, K, 1]
    stored = jnp.arange(d)[None, None, :] < n_stored  # [B, K, D] rank holds a channel
    q_scaled = q_rank * jnp.where(stored, ks, 0.0)[:, :, None, :]  # [B, K, G, D]
    zp_term = jnp.einsum("BKGD,BKD->BKG", q_rank, jnp.where(stored, kz, 0.0))  # [B, K, G]
    coef = {}
    for w, (rank, valid) in k_view_ranks(k_counts, k_row_bytes).items():
        c = jnp.take_along_axis(q_scaled, rank[:, :, None, :], axis=3)  # [B, K, G, J_w]
        coef[w] = jnp.where(valid[:, :, None, :], c, 0.0)

    # One contraction over the row's 2-bit fields instead of one per K width: a 4-bit code is
    # c2[2j] + 4 c2[2j+1] and an 8-bit code c2[4j] + 4 c2[4j+1] + 16 c2[4j+2] + 64 c2[4j+3]
    # (little-endian packing), so their coefficients fold onto the 2-bit fields.
    folded = coef[2]  # [B, K, G, 4R]
    for kw in (4, 8):
        per = kw // 2
        weights = jnp.asarray([4.0 ** i for i in range(per)], jnp.float32)
        folded = folded + (coef[kw][..., None] * weights).reshape(folded.shape)
    views = region_views(arena, counts, k_row_bytes, d, vdt)
    scores, parts = [], []
    for w in WIDTHS:
        rows, valid = views[w]  # [B, K, M, rec], [B, K, M]
        fields = unpack_bits(rows[..., :k_row_bytes], 2).astype(jnp.float32)  # [B, K, M, 4R]
        s = zp_term[..., None] + jnp.einsum("BKGJ,BKMJ->BKGM", folded, fields)
        scores.append(jnp.where(valid[:, :, None, :], s * scale, NEG_INF))
        parts.append((w, rows, valid))
    # whole zone
    s_w = jnp.einsum("BKGD,BKZD->BKGZ", qg, whole_k.astype(jnp.float32)) * scale
    w_valid = jnp.arange(whole_k.shape[2])[None, :] < whole_lengths[:, None]  # [B, Z]
    scores.append(jnp.where(w_valid[:, None, None, :], s_w, NEG_INF))

    allp = jnp.concatenate(scores, axis=-1)  # [B, K, G, S]
    m = jnp.maximum(allp.max(-1, keepdims=True), NEG_INF)
    sizes = [x.shape[-1] for x in scores]
    splits = np.cumsum(sizes)[:-1].tolist()
    probs = jnp.split(jnp.exp(allp - m), splits, axis=-1)
    denom = jnp.zeros((b, kh, g), jnp.float32)
    num = jnp.zeros((b, kh, g, d), jnp.float32)
    r = k_row_bytes + META_BYTES
    for (w, rows, valid), p in zip(parts, probs[:-1]):
        p = p * valid[:, :, None, :]  # [B, K, G, M]
        denom = denom + p.sum(-1)
        if w == 16:
            vals = bytes_to(rows[..., r:], vdt, d).astype(jnp.float32)  # [B, K, M, D]
            num = num + jnp.einsum("BKGM,BKMD->BKGD", p, vals)
            continue
        meta = bytes_to(rows[..., r:r + VMETA_BYTES], jnp.float16, 2).astype(jnp.float32)
        vs, vz = meta[..., 0], meta[..., 1]  # [B, K, M]
        codes = unpack_bits(rows[..., r + VMETA_BYTES:], w)[..., :d]  # uint8 [B, K, M, D]
        num = num + jnp.einsum("BKGM,BKMD->BKGD", p * vs[:, :, None, :],
                               codes.astype(jnp.float32))
        num = num + (p * vz[:, :, None, :]).sum(-1)[..., None]
    p_w = probs[-1] * w_valid[:, None, None, :]
    denom = denom + p_w.sum(-1)
    num = num + jnp.einsum("BKGZ,BKZD->BKGD", p_w, whole_v.astype(jnp.float32))
    out = num / jnp.maximum(denom, 1e-30)[..., None]
    return out.reshape(b, h, d).astype(q.dtype)


# ---- Pallas TPU kernel ---------------------------------------------------------------------------
# What runs where. One piece runs in the wrapper, as XLA: cutting the byte arena into per-width
# row views, `region_views` (the reference's own gather): uint8 [B, K, M_w, record_bytes(w)] with
# M_w = P // record_bytes(w), rows past the region's count zeroed. The kernel cannot do this cut:
# a region starts at a data-dependent byte offset that is a multiple of neither its record size
# nor the 128-lane tile, and TPU arrays are tiled in HBM and VMEM, so re-folding a lane-contiguous
# byte stream into rows of record_bytes(w) bytes is a general relayout that no BlockSpec
# index_map (block-aligned) nor DMA (tile-aligned, same shape on both sides) expresses. The cost
# is an HBM gather of ~4 P bytes per head per call (one window of P bytes per width). Everything
# else is in the kernel, reading the views block by block.
#
# Grid (B, K, sum_w nb_w + nz): one program per (sequence, KV head) walks the 16-, 8-, 4- and
# 2-bit regions (nb_w blocks of rows_w records each), then the whole zone, along the last
# ("arbitrary") axis, with one online softmax over all of them (float32 m, l and accumulators in
# VMEM; the [G, D] output tile written on the last step). counts, k_counts and whole_lengths are
# scalar prefetched (SMEM): blocks past a region's count skip their compute and their index_map
# repeats the region's last valid block (no new DMA); the partial last block is masked.
#
# K, once per (sequence, head): q_rank = q @ onehot(k_channels) [G, D] (rank order), folded with
# the rank-order scales (q_s = q_rank * s, zero for pruned ranks) and the zero-point term
# zp = q_rank . z. The K row read at w bits is `per` = 8 / w sub-blocks (shift s * w, mask):
# sub-block s, byte j holds the code at position j * per + s of the w-bit view; coefficient rows
# coef_{w,s} [G, R] = q_s @ M_{w,s}, where the 0/1 matrix M_{w,s} [D, R] (built from iota and the
# k_counts scalars) picks the rank stored at each position (zero outside the width's range).
# score = zp + sum_{w,s} coef_{w,s} . sub_{w,s}: seven [G, R] x [R, rows] dots per block.
# V of a quantised record: its float16 scale and zero-point are decoded from their bytes inside
# the kernel (bytes -> 16-bit patterns by an exact 0/1 (x256) dot, then integer ops to float32),
# p * s_t is dotted with each shifted/masked sub-block of the whole record ([G, rows] x
# [rows, record_bytes]), accumulating in "record byte" space per sub-block; the finish maps the
# V-code bytes to channels once (0/1 matrices [record_bytes, D]); sum_t p_t z_t is added to every
# channel. V of a 16-bit record: the cache-dtype values are rebuilt from their bytes (bfloat16:
# 16-bit pattern << 16; float16: decoded; float32: two 16-bit halves) and dotted with p.
# Byte dots (operands are integers < 256 and 0/1 or 256 weights) are exact at any MXU precision;
# f32 selections use Precision.HIGHEST; the scoring / value dots HIGHEST for float32 models.

K_SUBS = tuple((w, s) for w in K_WIDTHS for s in range(8 // w))  # (8,0) (4,0) (4,1) (2,0..3)


def f16_bits_to_f32(h: jax.Array) -> jax.Array:
    """int32 16-bit patterns of float16 values -> float32 (exact, integer ops only)."""
    sign = (h >> 15) & 1
    e = (h >> 10) & 31
    m = h & 1023
    e32 = jnp.where(e == 31, 255, e + 112)  # 112 = 127 - 15; inf / nan keep an all-ones exponent
    normal = jax.lax.bitcast_convert_type((sign << 31) | (e32 << 23) | (m << 13), jnp.float32)
    subnormal = m.astype(jnp.float32) * (2.0 ** -24) * (1 - 2 * sign).astype(jnp.float32)
    return jnp.where(e == 0, subnormal, normal)


class _MixedPlan(NamedTuple):
    """Static shapes and choices of one mixed_decode_attention call."""
    g: int
    d: int
    kh: int
    r: int                  # K row bytes
    vdtype: str             # cache dtype (16-bit records)
    regions: tuple          # ((width, counts index, record bytes, M_w, rows_w, nb_w, base), ...)
    z: int
    bz: int
    nz: int
    zbase: int              # first whole-zone step
    scale: float
    precision: object


def _mixed_consts(p: _MixedPlan):
    """0/1 (x256) float32 selection matrices of the record fields, by name (numpy)."""
    d, o = p.d, p.r + META_BYTES  # o: first byte after the K row and the position
    item = np.dtype(p.vdtype).itemsize
    out = {}
    for w, _, rec, *_ in p.regions:
        if w == 16:  # 16-bit halves of each value: lo byte + 256 * hi byte
            sel = np.zeros((max(1, item // 2), rec, d), np.float32)
            for half in range(sel.shape[0]):
                for c in range(d):
                    at = o + item * c + 2 * half
                    sel[half, at, c], sel[half, at + 1, c] = 1.0, 256.0
            out["sel16"] = sel
            continue
        per = 8 // w
        meta = np.zeros((2, rec), np.float32)  # [scale bits, zero bits] of the float16 pair
        meta[0, o], meta[0, o + 1], meta[1, o + 2], meta[1, o + 3] = 1.0, 256.0, 1.0, 256.0
        out[f"meta{w}"] = meta
        sel = np.zeros((per, rec, d), np.float32)  # V-code byte o + 4 + j, shift s -> channel
        for s in range(per):
            j = np.arange(d // per)
            sel[s, o + VMETA_BYTES + j, j * per + s] = 1.0
        out[f"selv{w}"] = sel
    return out


def _mixed_kernel(counts_ref, kcounts_ref, wlen_ref, *refs, plan: _MixedPlan, names):
    """One (b, kv head, block) step; refs by `names` (inputs, output, scratch)."""
    p = plan
    r = dict(zip(names, refs))
    b, hd, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m_ref, l_ref = r["m"], r["l"]
    accs = [r[k] for k in names if k.startswith("acc")]
    head = b * p.kh + hd
    n_steps = p.zbase + p.nz

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        for acc in accs:
            acc[...] = jnp.zeros(acc.shape, jnp.float32)
        if not p.regions:
            return
        # K folded into the query, in rank order
        q = r["q"][...].astype(jnp.float32) * p.scale  # [G, D]
        chan = r["k_channels"][...]  # [1, D] int32: channel at each rank
        onehot = (row_iota(p.d) == chan).astype(jnp.float32)  # [D(channel), D(rank)]
        q_rank = dot_nn(q, onehot)  # [G, D]: q_rank[:, r] = q[:, channel(r)]
        d8, d4, d2 = (kcounts_ref[head * 3 + j] for j in range(3))
        stored = col_iota(p.d) < d8 + d4 + d2  # [1, D] ranks holding a channel
        q_s = q_rank * jnp.where(stored, r["k_scale"][...], 0.0)  # [G, D]
        r["zp"][...] = jnp.sum(q_rank * jnp.where(stored, r["k_zero"][...], 0.0), axis=1,
                               keepdims=True)  # [G, 1]
        if not p.r:
            return
        start = {8: 0, 4: 2 * d8, 2: 4 * d8 + 2 * d4}  # first position of the width's codes
        rank0 = {8: 0, 4: d8, 2: d8 + d4}  # rank of that first code
        count = {8: d8, 4: d4, 2: d2}
        rank = row_iota(p.d)  # [D, 1]
        for idx, (w, s) in enumerate(K_SUBS):
            pos = col_iota(p.r) * (8 // w) + s  # [1, R] position of sub-block byte j
            ok = (pos >= start[w]) & (pos < start[w] + count[w])
            pick = ok & (rank == rank0[w] + pos - start[w])  # [D, R]
            r["coef"][idx] = dot_nn(q_s, pick.astype(jnp.float32))  # [G, R]

    def softmax_step(score, valid_row):
        m_prev = m_ref[...]  # [G, 1]
        m_new = jnp.maximum(m_prev, score.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        prob = jnp.where(valid_row, jnp.exp(score - m_new), 0.0)  # [G, T]
        l_ref[...] = alpha * l_ref[...] + prob.sum(axis=1, keepdims=True)
        m_ref[...] = m_new
        for acc in accs:
            if len(acc.shape) == 3:
                for j in range(acc.shape[0]):
                    acc[j] = alpha * acc[j]
            else:
                acc[...] = alpha * acc[...]
        return prob

    for w, ci, rec, m_rows, rows, nb, base in p.regions:
        cnt = jnp.clip(counts_ref[head * 4 + ci], 0, m_rows)

        @pl.when((i >= base) & (i < base + nb) & ((i - base) * rows < cnt))
        def _region_block(w=w, rec=rec, rows=rows, base=base, cnt=cnt):
            start = (i - base) * rows
            valid_row = start + col_iota(rows) < cnt  # [1, T]
            valid_col = start + row_iota(rows) < cnt  # [T, 1]
            x = r[f"view{w}"][...].astype(jnp.int32)  # [T, rec] record bytes
            score = jnp.broadcast_to(r["zp"][...], (p.g, rows))  # [G, T]
            if p.r:
                krow = x[:, :p.r]  # [T, R]
                for idx, (kw, s) in enumerate(K_SUBS):
                    sub = ((krow >> (s * kw)) & (2 ** kw - 1)).astype(jnp.float32)
                    score = score + dot_nt(r["coef"][idx], sub, p.precision)
            prob = softmax_step(jnp.where(valid_row, score, NEG_INF), valid_row)
            xf = x.astype(jnp.float32)
            if w == 16:  # raw values in the cache dtype, rebuilt from their bytes
                sel = r["sel16"]
                lo = dot_nn(xf, sel[0], None).astype(jnp.int32)  # [T, D] 16-bit patterns
                if p.vdtype == "bfloat16":
                    vals = jax.lax.bitcast_convert_type(lo << 16, jnp.float32)
                elif p.vdtype == "float16":
                    vals = f16_bits_to_f32(lo)
                else:  # float32: two halves
                    hi = dot_nn(xf, sel[1], None).astype(jnp.int32)
                    vals = jax.lax.bitcast_convert_type((hi << 16) | lo, jnp.float32)
                vals = jnp.where(valid_col, vals, 0.0)  # undefined tail rows: 0 * NaN guard
                r["acc16"][...] = r["acc16"][...] + dot_nn(prob, vals, p.precision)
                return
            bits = dot_nt(r[f"meta{w}"][...], xf, None).astype(jnp.int32)  # [2, T] float16 bits
            meta = jnp.where(valid_row, f16_bits_to_f32(bits), 0.0)  # [2, T]: scale, zero
            pv = prob * meta[0:1]  # [G, T]: V scale folded into the probabilities
            acc = r[f"accb{w}"]  # [per, G, rec]
            for s in range(8 // w):
                sub = xf if w == 8 else ((x >> (s * w)) & (2 ** w - 1)).astype(jnp.float32)
                acc[s] = acc[s] + dot_nn(pv, sub, p.precision)  # [G, rec]
            r["accz"][...] = r["accz"][...] + jnp.sum(prob * meta[1:2], axis=1, keepdims=True)

    if p.z:
        nwl = jnp.clip(wlen_ref[b], 0, p.z)

        @pl.when((i >= p.zbase) & ((i - p.zbase) * p.bz < nwl))
        def _whole_block():
            start = (i - p.zbase) * p.bz
            valid_row = start + col_iota(p.bz) < nwl
            valid_col = start + row_iota(p.bz) < nwl
            q = r["q"][...].astype(jnp.float32) * p.scale
            score = dot_nt(q, r["whole_k"][...].astype(jnp.float32), p.precision)  # [G, T]
            prob = softmax_step(jnp.where(valid_row, score, NEG_INF), valid_row)
            wv = jnp.where(valid_col, r["whole_v"][...].astype(jnp.float32), 0.0)  # [T, D]
            r["acc_w"][...] = r["acc_w"][...] + dot_nn(prob, wv, p.precision)

    @pl.when(i == n_steps - 1)
    def _finish():
        out = jnp.zeros((p.g, p.d), jnp.float32)
        for name in ("acc_w", "acc16"):
            if name in r:
                out = out + r[name][...]
        for w, *_ in p.regions:
            if w != 16:  # record byte space -> channels
                sel = r[f"selv{w}"]
                for s in range(8 // w):
                    out = out + dot_nn(r[f"accb{w}"][s], sel[s])  # [G, D]
        if "accz" in r:
            out = out + r["accz"][...]  # sum_t p_t z_t: every channel
        r["out"][...] = (out / jnp.maximum(l_ref[...], 1e-30)).astype(r["out"].dtype)


@functools.partial(jax.jit, static_argnames=("scale", "k_row_bytes", "block_size",
                                             "whole_block_size", "interpret", "poison"))
def mixed_decode_attention(q: jax.Array, arena: jax.Array, counts: jax.Array,
                           k_channels: jax.Array, k_counts: jax.Array, k_scale: jax.Array,
                           k_zero: jax.Array, whole_k: jax.Array, whole_v: jax.Array,
                           whole_lengths: jax.Array, *, scale: float, k_row_bytes: int,
                           block_size: int = 256, whole_block_size: Optional[int] = None,
                           interpret=False, poison: bool = False) -> jax.Array:
    """Pallas TPU kernel of `mixed_decode_attention_reference` (same arguments and result).

    q: [B, H, D] -> [B, H, D] in q's dtype; the layout is the module docstring's. Codes, float16
    V scales / zero-points and 16-bit raw values are decoded from their bytes inside the kernel;
    only the cut of the arena into per-width row views runs outside it (see the comment above).
    block_size: records per grid step in each region (static; on TPU a multiple of 32, the
      uint8 sublane tile, when a region's view has more rows). whole_block_size: whole-zone slots
      per step (default block_size; on TPU a multiple of 16 when Z exceeds it).
    interpret: False (Mosaic TPU), True or a `pltpu.InterpretParams` (CPU interpret mode).
    poison: tests only; the output starts as NaN (aliased) so an unwritten tile shows up.
    """
    b, h, d = q.shape
    kh, z = whole_k.shape[1], whole_k.shape[2]
    r = int(k_row_bytes)
    vdt = jnp.dtype(whole_v.dtype)
    if q.ndim != 3 or whole_k.ndim != 4 or whole_k.shape[0] != b or whole_k.shape[3] != d \
            or h % kh or whole_v.shape != whole_k.shape:
        raise ValueError(f"q {q.shape}, whole_k {whole_k.shape}, whole_v {whole_v.shape}: "
                         f"expected q [B, H, D], whole_k = whole_v [B, K, Z, D], K dividing H")
    if arena.shape[:2] != (b, kh) or counts.shape != (b, kh, 4) or k_counts.shape != (b, kh, 3) \
            or k_channels.shape != (b, kh, d) or k_scale.shape != (b, kh, d) \
            or k_zero.shape != (b, kh, d) or whole_lengths.shape != (b,):
        raise ValueError(f"arena {arena.shape}, counts {counts.shape}, k_channels "
                         f"{k_channels.shape}, k_counts {k_counts.shape}, k_scale "
                         f"{k_scale.shape}, whole_lengths {whole_lengths.shape}: expected "
                         f"[B, K, P], [B, K, 4], [B, K, D], [B, K, 3], [B, K, D], [B] with "
                         f"B={b}, K={kh}, D={d}")
    if d % 4:
        raise ValueError(f"head_dim={d}: must be a multiple of 4 (2-bit codes fill whole bytes)")
    if r < 0 or 8 * r > 8 * d:
        raise ValueError(f"k_row_bytes={k_row_bytes}: must be in [0, D={d}] (<= 8 bits a channel)")
    if vdt.name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"whole_v.dtype={vdt.name}: 16-bit records hold bfloat16, float16 or "
                         f"float32 values")
    if block_size < 1 or (whole_block_size is not None and whole_block_size < 1):
        raise ValueError(f"block_size={block_size}, whole_block_size={whole_block_size}: must "
                         f"be positive")
    g = h // kh

    # the wrapper's piece: per-width row views of the arena (see the comment above)
    views = region_views(arena, counts, r, d, vdt)
    regions, base = [], 0
    for ci, w in enumerate(WIDTHS):
        rows_all = views[w][0]  # [B, K, M_w, rec_w]
        m_rows, rec = rows_all.shape[2], rows_all.shape[3]
        if m_rows == 0:
            continue  # the arena cannot hold one record of this width
        rows = min(block_size, m_rows)
        nb = pl.cdiv(m_rows, rows)
        regions.append((w, ci, rec, m_rows, rows, nb, base))
        base += nb
    if not regions and z == 0:
        return jnp.zeros(q.shape, q.dtype)
    bz = min(whole_block_size or block_size, z)
    plan = _MixedPlan(g=g, d=d, kh=kh, r=r, vdtype=vdt.name, regions=tuple(regions), z=z, bz=bz,
                      nz=pl.cdiv(z, bz) if z else 0, zbase=base, scale=float(scale),
                      precision=EXACT if jnp.dtype(q.dtype) == jnp.float32 else None)

    def head_index(bi, hi, i, *_):
        return bi, hi, 0, 0

    def region_index(ci, m_rows, rows, base):
        def index(bi, hi, i, counts_ref, kcounts_ref, wlen_ref):
            cnt = jnp.clip(counts_ref[(bi * kh + hi) * 4 + ci], 0, m_rows)
            last = jnp.maximum(pl.cdiv(cnt, rows) - 1, 0)  # other steps: no new DMA
            return bi, hi, jnp.clip(i - base, 0, last), 0
        return index

    def w_index(bi, hi, i, counts_ref, kcounts_ref, wlen_ref):
        last = jnp.maximum(pl.cdiv(jnp.clip(wlen_ref[bi], 0, z), bz) - 1, 0)
        return bi, hi, jnp.clip(i - plan.zbase, 0, last), 0

    sq = pl.squeezed
    qg = q.reshape(b, kh, g, d)  # [B, K, G, D]
    head_spec = pl.BlockSpec((sq, sq, g, d), head_index)
    names, specs, args = ["q"], [head_spec], [qg]

    def add(name, x, spec):
        names.append(name)
        specs.append(spec)
        args.append(x)

    if regions:  # per-head K settings: [B, K, 1, D] (tiny; cast here)
        row_spec = pl.BlockSpec((sq, sq, 1, d), head_index)
        add("k_channels", k_channels.astype(jnp.int32).reshape(b, kh, 1, d), row_spec)
        add("k_scale", k_scale.astype(jnp.float32).reshape(b, kh, 1, d), row_spec)
        add("k_zero", k_zero.astype(jnp.float32).reshape(b, kh, 1, d), row_spec)
        for w, ci, rec, m_rows, rows, nb, rbase in regions:
            add(f"view{w}", views[w][0],
                pl.BlockSpec((sq, sq, rows, rec), region_index(ci, m_rows, rows, rbase)))
    if z:
        w_spec = pl.BlockSpec((sq, sq, bz, d), w_index)
        add("whole_k", whole_k, w_spec)
        add("whole_v", whole_v, w_spec)
    for name, c in _mixed_consts(plan).items():
        add(name, jnp.asarray(c), pl.BlockSpec(c.shape, lambda *a, nd=c.ndim: (0,) * nd))
    aliases = {}
    if poison:
        add("poison", jnp.full(qg.shape, jnp.nan, q.dtype), pl.BlockSpec(memory_space=pl.ANY))
        aliases = {len(args) + 2: 0}  # operand index counts the three scalar-prefetch operands
    names.append("out")
    scratch = {"m": (g, 1), "l": (g, 1)}
    if regions:
        scratch["zp"] = (g, 1)  # q_rank . zero-points
        if r:
            scratch["coef"] = (len(K_SUBS), g, r)  # K coefficient rows per (width, shift)
        for w, _, rec, *_ in regions:
            if w == 16:
                scratch["acc16"] = (g, d)
            else:
                scratch[f"accb{w}"] = (8 // w, g, rec)  # record-byte space, per shift
                scratch["accz"] = (g, 1)
    if z:
        scratch["acc_w"] = (g, d)
    names += list(scratch)
    out = pl.pallas_call(
        functools.partial(_mixed_kernel, plan=plan, names=tuple(names)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, kh, plan.zbase + plan.nz),
            in_specs=specs,
            out_specs=head_spec,
            scratch_shapes=[pltpu.VMEM(s, jnp.float32) for s in scratch.values()]),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(counts.astype(jnp.int32).reshape(-1), k_counts.astype(jnp.int32).reshape(-1),
      whole_lengths.astype(jnp.int32), *args)
    return out.reshape(b, h, d)
