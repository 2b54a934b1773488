"""Mixed full + streaming causal prefill attention: the training pass of RLKV / DuoAttention gates.

Per KV head h with gate alpha[h] (shared by the G query heads of its group), for every query:

    out = alpha * softmax_full(s) V + (1 - alpha) * softmax_stream(s) V,   s = q k^T / sqrt(D)

softmax_full is causal; softmax_stream sees only the first `sink` positions and the last `window`
positions up to the query (`jaxkv.model.layers.streaming_mask`), and, when `prompt_lengths` is
given, a query inside its prompt (position < prompt_lengths[b]) attends in full in the streaming
branch too. The reference is `mixed_prefill_attention_reference` (plain jnp; the mixing of the two
softmaxes is `jaxkv.cache.gated.mix_softmax`, which the gated decode cache uses too).

Kernel (Pallas TPU, Mosaic). Layout inside: q [B, K, G, T, D], k, v [B, K, T, D] (the wrapper
transposes the model's [B, T, H, D] / [B, T, K, D]: one pass over q, k, v, small next to the
O(T^2) attention). Grid (B, K, query blocks, key blocks), the key axis "arbitrary": the G query
heads of a KV head and a block of `block_q` positions form one [G * block_q, D] tile (rows
g-major: row r is head g = r // block_q at position q0 + r % block_q), so each key block is read
once per KV head. One score tile feeds two float32 online-softmax states kept in VMEM (m, l, acc
of the full branch; m_s, l_s, acc_s of the streaming branch). Per (query block, key block):
  * entirely in the future: skipped (`pl.when`), and the K/V index_map repeats the last needed
    block, so no DMA is issued;
  * the whole query block inside the prompt: the streaming mask equals the causal one, so only
    the full state is updated and the streaming output is a copy of the full one;
  * no (query, key) pair of the block in the streaming mask (past the sink, before every
    query's window): only the full state is updated (one exp per score);
  * otherwise both states (two exps: each branch has its own running max, so neither can
    underflow the other, unlike a shared shift).
The branch outputs are written on the last key block in float32 [B, K, G, T, D], with the
log-sum-exp of each branch as row statistics [B, K, G, T, 128] (lane 0 full, lane 1 streaming;
the 128-lane layout of JAX's TPU flash attention residuals). The wrapper mixes
out = alpha * out_full + (1 - alpha) * out_stream.

Gradients (`jax.custom_vjp`): gate training differentiates w.r.t. the gates only, but the
gradient of a loss w.r.t. the gates of layer l flows back through the attention of every later
layer into its q, k, v (they depend on layer l's output), so q, k, v get exact gradients too:
  * d alpha[h] = sum over (b, g, t, d) of dO * (out_full - out_stream), from the forward's two
    branch outputs (exact; no recomputation);
  * dq, dk, dv: flash-attention backward with the two branches sharing scores and dP = dO V^T:
      dS = alpha * P_f * (dP - D_f) + (1 - alpha) * P_s * (dP - D_s),
      D_f = rowsum(dO * out_full), D_s = rowsum(dO * out_stream), P = exp(s - lse),
      dV = (alpha P_f + (1 - alpha) P_s)^T dO,  dQ = dS K / sqrt(D),  dK = dS^T Q / sqrt(D),
    in two kernels (dq: grid over query blocks, key blocks arbitrary; dk/dv: grid over key
    blocks, query blocks arbitrary) with the same block classification as the forward.
Residuals per layer: q, k, v, both branch outputs (float32) and the row statistics: O(T) per
head, no [T, T] array (the reference keeps the [B, K, G, T, T] probabilities).

Positions: the kernel derives positions from indices, so it requires contiguous positions
positions[b] = arange(T) for every row (what `Decoder.forward` passes); the `positions` argument
is accepted for the reference's signature and checked only when it is a concrete array.

  mixed_prefill_attention_reference(alpha, q, k, v, positions, prompt_lengths, sink, window)
  mixed_prefill_attention(alpha, q, k, v, positions=None, prompt_lengths=None, *, sink, window,
                          block_q=128, block_k=256, interpret=False, poison=False)
  mixed_prefill_branches(...) -> (out_full, out_stream) float32 [B, T, H, D] (tests, analysis)
  mixed_prefill_attention_fn(gates, sink, window, prompt_lengths=None, interpret=None) -> an
      AttentionFn for Decoder.forward, like jaxkv.model.gated.mixed_attention_fn
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxkv.cache.gated import check_streaming, mixed_attention  # the mixing math (jaxkv.cache)

NEG_INF = -1e30
STATS = 128  # lanes of the per-row statistics arrays (lane 0/1: lse full/stream; 2/3: deltas)
DEFAULT_BLOCK_Q = 128  # query positions per tile: the tile has G * block_q rows
DEFAULT_BLOCK_K = 256  # key positions per grid step (the lane dim of the score tile)
VMEM_LIMIT_BYTES = 48 * 1024 * 1024  # score tiles [G * block_q, block_k] f32 and temporaries


def mixed_prefill_attention_reference(alpha: jax.Array, q: jax.Array, k: jax.Array,
                                      v: jax.Array, positions: jax.Array,
                                      prompt_lengths: Optional[jax.Array], sink: int,
                                      window: int) -> jax.Array:
    """The jnp math (differentiable in everything): both branches from one float32 score
    matrix, their softmaxes mixed per KV head by `jaxkv.cache.gated.mix_softmax`
    (`jaxkv.cache.gated.mixed_attention`).

    alpha: [K]; q: [B, T, H, D]; k, v: [B, T, K, D]; positions: [B, T]; prompt_lengths: [B]
    or None -> [B, T, H, D] in q's dtype."""
    sink, window = check_streaming(sink, window)
    qp, kp = positions[:, :, None], positions[:, None, :]
    full = kp <= qp  # [B, T, S] causal
    stream = full & ((qp - kp < window) | (kp < sink))
    if prompt_lengths is not None:
        in_prompt = positions < jnp.asarray(prompt_lengths)[:, None]  # [B, T]
        stream = stream | (full & in_prompt[:, :, None])
    return mixed_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), full, stream,
                           alpha, q.shape[-1] ** -0.5)


# ---- kernel helpers ------------------------------------------------------------------------------

def _sublane_multiple(dtype) -> int:
    """Second-minor tile of a TPU VMEM array: 8 rows of 32-bit words, packed for narrow dtypes."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _last_key_block(qi, *, t: int, bq: int, bk: int):
    """Index of the last key block a query block sees (causal): that of its last real row."""
    # lax.div: truncating division, equal to // on these non-negative operands and lowered by
    # Mosaic without the sign fix-up of floor division.
    return jax.lax.div(jnp.minimum(qi * bq + bq, t) - 1, bk)


def _block_kind(q0, k0, plen, *, t: int, bq: int, bk: int, sink: int, window: int):
    """Scalars (bool) classifying the (query block at q0, key block at k0) pair.

    causal: some key of the block is at or before some real query of the block;
    all_prompt: every real query of the block is inside the prompt (stream mask == causal mask);
    both: the streaming state needs this block (a sink key, a key inside some query's window,
      or a query inside the prompt) and the block is not all_prompt.
    Conservative: a pair flagged `both` may still have an empty streaming mask; masks are exact.
    """
    q_last = jnp.minimum(q0 + bq, t) - 1
    causal = k0 <= q_last
    all_prompt = q_last < plen
    near = (k0 < sink) | (k0 + bk - 1 > q0 - window) | (q0 < plen)
    both = causal & near & jnp.logical_not(all_prompt)
    return causal, both, all_prompt


def _tile_masks(q0, k0, plen, *, g: int, bq: int, bk: int, sink: int, window: int):
    """bool [G * bq, bk] causal and streaming masks of a score tile (rows g-major)."""
    qpos = q0 + jax.lax.broadcasted_iota(jnp.int32, (g, bq, bk), 1).reshape(g * bq, bk)
    kpos = k0 + jax.lax.broadcasted_iota(jnp.int32, (g * bq, bk), 1)
    full = kpos <= qpos
    stream = full & ((qpos - kpos < window) | (kpos < sink) | (qpos < plen))
    return full, stream


def _zero_rows_past(x, start, t: int):
    """x [N, D] with rows start + i >= t set to 0 (a partial block's tail may hold NaN)."""
    rows = start + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.where(rows < t, x, jnp.zeros((), x.dtype))


def _zero_tile_rows_past(x, q0, t: int, g: int, bq: int):
    """x [G * bq, N] (rows g-major) with rows of positions >= t set to 0."""
    n = x.shape[-1]
    rows = q0 + jax.lax.broadcasted_iota(jnp.int32, (g, bq, n), 1).reshape(g * bq, n)
    return jnp.where(rows < t, x, jnp.zeros((), x.dtype))


def _scores(q, k, scale: float):
    """q [R, D] @ k [N, D]^T -> float32 [R, N] (bf16 products accumulate exactly in f32)."""
    return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32) * scale


def _matmul(a, b):
    """a [M, N] @ b [N, D] -> float32 [M, D], a cast to b's dtype (bf16 MXU for bf16 inputs)."""
    return jax.lax.dot_general(a.astype(b.dtype), b, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _online_update(s, mask, v, m_ref, l_ref, acc_ref):
    """One key block into one online-softmax state. s: f32 [R, N]; mask: bool [R, N]; v [N, D];
    m_ref, l_ref: [R, 1] f32; acc_ref: [R, D] f32."""
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.where(mask, s, NEG_INF).max(axis=1, keepdims=True))
    corr = jnp.exp(m_prev - m_new)  # [R, 1]; 0 once a real max replaces NEG_INF
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)  # [R, N]
    l_ref[...] = corr * l_ref[...] + p.sum(axis=1, keepdims=True)
    acc_ref[...] = corr * acc_ref[...] + _matmul(p, v)
    m_ref[...] = m_new


# ---- forward kernel ------------------------------------------------------------------------------

def _forward_kernel(plen_ref, q_ref, k_ref, v_ref, *rest, scale: float, sink: int, window: int,
                    t: int, g: int, bq: int, bk: int):
    """One (b, kv head, query block, key block) step.

    plen_ref: SMEM [B] int32; q_ref: [G, bq, D]; k_ref, v_ref: [bk, D]; rest = ([3 poison refs,]
    of_ref, os_ref [G, bq, D] f32, st_ref [G, bq, STATS] f32, then VMEM scratch m, l [R, 1],
    acc [R, D] of the full branch and the same three of the streaming branch (R = G * bq)).
    """
    of_ref, os_ref, st_ref, mf_ref, lf_ref, af_ref, ms_ref, ls_ref, as_ref = rest[-9:]
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q0, k0 = qi * bq, ki * bk
    plen = plen_ref[b]
    causal, both, all_prompt = _block_kind(q0, k0, plen, t=t, bq=bq, bk=bk, sink=sink,
                                           window=window)
    d = q_ref.shape[-1]
    r = g * bq

    @pl.when(ki == 0)
    def _init():
        for m_ref, l_ref, acc_ref in ((mf_ref, lf_ref, af_ref), (ms_ref, ls_ref, as_ref)):
            m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
            l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(causal)
    def _step():
        q = q_ref[...].reshape(r, d)  # [R, D]
        k, v = k_ref[...], v_ref[...]  # [bk, D]
        if t % bk:  # rows past T in the partial last key block are undefined (maybe NaN)
            k, v = _zero_rows_past(k, k0, t), _zero_rows_past(v, k0, t)
        s = _scores(q, k, scale)  # [R, bk]
        full, stream = _tile_masks(q0, k0, plen, g=g, bq=bq, bk=bk, sink=sink, window=window)
        _online_update(s, full, v, mf_ref, lf_ref, af_ref)

        @pl.when(both)
        def _stream():
            _online_update(s, stream, v, ms_ref, ls_ref, as_ref)

    @pl.when(ki == _last_key_block(qi, t=t, bq=bq, bk=bk))
    def _finish():
        # Every real row has its own position in both masks (window >= 1), so l >= 1 there; the
        # clamp only keeps rows past T (never written back) finite.
        lf = jnp.maximum(lf_ref[...], 1e-30)  # [R, 1]
        out_f = af_ref[...] / lf  # [R, D]
        lse_f = mf_ref[...] + jnp.log(lf)  # [R, 1]
        ls = jnp.maximum(ls_ref[...], 1e-30)
        out_s = jnp.where(all_prompt, out_f, as_ref[...] / ls)
        lse_s = jnp.where(all_prompt, lse_f, ms_ref[...] + jnp.log(ls))
        lane = jax.lax.broadcasted_iota(jnp.int32, (r, STATS), 1)
        stats = jnp.where(lane == 0, lse_f, jnp.where(lane == 1, lse_s, 0.0))  # [R, STATS]
        of_ref[...] = out_f.reshape(g, bq, d)
        os_ref[...] = out_s.reshape(g, bq, d)
        st_ref[...] = stats.reshape(g, bq, STATS)


def _compiler_params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=VMEM_LIMIT_BYTES)


def _poisoned(shapes, args, in_specs, first_operand: int, interpret):
    """Tests: outputs that start as NaN, so any element the kernel fails to write shows.

    Compiled or generic interpret mode (interpret=True): NaN-filled buffers aliased to the
    outputs (appended to args / in_specs; returns the aliases). first_operand: operand index of
    the first poison input (scalar prefetch included). TPU interpret mode (`InterpretParams`)
    cannot alias a buffer that a partial last block overhangs, but allocates outputs (and
    scratch) filled with NaN itself (`uninitialized_memory="nan"`, which `_config` sets), so
    nothing is added there."""
    if isinstance(interpret, pltpu.InterpretParams):
        return {}
    aliases = {}
    for i, (shape, dtype) in enumerate(shapes):
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        args.append(jnp.full(shape, jnp.nan, dtype))
        aliases[first_operand + i] = i
    return aliases


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static settings of one mixed prefill call (hashable: a custom_vjp nondiff argument)."""
    sink: int
    window: int
    bq: int
    bk: int
    scale: float
    interpret: Any
    poison: bool


def _forward_call(q5, k4, v4, plen, cfg: _Config):
    """q5: [B, K, G, T, D]; k4, v4: [B, K, T, D]; plen: [B] int32 -> (out_full, out_stream
    float32 [B, K, G, T, D], stats float32 [B, K, G, T, STATS])."""
    b, kh, g, t, d = q5.shape
    bq, bk = cfg.bq, cfg.bk
    grid = (b, kh, pl.cdiv(t, bq), pl.cdiv(t, bk))

    def q_index(bi, hi, qi, ki, plen_ref):
        return bi, hi, 0, qi, 0

    def kv_index(bi, hi, qi, ki, plen_ref):
        # Future blocks: repeat the last needed block (same index -> no new DMA).
        return bi, hi, jnp.minimum(ki, _last_key_block(qi, t=t, bq=bq, bk=bk)), 0

    sq = pl.squeezed
    q_spec = pl.BlockSpec((sq, sq, g, bq, d), q_index)  # [G, bq, D] tile of one KV head
    st_spec = pl.BlockSpec((sq, sq, g, bq, STATS), q_index)
    kv_spec = pl.BlockSpec((sq, sq, bk, d), kv_index)  # [bk, D]
    shapes = [(q5.shape, jnp.float32), (q5.shape, jnp.float32),
              ((b, kh, g, t, STATS), jnp.float32)]
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [plen, q5, k4, v4]
    aliases = _poisoned(shapes, args, in_specs, len(args), cfg.interpret) if cfg.poison else {}
    r = g * bq
    state = [pltpu.VMEM((r, 1), jnp.float32), pltpu.VMEM((r, 1), jnp.float32),
             pltpu.VMEM((r, d), jnp.float32)]  # m, l, acc
    return pl.pallas_call(
        functools.partial(_forward_kernel, scale=cfg.scale, sink=cfg.sink, window=cfg.window,
                          t=t, g=g, bq=bq, bk=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
            out_specs=[q_spec, q_spec, st_spec],
            scratch_shapes=state + state),  # full branch, then streaming branch
        out_shape=[jax.ShapeDtypeStruct(s, dt) for s, dt in shapes],
        input_output_aliases=aliases,
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
    )(*args)


# ---- backward kernels ----------------------------------------------------------------------------

def _score_grads(q, k, v, do, stats, q0, k0, plen, *, scale, sink, window, g, bq, bk):
    """The recomputed probabilities and score gradients of one tile: q, do [R, D]; k, v [bk, D];
    stats [R, STATS] (lse_f, lse_s, D_f, D_s in lanes 0..3).

    -> (p_f, ds_f, stream_part): p_f = P_full, ds_f = P_full * (dP - D_full), f32 [R, bk];
    stream_part() -> (p_s, ds_s), the same for the streaming branch, a thunk so that only the
    blocks that need it (`both`) pay its exp. dS = alpha * ds_f + (1 - alpha) * ds_s."""
    s = _scores(q, k, scale)  # [R, bk]
    full, stream = _tile_masks(q0, k0, plen, g=g, bq=bq, bk=bk, sink=sink, window=window)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)  # [R, bk] = dO V^T
    p_f = jnp.where(full, jnp.exp(s - stats[:, 0:1]), 0.0)
    ds_f = p_f * (dp - stats[:, 2:3])

    def stream_part():
        p_s = jnp.where(stream, jnp.exp(s - stats[:, 1:2]), 0.0)
        return p_s, p_s * (dp - stats[:, 3:4])
    return p_f, ds_f, stream_part


def _dq_kernel(plen_ref, alpha_ref, q_ref, k_ref, v_ref, do_ref, st_ref, *rest, scale: float,
               sink: int, window: int, t: int, g: int, bq: int, bk: int):
    """dQ of one (b, kv head, query block) over the key blocks (last grid axis).

    alpha_ref: SMEM [K] f32; q_ref, do_ref: [G, bq, D]; k_ref, v_ref: [bk, D]; st_ref:
    [G, bq, STATS] (lse_f, lse_s, D_f, D_s); rest = ([poison,] dq_ref [G, bq, D], acc [R, D] f32).
    """
    dq_ref, acc_ref = rest[-2:]
    b, h, qi, ki = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    q0, k0 = qi * bq, ki * bk
    plen = plen_ref[b]
    a = alpha_ref[h]
    causal, both, all_prompt = _block_kind(q0, k0, plen, t=t, bq=bq, bk=bk, sink=sink,
                                           window=window)
    d = q_ref.shape[-1]
    r = g * bq

    @pl.when(ki == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(causal)
    def _step():
        k, v = k_ref[...], v_ref[...]  # [bk, D]
        if t % bk:
            k, v = _zero_rows_past(k, k0, t), _zero_rows_past(v, k0, t)
        _, ds_f, stream_part = _score_grads(
            q_ref[...].reshape(r, d), k, v, do_ref[...].reshape(r, d),
            st_ref[...].reshape(r, STATS), q0, k0, plen, scale=scale, sink=sink,
            window=window, g=g, bq=bq, bk=bk)

        @pl.when(both)
        def _mixed():
            _, ds_s = stream_part()
            acc_ref[...] += _matmul(a * ds_f + (1.0 - a) * ds_s, k) * scale

        @pl.when(jnp.logical_not(both))
        def _full_only():  # streaming P is 0 here, or equal to P_full for an all-prompt block
            c = jnp.where(all_prompt, 1.0, a)
            acc_ref[...] += c * _matmul(ds_f, k) * scale

    @pl.when(ki == _last_key_block(qi, t=t, bq=bq, bk=bk))
    def _finish():
        dq_ref[...] = acc_ref[...].reshape(g, bq, d).astype(dq_ref.dtype)


def _dkv_kernel(plen_ref, alpha_ref, q_ref, k_ref, v_ref, do_ref, st_ref, *rest, scale: float,
                sink: int, window: int, t: int, g: int, bq: int, bk: int):
    """dK, dV of one (b, kv head, key block) over the query blocks (last grid axis).

    Refs as in `_dq_kernel`; rest = ([2 poison,] dk_ref, dv_ref [bk, D], dk_acc, dv_acc
    [bk, D] f32). The G query heads of the tile sum into their KV head's dK, dV."""
    dk_ref, dv_ref, dk_acc, dv_acc = rest[-4:]
    b, h, ki, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    q0, k0 = qi * bq, ki * bk
    plen = plen_ref[b]
    a = alpha_ref[h]
    causal, both, all_prompt = _block_kind(q0, k0, plen, t=t, bq=bq, bk=bk, sink=sink,
                                           window=window)
    d = q_ref.shape[-1]
    r = g * bq

    @pl.when(qi == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(causal)
    def _step():
        q = q_ref[...].reshape(r, d)
        do = do_ref[...].reshape(r, d)
        stats = st_ref[...].reshape(r, STATS)
        if t % bq:  # rows past T of the partial last query block: undefined, summed over here
            q = _zero_tile_rows_past(q, q0, t, g, bq)
            do = _zero_tile_rows_past(do, q0, t, g, bq)
            stats = _zero_tile_rows_past(stats, q0, t, g, bq)
        k, v = k_ref[...], v_ref[...]  # rows past T only reach dK, dV rows past T (dropped)
        p_f, ds_f, stream_part = _score_grads(
            q, k, v, do, stats, q0, k0, plen, scale=scale, sink=sink, window=window, g=g,
            bq=bq, bk=bk)

        @pl.when(both)
        def _mixed():
            p_s, ds_s = stream_part()
            p = a * p_f + (1.0 - a) * p_s  # [R, bk]
            ds = a * ds_f + (1.0 - a) * ds_s
            dv_acc[...] += _matmul(p.T, do)
            dk_acc[...] += _matmul(ds.T, q) * scale

        @pl.when(jnp.logical_not(both))
        def _full_only():
            c = jnp.where(all_prompt, 1.0, a)
            dv_acc[...] += c * _matmul(p_f.T, do)
            dk_acc[...] += c * _matmul(ds_f.T, q) * scale

    @pl.when(qi == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward_calls(alpha, q5, k4, v4, do5, stats, plen, cfg: _Config):
    """-> dq5 [B, K, G, T, D], dk4, dv4 [B, K, T, D] (dtypes of q, k, v). stats: lanes 0..3 =
    lse_f, lse_s, D_f, D_s."""
    b, kh, g, t, d = q5.shape
    bq, bk = cfg.bq, cfg.bk
    nq, nk = pl.cdiv(t, bq), pl.cdiv(t, bk)
    sq = pl.squeezed
    kw = dict(scale=cfg.scale, sink=cfg.sink, window=cfg.window, t=t, g=g, bq=bq, bk=bk)
    alpha_spec = pl.BlockSpec(memory_space=pltpu.SMEM)  # [K] f32, whole
    alpha32 = alpha.astype(jnp.float32)

    # dq: grid (B, K, query blocks, key blocks) as in the forward.
    def q_index(bi, hi, qi, ki, plen_ref):
        return bi, hi, 0, qi, 0

    def kv_index(bi, hi, qi, ki, plen_ref):
        return bi, hi, jnp.minimum(ki, _last_key_block(qi, t=t, bq=bq, bk=bk)), 0

    q_spec = pl.BlockSpec((sq, sq, g, bq, d), q_index)
    st_spec = pl.BlockSpec((sq, sq, g, bq, STATS), q_index)
    kv_spec = pl.BlockSpec((sq, sq, bk, d), kv_index)
    in_specs = [alpha_spec, q_spec, kv_spec, kv_spec, q_spec, st_spec]
    args = [plen, alpha32, q5, k4, v4, do5, stats]
    shapes = [(q5.shape, q5.dtype)]
    aliases = _poisoned(shapes, args, in_specs, len(args), cfg.interpret) if cfg.poison else {}
    dq5 = pl.pallas_call(
        functools.partial(_dq_kernel, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, kh, nq, nk), in_specs=in_specs, out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((g * bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
        input_output_aliases=aliases,
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
    )(*args)

    # dk, dv: grid (B, K, key blocks, query blocks); query blocks wholly before the key block
    # repeat the first one that sees it (no DMA) and skip their compute.
    def q_index_t(bi, hi, ki, qi, plen_ref):
        return bi, hi, 0, jnp.maximum(qi, jax.lax.div(ki * bk, bq)), 0

    def kv_index_t(bi, hi, ki, qi, plen_ref):
        return bi, hi, ki, 0

    q_spec_t = pl.BlockSpec((sq, sq, g, bq, d), q_index_t)
    st_spec_t = pl.BlockSpec((sq, sq, g, bq, STATS), q_index_t)
    kv_spec_t = pl.BlockSpec((sq, sq, bk, d), kv_index_t)
    in_specs = [alpha_spec, q_spec_t, kv_spec_t, kv_spec_t, q_spec_t, st_spec_t]
    args = [plen, alpha32, q5, k4, v4, do5, stats]
    shapes = [(k4.shape, k4.dtype), (v4.shape, v4.dtype)]
    aliases = _poisoned(shapes, args, in_specs, len(args), cfg.interpret) if cfg.poison else {}
    dk4, dv4 = pl.pallas_call(
        functools.partial(_dkv_kernel, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, kh, nk, nq), in_specs=in_specs,
            out_specs=[kv_spec_t, kv_spec_t],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(s, dt) for s, dt in shapes],
        input_output_aliases=aliases,
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
    )(*args)
    return dq5, dk4, dv4


# ---- custom_vjp and layout -----------------------------------------------------------------------

def _to_kernel_layout(q, k, v):
    """q [B, T, H, D] -> [B, K, G, T, D]; k, v [B, T, K, D] -> [B, K, T, D]."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    q5 = q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4)
    return q5, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _from_q_layout(x5):
    """[B, K, G, T, D] -> [B, T, H, D]."""
    b, kh, g, t, d = x5.shape
    return x5.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, d)


def _mix(alpha, of, os):
    a = alpha.astype(jnp.float32)[None, :, None, None, None]  # [1, K, 1, 1, 1]
    return a * of + (1.0 - a) * os


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _mixed_prefill(alpha, q, k, v, plen, cfg: _Config):
    out, _ = _mixed_prefill_fwd(alpha, q, k, v, plen, cfg)
    return out


def _mixed_prefill_fwd(alpha, q, k, v, plen, cfg: _Config):
    q5, k4, v4 = _to_kernel_layout(q, k, v)
    of, os, stats = _forward_call(q5, k4, v4, plen, cfg)
    out = _from_q_layout(_mix(alpha, of, os)).astype(q.dtype)
    return out, (alpha, q5, k4, v4, plen, of, os, stats)


def _mixed_prefill_bwd(cfg: _Config, res, g_out):
    alpha, q5, k4, v4, plen, of, os, stats = res
    b, t, h, d = g_out.shape
    kh = k4.shape[1]
    do5 = g_out.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    do32 = do5.astype(jnp.float32)
    delta_f = jnp.sum(do32 * of, axis=-1)  # [B, K, G, T] = rowsum(dO * out_full)
    delta_s = jnp.sum(do32 * os, axis=-1)
    d_alpha = jnp.sum(delta_f - delta_s, axis=(0, 2, 3)).astype(alpha.dtype)  # [K]
    stats = stats.at[..., 2].set(delta_f).at[..., 3].set(delta_s)
    dq5, dk4, dv4 = _backward_calls(alpha, q5, k4, v4, do5.astype(q5.dtype), stats, plen, cfg)
    return (d_alpha, _from_q_layout(dq5), dk4.transpose(0, 2, 1, 3), dv4.transpose(0, 2, 1, 3),
            None)


_mixed_prefill.defvjp(_mixed_prefill_fwd, _mixed_prefill_bwd)


# ---- public functions ----------------------------------------------------------------------------

def _check_inputs(alpha, q, k, v, positions, prompt_lengths) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q [B, T, H, D] and "
                         f"k, v [B, T, K, D] of one shape")
    b, t, h, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"q {q.shape}, k {k.shape}: batch, length and head_dim must match and "
                         f"the {k.shape[2]} KV heads must divide the {h} query heads")
    if getattr(alpha, "shape", None) != (k.shape[2],):
        raise ValueError(f"alpha: shape {getattr(alpha, 'shape', None)}; expected "
                         f"({k.shape[2]},), one gate per KV head")
    if prompt_lengths is not None and jnp.shape(prompt_lengths) != (b,):
        raise ValueError(f"prompt_lengths has shape {jnp.shape(prompt_lengths)}; expected ({b},)")
    if positions is not None:
        if jnp.shape(positions) != (b, t):
            raise ValueError(f"positions has shape {jnp.shape(positions)}; expected ({b}, {t})")
        try:
            pos = np.asarray(positions)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            pos = None  # traced (under jit): the caller's promise
        if pos is not None:
            if not np.array_equal(pos, np.broadcast_to(np.arange(t), (b, t))):
                raise ValueError("positions: the mixed prefill kernel needs contiguous positions "
                                 "arange(T) in every row (Decoder.forward's); use "
                                 "mixed_prefill_attention_reference for others")


def _config(t: int, dtype, *, sink, window, block_q, block_k, interpret, poison, d) -> _Config:
    sink, window = check_streaming(sink, window)
    tile = _sublane_multiple(dtype)
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < tile \
                or val % tile:
            raise ValueError(f"{name}={val!r}: must be a positive multiple of {tile} for "
                             f"{jnp.dtype(dtype).name} inputs")
    bq = min(int(block_q), _round_up(t, tile))  # a short sequence is one (padded) block
    bk = min(int(block_k), _round_up(t, tile))
    if poison and isinstance(interpret, pltpu.InterpretParams):
        interpret = dataclasses.replace(interpret, uninitialized_memory="nan")  # see _poisoned
    return _Config(sink=sink, window=window, bq=bq, bk=bk, scale=float(d) ** -0.5,
                   interpret=interpret, poison=bool(poison))


def mixed_prefill_attention(alpha: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
                            positions: Optional[jax.Array] = None,
                            prompt_lengths: Optional[jax.Array] = None, *, sink: int,
                            window: int, block_q: int = DEFAULT_BLOCK_Q,
                            block_k: int = DEFAULT_BLOCK_K, interpret=False,
                            poison: bool = False) -> jax.Array:
    """Pallas TPU kernel of `mixed_prefill_attention_reference` (same shapes and result),
    differentiable w.r.t. alpha, q, k and v (see the module doc).

    alpha: [K] gates; q: [B, T, H, D]; k, v: [B, T, K, D]; positions: [B, T], must be arange(T)
      in every row (checked when concrete; None: assumed); prompt_lengths: [B] int or None
      -> [B, T, H, D] in q's dtype. Scale 1 / sqrt(D), as the reference.
    sink, window: static ints (sink >= 0, window >= 1).
    block_q, block_k: query / key positions per tile (static); multiples of the sublane tile (8
      for 32-bit, 16 for 16-bit dtypes); T need not be a multiple: partial blocks are masked.
    interpret: False (Mosaic TPU), True or a `pltpu.InterpretParams` (CPU interpret mode).
    poison: tests only; every kernel output starts as NaN (aliased) so unwritten tiles show.
    """
    _check_inputs(alpha, q, k, v, positions, prompt_lengths)
    b, t, _, d = q.shape
    if t == 0:
        return jnp.zeros(q.shape, q.dtype)
    cfg = _config(t, q.dtype, sink=sink, window=window, block_q=block_q, block_k=block_k,
                  interpret=interpret, poison=poison, d=d)
    plen = (jnp.zeros((b,), jnp.int32) if prompt_lengths is None
            else jnp.asarray(prompt_lengths).astype(jnp.int32))
    return _mixed_prefill(alpha, q, k, v, plen, cfg)


def mixed_prefill_branches(q: jax.Array, k: jax.Array, v: jax.Array,
                           prompt_lengths: Optional[jax.Array] = None, *, sink: int,
                           window: int, block_q: int = DEFAULT_BLOCK_Q,
                           block_k: int = DEFAULT_BLOCK_K, interpret=False,
                           poison: bool = False):
    """The forward kernel's two branch outputs (not differentiable): q [B, T, H, D]; k, v
    [B, T, K, D] -> (out_full, out_stream), float32 [B, T, H, D] each."""
    kh = k.shape[2]
    _check_inputs(jnp.zeros((kh,)), q, k, v, None, prompt_lengths)
    b, t, _, d = q.shape
    cfg = _config(t, q.dtype, sink=sink, window=window, block_q=block_q, block_k=block_k,
                  interpret=interpret, poison=poison, d=d)
    plen = (jnp.zeros((b,), jnp.int32) if prompt_lengths is None
            else jnp.asarray(prompt_lengths).astype(jnp.int32))
    of, os, _ = _forward_call(*_to_kernel_layout(q, k, v), plen, cfg)
    return _from_q_layout(of), _from_q_layout(os)


def mixed_prefill_attention_fn(gates, sink: int, window: int, prompt_lengths=None,
                               interpret=None, block_q: int = DEFAULT_BLOCK_Q,
                               block_k: int = DEFAULT_BLOCK_K):
    """An `AttentionFn` (see jaxkv.model.decoder) with the contract of
    `jaxkv.model.gated.mixed_attention_fn(gates, sink, window, prompt_lengths)`, computed by the
    mixed prefill kernel. Differentiable w.r.t. gates (and q, k, v, hence through later layers).

    gates: [L, K] (float; traced); sink, window: static ints; prompt_lengths: optional [B] int.
    interpret: None (default): per call through `pallas_kernels.dispatch.mixed_prefill_attention`
      (compiled kernel on TPU, interpret mode under kernel_mode "interpret", the jnp reference
      elsewhere); False / True / `pltpu.InterpretParams`: always this kernel, compiled or
      interpreted. The model's positions must be arange(T) per row (Decoder.forward's).
    """
    sink, window = check_streaming(sink, window)
    if getattr(gates, "ndim", None) != 2:
        raise ValueError(f"gates: expected shape [layers, kv_heads], got "
                         f"{getattr(gates, 'shape', type(gates).__name__)}")

    def attention(layer, q, k, v, positions):
        kh = k.shape[2]
        if gates.shape[1] != kh or not 0 <= layer < gates.shape[0]:
            raise ValueError(f"gates: shape {tuple(gates.shape)} does not fit layer {layer} with "
                             f"{kh} KV heads")
        lengths = None if prompt_lengths is None else jnp.asarray(prompt_lengths)
        if interpret is None:
            from pallas_kernels import dispatch
            return dispatch.mixed_prefill_attention(gates[layer], q, k, v, positions, lengths,
                                                    sink=sink, window=window, block_q=block_q,
                                                    block_k=block_k)
        return mixed_prefill_attention(gates[layer], q, k, v, positions, lengths, sink=sink,
                                       window=window, block_q=block_q, block_k=block_k,
                                       interpret=interpret)

    return attention
