"""Mixed-precision cache (RDKV): per layer and KV head, every kept prompt token has its own V bit
width in {2, 4, 8, 16} (0 evicted it) and every K channel its own width in {0, 2, 4, 8}; tokens
are grouped by V width into dense packed regions of one byte arena, plus a zone in the cache dtype
for the recent window of the prompt and the tokens generated while decoding.

Layout of one layer (B batch, K KV heads, T padded prompt, D head dim, W window, E decode slots):

    arena:         uint8 [B, K, P]     token records, grouped by V width: 16-bit records, then 8,
                                       4, 2 (each region dense, positions ascending inside it)
    counts:        int32 [B, K, 4]     records at V width 16, 8, 4, 2
    k_channels:    uint8 [B, K, D]     channel at each rank (channels sorted by K width, 8 first;
                                       int32 when D > 256)
    k_counts:      int32 [B, K, 3]     channels at K width 8, 4, 2 (the rest are pruned: 0 bits)
    k_scale,
    k_zero:        float16 [B, K, D]   per-channel K scale and zero-point (min/max over the kept
                                       tokens of the arena), rank order
    whole_k,
    whole_v:       [B, K, W + E, D]    the last min(W, length) prompt tokens, then decoded tokens,
                                       in the cache dtype ("kept whole")
    whole_lengths: int32 [B]           valid whole-zone slots
    lengths:       int32 [B]           prompt lengths (positions of the window tokens)

A record is `record_bytes(bits)` bytes (see `pallas_kernels.mixed_decode` for the byte layout):
R bytes of K codes (the row: every kept channel at its width, R = k_row_bytes static, so every
kept token pays R * 8 K bits whatever the split between channels), a 4-byte int32 position, and V:
at 2/4/8 bits a float16 scale and zero-point (per token, over D) plus D * bits / 8 bytes of packed
codes; at 16 bits the D values in the cache dtype (so "16 bits" is 32 for a float32 model). Bytes
per kept token, D = 128, R = 64 (4 K bits per channel on average), bfloat16 cache:

    V width        2     4     8     16      (a dense token: K + V = 512 bytes)
    record bytes   104   136   200   324

Why one arena per head and not static segment capacities: the allocation decides per head how many
tokens get each width, so fixed per-width capacities would either constrain the allocation or pad
up to 4x; an arena of P bytes holds any mix that fits. The only padding (`padding_bytes`) is the
arena tail the allocation leaves unused (less than one record's upgrade per head, plus whatever a
sequence shorter than the padded prompt does not use), the K-row bits a head leaves unused
(R * 8 - sum of its channel widths, per record) and window slots of sequences shorter than W.
`nbytes` counts every array above. K is quantised per channel over the kept arena tokens (all V
widths, including 16: only the whole zone keeps K in the cache dtype).
"""
from __future__ import annotations

from typing import Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache import quant
from jaxkv.cache.base import array_nbytes, batched_write
from jaxkv.cache.mixed_format import (
    K_WIDTHS,
    META_BYTES,
    VMETA_BYTES,
    WIDTHS,
    bytes_to,
    k_row_codes,
    record_bytes,
    region_offsets,
    region_views,
)
from jaxkv.checks import check_int

TOKEN_BITS = (0, 2, 4, 8, 16)
CHANNEL_BITS = (0, 2, 4, 8)


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _put_records(arena: jax.Array, start: jax.Array, records: jax.Array) -> jax.Array:
    """arena uint8 [P] with each row of records [T, R] written at byte start [T]; a record whose
    bytes do not all fit (start = P marks one not kept) is dropped. One index per record (a
    window scatter), not one per byte: the index array is T ints, not T x R x 3."""
    dnums = jax.lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(),
                                            scatter_dims_to_operand_dims=(0,))
    return jax.lax.scatter(arena, start[:, None], records, dnums,
                           mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def _to_bytes(x: jax.Array) -> jax.Array:
    """[..., n] of any 2/4-byte dtype -> uint8 [..., n * itemsize] (native byte order)."""
    out = jax.lax.bitcast_convert_type(x, jnp.uint8)  # [..., n, itemsize]
    return out.reshape(x.shape[:-1] + (x.shape[-1] * x.dtype.itemsize,))


@flax.struct.dataclass
class MixedCache:
    """One layer's mixed-precision cache (see module docstring)."""

    arena: jax.Array
    counts: jax.Array
    k_channels: jax.Array
    k_counts: jax.Array
    k_scale: jax.Array
    k_zero: jax.Array
    whole_k: jax.Array
    whole_v: jax.Array
    whole_lengths: jax.Array
    lengths: jax.Array
    k_row_bytes: int = flax.struct.field(pytree_node=False)
    window: int = flax.struct.field(pytree_node=False)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def fixed_bytes_per_head(head_dim: int, window: int, itemsize: int) -> int:
        """Bytes of a head's prompt part outside the arena: window slots (K and V whole), channel
        ranks, K scales and zero-points, counts and k_counts."""
        chan = 1 if head_dim <= 256 else 4
        return window * 2 * head_dim * itemsize + head_dim * (chan + 2 + 2) + 4 * 4 + 3 * 4

    @classmethod
    def from_allocation(cls, k: jax.Array, v: jax.Array, lengths: jax.Array,
                        token_bits: jax.Array, channel_bits: jax.Array, *, window: int,
                        arena_bytes: int, k_row_bytes: int, extra_capacity: int) -> "MixedCache":
        """Build the cache of a prefill layer from an allocation.

        k, v: [B, K, T, D] prefill keys (post-RoPE) and values; lengths: [B];
        token_bits: int [B, K, T] V width of each prompt token in {0, 2, 4, 8, 16} (0 evicts it;
            the last min(window, length) tokens go to the whole zone and padding is dropped, so
            their entries are ignored);
        channel_bits: int [B, K, D] K width of each channel in {0, 2, 4, 8}, summing to at most
            8 * k_row_bytes per head;
        window: whole-zone prompt slots; arena_bytes: P; extra_capacity: decode slots.
        The records of a head must fit in P bytes. With concrete arrays every condition is checked
        (ValueError); under jit the caller guarantees them (RDKV's allocator does by
        construction) and records past the arena would be dropped.
        """
        b, kh, t, d = k.shape
        if v.shape != k.shape:
            raise ValueError(f"v.shape={v.shape}: must equal k.shape={k.shape}")
        if d % 4:
            raise ValueError(f"head_dim={d}: the mixed cache packs D 2-bit codes into whole "
                             f"bytes, so D must be a multiple of 4")
        window = check_int("window", window, 0)
        p = check_int("arena_bytes", arena_bytes, 0)
        r = check_int("k_row_bytes", k_row_bytes, 0)
        e = check_int("extra_capacity", extra_capacity, 0)
        if token_bits.shape != (b, kh, t):
            raise ValueError(f"token_bits.shape={token_bits.shape}: must be {(b, kh, t)}")
        if channel_bits.shape != (b, kh, d):
            raise ValueError(f"channel_bits.shape={channel_bits.shape}: must be {(b, kh, d)}")
        item = jnp.dtype(k.dtype).itemsize
        rec = tuple(record_bytes(w, r, d, item) for w in WIDTHS)
        lengths = jnp.asarray(lengths).astype(jnp.int32)
        pos = jnp.arange(t, dtype=jnp.int32)
        n_win = jnp.minimum(window, lengths)  # [B]
        arena_tok = (pos[None, :] < lengths[:, None] - n_win[:, None])  # [B, T]
        token_bits = jnp.where(arena_tok[:, None, :], token_bits.astype(jnp.int32), 0)
        channel_bits = channel_bits.astype(jnp.int32)
        if not _is_traced(token_bits, channel_bits):
            cls._check_allocation(np.asarray(token_bits), np.asarray(channel_bits), r, p, rec)
        kept = token_bits > 0  # [B, K, T]

        # ---- K: per channel over the kept tokens, each channel at its own width
        kq = {w: quant.quantize(k, w, axis=2, where=kept[..., None]) for w in K_WIDTHS}
        perm = jnp.argsort(-channel_bits, axis=-1, stable=True).astype(jnp.int32)  # rank -> chan
        k_counts = jnp.stack([(channel_bits == w).sum(-1) for w in K_WIDTHS], -1).astype(jnp.int32)
        scale = jnp.zeros((b, kh, d), jnp.float16)
        zero = jnp.zeros((b, kh, d), jnp.float16)
        for w in K_WIDTHS:
            sel = channel_bits == w
            scale = jnp.where(sel, kq[w].scale[:, :, 0], scale)
            zero = jnp.where(sel, kq[w].zero_point[:, :, 0], zero)
        k_scale = jnp.take_along_axis(scale, perm, axis=-1)
        k_zero = jnp.take_along_axis(zero, perm, axis=-1)
        krow = cls._k_rows({w: kq[w].codes for w in K_WIDTHS}, perm, k_counts, r)  # [B,K,T,R]

        # ---- records at every width, then scattered into the arena by width
        pos_bytes = _to_bytes(jnp.broadcast_to(pos[None, None, :, None], (b, kh, t, 1)))
        records = {16: jnp.concatenate([krow, pos_bytes, _to_bytes(v)], -1)}
        for w in (8, 4, 2):
            vq = quant.quantize(v, w, axis=-1)  # codes [B,K,T,D], scale/zero [B,K,T,1]
            meta = _to_bytes(jnp.concatenate([vq.scale, vq.zero_point], -1))  # [B, K, T, 4]
            records[w] = jnp.concatenate([krow, pos_bytes, meta, quant.pack(vq.codes, w)], -1)
        counts = jnp.stack([(token_bits == w).sum(-1) for w in WIDTHS], -1).astype(jnp.int32)
        offsets = region_offsets(counts, rec)  # [B, K, 4]
        arena = jnp.zeros((b, kh, p), jnp.uint8)
        scatter = jax.vmap(jax.vmap(_put_records))
        for i, w in enumerate(WIDTHS):
            if rec[i] > p:  # no record of this width fits the arena (the checks above refuse
                continue    # such tokens; under jit they are dropped)
            sel = token_bits == w  # [B, K, T]
            rank = jnp.cumsum(sel, axis=-1) - 1
            start = offsets[..., i, None] + rank * rec[i]  # [B, K, T] first byte of each record
            start = jnp.where(sel, start, p)  # p: out of range, dropped
            arena = scatter(arena, start, records[w])

        # ---- whole zone: the window, then room for decoded tokens
        wpos = lengths[:, None] - n_win[:, None] + jnp.arange(window, dtype=jnp.int32)  # [B, W]
        wvalid = jnp.arange(window)[None, :] < n_win[:, None]
        idx = jnp.clip(wpos, 0, max(t - 1, 0))[:, None, :, None]
        keep = wvalid[:, None, :, None]
        gather = lambda x: jnp.take_along_axis(x, idx, axis=2) * keep.astype(x.dtype)
        pad = [(0, 0), (0, 0), (0, e), (0, 0)]
        chan_dtype = jnp.uint8 if d <= 256 else jnp.int32
        return cls(arena=arena, counts=counts, k_channels=perm.astype(chan_dtype),
                   k_counts=k_counts, k_scale=k_scale, k_zero=k_zero,
                   whole_k=jnp.pad(gather(k), pad), whole_v=jnp.pad(gather(v), pad),
                   whole_lengths=n_win, lengths=lengths, k_row_bytes=r, window=window)

    @staticmethod
    def _check_allocation(token_bits, channel_bits, r, p, rec) -> None:
        bad = ~np.isin(token_bits, TOKEN_BITS)
        if bad.any():
            raise ValueError(f"token_bits: found {int(token_bits[bad][0])}; a token's V width "
                             f"must be one of {{0, 2, 4, 8, 16}}")
        bad = ~np.isin(channel_bits, CHANNEL_BITS)
        if bad.any():
            raise ValueError(f"channel_bits: found {int(channel_bits[bad][0])}; a K channel's "
                             f"width must be one of {{0, 2, 4, 8}} (K is capped at 8 bits)")
        row = channel_bits.sum(-1).max(initial=0)
        if row > 8 * r:
            raise ValueError(f"channel_bits: a head's channels take {int(row)} bits per token, "
                             f"more than the K row of k_row_bytes={r} ({8 * r} bits)")
        used = sum((token_bits == w).sum(-1) * rec[i] for i, w in enumerate(WIDTHS))
        if used.max(initial=0) > p:
            raise ValueError(f"token_bits: a head's records take {int(used.max())} bytes, more "
                             f"than arena_bytes={p}")

    @staticmethod
    def _k_rows(codes, perm, k_counts, r: int) -> jax.Array:
        """K rows uint8 [B, K, T, R] from per-width codes {w: uint8 [B, K, T, D]} (channel order),
        rank -> channel `perm` [B, K, D] and k_counts [B, K, 3] (see module docstring)."""
        b, kh, t, d = codes[8].shape
        if r == 0:
            return jnp.zeros((b, kh, t, 0), jnp.uint8)
        d8, d4, d2 = (k_counts[..., i:i + 1] for i in range(3))  # [B, K, 1]
        u = jnp.arange(4 * r, dtype=jnp.int32)[None, None, :]  # 2-bit units of the row
        in8 = u < 4 * d8
        in4 = (u >= 4 * d8) & (u < 4 * d8 + 2 * d4)
        in2 = (u >= 4 * d8 + 2 * d4) & (u < 4 * d8 + 2 * d4 + d2)
        rank = jnp.where(in8, u // 4, jnp.where(in4, d8 + (u - 4 * d8) // 2,
                                                 d8 + d4 + u - 4 * d8 - 2 * d4))
        sub = jnp.where(in8, u % 4, jnp.where(in4, (u - 4 * d8) % 2, 0))  # [B, K, U]
        chan = jnp.take_along_axis(perm, jnp.clip(rank, 0, d - 1), axis=-1)  # [B, K, U]
        idx = jnp.broadcast_to(chan[:, :, None, :], (b, kh, t, chan.shape[-1]))
        shift = (2 * sub).astype(jnp.uint8)[:, :, None, :]
        pick = lambda w: (jnp.take_along_axis(codes[w], idx, axis=3) >> shift) & jnp.uint8(3)
        units = jnp.where(in8[:, :, None, :], pick(8),
                          jnp.where(in4[:, :, None, :], pick(4),
                                    jnp.where(in2[:, :, None, :], pick(2), jnp.uint8(0))))
        return quant.pack(units, 2)  # [B, K, T, R]

    # ------------------------------------------------------------------ protocol
    @property
    def num_kv_heads(self) -> int:
        return self.whole_k.shape[1]

    @property
    def arena_bytes(self) -> int:
        return self.arena.shape[2]

    def record_sizes(self) -> Tuple[int, ...]:
        """Bytes of a record at each V width (WIDTHS order: 16, 8, 4, 2)."""
        d, item = self.whole_k.shape[3], jnp.dtype(self.whole_v.dtype).itemsize
        return tuple(record_bytes(w, self.k_row_bytes, d, item) for w in WIDTHS)

    def append(self, k: jax.Array, v: jax.Array) -> "MixedCache":
        """k, v: [B, K, D] written to the whole zone (cache dtype) at slot whole_lengths[b].
        `generate` sizes the zone so it is never exceeded (a full zone keeps its length)."""
        return self.replace(whole_k=batched_write(self.whole_k, k, self.whole_lengths),
                            whole_v=batched_write(self.whole_v, v, self.whole_lengths),
                            whole_lengths=jnp.minimum(self.whole_lengths + 1,
                                                      self.whole_k.shape[2]))

    def attend(self, q: jax.Array, scale: float) -> jax.Array:
        """q: [B, H, D] -> [B, H, D] without dequantising the cache (see mixed_decode)."""
        from pallas_kernels import dispatch
        return dispatch.mixed_decode_attention(
            q, self.arena, self.counts, self.k_channels, self.k_counts, self.k_scale, self.k_zero,
            self.whole_k, self.whole_v, self.whole_lengths, scale=scale,
            k_row_bytes=self.k_row_bytes)

    def nbytes(self) -> int:
        return array_nbytes(self.arena, self.counts, self.k_channels, self.k_counts, self.k_scale,
                            self.k_zero, self.whole_k, self.whole_v, self.whole_lengths,
                            self.lengths)

    def used_bytes(self) -> jax.Array:
        """int32 [B, K] arena bytes holding records."""
        return (self.counts * jnp.asarray(self.record_sizes(), jnp.int32)).sum(-1)

    def padding_bytes(self) -> jax.Array:
        """int32 [B] bytes allocated (and counted by nbytes) that hold nothing: the unused arena
        tail, unused K-row bits of the records (rounded down to bytes) and empty window slots."""
        d = self.whole_k.shape[3]
        item = jnp.dtype(self.whole_k.dtype).itemsize
        tail = (self.arena_bytes - self.used_bytes()).sum(-1)
        row_bits = (self.k_counts * jnp.asarray(K_WIDTHS, jnp.int32)).sum(-1)  # [B, K]
        slack = (self.counts.sum(-1) * (8 * self.k_row_bytes - row_bits)).sum(-1) // 8
        n_win = jnp.minimum(self.window, self.lengths)
        empty_window = (self.window - n_win) * self.num_kv_heads * 2 * d * item
        return (tail + slack + empty_window).astype(jnp.int32)

    def _dense_parts(self):
        """Per region (WIDTHS order): (k, v float32 [B, K, M, D], valid [B, K, M])."""
        d = self.whole_k.shape[3]
        vdt = self.whole_v.dtype
        r = self.k_row_bytes
        views = region_views(self.arena, self.counts, r, d, vdt)
        chan = self.k_channels.astype(jnp.int32)
        d8, d4, d2 = (self.k_counts[..., i:i + 1] for i in range(3))  # [B, K, 1]
        rank = jnp.arange(d, dtype=jnp.int32)[None, None, :]
        width = jnp.where(rank < d8, 8, jnp.where(rank < d8 + d4, 4,
                                                  jnp.where(rank < d8 + d4 + d2, 2, 0)))
        where = {8: rank, 4: 2 * d8 + rank - d8, 2: 4 * d8 + 2 * d4 + rank - d8 - d4}
        inv = jnp.argsort(chan, axis=-1)  # channel -> rank
        ks = self.k_scale.astype(jnp.float32)[:, :, None, :]
        kz = self.k_zero.astype(jnp.float32)[:, :, None, :]
        parts = []
        for w in WIDTHS:
            rows, valid = views[w]
            code = jnp.zeros(rows.shape[:3] + (d,), jnp.float32)
            if r:
                for kw, codes in k_row_codes(rows, r).items():  # [B, K, M, J]
                    j = jnp.clip(where[kw], 0, codes.shape[-1] - 1)
                    got = jnp.take_along_axis(codes, jnp.broadcast_to(j[:, :, None, :],
                                                                      (*rows.shape[:3], d)), 3)
                    code = jnp.where((width == kw)[:, :, None, :], got.astype(jnp.float32), code)
            k_rank = jnp.where((width > 0)[:, :, None, :], kz + ks * code, 0.0)  # [B,K,M,D]
            k_hat = jnp.take_along_axis(k_rank, jnp.broadcast_to(inv[:, :, None, :],
                                                                 k_rank.shape), 3)
            o = r + META_BYTES
            if w == 16:
                v_hat = bytes_to(rows[..., o:], vdt, d).astype(jnp.float32)
            else:
                meta = bytes_to(rows[..., o:o + VMETA_BYTES], jnp.float16, 2).astype(jnp.float32)
                codes = quant.unpack(rows[..., o + VMETA_BYTES:], w, d).astype(jnp.float32)
                v_hat = meta[..., 1:2] + meta[..., 0:1] * codes
            valid_f = valid[..., None]
            parts.append((jnp.where(valid_f, k_hat, 0.0), jnp.where(valid_f, v_hat, 0.0), valid))
        return parts

    def to_dense(self) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """(k, v float32 [B, K, S, D] dequantised, valid [B, K, S]): the regions (16, 8, 4, 2
        bits, P // record_bytes slots each) then the whole zone (for tests)."""
        parts = self._dense_parts()
        z = self.whole_k.shape[2]
        wvalid = jnp.broadcast_to((jnp.arange(z)[None, :] < self.whole_lengths[:, None])[:, None],
                                  self.whole_k.shape[:3])
        k = jnp.concatenate([p[0] for p in parts] + [self.whole_k.astype(jnp.float32)], 2)
        v = jnp.concatenate([p[1] for p in parts] + [self.whole_v.astype(jnp.float32)], 2)
        valid = jnp.concatenate([p[2] for p in parts] + [wvalid], 2)
        return k, v, valid

    def _region_positions(self):
        """Per region (WIDTHS order): positions int32 [B, K, M] of its slots, -1 where empty."""
        d, r = self.whole_k.shape[3], self.k_row_bytes
        views = region_views(self.arena, self.counts, r, d, self.whole_v.dtype)
        out = []
        for w in WIDTHS:
            rows, valid = views[w]
            pos = bytes_to(rows[..., r:r + META_BYTES], jnp.int32, 1)[..., 0]
            out.append(jnp.where(valid, pos, -1))
        return out

    def kept_positions(self) -> jax.Array:
        """int32 [B, K, S] position of each slot of `to_dense` (-1 where invalid); whole-zone
        slots hold the window (length - min(W, length) ...) then the decoded tokens (length ...)."""
        z = self.whole_k.shape[2]
        n_win = jnp.minimum(self.window, self.lengths)[:, None]
        i = jnp.arange(z, dtype=jnp.int32)[None, :]
        start = self.lengths[:, None] - n_win  # window, then decoded tokens: consecutive
        wpos = start + i
        wpos = jnp.where(i < self.whole_lengths[:, None], wpos, -1)
        wpos = jnp.broadcast_to(wpos[:, None, :], self.whole_k.shape[:3])
        return jnp.concatenate(self._region_positions() + [wpos], 2)

    def token_bits(self, t: int) -> jax.Array:
        """int32 [B, K, t]: V width of every prompt position (16 for the whole-zone window, 0 for
        evicted tokens and padding)."""
        b, kh = self.counts.shape[:2]
        out = jnp.zeros((b, kh, t + 1), jnp.int32)  # slot t collects the empty slots
        bi = jnp.arange(b)[:, None, None]
        hi = jnp.arange(kh)[None, :, None]
        for w, pos in zip(WIDTHS, self._region_positions()):
            out = out.at[bi, hi, jnp.where(pos >= 0, pos, t)].set(w)
        pos = jnp.arange(t)[None, :]
        n_win = jnp.minimum(self.window, self.lengths)[:, None]
        win = (pos >= self.lengths[:, None] - n_win) & (pos < self.lengths[:, None])
        return jnp.where(win[:, None, :], 16, out[..., :t])
