"""Decode attention over the sparse (per-head ragged) cache of `jaxkv.cache.SparseCache`.

Layout (one layer):
    k, v:          [B, N, D]     kept prompt tokens of all KV heads, grouped by head (head 0's
                                 slots first, heads ascending, each head's slots contiguous)
    heads:         [B, N] int32  KV head of each slot; K marks a padding slot (SparseCache puts
                                 them after the last head's slots)
    new_k, new_v:  [B, K, E, D]  tokens generated while decoding (dense per head)
    new_lengths:   [B] int32     valid decode slots

Query head h reads KV head h // G. Scores and softmax in float32; a head with no valid token
returns zeros.

`sparse_decode_attention_reference` (plain jnp) gathers, for every prompt slot, the G queries of
that slot's head, so it does the work of the ragged layout (N * G dot products) rather than
K times that; softmax statistics are combined per head with segment reductions.

`sparse_decode_attention` is the Pallas TPU kernel; it reads only each head's own segment of the
ragged array. Design:

- Segments. The wrapper turns `heads` into per-(b, head) segments [start, start + count) (a cheap
  [B, N, K] int reduction; SparseCache stores no offsets, and its `counts()` is the same
  reduction) and those into a per-sequence work list, all scalar-prefetched.
- Aligned blocks, masked by position. A segment rarely starts on a block boundary. The kernel
  reads the ordinary `pl.Blocked` blocks covering it (block start // block_size through
  (end - 1) // block_size) and masks slots outside [start, start + count) by position; slots of
  the neighbouring heads in the two boundary blocks, padding, and rows past N in a partial last
  block are all outside. Chosen over element-offset blocks (`pl.Element`) and over hand-written
  DMA (`memory_space=pltpu.ANY` + `make_async_copy`): every copy is then a tile-aligned block
  copy issued and double-buffered by the standard Pallas pipeline, the same code path in
  interpret mode and on every TPU generation, whereas element windows need unaligned sublane
  DMAs (packed bf16 rows at odd offsets) and manual DMA re-implements the pipeline. It costs no
  extra traffic: heads are stored in ascending order, so the block a head ends in is the block
  the next head starts in, and the pipeline issues no copy when consecutive grid steps map to
  the same block. Each block holding a valid slot is read from HBM once per sequence, whatever
  the per-head counts; blocks holding only padding are never read (unless no head has a slot).
- A flat work list instead of a (B, K, max blocks) grid. Grid (B, T) with T = cdiv(N, block) +
  K - 1 + K * cdiv(E, block), a static bound on the steps any sequence needs. Step t of sequence
  b serves one head: one of the blocks its segment spans, then its decode blocks (the decode
  region joins the same online softmax). A head costs max(1, blocks spanned) + decode blocks
  steps, so short heads cost no idle steps; only the tail of a sequence whose list is shorter
  than T idles, repeating the last block indices (no DMA, compute skipped with `pl.when`).
- Per step the G query heads of the KV head are one [G, D] tile, so a block is read once for all
  of them; running max, denominator and accumulator are float32 VMEM scratch across the steps of
  one head, and the [G, D] output tile is written on the head's last step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG_INF = -1e30


def sparse_decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, heads: jax.Array,
                                      new_k: jax.Array, new_v: jax.Array, new_lengths: jax.Array,
                                      scale: float) -> jax.Array:
    """q: [B, H, D] -> out [B, H, D] (dtype of q). A head with no valid token gets zeros."""
    b, h, d = q.shape
    kh = new_k.shape[1]
    g = h // kh
    qg = q.reshape(b, kh, g, d).astype(jnp.float32)  # [B, K, G, D]
    valid = heads < kh  # [B, N]
    seg = jnp.where(valid, heads, kh)  # padding goes to an extra segment, dropped below
    q_slot = jnp.take_along_axis(qg, jnp.minimum(seg, kh - 1)[:, :, None, None], axis=1)  # [B, N, G, D]
    s_p = jnp.einsum("BNGD,BND->BNG", q_slot, k.astype(jnp.float32)) * scale
    s_p = jnp.where(valid[:, :, None], s_p, NEG_INF)
    # decode part
    s_d = jnp.einsum("BKGD,BKED->BKGE", qg, new_k.astype(jnp.float32)) * scale
    d_valid = jnp.arange(new_k.shape[2])[None, :] < new_lengths[:, None]  # [B, E]
    s_d = jnp.where(d_valid[:, None, None, :], s_d, NEG_INF)

    seg_max = jax.vmap(lambda s, i: jax.ops.segment_max(s, i, num_segments=kh + 1))(s_p, seg)
    m = seg_max[:, :kh]  # [B, K, G]
    if new_k.shape[2]:
        m = jnp.maximum(m, s_d.max(-1))
    m = jnp.maximum(m, NEG_INF)  # segment_max of an empty segment is -inf
    m_slot = jnp.take_along_axis(m, jnp.minimum(seg, kh - 1)[:, :, None], axis=1)  # [B, N, G]
    p_p = jnp.exp(s_p - m_slot) * valid[:, :, None]  # [B, N, G]
    p_d = jnp.exp(s_d - m[..., None]) * d_valid[:, None, None, :]  # [B, K, G, E]
    seg_sum = lambda x: jax.vmap(lambda a, i: jax.ops.segment_sum(a, i, num_segments=kh + 1))(x, seg)
    denom = seg_sum(p_p)[:, :kh] + p_d.sum(-1)  # [B, K, G]
    num = seg_sum(p_p[..., None] * v.astype(jnp.float32)[:, :, None, :])[:, :kh]  # [B, K, G, D]
    num = num + jnp.einsum("BKGE,BKED->BKGD", p_d, new_v.astype(jnp.float32))
    out = num / jnp.maximum(denom, 1e-30)[..., None]
    return out.reshape(b, h, d).astype(q.dtype)


# ---- Pallas TPU kernel ---------------------------------------------------------------------------
# See the module docstring for the design. Schedule tables, one int32 per (sequence b, step t) at
# b * T + t, 1-D so that SMEM does not pad them to 2-D tiles: `meta` (the KV head served,
# shifted left by _HEAD_SHIFT, or'ed with flag bits), the prompt block read, the decode block read.

_FIRST, _LAST, _PROMPT, _DECODE = 1, 2, 4, 8  # schedule flag bits
_HEAD_SHIFT = 4


def _sublane_multiple(dtype) -> int:
    """Second-minor tile of a TPU VMEM array: 8 rows of 32-bit words, packed for narrow dtypes."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def segments(heads: jax.Array, num_kv_heads: int):
    """heads [B, N] -> (start, count) [B, K] int32: the slots of KV head h are
    [start[b, h], start[b, h] + count[b, h]) (start 0 for a head with no slot)."""
    n = heads.shape[1]
    onehot = heads[:, :, None] == jnp.arange(num_kv_heads, dtype=heads.dtype)  # [B, N, K]
    count = onehot.sum(1, dtype=jnp.int32)  # [B, K]
    slot = jnp.arange(n, dtype=jnp.int32)[None, :, None]  # [1, N, 1]
    start = jnp.min(jnp.where(onehot, slot, n), axis=1).astype(jnp.int32)  # [B, K]
    return jnp.where(count > 0, start, 0), count


def _schedule(start: jax.Array, count: jax.Array, new_lengths: jax.Array, *, block: int,
              decode_block: int, num_steps: int):
    """The flat work list of each sequence (see the module docstring).

    start, count: [B, K] segments; new_lengths: [B] in [0, E] (E = 0: decode_block = 0).
    Returns (head, k_block, d_block, flags), each [B, num_steps] int32 (the kernel packs head
    and flags into one table: meta = head << _HEAD_SHIFT | flags).
    """
    # Aligned blocks spanned by each head. An empty head stays on the block the previous head
    # ended in (no DMA), or takes no prompt step at all when the decode region has tokens.
    nonempty = count > 0
    first_blk = start // block  # [B, K]
    last_blk = jnp.maximum(start + count - 1, 0) // block  # [B, K]
    prev_last = jax.lax.cummax(jnp.where(nonempty, last_blk, 0), axis=1)  # [B, K]
    first_blk = jnp.where(nonempty, first_blk, prev_last)
    last_blk = jnp.where(nonempty, last_blk, prev_last)
    if decode_block:
        d_steps = (new_lengths + decode_block - 1) // decode_block  # [B]
    else:
        d_steps = jnp.zeros_like(new_lengths)
    p_steps = jnp.where(nonempty, last_blk - first_blk + 1,
                        jnp.where(d_steps[:, None] > 0, 0, 1))  # [B, K]; every head >= 1 step
    n_steps = p_steps + d_steps[:, None]  # [B, K]
    head_start = jnp.cumsum(n_steps, axis=1) - n_steps  # [B, K] first step of each head

    t = jnp.arange(num_steps, dtype=jnp.int32)  # [T]
    head = (head_start[:, None, :] <= t[None, :, None]).sum(-1, dtype=jnp.int32) - 1  # [B, T]
    pick = lambda x: jnp.take_along_axis(x, head, axis=1)  # [B, K] -> [B, T]
    s = t[None, :] - pick(head_start)  # [B, T] step inside the head (past its end on idle steps)
    hp, hn = pick(p_steps), pick(n_steps)
    in_prompt = s < hp
    k_block = jnp.where(in_prompt, pick(first_blk) + s, pick(last_blk))
    last_d = jnp.maximum(d_steps - 1, 0)[:, None]  # [B, 1]
    d_block = jnp.where(in_prompt, 0, jnp.minimum(s - hp, last_d))
    flags = (jnp.where(s == 0, _FIRST, 0) | jnp.where(s == hn - 1, _LAST, 0)
             | jnp.where(in_prompt & pick(count > 0), _PROMPT, 0)
             | jnp.where(~in_prompt & (s < hn), _DECODE, 0))
    return head, k_block.astype(jnp.int32), d_block.astype(jnp.int32), flags.astype(jnp.int32)


def _online_softmax_step(q, k, v, valid_t, valid_d, m_ref, l_ref, acc_ref, scale: float):
    """Fold one block into the running (m, l, acc).

    q: [G, D]; k, v: [T, D]; valid_t: [1, T] and valid_d: [T, 1] bool, the same slots."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale  # [G, T]
    s = jnp.where(valid_t, s, NEG_INF)
    m_prev = m_ref[...]  # [G, 1]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))  # [G, 1]
    alpha = jnp.exp(m_prev - m_new)  # [G, 1]
    p = jnp.where(valid_t, jnp.exp(s - m_new), 0.0)  # [G, T]
    l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
    # Slots of other heads, padding, or rows past the end of the array in a partial last block
    # (undefined contents, maybe NaN): zero them so 0 * NaN cannot reach the accumulator.
    v = jnp.where(valid_d, v, jnp.zeros((), v.dtype))  # [T, D]
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)  # [G, D]
    acc_ref[...] = alpha * acc_ref[...] + pv
    m_ref[...] = m_new


def _sparse_kernel(new_len_ref, start_ref, count_ref, meta_ref, kblk_ref, dblk_ref,
                   q_ref, k_ref, v_ref, *rest, scale: float, block: int, decode_block: int,
                   num_kv_heads: int, num_steps: int):
    """One step (b, t) of the work list.

    SMEM: new_len_ref [B]; start_ref, count_ref [B * K]; meta_ref, kblk_ref, dblk_ref [B * T].
    q_ref [G, D]; k_ref, v_ref [block, D]; rest = ([nk_ref, nv_ref [decode_block, D],]
    [poison_ref,] o_ref [G, D], m_ref [G, 1], l_ref [G, 1], acc_ref [G, D] f32).
    """
    o_ref, m_ref, l_ref, acc_ref = rest[-4:]  # a poison input (aliased to o_ref) is never read
    b, t = pl.program_id(0), pl.program_id(1)
    i = b * num_steps + t
    flags = meta_ref[i]

    @pl.when((flags & _FIRST) != 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((flags & _PROMPT) != 0)
    def _prompt():
        hb = b * num_kv_heads + (meta_ref[i] >> _HEAD_SHIFT)
        lo = start_ref[hb] - kblk_ref[i] * block  # segment bounds relative to this block
        hi = lo + count_ref[hb]
        col = jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)  # [1, T]
        row = jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)  # [T, 1]
        _online_softmax_step(q_ref[...], k_ref[...], v_ref[...], (col >= lo) & (col < hi),
                             (row >= lo) & (row < hi), m_ref, l_ref, acc_ref, scale)

    if decode_block:
        nk_ref, nv_ref = rest[0], rest[1]

        @pl.when((flags & _DECODE) != 0)
        def _decode():
            n_valid = new_len_ref[b] - dblk_ref[i] * decode_block  # valid slots of this block
            col = jax.lax.broadcasted_iota(jnp.int32, (1, decode_block), 1)
            row = jax.lax.broadcasted_iota(jnp.int32, (decode_block, 1), 0)
            _online_softmax_step(q_ref[...], nk_ref[...], nv_ref[...], col < n_valid,
                                 row < n_valid, m_ref, l_ref, acc_ref, scale)

    @pl.when((flags & _LAST) != 0)
    def _finish():
        # A head with no valid slot: acc = 0 and l = 0 -> zeros, like the reference.
        o_ref[...] = (acc_ref[...] / jnp.maximum(l_ref[...], 1e-30)).astype(o_ref.dtype)


def check_sparse_shapes(q, k, v, heads, new_k, new_v, new_lengths) -> None:
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q [B, H, D] and "
                         f"k, v [B, N, D] of one shape")
    b, h, d = q.shape
    if k.shape[0] != b or k.shape[2] != d:
        raise ValueError(f"q {q.shape}, k {k.shape}: batch and head_dim must match")
    if heads.shape != k.shape[:2] or not jnp.issubdtype(heads.dtype, jnp.integer):
        raise ValueError(f"heads {heads.shape} {heads.dtype}: expected integer [B, N] = "
                         f"{k.shape[:2]}")
    if new_k.ndim != 4 or new_k.shape != new_v.shape or new_k.shape[0] != b \
            or new_k.shape[3] != d:
        raise ValueError(f"new_k {new_k.shape}, new_v {new_v.shape}: expected [B, K, E, D] of "
                         f"one shape with B={b}, D={d}")
    if h % new_k.shape[1]:
        raise ValueError(f"the {new_k.shape[1]} KV heads of new_k must divide the {h} query "
                         f"heads of q")
    if new_lengths.shape != (b,):
        raise ValueError(f"new_lengths has shape {new_lengths.shape}; expected ({b},)")


def sparse_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: jax.Array,
                            new_k: jax.Array, new_v: jax.Array, new_lengths: jax.Array, *,
                            scale: float, block_size: int = 256, interpret=False,
                            poison: bool = False) -> jax.Array:
    """Pallas TPU kernel of `sparse_decode_attention_reference` (same shapes and result).

    q: [B, H, D]; k, v: [B, N, D] with heads [B, N] (the layout of `jaxkv.cache.SparseCache`:
    each KV head's slots contiguous, padding slots marked K; heads in ascending order, as
    SparseCache stores them, let a block shared by two heads be read once);
    new_k, new_v: [B, K, E, D] with new_lengths [B] -> [B, H, D] in q's dtype.
    block_size: slots per grid step (static), for both the prompt and the decode region; an axis
      shorter than it is one block, else it must be a multiple of the sublane tile (8 rows for
      32-bit, 16 for 16-bit dtypes). Neither N nor E need be a multiple of it (tails are masked).
    interpret: False (Mosaic TPU), True or a `pltpu.InterpretParams` (CPU interpret mode).
    poison: tests only; pre-fill the output with NaN (aliased) so unwritten tiles show.
    """
    check_sparse_shapes(q, k, v, heads, new_k, new_v, new_lengths)
    b, h, d = q.shape
    n = k.shape[1]
    kh, e = new_k.shape[1], new_k.shape[2]
    g = h // kh
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: must be a positive integer")
    tile = max(_sublane_multiple(k.dtype), _sublane_multiple(new_k.dtype))
    if block_size % tile and (n > block_size or e > block_size):
        raise ValueError(f"block_size={block_size}: must be a multiple of {tile} for "
                         f"{jnp.dtype(k.dtype).name} caches longer than one block "
                         f"(N={n}, E={e})")
    if n == 0 and e == 0:
        return jnp.zeros(q.shape, q.dtype)

    if n == 0:  # no prompt slot at all: a one-slot dummy block that is never valid
        k = v = jnp.zeros((b, 1, d), k.dtype)
        heads = jnp.full((b, 1), kh, jnp.int32)
        n = 1
    block = min(block_size, n)
    decode_block = min(block_size, e)  # 0: no decode region
    n_decode = pl.cdiv(e, decode_block) if e else 0
    # Bound on any sequence's schedule: disjoint contiguous segments share at most one block with
    # the next one by position, so the m non-empty heads span <= n_blocks + m - 1 blocks; each
    # empty head takes at most one step; each head takes <= n_decode decode steps.
    num_steps = pl.cdiv(n, block) + kh - 1 + kh * n_decode
    new_len = jnp.clip(new_lengths.astype(jnp.int32), 0, e)  # [B]
    start, count = segments(heads, kh)  # [B, K]
    head, k_block, d_block, flags = _schedule(start, count, new_len, block=block,
                                              decode_block=decode_block, num_steps=num_steps)
    meta = (head << _HEAD_SHIFT) | flags  # [B, T]
    prefetch = [new_len, start.reshape(-1), count.reshape(-1), meta.reshape(-1),
                k_block.reshape(-1), d_block.reshape(-1)]

    def q_index(bi, t, new_len_ref, start_ref, count_ref, meta_ref, kblk_ref, dblk_ref):
        return bi, meta_ref[bi * num_steps + t] >> _HEAD_SHIFT, 0, 0

    def kv_index(bi, t, new_len_ref, start_ref, count_ref, meta_ref, kblk_ref, dblk_ref):
        return bi, kblk_ref[bi * num_steps + t], 0

    def decode_index(bi, t, new_len_ref, start_ref, count_ref, meta_ref, kblk_ref, dblk_ref):
        i = bi * num_steps + t
        # An empty decode region stays on head 0's first block: one copy per sequence, not K.
        hd = jnp.where(new_len_ref[bi] > 0, meta_ref[i] >> _HEAD_SHIFT, 0)
        return bi, hd, dblk_ref[i], 0

    sq = pl.squeezed
    qg = q.reshape(b, kh, g, d)  # [B, K, G, D]; free (row-major split of H)
    head_spec = pl.BlockSpec((sq, sq, g, d), q_index)  # [G, D] tile of one KV head
    kv_spec = pl.BlockSpec((sq, block, d), kv_index)  # [block, D] of the ragged prompt part
    in_specs = [head_spec, kv_spec, kv_spec]
    args = [qg, k, v]
    if e:
        decode_spec = pl.BlockSpec((sq, sq, decode_block, d), decode_index)  # [block, D]
        in_specs += [decode_spec, decode_spec]
        args += [new_k, new_v]
    aliases = {}
    if poison:  # tests: the output starts as NaN, so any tile the kernel fails to write shows up
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        args.append(jnp.full(qg.shape, jnp.nan, q.dtype))
        aliases = {len(prefetch) + len(args) - 1: 0}  # operand index counts the prefetch too
    itemsize = jnp.dtype(k.dtype).itemsize
    cost = pl.CostEstimate(flops=4 * b * g * (n + kh * e) * d,
                           transcendentals=b * g * (n + kh * e),
                           bytes_accessed=2 * b * (n + kh * e) * d * itemsize
                           + 2 * q.size * jnp.dtype(q.dtype).itemsize)
    out = pl.pallas_call(
        functools.partial(_sparse_kernel, scale=float(scale), block=block,
                          decode_block=decode_block, num_kv_heads=kh, num_steps=num_steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(b, num_steps),
            in_specs=in_specs,
            out_specs=head_spec,
            scratch_shapes=[pltpu.VMEM((g, 1), jnp.float32),  # running max m
                            pltpu.VMEM((g, 1), jnp.float32),  # denominator l
                            pltpu.VMEM((g, d), jnp.float32)]),  # accumulator
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(*prefetch, *args)
    return out.reshape(b, h, d)
