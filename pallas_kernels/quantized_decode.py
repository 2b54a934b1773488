"""Decode attention over the uniformly quantised cache of `jaxkv.cache.QuantizedCache` (KIVI,
int8, SnapKV + KIVI), plus its zone of tokens kept in the cache dtype.

Layout of one layer (N quantised slots per head, Z whole slots):
    k_codes:   uint8 [B, K, N, D * k_bits / 8] packed codes (asymmetric) | int8 [B, K, N, D]
               (symmetric, zero-point None)
    k_scale:   float16 [B, K, ceil(N / kg), D] per channel over groups of kg = k_group_tokens
               tokens (KIVI), or, when k_group_tokens == 0, float16 [B, K, N, D / cg] per token
               over groups of cg channels (int8: cg = D)
    k_zero:    like k_scale, or None (symmetric)
    v_codes:   like k_codes;  v_scale, v_zero: float16 [B, K, N, D / vg] per token
    q_lengths: int32 [B] valid quantised slots (the same for every head)
    whole_k, whole_v: [B, K, Z, D];  whole_lengths: int32 [B]

No dequantised cache is built: the K scales fold into the query (per channel group: q * s, then
a dot with the codes; per token: the score of the codes times the token's scale), zero-points
give a per-query term, and the V scales multiply the probabilities:
    out = sum_t (p_t * s_t) * code_t + sum_t p_t * z_t.
Scores and softmax in float32; one softmax over the quantised slots and the whole zone.

`quantized_decode_attention_reference` is the plain-jnp (XLA) version; `quantized_decode_attention`
the Pallas TPU kernel (unpacking the codes in VMEM, block by block; see the comment above it).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxkv.cache.quant import unpack_codes  # the code format (jaxkv.cache)
from pallas_kernels.dense_decode import NEG_INF


def _grouped_scores(qg, codes, k_scale, k_zero, kg: int):
    """K per channel over token groups: qg [B, K, G, D] f32, codes [B, K, N, D] -> [B, K, G, N]."""
    b, kh, n, d = codes.shape
    full = (n // kg) * kg
    pieces = []
    for lo, hi in ((0, full), (full, n)):
        if hi == lo:
            continue
        j0, j1 = lo // kg, -(-hi // kg)
        c = codes[:, :, lo:hi].astype(jnp.float32)
        size = hi - lo if hi - lo < kg else kg
        c = c.reshape(b, kh, j1 - j0, size, d)
        qs = qg[:, :, :, None, :] * k_scale[:, :, None, j0:j1].astype(jnp.float32)  # [B,K,G,J,D]
        s = jnp.einsum("BKGJD,BKJiD->BKGJi", qs, c)
        if k_zero is not None:
            z = k_zero[:, :, j0:j1].astype(jnp.float32)  # [B, K, J, D]
            s = s + jnp.einsum("BKGD,BKJD->BKGJ", qg, z)[..., None]
        pieces.append(s.reshape(b, kh, qg.shape[2], hi - lo))
    if not pieces:
        return jnp.zeros((b, kh, qg.shape[2], 0), jnp.float32)
    return jnp.concatenate(pieces, axis=-1)


def quantized_decode_attention_reference(q: jax.Array, k_codes: jax.Array, k_scale: jax.Array,
                                         k_zero: Optional[jax.Array], v_codes: jax.Array,
                                         v_scale: jax.Array, v_zero: Optional[jax.Array],
                                         q_lengths: jax.Array, whole_k: jax.Array,
                                         whole_v: jax.Array, whole_lengths: jax.Array, *,
                                         scale: float, k_bits: int, v_bits: int,
                                         k_group_tokens: int) -> jax.Array:
    """q: [B, H, D] -> out [B, H, D] (dtype of q). See the module docstring for the layout."""
    b, h, d = q.shape
    kh = whole_k.shape[1]
    g = h // kh
    n = k_codes.shape[2]
    qg = q.reshape(b, kh, g, d).astype(jnp.float32)  # [B, K, G, D]
    kc = unpack_codes(k_codes, k_bits, d)  # [B, K, N, D] small ints
    if k_group_tokens:
        s_q = _grouped_scores(qg, kc, k_scale, k_zero, k_group_tokens)
    else:
        nc = k_scale.shape[-1]
        qc = qg.reshape(b, kh, g, nc, d // nc)
        part = jnp.einsum("BKGjc,BKNjc->BKGNj", qc,
                          kc.reshape(b, kh, n, nc, d // nc).astype(jnp.float32))
        s_q = (part * k_scale[:, :, None].astype(jnp.float32)).sum(-1)  # [B, K, G, N]
        if k_zero is not None:
            s_q = s_q + jnp.einsum("BKGj,BKNj->BKGN", qc.sum(-1), k_zero.astype(jnp.float32))
    q_valid = jnp.arange(n)[None, :] < q_lengths[:, None]  # [B, N]
    s_q = jnp.where(q_valid[:, None, None, :], s_q * scale, NEG_INF)
    s_w = jnp.einsum("BKGD,BKZD->BKGZ", qg, whole_k.astype(jnp.float32)) * scale
    w_valid = jnp.arange(whole_k.shape[2])[None, :] < whole_lengths[:, None]  # [B, Z]
    s_w = jnp.where(w_valid[:, None, None, :], s_w, NEG_INF)

    m = jnp.maximum(s_q.max(-1, initial=NEG_INF), s_w.max(-1, initial=NEG_INF))[..., None]
    p_q = jnp.exp(s_q - m) * q_valid[:, None, None, :]  # [B, K, G, N]
    p_w = jnp.exp(s_w - m) * w_valid[:, None, None, :]  # [B, K, G, Z]
    denom = p_q.sum(-1) + p_w.sum(-1)  # [B, K, G]

    nv = v_scale.shape[-1]
    vc = unpack_codes(v_codes, v_bits, d).reshape(b, kh, n, nv, d // nv).astype(jnp.float32)
    pv = p_q[..., None] * v_scale[:, :, None].astype(jnp.float32)  # [B, K, G, N, nv]
    num = jnp.einsum("BKGNj,BKNjc->BKGjc", pv, vc).reshape(b, kh, g, d)
    if v_zero is not None:
        zt = jnp.einsum("BKGN,BKNj->BKGj", p_q, v_zero.astype(jnp.float32))  # [B, K, G, nv]
        num = num + jnp.repeat(zt, d // nv, axis=-1)
    num = num + jnp.einsum("BKGZ,BKZD->BKGD", p_w, whole_v.astype(jnp.float32))
    out = num / jnp.maximum(denom, 1e-30)[..., None]
    return out.reshape(b, h, d).astype(q.dtype)


# ---- Pallas TPU kernel ---------------------------------------------------------------------------
# Grid (B, K, nq + nz): one program per (sequence, KV head) walks the quantised slots in nq blocks
# of `bq` slots, then the whole zone in nz blocks of `bz` slots, along the last ("arbitrary") axis,
# with one online softmax over both: running max m, denominator l and the accumulators live in
# VMEM as float32 for the whole walk, and the [G, D] output tile is written once, on the last step.
# The G query heads of a KV head form one tile, so every cache block is read once per KV head.
# The whole zone is thus the last steps of the same softmax: no partial (m, l, acc) states are
# returned and combined outside the kernel. q_lengths and whole_lengths are scalar prefetched (SMEM): steps past a sequence's valid slots
# skip their compute (`pl.when`) and their index_maps repeat the last valid block (no new DMA);
# the partial last block of either zone is masked (nothing is padded or copied in HBM).
#
# Unpacking. A packed code block is uint8 [bq, D / per] (per = 8 / bits codes a byte, the first in
# the lowest bits), so byte j holds channels j * per + s at shift s * bits. Shifting and masking
# the whole block by s * bits gives the "sub-block" s: codes [bq, D / per] of channels
# {j * per + s}. Interleaving the sub-blocks back into [bq, D] would cost a lane shuffle of every
# code, so the kernel never does it: everything that meets the codes is split the same way
# instead (the query and the K scale rows through 0/1 selection matrices `sel` [per, D, D / per],
# and the V accumulator, kept as `per` sub-accumulators [G, D / per] and scattered back through
# `sel` once, at the end). Every contraction below is a plain 2-D MXU dot.
#
# K per channel over groups of kg tokens (KIVI). A block holds J = bq / kg scale rows. Folding
# row j into the query gives J * G query rows (row r = j * G + g: q_g * s_j); one dot scores them
# against every token of the block, and each token keeps the rows of its own group
# (`row_grp == tok_grp`), summed back to G rows by a 0/1 matrix. The zero-points give the
# per-query, per-group term q . z_j, spread to the group's tokens.
# K per token over nc channel groups (int8: nc = 1): nc * G query rows (q_g masked to group m),
# each row block scaled by the token's scale m; zero-points: sum_{c in m} q_c times z_{t, m}.
# V per token over nv channel groups: p * s_{t, m} for each group m (nv * G rows), dotted with the
# codes, each channel keeping the rows of its group; zero-points: p @ z [G, nv], spread to the
# group's channels at the end.
#
# Cost: the K dot has J * G rows per block (J = 16 with `default_block_size(32)`), i.e. J times
# the MXU work of a dense [G, D] query; with K scales per token (int8) it has G rows (nc = 1).
#
# Selection / expansion dots use Precision.HIGHEST (0/1 matrices: exact in float32); the scoring
# and value dots use HIGHEST for float32 models and the MXU default for bfloat16 ones. Rows past
# a sequence's slots (the tail of a partial block may be undefined memory, even NaN) are zeroed
# before they can meet a 0 * NaN: scales and zero-points by row, whole-zone V by row; scores
# there are masked to NEG_INF and probabilities to 0.

EXACT = jax.lax.Precision.HIGHEST  # 0/1 selection dots: exact in float32 (shared: mixed_decode)
_NN = (((1,), (0,)), ((), ()))  # [M, C] x [C, N] -> [M, N]
_NT = (((1,), (1,)), ((), ()))  # [M, C] x [N, C] -> [M, N]


def dot_nn(a, b, precision=EXACT):
    return jax.lax.dot_general(a, b, _NN, precision=precision, preferred_element_type=jnp.float32)


def dot_nt(a, b, precision=EXACT):
    return jax.lax.dot_general(a, b, _NT, precision=precision, preferred_element_type=jnp.float32)


def unpack_block(x: jax.Array, bits: int, per: int):
    """uint8 [T, D / per] packed codes (or int8 / uint8 [T, D] at 8 bits) -> `per` float32
    sub-blocks [T, D / per]; sub-block s holds channels j * per + s."""
    xi = x.astype(jnp.int32)  # int8 sign-extends, uint8 zero-extends
    if per == 1:
        return [xi.astype(jnp.float32)]
    mask = 2 ** bits - 1
    return [((xi >> (s * bits)) & mask).astype(jnp.float32) for s in range(per)]


def row_iota(n: int):
    return jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0)


def col_iota(n: int):
    return jax.lax.broadcasted_iota(jnp.int32, (1, n), 1)


class _Plan(NamedTuple):
    """Static shapes and choices of one quantized_decode_attention call."""
    g: int            # query heads per KV head
    d: int            # head dim
    n: int            # quantised slots (0: no quantised zone)
    z: int            # whole-zone slots (0: no whole zone)
    bq: int           # quantised slots per block
    nq: int           # quantised blocks
    bz: int           # whole-zone slots per block
    nz: int           # whole-zone blocks
    k_bits: int
    v_bits: int
    per_k: int        # K codes per byte (1: int8 / uint8 codes, unpacked)
    per_v: int
    kg: int           # tokens per K scale row (0: K scales per token)
    mk: int           # K query-row blocks: scale rows per block (kg > 0) or channel groups nc
    nv: int           # V channel groups
    has_kz: bool
    has_vz: bool
    scale: float
    precision: object  # of the scoring / value dots


def _quant_consts(p: _Plan):
    """0/1 (float32) and group-index (int32) constants of the kernel, by name (numpy)."""
    g, d = p.g, p.d
    out = {}

    def rows(m):  # rep_g [m G, G], rep_m [m G, m], sum_g [G, m G], row_grp int [m G, 1]
        r = np.arange(m * g)
        return ((r[:, None] % g == np.arange(g)[None, :]).astype(np.float32),
                (r[:, None] // g == np.arange(m)[None, :]).astype(np.float32),
                (r[None, :] % g == np.arange(g)[:, None]).astype(np.float32),
                (r // g).astype(np.int32)[:, None])

    def sel(per):  # [per, D, D / per]: sub-block s, lane j <- channel j * per + s
        c, j = np.arange(d)[None, :, None], np.arange(d // per)[None, None, :]
        return (c == j * per + np.arange(per)[:, None, None]).astype(np.float32)

    def chan_grp(per, groups):  # int [per, 1, D / per]: channel group of sub-block lane j
        j = np.arange(d // per)[None, None, :]
        return ((j * per + np.arange(per)[:, None, None]) // (d // groups)).astype(np.int32)

    if p.n:
        if p.per_k > 1:
            out["sel_k"] = sel(p.per_k)
        if p.per_v > 1:
            out["sel_v"] = sel(p.per_v)
        if p.mk > 1:
            out["rep_gk"], out["rep_mk"], out["sum_gk"], out["row_grp_k"] = rows(p.mk)
        if p.kg:
            if p.mk > 1:
                out["tok_grp"] = (np.arange(p.bq) // p.kg).astype(np.int32)[None, :]
        else:
            out["eye_k"] = np.eye(p.mk, dtype=np.float32)
            if p.mk > 1:
                out["chan_grp_k"] = chan_grp(p.per_k, p.mk)
            if p.has_kz:
                out["grp_k"] = (np.arange(d)[:, None] // (d // p.mk)
                                == np.arange(p.mk)[None, :]).astype(np.float32)  # [D, nc]
        out["eye_v"] = np.eye(p.nv, dtype=np.float32)
        if p.nv > 1:
            out["rep_gv"], out["rep_mv"], out["sum_gv"], out["row_grp_v"] = rows(p.nv)
            out["chan_grp_v"] = chan_grp(p.per_v, p.nv)
        if p.has_vz:
            out["expand_v"] = (np.arange(d)[None, :] // (d // p.nv)
                               == np.arange(p.nv)[:, None]).astype(np.float32)  # [nv, D]
    return out


def _quant_kernel(qlen_ref, wlen_ref, *refs, plan: _Plan, names):
    """One (b, kv head, block) step; refs by `names` (inputs, output, scratch)."""
    p = plan
    r = dict(zip(names, refs))
    b, i = pl.program_id(0), pl.program_id(2)
    m_ref, l_ref = r["m"], r["l"]
    accs = [r[k] for k in ("acc_q", "acc_z", "acc_w") if k in r]

    def qf():  # [G, D] float32 query with the softmax scale folded in
        return r["q"][...].astype(jnp.float32) * p.scale

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        for acc in accs:
            acc[...] = jnp.zeros(acc.shape, jnp.float32)
        if p.n:  # the query rows of the quantised zone, once per (sequence, KV head)
            q = qf()
            for s in range(p.per_k):
                qs = q if p.per_k == 1 else dot_nn(q, r["sel_k"][s])  # [G, D / per_k]
                if p.mk > 1:
                    qs = dot_nn(r["rep_gk"][...], qs)  # [mk G, D / per_k]
                    if not p.kg:  # row block m keeps its channel group's channels only
                        qs = jnp.where(r["row_grp_k"][...] == r["chan_grp_k"][s], qs, 0.0)
                r["qk"][s] = qs
            if not p.kg and p.has_kz:
                r["qsum"][...] = dot_nn(q, r["grp_k"][...])  # [G, nc]

    def softmax_step(s, valid_row):
        """s [G, T] scores (masked), valid_row [1, T] -> p [G, T]; rescales every accumulator."""
        m_prev = m_ref[...]  # [G, 1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)  # [G, 1]
        prob = jnp.where(valid_row, jnp.exp(s - m_new), 0.0)  # [G, T]
        l_ref[...] = alpha * l_ref[...] + prob.sum(axis=1, keepdims=True)
        m_ref[...] = m_new
        for acc in accs:
            if len(acc.shape) == 3:  # V sub-accumulators
                for j in range(acc.shape[0]):
                    acc[j] = alpha * acc[j]
            else:
                acc[...] = alpha * acc[...]
        return prob

    if p.n:
        nql = jnp.clip(qlen_ref[b], 0, p.n)

        @pl.when((i < p.nq) & (i * p.bq < nql))
        def _quantised_block():
            start = i * p.bq
            valid_row = start + col_iota(p.bq) < nql  # [1, T]
            valid_col = start + row_iota(p.bq) < nql  # [T, 1]
            kc = unpack_block(r["k_codes"][...], p.k_bits, p.per_k)  # per_k x [T, D / per_k]
            if p.kg:  # K per channel: fold each scale row into the query
                row_ok = (i * p.mk + row_iota(p.mk)) * p.kg < nql  # [J, 1]
                sc = jnp.where(row_ok, r["k_scale"][...].astype(jnp.float32), 0.0)  # [J, D]
                if p.mk > 1:
                    sc = dot_nn(r["rep_mk"][...], sc)  # [J G, D]: row j G + g <- scale row j
                raw = 0.0
                for s in range(p.per_k):
                    sc_s = sc if p.per_k == 1 else dot_nn(sc, r["sel_k"][s])  # [J G, D / per_k]
                    raw = raw + dot_nt(r["qk"][s] * sc_s, kc[s], p.precision)  # [J G, T]
                if p.mk > 1:  # token t keeps the rows of its group t // kg
                    own = r["row_grp_k"][...] == r["tok_grp"][...]  # [J G, T]
                    score = dot_nn(r["sum_gk"][...], jnp.where(own, raw, 0.0))  # [G, T]
                else:
                    score = raw
                if p.has_kz:
                    zr = jnp.where(row_ok, r["k_zero"][...].astype(jnp.float32), 0.0)  # [J, D]
                    zq = dot_nt(qf(), zr, p.precision)  # [G, J]
                    if p.mk > 1:
                        spread = (row_iota(p.mk) == r["tok_grp"][...]).astype(jnp.float32)
                        score = score + dot_nn(zq, spread)  # [G, T]
                    else:
                        score = score + zq
            else:  # K per token over nc channel groups
                ks = jnp.where(valid_col, r["k_scale"][...].astype(jnp.float32), 0.0)  # [T, nc]
                ks_t = dot_nt(r["eye_k"][...], ks)  # [nc, T]
                raw = 0.0
                for s in range(p.per_k):
                    raw = raw + dot_nt(r["qk"][s], kc[s], p.precision)  # [nc G, T]
                if p.mk > 1:
                    score = dot_nn(r["sum_gk"][...], raw * dot_nn(r["rep_mk"][...], ks_t))
                else:
                    score = raw * ks_t
                if p.has_kz:
                    kz = jnp.where(valid_col, r["k_zero"][...].astype(jnp.float32), 0.0)
                    score = score + dot_nt(r["qsum"][...], kz, p.precision)  # [G, T]
            prob = softmax_step(jnp.where(valid_row, score, NEG_INF), valid_row)  # [G, T]

            # V: scales folded into the probabilities
            vs = jnp.where(valid_col, r["v_scale"][...].astype(jnp.float32), 0.0)  # [T, nv]
            vs_t = dot_nt(r["eye_v"][...], vs)  # [nv, T]
            if p.nv > 1:
                pv = dot_nn(r["rep_gv"][...], prob) * dot_nn(r["rep_mv"][...], vs_t)  # [nv G, T]
            else:
                pv = prob * vs_t  # [G, T]
            vc = unpack_block(r["v_codes"][...], p.v_bits, p.per_v)
            for s in range(p.per_v):
                part = dot_nn(pv, vc[s], p.precision)  # [nv G, D / per_v]
                if p.nv > 1:  # channel keeps the rows of its group
                    own = r["row_grp_v"][...] == r["chan_grp_v"][s]
                    part = dot_nn(r["sum_gv"][...], jnp.where(own, part, 0.0))  # [G, D / per_v]
                r["acc_q"][s] = r["acc_q"][s] + part
            if p.has_vz:
                vz = jnp.where(valid_col, r["v_zero"][...].astype(jnp.float32), 0.0)  # [T, nv]
                r["acc_z"][...] = r["acc_z"][...] + dot_nn(prob, vz, p.precision)  # [G, nv]

    if p.z:
        nwl = jnp.clip(wlen_ref[b], 0, p.z)

        @pl.when((i >= p.nq) & ((i - p.nq) * p.bz < nwl))
        def _whole_block():
            start = (i - p.nq) * p.bz
            valid_row = start + col_iota(p.bz) < nwl
            valid_col = start + row_iota(p.bz) < nwl
            score = dot_nt(qf(), r["whole_k"][...].astype(jnp.float32), p.precision)  # [G, T]
            prob = softmax_step(jnp.where(valid_row, score, NEG_INF), valid_row)
            wv = jnp.where(valid_col, r["whole_v"][...].astype(jnp.float32), 0.0)  # [T, D]
            r["acc_w"][...] = r["acc_w"][...] + dot_nn(prob, wv, p.precision)

    @pl.when(i == p.nq + p.nz - 1)
    def _finish():
        out = jnp.zeros((p.g, p.d), jnp.float32)
        if p.z:
            out = out + r["acc_w"][...]
        if p.n:
            for s in range(p.per_v):  # sub-accumulator s -> channels j * per_v + s
                acc = r["acc_q"][s]
                out = out + (acc if p.per_v == 1 else dot_nt(acc, r["sel_v"][s]))
            if p.has_vz:
                out = out + dot_nn(r["acc_z"][...], r["expand_v"][...])  # [G, D]
        # no valid slot: every accumulator and l are 0 -> zeros, like the reference
        r["out"][...] = (out / jnp.maximum(l_ref[...], 1e-30)).astype(r["out"].dtype)


def packing(codes: jax.Array, bits: int, d: int, name: str) -> int:
    """Codes per byte of a codes array (1: int8 / 8-bit codes), checking its last axis."""
    if codes.dtype == jnp.int8 or bits == 8:
        per, width = 1, d
    else:
        if bits not in (2, 4):
            raise ValueError(f"{name} bits={bits!r}: packed codes are 2 or 4 bits (8: unpacked)")
        per, width = 8 // bits, d * bits // 8
        if d % per:
            raise ValueError(f"head_dim={d}: must be a multiple of {per} for {bits}-bit codes")
    if codes.shape[-1] != width:
        raise ValueError(f"{name}.shape={codes.shape}: last axis must be {width} "
                         f"(head_dim={d} at {bits} bits)")
    return per


def default_block_size(k_group_tokens: int, target: int = 512) -> int:
    """A TPU-friendly quantised block size near `target`: a multiple of k_group_tokens whose
    scale rows fill whole float16 sublane tiles (16 rows) and whose uint8 code rows fill whole
    int8 tiles (32 rows)."""
    kg = max(int(k_group_tokens), 1)
    unit = int(np.lcm(16 * kg, 32)) if k_group_tokens else 32
    return unit * max(1, round(target / unit))


@functools.partial(jax.jit, static_argnames=("scale", "k_bits", "v_bits", "k_group_tokens",
                                             "block_size", "whole_block_size", "interpret",
                                             "poison"))
def quantized_decode_attention(q: jax.Array, k_codes: jax.Array, k_scale: jax.Array,
                               k_zero: Optional[jax.Array], v_codes: jax.Array,
                               v_scale: jax.Array, v_zero: Optional[jax.Array],
                               q_lengths: jax.Array, whole_k: jax.Array, whole_v: jax.Array,
                               whole_lengths: jax.Array, *, scale: float, k_bits: int,
                               v_bits: int, k_group_tokens: int, block_size: int = 512,
                               whole_block_size: Optional[int] = None, interpret=False,
                               poison: bool = False) -> jax.Array:
    """Pallas TPU kernel of `quantized_decode_attention_reference` (same arguments and result).

    q: [B, H, D] -> [B, H, D] in q's dtype; the layout is the module docstring's. The packed codes
    are unpacked inside the kernel (shifts and masks on VMEM blocks); no dequantised cache exists.
    block_size: quantised slots per grid step (static). When N > block_size it must be a multiple
      of k_group_tokens (each block holds whole scale groups); on TPU also a multiple of 32 (int8
      tiles) with block_size / k_group_tokens a multiple of 16 (float16 tiles):
      `default_block_size(k_group_tokens)` picks one. N need not be a multiple of it: the partial
      last block is masked.
    whole_block_size: whole-zone slots per grid step (default block_size; on TPU a multiple of 16
      when Z exceeds it).
    interpret: False (Mosaic TPU), True (CPU interpret mode, `pltpu.InterpretParams()`) or an
      InterpretParams. poison: tests only; the output starts as NaN (aliased), so any tile the
      kernel fails to write shows up.
    """
    b, h, d = q.shape
    kh, z = whole_k.shape[1], whole_k.shape[2]
    n = k_codes.shape[2]
    kg = int(k_group_tokens)
    if q.ndim != 3 or whole_k.shape[0] != b or whole_k.shape[3] != d or h % kh \
            or whole_v.shape != whole_k.shape:
        raise ValueError(f"q {q.shape}, whole_k {whole_k.shape}, whole_v {whole_v.shape}: "
                         f"expected q [B, H, D], whole_k = whole_v [B, K, Z, D], K dividing H")
    if k_codes.shape[:3] != (b, kh, n) or v_codes.shape[:3] != (b, kh, n):
        raise ValueError(f"k_codes {k_codes.shape}, v_codes {v_codes.shape}: expected "
                         f"[B, K, N, ...] with B={b}, K={kh}")
    if q_lengths.shape != (b,) or whole_lengths.shape != (b,):
        raise ValueError(f"q_lengths {q_lengths.shape}, whole_lengths {whole_lengths.shape}: "
                         f"expected ({b},)")
    if block_size < 1 or (whole_block_size is not None and whole_block_size < 1):
        raise ValueError(f"block_size={block_size}, whole_block_size={whole_block_size}: must "
                         f"be positive")
    per_k = packing(k_codes, k_bits, d, "k_codes")
    per_v = packing(v_codes, v_bits, d, "v_codes")
    nv = v_scale.shape[-1]
    if v_scale.shape != (b, kh, n, nv) or d % nv or \
            (v_zero is not None and v_zero.shape != v_scale.shape):
        raise ValueError(f"v_scale {v_scale.shape}: expected [B, K, N, D / vg] with D={d} a "
                         f"multiple of the groups (v_zero alike)")
    if kg < 0:
        raise ValueError(f"k_group_tokens={k_group_tokens}: must be >= 0")
    if kg:
        k_rows = -(-n // kg)
        expect = (b, kh, k_rows, d)
    else:
        nc = k_scale.shape[-1]
        expect = (b, kh, n, nc)
        if d % nc:
            raise ValueError(f"k_scale {k_scale.shape}: its {nc} channel groups must divide "
                             f"head_dim={d}")
    if k_scale.shape != expect or (k_zero is not None and k_zero.shape != expect):
        raise ValueError(f"k_scale {k_scale.shape}: expected {expect} for k_group_tokens={kg}")

    if n == 0 and z == 0:
        return jnp.zeros(q.shape, q.dtype)
    if n > block_size:
        if kg and block_size % kg:
            raise ValueError(f"block_size={block_size}: must be a multiple of k_group_tokens="
                             f"{kg} (try default_block_size({kg}))")
        bq = block_size
    else:
        bq = n
    bz = min(whole_block_size or block_size, z)
    g = h // kh
    plan = _Plan(g=g, d=d, n=n, z=z, bq=bq, nq=pl.cdiv(n, bq) if n else 0, bz=bz,
                 nz=pl.cdiv(z, bz) if z else 0, k_bits=k_bits, v_bits=v_bits, per_k=per_k,
                 per_v=per_v, kg=kg, mk=(-(-bq // kg) if kg else k_scale.shape[-1]) if n else 1,
                 nv=nv, has_kz=k_zero is not None, has_vz=v_zero is not None,
                 scale=float(scale),
                 precision=EXACT if jnp.dtype(q.dtype) == jnp.float32 else None)

    def q_index(bi, hi, i, qlen_ref, wlen_ref):
        # past the valid slots (and in the whole-zone steps): the last valid block, no new DMA
        last = jnp.maximum(pl.cdiv(jnp.clip(qlen_ref[bi], 0, n), bq) - 1, 0)
        return bi, hi, jnp.minimum(i, last), 0

    def w_index(bi, hi, i, qlen_ref, wlen_ref):
        last = jnp.maximum(pl.cdiv(jnp.clip(wlen_ref[bi], 0, z), bz) - 1, 0)
        return bi, hi, jnp.clip(i - plan.nq, 0, last), 0

    def head_index(bi, hi, i, qlen_ref, wlen_ref):
        return bi, hi, 0, 0

    sq = pl.squeezed
    qg = q.reshape(b, kh, g, d)  # [B, K, G, D]; free (row-major split of H)
    head_spec = pl.BlockSpec((sq, sq, g, d), head_index)
    names, specs, args = ["q"], [head_spec], [qg]

    def add(name, x, spec):
        names.append(name)
        specs.append(spec)
        args.append(x)

    if n:
        rows = lambda x: pl.BlockSpec((sq, sq, bq, x.shape[-1]), q_index)  # [bq, ...] per block
        add("k_codes", k_codes, rows(k_codes))
        add("k_scale", k_scale, pl.BlockSpec((sq, sq, plan.mk, d), q_index) if kg
            else rows(k_scale))
        if k_zero is not None:
            add("k_zero", k_zero, specs[-1])
        add("v_codes", v_codes, rows(v_codes))
        add("v_scale", v_scale, rows(v_scale))
        if v_zero is not None:
            add("v_zero", v_zero, rows(v_zero))
    if z:
        w_spec = pl.BlockSpec((sq, sq, bz, d), w_index)
        add("whole_k", whole_k, w_spec)
        add("whole_v", whole_v, w_spec)
    for name, c in _quant_consts(plan).items():  # constant blocks: fetched once
        add(name, jnp.asarray(c), pl.BlockSpec(c.shape, lambda *a, nd=c.ndim: (0,) * nd))
    aliases = {}
    if poison:
        add("poison", jnp.full(qg.shape, jnp.nan, q.dtype), pl.BlockSpec(memory_space=pl.ANY))
        aliases = {len(args) + 1: 0}  # operand index counts the two scalar-prefetch operands
    names.append("out")
    scratch = {"m": (g, 1), "l": (g, 1)}  # running max, denominator
    if n:
        scratch["acc_q"] = (per_v, g, d // per_v)  # V sub-accumulators (channels j per_v + s)
        if v_zero is not None:
            scratch["acc_z"] = (g, nv)  # sum_t p_t z_{t, m}
        scratch["qk"] = (per_k, plan.mk * g, d // per_k)  # the query rows against K codes
        if not kg and k_zero is not None:
            scratch["qsum"] = (g, plan.mk)
    if z:
        scratch["acc_w"] = (g, d)
    names += list(scratch)
    out = pl.pallas_call(
        functools.partial(_quant_kernel, plan=plan, names=tuple(names)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, plan.nq + plan.nz),
            in_specs=specs,
            out_specs=head_spec,
            scratch_shapes=[pltpu.VMEM(s, jnp.float32) for s in scratch.values()]),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(q_lengths.astype(jnp.int32), whole_lengths.astype(jnp.int32), *args)
    return out.reshape(b, h, d)
