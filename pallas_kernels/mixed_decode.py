"""Decode attention over the mixed-precision cache of `jaxkv.cache.MixedCache` (RDKV). The byte
layout of its arena (the arrays of a layer, the heads' sections, V records, K groups with their
float16 headers) is `jaxkv.cache.mixed_format`: the cache writes it, this module reads it through
`mixed_views`, which cuts per V width static-size views: V record bytes [M, record], K codes
uint8 [M, D] in channel order and the K group scales / zero-points [M / 32, D].

Decoding never dequantises the cache in memory. For the G queries of a KV head and a record t of
K group j:
    score(t) = sum_c (q_c * s_{j,c}) * code_{t,c} + sum_c q_c * z_{j,c}   (each group's K scales
                                                                        folded into the query)
    out = sum_t (p_t * s_t) * code_t + sum_t p_t * z_t                    (V scale folded into p)
The reference contracts the codes of each group with its folded query (as KIVI's K groups in
`quantized_decode`). Scores and softmax in float32; one softmax over all regions and the whole
zone.

`mixed_decode_attention` is the Pallas TPU kernel of the same math: it decodes V codes, float16
V scales / zero-points and 16-bit raw values from the record bytes in VMEM and folds the K group
scales into the query block by block; the cut of the arena into per-width views
(`mixed_views`) runs outside it, in XLA (see the comment above it for why).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxkv.cache.mixed_format import (GROUP, VMETA_BYTES, WIDTHS, bytes_to, mixed_views,
                                     tier16_dtype, unpack_bits)
from pallas_kernels.dense_decode import NEG_INF
from pallas_kernels.quantized_decode import EXACT, col_iota, dot_nn, dot_nt, row_iota


def _check_args(q, arena, counts, k_channels, k_counts, whole_k, whole_v, whole_lengths,
                head_capacity, pos_bytes, max_records):
    b, h, d = q.shape
    kh = whole_k.shape[1]
    if q.ndim != 3 or whole_k.ndim != 4 or whole_k.shape[0] != b or whole_k.shape[3] != d \
            or h % kh or whole_v.shape != whole_k.shape:
        raise ValueError(f"q {q.shape}, whole_k {whole_k.shape}, whole_v {whole_v.shape}: "
                         f"expected q [B, H, D], whole_k = whole_v [B, K, Z, D], K dividing H")
    if arena.ndim != 2 or arena.shape[0] != b or counts.shape != (b, kh, 4) \
            or k_counts.shape != (b, kh, 3) or k_channels.shape != (b, kh, d) \
            or whole_lengths.shape != (b,):
        raise ValueError(f"arena {arena.shape}, counts {counts.shape}, k_channels "
                         f"{k_channels.shape}, k_counts {k_counts.shape}, whole_lengths "
                         f"{whole_lengths.shape}: expected [B, S], [B, K, 4], [B, K, D], "
                         f"[B, K, 3], [B] with B={b}, K={kh}, D={d}")
    if d % 4:
        raise ValueError(f"head_dim={d}: must be a multiple of 4 (2-bit codes fill whole bytes)")
    if not 0 <= head_capacity <= arena.shape[1]:
        raise ValueError(f"head_capacity={head_capacity}: must be in [0, S={arena.shape[1]}]")
    if pos_bytes not in (2, 4):
        raise ValueError(f"pos_bytes={pos_bytes}: positions are int16 (2) or int32 (4)")
    if max_records < 0:
        raise ValueError(f"max_records={max_records}: must be >= 0")


def _group_scores(qg, view, m: int):
    """qg [B, K, G, D] f32 -> scores [B, K, G, M] of a region's view (K groups of GROUP rows)."""
    b, kh, g, d = qg.shape
    ng = m // GROUP
    codes = view.k_codes.astype(jnp.float32).reshape(b, kh, ng, GROUP, d)
    qs = qg[:, :, :, None, :] * view.k_scale.astype(jnp.float32)[:, :, None]  # [B, K, G, NG, D]
    s = jnp.einsum("BKGJD,BKJiD->BKGJi", qs, codes)
    s = s + jnp.einsum("BKGD,BKJD->BKGJ", qg, view.k_zero.astype(jnp.float32))[..., None]
    return s.reshape(b, kh, g, m)


def mixed_decode_attention_reference(q: jax.Array, arena: jax.Array, counts: jax.Array,
                                     k_channels: jax.Array, k_counts: jax.Array,
                                     whole_k: jax.Array, whole_v: jax.Array,
                                     whole_lengths: jax.Array, *, scale: float,
                                     head_capacity: int, pos_bytes: int,
                                     max_records: int) -> jax.Array:
    """q: [B, H, D] -> out [B, H, D] (dtype of q). See the module docstring for the layout;
    head_capacity, pos_bytes, max_records: the cache's static fields."""
    _check_args(q, arena, counts, k_channels, k_counts, whole_k, whole_v, whole_lengths,
                head_capacity, pos_bytes, max_records)
    b, h, d = q.shape
    kh = whole_k.shape[1]
    g = h // kh
    qg = q.reshape(b, kh, g, d).astype(jnp.float32)  # [B, K, G, D]
    views = mixed_views(arena, counts, k_channels, k_counts, head_dim=d, pos_bytes=pos_bytes,
                        head_capacity=head_capacity, max_records=max_records)
    scores, parts = [], []
    for w, view in views.items():
        m = view.valid.shape[-1]
        s = _group_scores(qg, view, m)
        scores.append(jnp.where(view.valid[:, :, None, :], s * scale, NEG_INF))
        parts.append((w, view))
    s_w = jnp.einsum("BKGD,BKZD->BKGZ", qg, whole_k.astype(jnp.float32)) * scale
    w_valid = jnp.arange(whole_k.shape[2])[None, :] < whole_lengths[:, None]  # [B, Z]
    scores.append(jnp.where(w_valid[:, None, None, :], s_w, NEG_INF))

    allp = jnp.concatenate(scores, axis=-1)  # [B, K, G, S]
    m_ = jnp.maximum(allp.max(-1, keepdims=True), NEG_INF)
    sizes = [x.shape[-1] for x in scores]
    splits = np.cumsum(sizes)[:-1].tolist()
    probs = jnp.split(jnp.exp(allp - m_), splits, axis=-1)
    denom = jnp.zeros((b, kh, g), jnp.float32)
    num = jnp.zeros((b, kh, g, d), jnp.float32)
    o = pos_bytes
    for (w, view), p in zip(parts, probs[:-1]):
        p = p * view.valid[:, :, None, :]  # [B, K, G, M]
        denom = denom + p.sum(-1)
        rows = view.rows
        if w == 16:
            vals = bytes_to(rows[..., o:], tier16_dtype(whole_v.dtype), d).astype(jnp.float32)
            num = num + jnp.einsum("BKGM,BKMD->BKGD", p, vals)
            continue
        meta = bytes_to(rows[..., o:o + VMETA_BYTES], jnp.float16, 2).astype(jnp.float32)
        vs, vz = meta[..., 0], meta[..., 1]  # [B, K, M]
        codes = unpack_bits(rows[..., o + VMETA_BYTES:], w)[..., :d]  # uint8 [B, K, M, D]
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
# views, `mixed_views` (the reference's own): V record bytes uint8 [B, K, M_w, record(w)], K codes
# uint8 [B, K, M_w, D] (channel order) and K group scales / zero-points [B, K, M_w / 32, D], rows
# past the region's count zeroed. The kernel cannot do this cut: a region starts at a
# data-dependent byte offset that is a multiple of neither its record size nor the 128-lane tile,
# and a K row's width and its group header's size are data-dependent per head; TPU arrays are
# tiled in HBM and VMEM, so re-folding a lane-contiguous byte stream into rows is a general
# relayout that no BlockSpec index_map (block-aligned) nor DMA (tile-aligned, same shape on both
# sides) expresses. Cost: an HBM pass over ~4 C bytes of V windows per head per call plus the K
# codes at one byte a channel (M_w D per width). Everything else is in the kernel, reading the
# views block by block.
#
# Grid (B, K, sum_w nb_w + nz): one program per (sequence, KV head) walks the 16-, 8-, 4- and
# 2-bit regions (nb_w blocks of rows_w records each, rows_w a multiple of 32: whole K groups),
# then the whole zone, along the last ("arbitrary") axis, with one online softmax over all of them
# (float32 m, l and accumulators in VMEM; the [G, D] output tile written on the last step).
# counts and whole_lengths are scalar prefetched (SMEM): blocks past a region's count skip their
# compute and their index_map repeats the region's last valid block (no new DMA); the partial last
# block is masked.
#
# K of a block with J = rows / 32 groups (as KIVI's K groups in `quantized_decode`): the J scale
# rows fold into J * G query rows (row j G + g: q_g * s_j), one dot scores them against the
# block's codes [rows, D], each record keeps the rows of its own group (`row_grp == tok_grp`),
# summed back to G rows by a 0/1 matrix; the zero-points give q . z_j, spread to the group's rows.
# V of a quantised record: its float16 scale and zero-point are decoded from their bytes inside
# the kernel (bytes -> 16-bit patterns by an exact 0/1 (x256) dot, then integer ops to float32),
# p * s_t is dotted with each shifted/masked sub-block of the whole record ([G, rows] x
# [rows, record_bytes]), accumulating in "record byte" space per sub-block; the finish maps the
# V-code bytes to channels once (0/1 matrices [record_bytes, D]); sum_t p_t z_t is added to every
# channel. V of a 16-bit record: the 16-bit tier's values are rebuilt from their bytes (bfloat16:
# 16-bit pattern << 16; float16: decoded) and dotted with p.
# Byte dots (operands are integers < 256 and 0/1 or 256 weights) are exact at any MXU precision;
# f32 selections use Precision.HIGHEST; the scoring / value dots HIGHEST for float32 models.


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
    o: int                  # first V byte of a record (after the position)
    tier: str               # dtype of 16-bit records
    regions: tuple          # ((width, counts index, record bytes, M_w, rows_w, nb_w, base), ...)
    z: int
    bz: int
    nz: int
    zbase: int              # first whole-zone step
    scale: float
    precision: object


def _mixed_consts(p: _MixedPlan):
    """0/1 (x256) float32 selection matrices of the record fields and the K group-row constants,
    by name (numpy)."""
    d, o, g = p.d, p.o, p.g
    out = {}
    for w, _, rec, _, rows, *_ in p.regions:
        jg = rows // GROUP
        if jg > 1 and f"rep_g{jg}" not in out:
            r = np.arange(jg * g)
            out[f"rep_g{jg}"] = (r[:, None] % g == np.arange(g)[None, :]).astype(np.float32)
            out[f"rep_m{jg}"] = (r[:, None] // g == np.arange(jg)[None, :]).astype(np.float32)
            out[f"sum_g{jg}"] = (r[None, :] % g == np.arange(g)[:, None]).astype(np.float32)
            out[f"row_grp{jg}"] = (r // g).astype(np.int32)[:, None]
            out[f"tok_grp{jg}"] = (np.arange(rows) // GROUP).astype(np.int32)[None, :]
            out[f"spread{jg}"] = (np.arange(jg)[:, None]
                                  == np.arange(rows)[None, :] // GROUP).astype(np.float32)
        if w == 16:  # 16-bit values: lo byte + 256 * hi byte
            sel = np.zeros((rec, d), np.float32)
            for c in range(d):
                sel[o + 2 * c, c], sel[o + 2 * c + 1, c] = 1.0, 256.0
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


def _mixed_kernel(counts_ref, wlen_ref, *refs, plan: _MixedPlan, names):
    """One (b, kv head, block) step; refs by `names` (inputs, output, scratch)."""
    p = plan
    r = dict(zip(names, refs))
    b, hd, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kh = p.kh
    m_ref, l_ref = r["m"], r["l"]
    accs = [r[k] for k in names if k.startswith("acc")]
    head = b * kh + hd
    n_steps = p.zbase + p.nz

    def qf():  # [G, D] float32 query with the softmax scale folded in
        return r["q"][...].astype(jnp.float32) * p.scale

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        for acc in accs:
            acc[...] = jnp.zeros(acc.shape, jnp.float32)

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
        jg = rows // GROUP

        @pl.when((i >= base) & (i < base + nb) & ((i - base) * rows < cnt))
        def _region_block(w=w, rec=rec, rows=rows, base=base, cnt=cnt, jg=jg):
            start = (i - base) * rows
            valid_row = start + col_iota(rows) < cnt  # [1, T]
            valid_col = start + row_iota(rows) < cnt  # [T, 1]
            # K: the block's group scale rows folded into the query
            q = qf()  # [G, D]
            g_ok = (start + row_iota(jg) * GROUP) < cnt  # [J, 1]
            sc = jnp.where(g_ok, r[f"ks{w}"][...], 0.0)  # [J, D]
            zr = jnp.where(g_ok, r[f"kz{w}"][...], 0.0)
            codes = jnp.where(valid_col, r[f"kc{w}"][...].astype(jnp.int32), 0)
            codes = codes.astype(jnp.float32)  # [T, D]
            if jg > 1:
                qk = dot_nn(r[f"rep_g{jg}"][...], q) * dot_nn(r[f"rep_m{jg}"][...], sc)
                raw = dot_nt(qk, codes, p.precision)  # [J G, T]
                own = r[f"row_grp{jg}"][...] == r[f"tok_grp{jg}"][...]
                score = dot_nn(r[f"sum_g{jg}"][...], jnp.where(own, raw, 0.0))  # [G, T]
                zq = dot_nt(q, zr, p.precision)  # [G, J]
                score = score + dot_nn(zq, r[f"spread{jg}"][...])
            else:
                score = dot_nt(q * sc, codes, p.precision) + dot_nt(q, zr, p.precision)
            prob = softmax_step(jnp.where(valid_row, score, NEG_INF), valid_row)
            x = r[f"view{w}"][...].astype(jnp.int32)  # [T, rec] record bytes
            xf = x.astype(jnp.float32)
            if w == 16:  # raw values of the 16-bit tier, rebuilt from their bytes
                lo = dot_nn(xf, r["sel16"][...], None).astype(jnp.int32)  # [T, D] 16-bit patterns
                if p.tier == "bfloat16":
                    vals = jax.lax.bitcast_convert_type(lo << 16, jnp.float32)
                else:
                    vals = f16_bits_to_f32(lo)
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
            score = dot_nt(qf(), r["whole_k"][...].astype(jnp.float32), p.precision)  # [G, T]
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


@functools.partial(jax.jit, static_argnames=("scale", "head_capacity", "pos_bytes",
                                             "max_records", "block_size", "whole_block_size",
                                             "interpret", "poison"))
def mixed_decode_attention(q: jax.Array, arena: jax.Array, counts: jax.Array,
                           k_channels: jax.Array, k_counts: jax.Array, whole_k: jax.Array,
                           whole_v: jax.Array, whole_lengths: jax.Array, *, scale: float,
                           head_capacity: int, pos_bytes: int, max_records: int,
                           block_size: int = 256,
                           whole_block_size: Optional[int] = None, interpret=False,
                           poison: bool = False) -> jax.Array:
    """Pallas TPU kernel of `mixed_decode_attention_reference` (same arguments and result).

    q: [B, H, D] -> [B, H, D] in q's dtype; the layout is `jaxkv.cache.mixed_format`'s. V codes,
    float16 V scales / zero-points and 16-bit raw values are decoded from their bytes inside the
    kernel, K group scales fold into the query there; only the cut of the arena into per-width
    views runs outside it (see the comment above).
    block_size: records per grid step in each region (static, rounded down to a multiple of 32,
      the K group, at least 32). whole_block_size: whole-zone slots per step (default
      block_size; on TPU a multiple of 16 when Z exceeds it).
    interpret: False (Mosaic TPU), True or a `pltpu.InterpretParams` (CPU interpret mode).
    poison: tests only; the output starts as NaN (aliased) so an unwritten tile shows up.
    """
    _check_args(q, arena, counts, k_channels, k_counts, whole_k, whole_v, whole_lengths,
                head_capacity, pos_bytes, max_records)
    b, h, d = q.shape
    kh, z = whole_k.shape[1], whole_k.shape[2]
    if block_size < 1 or (whole_block_size is not None and whole_block_size < 1):
        raise ValueError(f"block_size={block_size}, whole_block_size={whole_block_size}: must "
                         f"be positive")
    g = h // kh
    block = max(GROUP, block_size // GROUP * GROUP)

    # the wrapper's piece: per-width views of the arena (see the comment above)
    views = mixed_views(arena, counts, k_channels, k_counts, head_dim=d, pos_bytes=pos_bytes,
                        head_capacity=head_capacity, max_records=max_records)
    regions, base = [], 0
    for ci, w in enumerate(WIDTHS):
        if w not in views:
            continue  # the capacity cannot hold one record of this width
        m_rows, rec = views[w].rows.shape[2], views[w].rows.shape[3]
        rows = min(block, m_rows)  # both multiples of GROUP
        nb = pl.cdiv(m_rows, rows)
        regions.append((w, ci, rec, m_rows, rows, nb, base))
        base += nb
    if not regions and z == 0:
        return jnp.zeros(q.shape, q.dtype)
    bz = min(whole_block_size or block_size, z)
    plan = _MixedPlan(g=g, d=d, kh=kh, o=pos_bytes, tier=tier16_dtype(whole_v.dtype).name,
                      regions=tuple(regions), z=z, bz=bz, nz=pl.cdiv(z, bz) if z else 0,
                      zbase=base, scale=float(scale),
                      precision=EXACT if jnp.dtype(q.dtype) == jnp.float32 else None)

    def head_index(bi, hi, i, *_):
        return bi, hi, 0, 0

    def region_index(ci, m_rows, rows, base):
        def index(bi, hi, i, counts_ref, wlen_ref):
            cnt = jnp.clip(counts_ref[(bi * kh + hi) * 4 + ci], 0, m_rows)
            last = jnp.maximum(pl.cdiv(cnt, rows) - 1, 0)  # other steps: no new DMA
            return bi, hi, jnp.clip(i - base, 0, last), 0
        return index

    def w_index(bi, hi, i, counts_ref, wlen_ref):
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

    for w, ci, rec, m_rows, rows, nb, rbase in regions:
        index = region_index(ci, m_rows, rows, rbase)
        v = views[w]
        add(f"view{w}", v.rows, pl.BlockSpec((sq, sq, rows, rec), index))
        add(f"kc{w}", v.k_codes, pl.BlockSpec((sq, sq, rows, d), index))
        jspec = pl.BlockSpec((sq, sq, rows // GROUP, d), index)
        add(f"ks{w}", v.k_scale.astype(jnp.float32), jspec)
        add(f"kz{w}", v.k_zero.astype(jnp.float32), jspec)
    if z:
        w_spec = pl.BlockSpec((sq, sq, bz, d), w_index)
        add("whole_k", whole_k, w_spec)
        add("whole_v", whole_v, w_spec)
    for name, c in _mixed_consts(plan).items():
        add(name, jnp.asarray(c), pl.BlockSpec(c.shape, lambda *a, nd=c.ndim: (0,) * nd))
    aliases = {}
    if poison:
        add("poison", jnp.full(qg.shape, jnp.nan, q.dtype), pl.BlockSpec(memory_space=pl.ANY))
        aliases = {len(args) + 1: 0}  # operand index counts the two scalar-prefetch operands
    names.append("out")
    scratch = {"m": (g, 1), "l": (g, 1)}
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
            num_scalar_prefetch=2,
            grid=(b, kh, plan.zbase + plan.nz),
            in_specs=specs,
            out_specs=head_spec,
            scratch_shapes=[pltpu.VMEM(s, jnp.float32) for s in scratch.values()]),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(counts.astype(jnp.int32).reshape(-1), whole_lengths.astype(jnp.int32), *args)
    return out.reshape(b, h, d)
