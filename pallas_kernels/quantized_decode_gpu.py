"""Decode attention over the uniformly quantised cache of `jaxkv.cache.QuantizedCache` (KIVI 2/4
bits, int8, SnapKV + KIVI) on NVIDIA Hopper GPUs: the Mosaic GPU counterpart of
`quantized_decode.quantized_decode_attention`, plus the code-block kernel (`codes_partials`) that
`mixed_decode_gpu` reuses.

Layout and reference: `pallas_kernels.quantized_decode` (`quantized_decode_attention_reference`).

Two launches, their split partials merged by one log-sum-exp combine (`gpu_common`): the
quantised zone through `codes_partials` below, the whole zone (tokens in the cache dtype) through
the dense kernel's partials (`dense_decode_gpu.dense_decode_partials`).

`codes_partials`: split-K over blocks of BK = 64 slots, one CTA (one warpgroup) per (sequence,
KV head, split), TMA-pipelined code / scale blocks, in the "columns" orientation of `gpu_common`
(slots are rows: S^T = K_hat Q^T [BK, Gq], softmax along columns, O^T += V_hat^T P^T [D, Gq];
both products on WGMMA). Per block:

  1. K codes -> registers -> integer shifts / masks -> cache-dtype values K_hat [BK, C] in shared
     memory. A packed byte j holds channels j * per + s at shift s * bits (per = 8 / bits codes a
     byte); the sub-blocks s are stored side by side (column slab s = channels {j * per + s}), so
     K_hat's columns are the channels in "sub-block order" and the query is permuted to the same
     order (in the wrapper: a [G, D] gather). Codes are small integers, exact in bf16 / f16.
  2. Scales and zero-points enter on the query side, never per element of K:
     - K per channel over groups of kg tokens (KIVI): for each of the J' <= ceil((BK - 1) / kg) + 1
       scale rows the block touches, B_j = Q^T * s_j (channels are the rows of B, the scale row is
       a row vector) is written to shared memory and S_j^T = K_hat B_j runs on WGMMA; each slot
       keeps the S_j^T of its own group, plus its zero-point term q . z_j (float32). B_j goes in
       as two cache-dtype parts, hi + lo (two WGMMAs into one accumulator): bfloat16's 8
       significant bits alone put errors of ~2^-9 |q . s code| on a score whose zero-point term
       cancels most of it (outputs off by several 1e-2 in the tests);
     - K per token over nc channel groups (int8: nc = 1): B_m = Q^T masked to channel group m
       (built once per call in the wrapper), S^T = sum_m k_scale[:, m] * (K_hat B_m) +
       k_zero[:, m] * sum_{c in m} q_c.
  3. Online softmax (float32, base 2) along the slots; P^T [BK, Gq] -> shared memory.
  4. V codes -> V_hat = code * v_scale[t, group] + v_zero[t, group] in registers (per token over
     nv channel groups), stored in sub-block order; O^T += V_hat^T P^T (WGMMA, V_hat transposed
     from shared memory). The output rows come out in V's sub-block order and the wrapper puts
     the channels back in order (a gather of the [G, D] partials).
Blocks past a head's valid slots are never fetched (dynamic trip count); the last block is fetched
at N - BK (overlapping, never out of bounds) with its slots masked by position, as in the dense
kernel; N < BK pads the codes to one block.

What Mosaic GPU (jax 0.10.2) cannot express, and the formulation used instead:
  - A per-channel vector in sub-block order (a strided gather, stride = codes per byte) cannot be
    loaded into the register layout of a tile's columns: `plgpu.load` of a strided view into
    `Layout.WGMMA.reduce(0)` fails with "Vectorized dimension should not require further tiling
    and have a stride of 1", and register arrays have no lane shuffle / interleave op that would
    put unpacked codes back in natural order (nor a matmul other than WGMMA: no
    `lax.dot_general` lowering). So the wrapper permutes the per-channel K scales and
    zero-points of KIVI into sub-block order ([B, K, ceil(N / kg), D] float16, one XLA gather
    per call: about 16 of KIVI-2's 96 bytes per token at D = 128, kg = 32, read and written once
    more), and the query. Storing K scales in sub-block order in QuantizedCache would remove
    that pass.
  - TMA boxes need an innermost extent of 16 bytes or more, so per-token scales [N, nc] (nc * 2
    bytes a row) are fetched as flat 1-D runs of BK * nc values and their columns read through a
    reshaped shared-memory view.
  - Decoding runs elementwise in 32-bit registers (shift, mask, or-into-float exponent bits,
    subtract: no integer-to-float conversion instruction); V's per-element scale is a select
    per channel group. That is ALU work per code, probably the limit at 2 bits on an H100 (no
    packed bf16x2 decode as Mosaic GPU's int4 -> bf16 path has), not measured: no GPU was
    available.
Plain-dot (non-WGMMA) formulations are not used on the GPU: every product is a WGMMA, with N =
Gq (G padded to 16, a 32-byte swizzle shared by both operands of a WGMMA) as the small side.

Constraints (`quantized_gpu_supported`): float16 / bfloat16 q, whole zone of the same dtype, D a
multiple of 64, G <= 64; codes at 2, 4 or 8 bits (int8 symmetric included); KIVI groups of
kg >= 8 tokens; at most 8 channel groups for per-token scales, V groups of a multiple of
`per` channels. The dispatcher runs the reference for anything else.

Interpret mode: the kernel runs in Pallas' Mosaic GPU interpreter, including the S_j^T WGMMAs
(both operands in shared memory, untransposed); the V_hat^T P^T WGMMA is a plain dot there (a
transposed operand), as `gpu_common` describes.
"""
from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.dense_decode_gpu import dense_decode_partials, gpu_kernel_supported
from pallas_kernels.gpu_common import (COLUMN_SWIZZLE, COLUMN_TILE, LOG2E, NEG_INF, WGMMA_ROWS,
                                       layouts, Ops, check_16bit, column_finish,
                                       column_group_pad, column_softmax_step,
                                       default_num_splits, interpret_params, merge_partials,
                                       score_product, split_16bit, split_share, swizzled,
                                       unpermute_partials, value_product)
from pallas_kernels.quantized_decode import packing

BLOCK = 64  # slots per block (WGMMA's M)
SMEM_LIMIT = 200 * 1024  # bytes of shared memory a launch may plan for (227 KiB on an H100)
MAX_GROUPS = 8  # K scale rows per block, per-token channel groups, V groups: unrolled selects
_MAGIC = 0x4B000000  # float32 2^23: (2^23 + i) as bits, minus 2^23, is i for 0 <= i < 2^23


class CodePlan(NamedTuple):
    """Static description of one `codes_partials` launch."""
    g: int                # query heads per KV head
    d: int                # V channels (rows of O^T)
    n: int                # slots of the slot axis (>= BLOCK, padded by the caller)
    dtype: str            # cache dtype: decoded blocks, B matrices, P^T
    k_width: int          # bytes (elements) of one slot's K code row
    k_signed: bool        # int8 codes
    k_subs: Tuple[Tuple[int, int], ...]  # (shift, bits) of each K column slab
    k_mode: str           # "channel": K scale rows over kg slots; "token": fixed B matrices
    kg: int               # "channel": slots per scale row
    k_rows: int           # "channel": scale rows a block can touch
    nb: int               # "token": B matrices (channel groups)
    k_token_scale: bool   # "token": per-slot K scales [N, nb] (else unscaled: mixed)
    has_kz: bool          # K zero-points
    k_bias: bool          # a per-query score term [Gq] (mixed: the zero-point term)
    v_raw: bool           # V block in the cache dtype (no codes)
    v_width: int          # bytes of one slot's V code row
    v_signed: bool
    v_subs: Tuple[Tuple[int, int], ...]  # (shift, bits) of each V column slab
    nv: int               # V scale groups (per slot)
    has_vz: bool
    b_parts: int          # cache-dtype parts of each B matrix (2: hi + lo, `split_16bit`)
    splits: int
    scale: float


def codes_smem_bytes(g: int, d: int, k_columns: int, b_rows: int, n_b: int, k_width: int,
                     v_width: int, itemsize: int, stages: int = 2) -> int:
    """Shared memory of one `codes_partials` CTA (bytes, scales and barriers not counted): K_hat
    [BK, k_columns], V_hat [BK, D], P^T [BK, Gq], n_b B matrices [b_rows, Gq], and `stages`
    pipeline buffers of the K and V code blocks (V in the cache dtype when v_width is 0)."""
    gq = column_group_pad(g)
    operands = (BLOCK * (k_columns + d + gq) + n_b * b_rows * gq) * itemsize
    v_block = BLOCK * (v_width or d * itemsize)
    return operands + stages * (BLOCK * k_width + v_block)


def decode_codes(x, shift: int, bits: int, signed: bool):
    """int32 codes (bytes, zero- or sign-extended) -> float32 of bits [shift, shift + bits),
    exact, without an int -> float conversion (exponent bits or-ed in, then 2^23 subtracted)."""
    if signed:  # int8 in [-128, 127]
        y = (x + 128) | _MAGIC
        return lax.bitcast_convert_type(y, jnp.float32) - (8388608.0 + 128.0)
    y = x if shift == 0 and bits == 8 else (x >> shift) & (2 ** bits - 1)
    return lax.bitcast_convert_type(y | _MAGIC, jnp.float32) - 8388608.0


def sub_order(width: int, per: int) -> list:
    """Natural channel of each column of `per` side-by-side sub-block slabs of `width` columns:
    slab s, column j <- channel j * per + s."""
    return [j * per + s for s in range(per) for j in range(width)]


def codes_partials(plan: CodePlan, inputs: Dict[str, jax.Array], *, interpret: bool,
                   max_concurrent_steps: int = 2):
    """The code-block split-K kernel (see the module docstring); inputs by name:

    count [B, K] int32: valid slots per (sequence, head), slots [0, count) of the slot axis.
    K side, "channel": qt [B, K, C, Gq] float32 (query, channels in slab order, transposed,
      zero columns past G); k_scale (and k_zero) [B, K, R, C] float16, scale rows in slab order,
      R >= (n - BLOCK) // kg + k_rows. "token": bmat [B, K, nb * b_parts, C, Gq] cache dtype
      (B matrix m is the sum of parts m * b_parts + i, `split_16bit`); k_scale (and
      k_zero) [B, K, n * nb] flat per-slot scales if k_token_scale; qsum [B, K, nb, Gq] float32
      with k_zero; bias [B, K, Gq] float32 if k_bias. k_codes [B, K, n, k_width] uint8 / int8.
    V side: v [B, K, n, D] cache dtype (v_raw) or v_codes [B, K, n, v_width] uint8 / int8 with
      v_scale (and v_zero) [B, K, n * nv] flat, float16 or float32.
    -> (o [B, K, P, D, Gq] float32, rows in V's slab order, each split normalised by its own
    denominator; lse [B, K, P, Gq] float32 base 2): `gpu_common.unpermute_partials`."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    p = plan
    b, kh = inputs["count"].shape
    gq, bk, d = column_group_pad(p.g), BLOCK, p.d
    cw = len(p.k_subs) * p.k_width  # columns of K_hat
    dtype = jnp.dtype(p.dtype)
    ops = Ops(interpret)
    wg, row, col = layouts()
    tr = swizzled(COLUMN_TILE, dtype, COLUMN_SWIZZLE)  # every WGMMA operand of this kernel
    qk_scale = p.scale * LOG2E
    names = list(inputs)
    pipelined = [nm for nm in ("k_codes", "k_scale", "k_zero", "v", "v_codes", "v_scale",
                               "v_zero") if nm in inputs and not (
                                   p.k_mode == "token" and not p.k_token_scale
                                   and nm in ("k_scale", "k_zero"))]

    def kernel(*refs):
        r = dict(zip(names + ["o", "lse"], refs))
        bi, hi, pi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("p")
        count = r["count"][bi, hi]
        blocks = lax.div(count + (bk - 1), jnp.int32(bk))
        first, nblk = split_share(blocks, pi, p.splits)

        def fetch(i):  # element offset of the split's block i (clamped, never out of bounds)
            return jnp.minimum((first + i) * bk, p.n - bk)

        def spec(name):
            x = inputs[name]
            if name == "k_codes":
                return plgpu.BlockSpec((pl.Element(bk), p.k_width), lambda j: (fetch(j), 0))
            if name in ("k_scale", "k_zero") and p.k_mode == "channel":
                return plgpu.BlockSpec((pl.Element(p.k_rows), x.shape[-1]),
                                       lambda j: (fetch(j) // p.kg, 0))
            if name in ("k_scale", "k_zero"):  # flat per-slot scales [n * nb]
                return plgpu.BlockSpec((pl.Element(bk * p.nb),), lambda j: (fetch(j) * p.nb,))
            if name == "v":
                return plgpu.BlockSpec((pl.Element(bk), d), lambda j: (fetch(j), 0), transforms=tr)
            if name == "v_codes":
                return plgpu.BlockSpec((pl.Element(bk), p.v_width), lambda j: (fetch(j), 0))
            return plgpu.BlockSpec((pl.Element(bk * p.nv),), lambda j: (fetch(j) * p.nv,))

        fixed = {}  # per-CTA values
        if p.k_mode == "channel":
            fixed["qt"] = ops.load(r["qt"].at[bi, hi], wg).astype(jnp.float32)  # [C, Gq]
        if "qsum" in r:
            fixed["qsum"] = [ops.load(r["qsum"].at[bi, hi, m], col) for m in range(p.nb)]
        if "bias" in r:
            fixed["bias"] = ops.load(r["bias"].at[bi, hi], col)  # [Gq]

        def decode_k(x, kd_smem):  # codes [BK, k_width] int32 -> K_hat slabs in SMEM
            for i, (shift, bits) in enumerate(p.k_subs):
                val = decode_codes(x, shift, bits, p.k_signed)
                kd_smem[:, pl.ds(i * p.k_width, p.k_width)] = val.astype(dtype)
            plgpu.commit_smem()

        def scores(at, kd_smem, b_smems, blk):  # -> S^T [BK, Gq] float32 (unscaled)
            if p.k_mode == "channel":
                qt = fixed["qt"]
                g0 = at // p.kg  # first scale row of the block
                pos = at + ops.iota(jnp.int32, (bk, gq), 0, wg)
                st = None
                for j in range(p.k_rows):
                    s_j = ops.load(blk["k_scale"].at[j], row).astype(jnp.float32)  # [C]
                    b_j = qt * lax.broadcast_in_dim(s_j, qt.shape, [0])  # [C, Gq]
                    for b_smem, part in zip(b_smems, split_16bit(b_j, dtype, p.b_parts)):
                        b_smem[...] = part
                    plgpu.commit_smem()
                    term = score_product(kd_smem, b_smems, (bk, gq))
                    if p.has_kz:
                        z_j = ops.load(blk["k_zero"].at[j], row).astype(jnp.float32)
                        zq = (qt * lax.broadcast_in_dim(z_j, qt.shape, [0])).sum(axis=0)
                        term = term + lax.broadcast_in_dim(zq, term.shape, [1])
                    lo = (g0 + j) * p.kg
                    mine = (pos >= lo) & (pos < lo + p.kg)
                    st = jnp.where(mine, term, 0.0) if st is None else \
                        jnp.where(mine, term, st)
                return st
            st = None
            for m in range(p.nb):
                term = score_product(
                    kd_smem, b_smems[m * p.b_parts:(m + 1) * p.b_parts], (bk, gq))
                if p.k_token_scale:
                    ks = ops.column(blk["k_scale"], bk, p.nb, m, row).astype(jnp.float32)
                    term = term * lax.broadcast_in_dim(ks, term.shape, [0])
                    if p.has_kz:
                        kz = ops.column(blk["k_zero"], bk, p.nb, m, row).astype(jnp.float32)
                        term = term + (lax.broadcast_in_dim(kz, term.shape, [0])
                                       * lax.broadcast_in_dim(fixed["qsum"][m], term.shape, [1]))
                st = term if st is None else st + term
            if p.k_bias:
                st = st + lax.broadcast_in_dim(fixed["bias"], st.shape, [1])
            return st

        def decode_v(blk, vd_smem):  # V codes -> V_hat slabs (sub-block order) in SMEM
            x = ops.load(blk["v_codes"], wg).astype(jnp.int32)  # [BK, v_width]

            def per_slot(name):  # [BK, v_width] float32: the slot's value for each column
                out = None
                colgrp = None
                for m in range(p.nv):
                    c = ops.column(blk[name], bk, p.nv, m, row).astype(jnp.float32)
                    c = lax.broadcast_in_dim(c, x.shape, [0])
                    if p.nv == 1:
                        return c
                    if colgrp is None:  # group of slab column j (the same in every slab)
                        group = d // p.nv // len(p.v_subs)
                        colgrp = ops.iota(jnp.int32, x.shape, 1, wg) // group
                    out = c if out is None else jnp.where(colgrp == m, c, out)
                return out

            vs = per_slot("v_scale")
            vz = per_slot("v_zero") if p.has_vz else None
            for i, (shift, bits) in enumerate(p.v_subs):
                val = decode_codes(x, shift, bits, p.v_signed) * vs
                if vz is not None:
                    val = val + vz
                vd_smem[:, pl.ds(i * p.v_width, p.v_width)] = val.astype(dtype)
            plgpu.commit_smem()

        def run(kd_smem, vd_smem, pt_smem, *b_smems):
            if p.k_mode == "token":  # the fixed B matrices: one TMA each
                def load_b(bar):
                    for m in range(len(b_smems)):
                        plgpu.copy_gmem_to_smem(r["bmat"].at[bi, hi, m], b_smems[m], bar.at[m])
                    for m in range(len(b_smems)):
                        plgpu.barrier_wait(bar.at[m])
                pl.run_scoped(load_b, plgpu.Barrier(num_barriers=len(b_smems)))

            def body(idx, *args):
                blk = dict(zip(pipelined, args[:-1]))
                carry = args[-1]
                acc = carry[0]
                j = first + idx[0]
                nominal = j * bk
                at = jnp.minimum(nominal, p.n - bk)  # where the block was fetched from
                decode_k(ops.load(blk["k_codes"], wg).astype(jnp.int32), kd_smem)
                st = scores(at, kd_smem, b_smems, blk)  # [BK, Gq]
                pos = at + ops.iota(jnp.int32, (bk, gq), 0, wg)
                valid = (pos >= nominal) & (pos < count)
                prob, alpha, m_new, l_new = column_softmax_step(carry, st, valid, qk_scale)
                pt_smem[...] = prob.astype(dtype)
                if p.v_raw:
                    v_smem = blk["v"]
                    plgpu.commit_smem()
                else:
                    v_smem = vd_smem
                    decode_v(blk, vd_smem)  # commits P^T too
                pv = value_product(interpret, v_smem, pt_smem, (d, gq))  # [D, Gq]
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1]) + pv
                return acc, m_new, l_new

            init = (ops.full((d, gq), 0.0, wg), ops.full((gq,), NEG_INF, col),
                    ops.full((gq,), 0.0, col))
            srcs = [r[nm].at[bi, hi] for nm in pipelined]
            return plgpu.emit_pipeline(body, grid=(nblk,), in_specs=[spec(nm) for nm in pipelined],
                                       max_concurrent_steps=max_concurrent_steps,
                                       init_carry=init)(*srcs)

        n_b = (1 if p.k_mode == "channel" else p.nb) * p.b_parts
        c_rows = r["qt"].shape[2] if p.k_mode == "channel" else r["bmat"].shape[3]
        acc, m_i, l_i = pl.run_scoped(
            run, plgpu.SMEM((bk, cw), dtype, transforms=tr),  # K_hat
            plgpu.SMEM((bk, d), dtype, transforms=tr),  # V_hat
            plgpu.SMEM((bk, gq), dtype, transforms=tr),  # P^T
            *[plgpu.SMEM((c_rows, gq), dtype, transforms=tr) for _ in range(n_b)])  # B
        out, lse = column_finish(acc, m_i, l_i)

        def store(o_smem, lse_smem):
            o_smem[...] = out
            lse_smem[...] = lse
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, r["o"].at[bi, hi, pi])
            plgpu.copy_smem_to_gmem(lse_smem, r["lse"].at[bi, hi, pi])
            plgpu.wait_smem_to_gmem(0)
        pl.run_scoped(store, plgpu.SMEM((d, gq), jnp.float32), plgpu.SMEM((gq,), jnp.float32))

    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((b, kh, p.splits, d, gq), jnp.float32),
                  jax.ShapeDtypeStruct((b, kh, p.splits, gq), jnp.float32)),
        grid=(b, kh, p.splits),
        grid_names=("b", "h", "p"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        interpret=interpret_params() if interpret else None,
    )(*inputs.values())


# ---- the quantised layer ------------------------------------------------------------------------

def whole_zone_partials(q, whole_k, whole_v, whole_lengths, scale, *, num_splits, interpret):
    """Partials of a whole zone [B, K, Z, D] (tokens in the cache dtype): the dense kernel's."""
    z = whole_k.shape[2]
    bkv = 128 if z >= 128 else 64
    splits = None if num_splits is None else min(int(num_splits), -(-max(z, bkv) // bkv))
    return dense_decode_partials(q, whole_k, whole_v,
                                 jnp.clip(whole_lengths.astype(jnp.int32), 0, z), scale,
                                 block_kv=bkv, num_splits=splits, interpret=interpret)


def _k_scale_rows(kg: int) -> int:
    """K scale rows (groups of kg slots) any BLOCK consecutive slots can touch."""
    return -(-(BLOCK - 1) // kg) + 1


def quantized_gpu_supported(q: jax.Array, k_codes: jax.Array, k_scale: jax.Array,
                            v_codes: jax.Array, v_scale: jax.Array, whole_k: jax.Array, *,
                            k_bits: int, v_bits: int, k_group_tokens: int) -> Optional[str]:
    """None when `quantized_decode_attention_gpu` handles these shapes and dtypes, else the
    reason (see the module docstring's constraints)."""
    b, h, d = q.shape
    kh = whole_k.shape[1]
    reason = (check_16bit("q", q.dtype)
              or gpu_kernel_supported(q, whole_k))  # the whole zone runs the dense kernel
    if reason:
        return reason
    if h // kh > WGMMA_ROWS:
        return f"group size G={h // kh}: at most {WGMMA_ROWS} query heads per KV head"
    try:
        per_k = packing(k_codes, k_bits, d, "k_codes")
        per_v = packing(v_codes, v_bits, d, "v_codes")
    except ValueError as e:
        return str(e)
    nv = v_scale.shape[-1]
    if k_group_tokens < 0:
        return f"k_group_tokens={k_group_tokens}: must be >= 0"
    if k_group_tokens and _k_scale_rows(k_group_tokens) > MAX_GROUPS + 1:
        return (f"k_group_tokens={k_group_tokens}: K scale groups of at least 8 slots (a "
                f"{BLOCK}-slot block touches at most {MAX_GROUPS + 1} of them)")
    if not k_group_tokens and (k_scale.shape[-1] > MAX_GROUPS or d % k_scale.shape[-1]):
        return (f"k_scale has {k_scale.shape[-1]} per-token channel groups: at most "
                f"{MAX_GROUPS}, dividing head_dim={d}")
    if nv > MAX_GROUPS or d % nv or (d // nv) % per_v:
        return (f"v_scale has {nv} channel groups: at most {MAX_GROUPS}, each a multiple of "
                f"the {per_v} codes per byte (head_dim={d})")
    del per_k
    return None


def flat_per_slot(x: jax.Array) -> jax.Array:
    """Per-slot scales [B, K, N, c] -> [B, K, N * c] (free), padded to a multiple of 16 bytes
    (a TMA'd array's row pitch must be; the padding is never read)."""
    b, kh, n, c = x.shape
    x = x.reshape(b, kh, n * c)
    unit = 16 // jnp.dtype(x.dtype).itemsize
    extra = -(n * c) % unit
    return jnp.pad(x, [(0, 0), (0, 0), (0, extra)]) if extra else x


def _prepare_k(qg: jax.Array, k_scale: jax.Array, k_zero: Optional[jax.Array], n: int,
               per_k: int, kg: int, gq: int, dtype) -> Dict[str, jax.Array]:
    """The query-side K inputs of `codes_partials` for a quantised layer (see its docstring).
    qg: [B, K, G, D] float32 in natural channel order."""
    b, kh, g, d = qg.shape
    order = np.asarray(sub_order(d // per_k, per_k))
    qp = qg[..., order]  # [B, K, G, D], slab order
    pad_g = [(0, 0), (0, 0), (0, 0), (0, gq - g)]
    out = {}
    if kg:  # K per channel: scale rows in slab order, padded so a block's rows are in range
        rows = max(-(-n // kg), (n - BLOCK) // kg + _k_scale_rows(kg))
        out["qt"] = jnp.pad(jnp.swapaxes(qp, 2, 3), pad_g)  # [B, K, D, Gq] f32
        for name, x in (("k_scale", k_scale), ("k_zero", k_zero)):
            if x is not None:
                x = x[..., order]
                out[name] = jnp.pad(x, [(0, 0), (0, 0), (0, rows - x.shape[2]), (0, 0)])
        return out
    nc = k_scale.shape[-1]
    grp = order // (d // nc)  # channel group of each slab column
    masks = (grp[None, :] == np.arange(nc)[:, None]).astype(np.float32)  # [nc, D]
    bm = qp[:, :, None] * masks[None, None, :, None, :]  # [B, K, nc, G, D]
    out["bmat"] = jnp.pad(jnp.swapaxes(bm, 3, 4),
                          [(0, 0)] * 4 + [(0, gq - g)]).astype(dtype)  # [B, K, nc, D, Gq]
    if k_zero is not None:
        out["qsum"] = jnp.pad(bm.sum(-1), [(0, 0)] * 3 + [(0, gq - g)])  # [B, K, nc, Gq]
    for name, x in (("k_scale", k_scale), ("k_zero", k_zero)):
        if x is not None:
            out[name] = flat_per_slot(x)  # [B, K, N * nc (+ padding)]
    return out


@functools.partial(jax.jit, static_argnames=("scale", "k_bits", "v_bits", "k_group_tokens",
                                             "num_splits", "interpret"))
def quantized_decode_attention_gpu(q: jax.Array, k_codes: jax.Array, k_scale: jax.Array,
                                   k_zero: Optional[jax.Array], v_codes: jax.Array,
                                   v_scale: jax.Array, v_zero: Optional[jax.Array],
                                   q_lengths: jax.Array, whole_k: jax.Array, whole_v: jax.Array,
                                   whole_lengths: jax.Array, *, scale: float, k_bits: int,
                                   v_bits: int, k_group_tokens: int,
                                   num_splits: Optional[int] = None,
                                   interpret: bool = False) -> jax.Array:
    """Mosaic GPU version of `quantized_decode_attention_reference` (same arguments and result).

    q: [B, H, D] -> [B, H, D] in q's dtype; layout: `pallas_kernels.quantized_decode`.
    num_splits: CTAs per (sequence, KV head) for each zone (None: enough to fill an H100; capped
    at each zone's block count). interpret: run in Pallas' Mosaic GPU interpreter (CPU tests)."""
    reason = quantized_gpu_supported(q, k_codes, k_scale, v_codes, v_scale, whole_k,
                                     k_bits=k_bits, v_bits=v_bits, k_group_tokens=k_group_tokens)
    if reason is not None:
        raise ValueError(reason)
    b, h, d = q.shape
    kh, z = whole_k.shape[1], whole_k.shape[2]
    n = k_codes.shape[2]
    g = h // kh
    kg = int(k_group_tokens)
    dtype = q.dtype

    def splits_for(slots):
        blocks = -(-max(slots, BLOCK) // BLOCK)
        if num_splits is None:
            return default_num_splits(b, kh, blocks)
        return min(int(num_splits), blocks)

    parts = []
    if n:
        per_k = packing(k_codes, k_bits, d, "k_codes")
        per_v = packing(v_codes, v_bits, d, "v_codes")
        gq = column_group_pad(g)
        n_pad = max(n, BLOCK)

        def pad_slots(x):  # [B, K, N, ...] -> N_pad slots (only N < BLOCK copies)
            if x is None or n_pad == n:
                return x
            return jnp.pad(x, [(0, 0), (0, 0), (0, n_pad - n)] + [(0, 0)] * (x.ndim - 3))

        qg = q.reshape(b, kh, g, d).astype(jnp.float32)
        if kg:
            ks, kz = k_scale, k_zero
        else:
            ks, kz = pad_slots(k_scale), pad_slots(k_zero)
        inputs = {"count": jnp.broadcast_to(jnp.clip(q_lengths.astype(jnp.int32), 0, n)[:, None],
                                            (b, kh))}
        inputs.update(_prepare_k(qg, ks, kz, n_pad, per_k, kg, gq, dtype))
        inputs["k_codes"] = pad_slots(k_codes)
        nv = v_scale.shape[-1]
        inputs["v_codes"] = pad_slots(v_codes)
        inputs["v_scale"] = flat_per_slot(pad_slots(v_scale))
        if v_zero is not None:
            inputs["v_zero"] = flat_per_slot(pad_slots(v_zero))
        k_bits_eff = 8 if per_k == 1 else k_bits
        v_bits_eff = 8 if per_v == 1 else v_bits
        plan = CodePlan(
            g=g, d=d, n=n_pad, dtype=jnp.dtype(dtype).name, k_width=d // per_k,
            k_signed=k_codes.dtype == jnp.int8,
            k_subs=tuple((s * k_bits_eff, k_bits_eff) for s in range(per_k)),
            k_mode="channel" if kg else "token", kg=kg,
            k_rows=_k_scale_rows(kg) if kg else 0, nb=1 if kg else k_scale.shape[-1],
            k_token_scale=not kg, has_kz=k_zero is not None, k_bias=False, v_raw=False,
            v_width=d // per_v, v_signed=v_codes.dtype == jnp.int8,
            v_subs=tuple((s * v_bits_eff, v_bits_eff) for s in range(per_v)), nv=nv,
            has_vz=v_zero is not None, b_parts=2 if kg else 1, splits=splits_for(n),
            scale=float(scale))
        o, lse = codes_partials(plan, inputs, interpret=interpret)
        parts.append(unpermute_partials(o, lse, g, sub_order(d // per_v, per_v)))
    if z:
        parts.append(whole_zone_partials(q, whole_k, whole_v, whole_lengths, scale,
                                         num_splits=num_splits, interpret=interpret))
    return merge_partials(parts, b, h, d, dtype)

