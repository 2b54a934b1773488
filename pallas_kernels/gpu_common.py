"""Pieces shared by the Mosaic GPU decode-attention kernels (`*_decode_gpu.py`).

Every GPU kernel here is split-K ("flash decoding"): one CTA (one warpgroup) per (sequence b,
KV head h, split p) walks its share of that head's cache blocks with `plgpu.emit_pipeline` (TMA
prefetch of `max_concurrent_steps` blocks, a dynamic trip count: blocks past the valid slots are
never fetched), keeps an online softmax in float32 registers (base 2), and writes a normalised
partial output and its log-sum-exp; `combine_splits` (XLA) merges the partials of all splits and
of all launches of one call (a layout whose parts are separate launches, e.g. a quantised zone and
a whole zone, simply concatenates their partials along the split axis).

Notation: B batch, H query heads, K KV heads, G = H / K, D head dim, BK slots per block, P splits.

Two matrix-product orientations, both on WGMMA (Hopper tensor cores, float16 / bfloat16
operands, float32 accumulation):

- "rows" (`segment_partials`: the dense, head-split and sparse layouts), as in JAX's
  attention_mgpu.py: the G query heads of a KV head are the rows of a [64, D] tile (WGMMA's M is
  64), S = Q K^T [64, BK] with K transposed from shared memory, softmax along rows, O += P V with
  P in registers. Rows G..63 are padding: the tensor cores do 64 / G times the useful work, which
  is cheap next to the 2 bytes per cache element of a 16-bit cache.
- "columns" (`quantized_decode_gpu.codes_partials`, the quantised and mixed-precision kernels,
  with `score_product`, `column_softmax_step`, `value_product` here): cache slots are the rows,
  S^T = K_hat Q^T [BK, Gq] with Gq = G rounded up to 16, softmax along columns (a cross-warp
  reduction), O^T [D, Gq] += V_hat^T P^T with V_hat transposed from shared memory. A code costs 2 to 8 bits, so padding G to 64 would make the tensor cores (not HBM) the
  bottleneck at 2 bits; here N = Gq is the small dimension. K_hat, V_hat are the codes' blocks
  decoded to the cache dtype in registers and stored to shared memory (see quantized_decode_gpu).
  Both operands of a WGMMA share one swizzle in Mosaic GPU, and P^T / B [., Gq] rows are 32
  bytes at Gq = 16, so every operand of this orientation uses a 32-byte swizzle.

Interpret mode (`interpret=True`, CPU tests) runs the same kernels in Pallas' Mosaic GPU
interpreter (jax >= 0.10, `InterpretGPUParams(uninitialized_memory="nan")`: shared memory, TMA,
barriers and the pipeline are simulated; outputs never written stay NaN). jax 0.10.2's
interpreter lacks a few things the compiled path uses, replaced under interpret=True by `Ops`:
  - `plgpu.layout_cast`, `plgpu.load(..., layout=...)`, `plgpu.broadcasted_iota(..., layout=)`
    (register layouts are compile-time annotations; no CPU rule): plain values / `ref[...]`;
  - a reshaped shared-memory view (`ref.reshape(...)`: "Unsupported transform:
    ReshapeTransform"): the block is loaded and reshaped as a value;
  - WGMMAs whose operand is transposed (`plgpu.transpose_ref`: "'TransposeTransform' object has
    no attribute 'indices'") or lives in registers (its wgmma callback reads both operands as
    shared-memory allocations): `lax.dot_general` on the loaded blocks, same operand dtypes,
    float32 accumulation. The "columns" orientation's S^T = K_hat Q^T has both operands in
    shared memory and untransposed, so the interpreter runs that WGMMA itself (its own
    `wgmma` callback); the P V products of both orientations and the Q K^T of the "rows"
    orientation are the plain dots.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -1e30  # finite: exp2(NEG_INF - m) == 0 with no inf - inf = NaN
LOG2E = math.log2(math.e)
WGMMA_ROWS = 64  # rows of one WGMMA tile (one warpgroup)
SUPPORTED_DTYPES = ("float16", "bfloat16")
H100_SMS = 132
COLUMN_SWIZZLE = 32  # bytes; the "columns" orientation's shared swizzle (Gq * 2 bytes >= 32)
COLUMN_TILE = COLUMN_SWIZZLE // 2  # 16-bit elements per swizzled tile row


def interpret_params():
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


def combine_splits(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Merge per-split softmax results. o: [B, K, P, G, D] (each split normalised by its own
    denominator), lse: [B, K, P, G] base-2 log-sum-exp (NEG_INF for an empty split)
    -> [B, K, G, D] float32. All splits empty: zeros (o is zero there)."""
    mx = lse.max(axis=2, keepdims=True)  # [B, K, 1, G]
    w = jnp.exp2(lse - mx)  # [B, K, P, G]
    num = jnp.einsum("BKPG,BKPGD->BKGD", w, o)
    return num / w.sum(axis=2)[..., None]


def check_16bit(name: str, dtype) -> Optional[str]:
    """None for float16 / bfloat16, else the reason (WGMMA operand dtypes)."""
    if jnp.dtype(dtype).name not in SUPPORTED_DTYPES:
        return (f"{name}.dtype={jnp.dtype(dtype).name}: the Mosaic GPU kernel needs float16 or "
                f"bfloat16 (WGMMA)")
    return None


def swizzled(minor_elems: int, dtype, swizzle: Optional[int] = None):
    """Tiling + swizzle transforms of a 2-D shared-memory WGMMA operand whose minor dimension has
    `minor_elems` elements (swizzle: the largest that fits unless given)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = swizzle or plgpu.find_swizzle(minor_elems * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def split_share(blocks, pi, splits: int):
    """Blocks [first, first + n) of a head's `blocks` (dynamic) for split `pi` of `splits`: the
    blocks are shared evenly (ceil) among the splits, so a short head still spreads over all
    CTAs and trailing splits of it are empty."""
    per = jnp.maximum(lax.div(blocks + (splits - 1), jnp.int32(splits)), 1)
    first = pi * per
    return first, jnp.clip(blocks - first, 0, per)


class Ops:
    """Register-level operations that differ between compiled Mosaic GPU and the interpreter
    (see the module docstring)."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def cast(self, x, layout):
        if self.interpret:
            return x
        from jax.experimental.pallas import mosaic_gpu as plgpu
        return plgpu.layout_cast(x, layout)

    def iota(self, dtype, shape, dim, layout):
        if self.interpret:
            return lax.broadcasted_iota(dtype, shape, dim)
        from jax.experimental.pallas import mosaic_gpu as plgpu
        return plgpu.broadcasted_iota(dtype, shape, dim, layout=layout)

    def full(self, shape, value, layout, dtype=jnp.float32):
        return self.cast(jnp.full(shape, value, dtype), layout)

    def load(self, ref, layout):
        """The whole `ref` (shared or global memory) in registers with `layout`."""
        if self.interpret:
            return ref[...]
        from jax.experimental.pallas import mosaic_gpu as plgpu
        return plgpu.load(ref, (), layout=layout, optimized=False)

    def column(self, flat_ref, rows: int, cols: int, col: int, layout):
        """Column `col` [rows] of a row-major [rows, cols] array stored flat ([rows * cols]) in
        shared memory (e.g. per-token scales of `cols` channel groups)."""
        if cols == 1:
            return self.load(flat_ref, layout)
        if self.interpret:
            return flat_ref[...].reshape(rows, cols)[:, col]
        from jax.experimental.pallas import mosaic_gpu as plgpu
        return plgpu.load(flat_ref.reshape(rows, cols).at[:, col], (), layout=layout,
                          optimized=False)


def layouts():
    from jax.experimental.pallas import mosaic_gpu as plgpu
    wg = plgpu.Layout.WGMMA
    return wg, wg.reduce(1), wg.reduce(0)  # [M, N] tiles, their rows [M], their columns [N]


def _wgmma_scoped(shape, issue):
    """Run `issue(acc_ref)` (WGMMAs) into a fresh float32 accumulator; its value."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def scope(acc_ref):
        issue(acc_ref)
        return acc_ref[...]
    return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def dot_nt(a, b):  # [M, C] x [N, C] -> [M, N] f32
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):  # [M, C] x [C, N] -> [M, N] f32
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):  # [C, M] x [C, N] -> [M, N] f32
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ---- "rows" orientation: dense, head-split, sparse ----------------------------------------------

def segment_partials(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array,
                     count: jax.Array, scale: float, *, block_kv: int,
                     num_splits: Optional[int], max_concurrent_steps: int,
                     interpret: bool) -> Tuple[jax.Array, jax.Array]:
    """Split-K decode attention of each (sequence, KV head) over one contiguous segment of slots.

    q: [B, H, D]; k, v: [B, K, S, D] (a cache per head) or [B, S, D] (one slot axis shared by the
    heads, e.g. the ragged sparse layout); start, count: [B, K] int32, head h of sequence b
    attends to slots [start, start + count) of its slot axis (0 <= start, start + count <= S).
    -> (o [B, K, P, G, D] float32, each split normalised by its own denominator; lse [B, K, P, G]
    float32 base-2 log-sum-exp, NEG_INF for an empty split): `combine_splits` merges them.

    Blocks: a segment's blocks start at its origin, origin + j * BK, and are fetched at element
    offset min(origin + j * BK, S - BK) (never out of bounds, no copy of the cache; only S < BK
    pads the slot axis to one block); slots outside [max(origin + j * BK, start), start + count)
    are masked, so neighbouring heads' slots in a shared slot axis and the overlap of a clamped
    last block never count. Split p of P takes blocks `split_share` of its segment; a segment of
    0 slots writes zeros and lse NEG_INF.

    Alignment. A TMA copy into a tiled (swizzled) shared-memory buffer tiles the global array
    too (Mosaic GPU's `TileTransform`: the slot axis becomes [S / 8, 8] and a slot offset i the
    pair (i // 8, i % 8)), so it needs S a multiple of 8 (else lowering fails: "dimension 2 must
    have size smaller or a multiple of its tiling 8") and slot offsets that are multiples of 8 (an
    offset i % 8 != 0 would run past the 8-row tile: out of bounds, zero-filled by the hardware;
    the interpreter does not model this). Hence two paths, chosen statically:
      - S % 8 == 0 ("aligned"): origin = start rounded down to a multiple of BK, so every offset
        is a multiple of 8; blocks go by TMA straight into the swizzled WGMMA operand buffers.
        A segment not starting on a block boundary reads part of its first block for nothing
        (in a shared slot axis that block is also its neighbour's last);
      - otherwise: origin = start; blocks go by TMA into plain row-major buffers (no tiling:
        any offset) and each is copied through registers into the swizzled operand buffers
        (an extra shared-memory round trip per block, no extra HBM traffic).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if max_concurrent_steps < 1:
        raise ValueError(f"max_concurrent_steps={max_concurrent_steps}: must be >= 1")
    if block_kv % 64 or block_kv < 64:
        raise ValueError(f"block_kv={block_kv}: must be a positive multiple of 64")
    shared = k.ndim == 3
    b, h, d = q.shape
    kh = start.shape[1]
    g = h // kh
    gp = WGMMA_ROWS
    s = k.shape[-2]
    if s < block_kv:  # a slot axis shorter than one block: pad it (copies < one block)
        pad = [(0, 0)] * (k.ndim - 2) + [(0, block_kv - s), (0, 0)]
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    s_pad = k.shape[-2]
    aligned = s_pad % 8 == 0
    num_blocks = -(-s_pad // block_kv)
    splits = default_num_splits(b, kh, num_blocks) if num_splits is None else int(num_splits)
    if not 1 <= splits <= num_blocks:
        raise ValueError(f"num_splits={num_splits}: must be in [1, {num_blocks}] (cache blocks)")
    dtype = k.dtype
    transforms = swizzled(d, dtype)
    qk_scale = float(scale) * LOG2E  # softmax in base 2: exp(x) = exp2(x * log2(e))
    ops = Ops(interpret)
    wg, row, _ = layouts()

    qg = q.reshape(b, kh, g, d)
    qg = jnp.pad(qg, [(0, 0), (0, 0), (0, gp - g), (0, 0)])  # [B, K, Gp, D] (zero rows)
    start = start.astype(jnp.int32)  # [B, K]
    count = count.astype(jnp.int32)  # [B, K]

    def qk_product(q_smem, k_smem):  # [Gp, D] x [BK, D] (SMEM) -> [Gp, BK] f32
        if interpret:
            return dot_nt(q_smem[...], k_smem[...])
        return _wgmma_scoped((gp, block_kv), lambda acc: plgpu.wgmma(
            acc, q_smem, plgpu.transpose_ref(k_smem, (1, 0))))

    def pv_product(p, v_smem):  # [Gp, BK] (registers, cache dtype) x [BK, D] -> [Gp, D] f32
        if interpret:
            return dot_nn(p, v_smem[...])
        # Into a fresh zero accumulator, added to the running one in registers.
        return _wgmma_scoped((gp, d), lambda acc: plgpu.wgmma(acc, p, v_smem))

    def kernel(start_ref, count_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        # start_ref, count_ref [B, K] i32, q_ref [B, K, Gp, D], k_ref / v_ref [B, (K,) S, D]:
        # GMEM. o_ref [B, K, P, G, D] f32, lse_ref [B, K, P, Gp] f32: GMEM
        bi = lax.axis_index("b")
        hi = lax.axis_index("h")
        pi = lax.axis_index("p")
        seg_start = start_ref[bi, hi]
        seg_count = count_ref[bi, hi]
        seg_end = seg_start + seg_count
        origin = lax.div(seg_start, jnp.int32(block_kv)) * block_kv if aligned else seg_start
        blocks = jnp.where(seg_count > 0, lax.div(seg_end - origin + (block_kv - 1),
                                                  jnp.int32(block_kv)), 0)
        first, n = split_share(blocks, pi, splits)
        k_src = k_ref.at[bi] if shared else k_ref.at[bi, hi]  # [S, D]
        v_src = v_ref.at[bi] if shared else v_ref.at[bi, hi]

        def fetched_at(j):  # element offset of segment block j (clamped, never out of bounds)
            return jnp.minimum(origin + j * block_kv, s_pad - block_kv)

        def with_q(q_smem, q_bar, *operands):
            plgpu.copy_gmem_to_smem(q_ref.at[bi, hi], q_smem, q_bar.at[0])
            plgpu.barrier_wait(q_bar.at[0])

            def body(idx, k_smem, v_smem, carry):  # k_smem, v_smem: [BK, D]
                if not aligned:  # plain row-major stage buffers -> swizzled operand buffers
                    k_op, v_op = operands
                    k_op[...] = ops.load(k_smem, wg)
                    v_op[...] = ops.load(v_smem, wg)
                    plgpu.commit_smem()
                    k_smem, v_smem = k_op, v_op
                acc, m_i, l_i = carry  # [Gp, D], [Gp], [Gp] f32
                j = first + idx[0]
                nominal = origin + j * block_kv  # this block's own slots start here
                qk = qk_product(q_smem, k_smem)  # [Gp, BK] f32
                pos = fetched_at(j) + ops.iota(jnp.int32, (gp, block_kv), 1, wg)
                valid = (pos >= jnp.maximum(nominal, seg_start)) & (pos < seg_end)
                sc = jnp.where(valid, qk * qk_scale, NEG_INF)  # [Gp, BK], log2 units
                m_new = jnp.maximum(m_i, sc.max(axis=1))  # [Gp]
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
                l_new = l_i * alpha + p.sum(axis=1)
                pv = pv_product(p.astype(dtype), v_smem)  # [Gp, D] f32
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
                return acc, m_new, l_new

            init = (ops.full((gp, d), 0.0, wg), ops.full((gp,), NEG_INF, row),
                    ops.full((gp,), 0.0, row))
            block = lambda i: (fetched_at(first + i), 0)
            spec = plgpu.BlockSpec((pl.Element(block_kv), d), block,
                                   transforms=transforms if aligned else ())
            return plgpu.emit_pipeline(body, grid=(n,), in_specs=[spec, spec],
                                       max_concurrent_steps=max_concurrent_steps,
                                       init_carry=init)(k_src, v_src)

        operand_buffers = [] if aligned else \
            [plgpu.SMEM((block_kv, d), dtype, transforms=transforms)] * 2
        acc, m_i, l_i = pl.run_scoped(
            with_q, plgpu.SMEM((gp, d), dtype, transforms=transforms),
            plgpu.Barrier(num_barriers=1), *operand_buffers)
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
        interpret=interpret_params() if interpret else None,
    )(start, count, qg, k, v)
    return o, lse[..., :g]


# ---- "columns" orientation: quantised and mixed-precision layouts -------------------------------

def column_group_pad(g: int) -> int:
    """Gq: G rounded up to a multiple of 16 (WGMMA's N with a 32-byte swizzle)."""
    return -(-g // COLUMN_TILE) * COLUMN_TILE


def column_softmax_step(carry, st, valid, qk_scale: float):
    """Fold a block's scores into the running softmax of the "columns" orientation.

    carry: (acc [D, Gq], m [Gq], l [Gq]) float32; st: S^T [BK, Gq] float32 (raw scores);
    valid: bool [BK, Gq]. -> (p [BK, Gq] float32 probabilities, alpha [Gq], m_new [Gq], l_new)."""
    _, m_i, l_i = carry
    sc = jnp.where(valid, st * qk_scale, NEG_INF)  # log2 units
    m_new = jnp.maximum(m_i, sc.max(axis=0))  # [Gq]
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [1]))  # [BK, Gq]
    l_new = l_i * alpha + p.sum(axis=0)
    return p, alpha, m_new, l_new


def score_product(a_smem, b_smems, shape):
    """S^T = A @ (B_0 + B_1 + ...), A [BK, C] and each B_i [C, Gq] in shared memory
    (untransposed; several B_i: a value split into bf16 parts, see `split_16bit`), one WGMMA per
    B_i into one float32 accumulator -> [BK, Gq]. The interpreter runs these WGMMAs itself."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def issue(acc):
        for b_smem in b_smems:
            plgpu.wgmma(acc, a_smem, b_smem)
    return _wgmma_scoped(shape, issue)


def split_16bit(x, dtype, parts: int):
    """float32 x -> `parts` values of `dtype` summing to x up to the last part's rounding (1: x
    rounded; 2: hi + lo, about 16 significant bits for bfloat16 instead of 8)."""
    out = []
    for i in range(parts):
        part = x.astype(dtype)
        out.append(part)
        if i + 1 < parts:
            x = x - part.astype(jnp.float32)
    return out


def value_product(interpret: bool, v_smem, pt_smem, shape):
    """O^T = V^T @ P^T: V [BK, D] transposed from shared memory, P^T [BK, Gq] in shared memory
    -> [D, Gq] f32 (plain dot in the interpreter: it cannot transpose a WGMMA operand)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if interpret:
        return dot_tn(v_smem[...], pt_smem[...])
    return _wgmma_scoped(shape, lambda acc: plgpu.wgmma(
        acc, plgpu.transpose_ref(v_smem, (1, 0)), pt_smem))


def column_finish(acc, m_i, l_i):
    """(acc [D, Gq], m [Gq], l [Gq]) -> (out [D, Gq] normalised, lse [Gq] base 2)."""
    l_safe = jnp.where(l_i > 0.0, l_i, 1.0)  # empty split: acc == 0, lse ~ NEG_INF
    out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [1])
    return out, m_i + jnp.log(l_safe) * (1.0 / math.log(2.0))


def unpermute_partials(o: jax.Array, lse: jax.Array, g: int,
                       channels: Optional[Sequence[int]]) -> Tuple[jax.Array, jax.Array]:
    """Partials of the "columns" orientation: o [B, K, P, D, Gq] (rows in a kernel channel order)
    and lse [B, K, P, Gq] -> o [B, K, P, G, D] in natural channel order, lse [B, K, P, G].
    channels: channels[i] = natural channel of row i (None: natural already)."""
    o = jnp.swapaxes(o[..., :g], -1, -2)  # [B, K, P, G, D]
    if channels is not None:
        import numpy as np
        inverse = np.argsort(np.asarray(channels))
        o = jnp.take(o, jnp.asarray(inverse, jnp.int32), axis=-1)
    return o, lse[..., :g]


def merge_partials(parts: Sequence[Tuple[jax.Array, jax.Array]], b: int, h: int, d: int,
                   dtype) -> jax.Array:
    """Concatenate (o [B, K, P_i, G, D], lse [B, K, P_i, G]) partials along the splits and
    combine them -> [B, H, D] in `dtype`; no parts: zeros."""
    if not parts:
        return jnp.zeros((b, h, d), dtype)
    o = jnp.concatenate([p[0] for p in parts], axis=2)
    lse = jnp.concatenate([p[1] for p in parts], axis=2)
    return combine_splits(o, lse).reshape(b, h, d).astype(dtype)

