"""Mixed-precision cache (RDKV): per layer and KV head, every kept prompt token has its own V bit
width in {2, 4, 8, 16} (0 evicted it) and every K channel its own width in {0, 2, 4, 8}, K
quantised per channel over groups of 32 kept tokens; tokens are grouped by V width into dense
regions of one byte arena per sequence (the heads' sections one after the other), plus a zone in
the cache dtype for the recent prompt tokens and the tokens generated while decoding.

The byte layout is `jaxkv.cache.mixed_format` (arrays, sections, records, K groups). Per layer
(B batch, K KV heads, T padded prompt, D head dim, W whole prompt tokens, E decode slots):

    arena:         uint8 [B, S]        the heads' sections: V records by width (16, 8, 4, 2),
                                       then their K rows in groups of 32 with float16 headers
    counts:        int32 [B, K, 4]     records at V width 16, 8, 4, 2
    k_channels:    uint8 [B, K, D]     channel at each rank (8-bit channels first)
    k_counts:      int32 [B, K, 3]     channels at K width 8, 4, 2 (the rest pruned)
    whole_k,
    whole_v:       [B, K, W + E, D]    the last min(W, length) prompt tokens, then decoded tokens,
                                       in the cache dtype ("kept whole")
    whole_lengths: int32 [B]           valid whole-zone slots
    lengths:       int32 [B]           prompt lengths

Bytes per kept token, D = 64, bfloat16 cache, int16 positions (prompts up to 32768 tokens), with
K at k bits per channel on average (row k D / 8 bytes) and every channel stored (its group header
4 D / 32 = 8 bytes a token):

    V width                      2         4         8         16
    V record                     22        38        70        130
    + K at 4 bits (32 + 8)       62        78        110       170      (a dense token: 256)

`nbytes` counts every array above; `padding_bytes` the bytes of it that hold nothing (arena tail,
K-row rounding bits, empty window slots). Why one arena and not static per-width capacities: the
allocation decides per head how many tokens get each width and how many bits a K row has, so
fixed capacities would either constrain it or pad; an arena holds any mix that fits, and a head
may take more than its share when one water level is solved across the heads of a layer
(`head_capacity`).
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
    GROUP,
    K_WIDTHS,
    KMETA_BYTES,
    VMETA_BYTES,
    WIDTHS,
    check_head_dim,
    group_expand,
    head_layout,
    head_starts,
    k_row_bits,
    mixed_views,
    position_bytes,
    position_dtype,
    record_positions,
    record_values,
    tier16_dtype,
    to_bytes,
    v_record_sizes,
)
from jaxkv.checks import check_int

TOKEN_BITS = (0, 2, 4, 8, 16)
CHANNEL_BITS = (0, 2, 4, 8)


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def head_bytes_np(token_bits: np.ndarray, channel_bits: np.ndarray, head_dim: int,
                  pos_bytes: int) -> np.ndarray:
    """Bytes of each head's section [B, K] (numpy) for an allocation (the layout's formula)."""
    rec = v_record_sizes(head_dim, pos_bytes)
    counts = np.stack([(token_bits == w).sum(-1) for w in WIDTHS], -1)  # [B, K, 4]
    bits = np.where(np.isin(channel_bits, (2, 4, 8)), channel_bits, 0).sum(-1)
    row = (bits + 7) // 8
    header = KMETA_BYTES * (channel_bits > 0).sum(-1)
    groups = ((counts + GROUP - 1) // GROUP).sum(-1)
    return (counts * np.asarray(rec)).sum(-1) + groups * header + counts.sum(-1) * row


def _k_rows(codes: jax.Array, perm: jax.Array, k_counts: jax.Array, r: int) -> jax.Array:
    """K rows uint8 [B, K, N, r] from codes uint8 [B, K, N, D] (channel order, each channel at its
    width), rank -> channel `perm` [B, K, D] and k_counts [B, K, 3]: the ranks' codes packed
    little-endian at widths 8, 4, 2 (see mixed_format), zeros after the last one. Each rank's
    code lands in one byte at one shift, so a row is one exact 0/1 contraction of the shifted
    codes (values < 256) with a [D, r] byte map per head."""
    b, kh, n, d = codes.shape
    if r == 0:
        return jnp.zeros((b, kh, n, 0), jnp.uint8)
    kc = k_counts.astype(jnp.int32)
    d8, d4, d2 = (kc[..., i:i + 1] for i in range(3))  # [B, K, 1]
    rank = jnp.arange(d, dtype=jnp.int32)[None, None, :]
    bit = (8 * jnp.minimum(rank, d8) + 4 * jnp.clip(rank - d8, 0, d4)
           + 2 * jnp.clip(rank - d8 - d4, 0, d2))  # [B, K, D] first bit of each rank's code
    stored = rank < d8 + d4 + d2
    onto = ((bit // 8)[..., None] == jnp.arange(r)[None, None, None, :]) & stored[..., None]
    ranked = jnp.take_along_axis(codes, jnp.broadcast_to(perm[:, :, None, :], codes.shape), -1)
    shifted = ranked.astype(jnp.float32) * (2.0 ** (bit % 8)).astype(jnp.float32)[:, :, None, :]
    rows = jnp.einsum("BKND,BKDR->BKNR", shifted, onto.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
    return rows.astype(jnp.int32).astype(jnp.uint8)


@flax.struct.dataclass
class MixedCache:
    """One layer's mixed-precision cache (see module docstring)."""

    arena: jax.Array
    counts: jax.Array
    k_channels: jax.Array
    k_counts: jax.Array
    whole_k: jax.Array
    whole_v: jax.Array
    whole_lengths: jax.Array
    lengths: jax.Array
    window: int = flax.struct.field(pytree_node=False)
    head_capacity: int = flax.struct.field(pytree_node=False)
    pos_bytes: int = flax.struct.field(pytree_node=False)
    max_records: int = flax.struct.field(pytree_node=False)  # T: records a head may hold

    # ------------------------------------------------------------------ construction
    @staticmethod
    def fixed_bytes_per_head(head_dim: int, window: int, itemsize: int) -> int:
        """Bytes of a head's prompt part outside the arena: window slots (K and V whole), channel
        ranks, counts and k_counts."""
        chan = 1 if head_dim <= 256 else 4
        return window * 2 * head_dim * itemsize + head_dim * chan + 4 * 4 + 3 * 4

    @classmethod
    def from_allocation(cls, k: jax.Array, v: jax.Array, lengths: jax.Array,
                        token_bits: jax.Array, channel_bits: jax.Array, *, window: int,
                        arena_bytes: int, head_capacity: int,
                        extra_capacity: int) -> "MixedCache":
        """Build the cache of a prefill layer from an allocation.

        k, v: [B, K, T, D] prefill keys (post-RoPE) and values; lengths: [B];
        token_bits: int [B, K, T] V width of each prompt token in {0, 2, 4, 8, 16} (0 evicts it;
            the last min(window, length) tokens go to the whole zone and padding is dropped, so
            their entries are ignored);
        channel_bits: int [B, K, D] K width of each channel in {0, 2, 4, 8};
        window: whole-zone prompt slots; arena_bytes: S, bytes of a sequence's arena;
        head_capacity: C <= S, the most bytes one head's section may take (what decoding views
            of a head span); extra_capacity: decode slots.
        Each head's section must fit in C bytes and a sequence's sections in S. With concrete
        arrays every condition is checked (ValueError); under jit the caller guarantees them
        (RDKV's allocator does by construction).
        """
        b, kh, t, d = k.shape
        if v.shape != k.shape:
            raise ValueError(f"v.shape={v.shape}: must equal k.shape={k.shape}")
        check_head_dim(d)
        window = check_int("window", window, 0)
        s = check_int("arena_bytes", arena_bytes, 0)
        c = check_int("head_capacity", head_capacity, 0)
        if c > s:
            raise ValueError(f"head_capacity={c}: must be at most arena_bytes={s}")
        e = check_int("extra_capacity", extra_capacity, 0)
        if token_bits.shape != (b, kh, t):
            raise ValueError(f"token_bits.shape={token_bits.shape}: must be {(b, kh, t)}")
        if channel_bits.shape != (b, kh, d):
            raise ValueError(f"channel_bits.shape={channel_bits.shape}: must be {(b, kh, d)}")
        pb = position_bytes(t)
        rec = v_record_sizes(d, pb)
        lengths = jnp.asarray(lengths).astype(jnp.int32)
        pos = jnp.arange(t, dtype=jnp.int32)
        n_win = jnp.minimum(window, lengths)  # [B]
        arena_tok = pos[None, :] < lengths[:, None] - n_win[:, None]  # [B, T]
        token_bits = jnp.where(arena_tok[:, None, :], token_bits.astype(jnp.int32), 0)
        channel_bits = channel_bits.astype(jnp.int32)
        if not _is_traced(token_bits, channel_bits):
            cls._check_allocation(np.asarray(token_bits), np.asarray(channel_bits), d, pb, c, s)

        # ---- arena order: region (16, 8, 4, 2), then position; evicted tokens last
        ridx = jnp.full(token_bits.shape, 4, jnp.int32)
        for i, w in enumerate(WIDTHS):
            ridx = jnp.where(token_bits == w, i, ridx)
        order = jnp.argsort(ridx * t + pos, axis=-1).astype(jnp.int32)  # [B, K, T] positions
        counts = jnp.stack([(ridx == i).sum(-1) for i in range(4)], -1).astype(jnp.int32)
        rec_base = jnp.cumsum(counts, -1) - counts  # [B, K, 4]
        groups = (counts + GROUP - 1) // GROUP
        group_base = jnp.cumsum(groups, -1) - groups
        ng_max = t // GROUP + 4  # >= sum_w ceil(n_w / 32)
        # slot i of the group array: group g = i // 32 of region rg, its record j = i % 32
        gs = jnp.arange(ng_max * GROUP, dtype=jnp.int32)[None, None, :]
        g_of = gs // GROUP
        rg = jnp.minimum((g_of[..., None] >= (group_base + groups)[:, :, None, :]).sum(-1), 3)
        rec_i = (jnp.take_along_axis(rec_base, rg, -1)
                 + GROUP * (g_of - jnp.take_along_axis(group_base, rg, -1)) + gs % GROUP)
        gvalid = (rec_i < jnp.take_along_axis(rec_base + counts, rg, -1)) \
            & (g_of < groups.sum(-1)[..., None])  # [B, K, NG * 32]
        src = jnp.take_along_axis(order, jnp.clip(rec_i, 0, t - 1), -1)  # prompt position
        kg = jnp.take_along_axis(k, src[..., None], axis=2).reshape(b, kh, ng_max, GROUP, d)
        gvalid = gvalid.reshape(b, kh, ng_max, GROUP)
        cw = channel_bits[:, :, None, None, :]  # [B, K, 1, 1, D]
        codes = jnp.zeros((b, kh, ng_max, GROUP, d), jnp.uint8)
        scale = jnp.zeros((b, kh, ng_max, 1, d), jnp.float16)
        zero = jnp.zeros((b, kh, ng_max, 1, d), jnp.float16)
        for w in K_WIDTHS:
            qz = quant.quantize(kg, w, axis=3, where=gvalid[..., None])
            codes = jnp.where(cw == w, qz.codes, codes)
            scale = jnp.where(cw == w, qz.scale, scale)
            zero = jnp.where(cw == w, qz.zero_point, zero)
        perm = jnp.argsort(-channel_bits, axis=-1, stable=True).astype(jnp.int32)  # rank -> chan
        k_counts = jnp.stack([(channel_bits == w).sum(-1) for w in K_WIDTHS], -1).astype(jnp.int32)
        krows = _k_rows(codes.reshape(b, kh, ng_max * GROUP, d), perm, k_counts, d)  # [.., D]
        rank_idx = jnp.broadcast_to(perm[:, :, None, :], (b, kh, ng_max, d))
        hdr = jnp.stack([jnp.take_along_axis(scale[:, :, :, 0], rank_idx, -1),
                         jnp.take_along_axis(zero[:, :, :, 0], rank_idx, -1)], -1)
        headers = to_bytes(hdr.reshape(b, kh, ng_max, 2 * d))  # [B, K, NG, 4D] rank order

        # ---- V records of every sorted token at every width
        vs = jnp.take_along_axis(v, order[..., None], axis=2)  # [B, K, T, D]
        pos_b = to_bytes(order[..., None].astype(position_dtype(pb)))  # [B, K, T, pb]
        vrec = {16: jnp.concatenate([pos_b, to_bytes(vs.astype(tier16_dtype(v.dtype)))], -1)}
        for w in (8, 4, 2):
            vq = quant.quantize(vs, w, axis=-1)  # codes [B,K,T,D], scale/zero [B,K,T,1]
            meta = to_bytes(jnp.concatenate([vq.scale, vq.zero_point], -1))  # [B, K, T, 4]
            vrec[w] = jnp.concatenate([pos_b, meta, quant.pack(vq.codes, w)], -1)

        # ---- each head's section as a byte stream of C bytes (one gather per source)
        lay = head_layout(counts, k_counts, d, pb)
        o = jnp.arange(c, dtype=jnp.int32)[None, None, :]  # [1, 1, C]
        vend = lay.v_offsets + counts * jnp.asarray(rec, jnp.int32)  # [B, K, 4]
        reg = (o[..., None] >= vend[:, :, None, :]).sum(-1)  # [B, K, C] first region not ended
        stream = jnp.zeros((b, kh, c), jnp.uint8)
        for i, w in enumerate(WIDTHS):
            local = o - lay.v_offsets[..., i:i + 1]
            src = (rec_base[..., i:i + 1] + local // rec[i]) * rec[i] + local % rec[i]
            flat = vrec[w].reshape(b, kh, t * rec[i])
            got = jnp.take_along_axis(flat, jnp.clip(src, 0, t * rec[i] - 1), axis=-1)
            stream = jnp.where(reg == i, got, stream)
        # K section, region by region: a region's groups are full (32 rows) but its last, so in
        # region w the byte at `lo` is in group lo // (H + 32 R) of it, at lo % (H + 32 R)
        hsz, rsz = lay.header[..., None], lay.row[..., None]  # [B, K, 1]
        kstart = lay.group_base * lay.header[..., None] + rec_base * lay.row[..., None]  # [B,K,4]
        kend = kstart + groups * lay.header[..., None] + counts * lay.row[..., None]
        ko = o - lay.k_start[..., None]  # [B, K, C]
        in_k = (ko >= 0) & (o < lay.total[..., None])
        kreg = jnp.minimum((ko[..., None] >= kend[:, :, None, :]).sum(-1), 3)  # [B, K, C]
        lo = ko - jnp.take_along_axis(kstart, kreg, -1)
        gsz = jnp.maximum(hsz + GROUP * rsz, 1)
        gi = jnp.clip(jnp.take_along_axis(lay.group_base, kreg, -1) + lo // gsz, 0, ng_max - 1)
        off = lo % gsz
        hsrc = gi * (KMETA_BYTES * d) + jnp.clip(off, 0, KMETA_BYTES * d - 1)
        hval = jnp.take_along_axis(headers.reshape(b, kh, -1), hsrc, -1)
        roff = jnp.maximum(off - hsz, 0)
        rmax = jnp.maximum(rsz, 1)
        rsrc = (gi * GROUP + jnp.minimum(roff // rmax, GROUP - 1)) * d + jnp.minimum(roff % rmax,
                                                                                    d - 1)
        rval = jnp.take_along_axis(krows.reshape(b, kh, -1), rsrc, -1)
        stream = jnp.where(in_k, jnp.where(off < hsz, hval, rval), stream)
        stream = jnp.where(o < lay.total[..., None], stream, jnp.uint8(0))

        # ---- the arena: the heads' sections one after the other
        starts = head_starts(lay.total)  # [B, K]
        oa = jnp.arange(s, dtype=jnp.int32)[None, :]
        h_of = jnp.clip((oa[..., None] >= (starts + lay.total)[:, None, :]).sum(-1), 0, kh - 1)
        local = oa - jnp.take_along_axis(starts, h_of, -1)
        inside = local < jnp.take_along_axis(lay.total, h_of, -1)
        src = h_of * c + jnp.clip(local, 0, c - 1)
        arena = jnp.where(inside, jnp.take_along_axis(stream.reshape(b, kh * c), src, -1),
                          jnp.uint8(0)) if c else jnp.zeros((b, s), jnp.uint8)

        # ---- whole zone: the window, then room for decoded tokens
        wpos = lengths[:, None] - n_win[:, None] + jnp.arange(window, dtype=jnp.int32)  # [B, W]
        wvalid = jnp.arange(window)[None, :] < n_win[:, None]
        idx = jnp.clip(wpos, 0, max(t - 1, 0))[:, None, :, None]
        keep = wvalid[:, None, :, None]
        gather = lambda x: jnp.take_along_axis(x, idx, axis=2) * keep.astype(x.dtype)
        pad = [(0, 0), (0, 0), (0, e), (0, 0)]
        chan_dtype = jnp.uint8 if d <= 256 else jnp.int32
        return cls(arena=arena, counts=counts, k_channels=perm.astype(chan_dtype),
                   k_counts=k_counts, whole_k=jnp.pad(gather(k), pad),
                   whole_v=jnp.pad(gather(v), pad), whole_lengths=n_win, lengths=lengths,
                   window=window, head_capacity=c, pos_bytes=pb, max_records=t)

    @staticmethod
    def _check_allocation(token_bits, channel_bits, d, pb, c, s) -> None:
        bad = ~np.isin(token_bits, TOKEN_BITS)
        if bad.any():
            raise ValueError(f"token_bits: found {int(token_bits[bad][0])}; a token's V width "
                             f"must be one of {{0, 2, 4, 8, 16}}")
        bad = ~np.isin(channel_bits, CHANNEL_BITS)
        if bad.any():
            raise ValueError(f"channel_bits: found {int(channel_bits[bad][0])}; a K channel's "
                             f"width must be one of {{0, 2, 4, 8}} (K is capped at 8 bits)")
        used = head_bytes_np(token_bits, channel_bits, d, pb)  # [B, K]
        if used.max(initial=0) > c:
            raise ValueError(f"token_bits: a head's section takes {int(used.max())} bytes, more "
                             f"than head_capacity={c}")
        if used.sum(-1).max(initial=0) > s:
            raise ValueError(f"token_bits: a sequence's sections take {int(used.sum(-1).max())} "
                             f"bytes, more than arena_bytes={s}")

    # ------------------------------------------------------------------ protocol
    @property
    def num_kv_heads(self) -> int:
        return self.whole_k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.whole_k.shape[3]

    @property
    def arena_bytes(self) -> int:
        return self.arena.shape[1]

    def record_sizes(self) -> Tuple[int, ...]:
        """Bytes of a V record at each width (WIDTHS order: 16, 8, 4, 2)."""
        return v_record_sizes(self.head_dim, self.pos_bytes)

    def layout(self):
        return head_layout(self.counts, self.k_counts, self.head_dim, self.pos_bytes)

    def views(self):
        """{bits: RegionView} (`jaxkv.cache.mixed_format.mixed_views`)."""
        return mixed_views(self.arena, self.counts, self.k_channels, self.k_counts,
                           head_dim=self.head_dim, pos_bytes=self.pos_bytes,
                           head_capacity=self.head_capacity, max_records=self.max_records)

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
            q, self.arena, self.counts, self.k_channels, self.k_counts, self.whole_k,
            self.whole_v, self.whole_lengths, scale=scale, head_capacity=self.head_capacity,
            pos_bytes=self.pos_bytes, max_records=self.max_records)

    def nbytes(self) -> int:
        return array_nbytes(self.arena, self.counts, self.k_channels, self.k_counts, self.whole_k,
                            self.whole_v, self.whole_lengths, self.lengths)

    def used_bytes(self) -> jax.Array:
        """int32 [B, K] arena bytes of each head's section."""
        return self.layout().total

    def padding_bytes(self) -> jax.Array:
        """int32 [B] bytes allocated (and counted by nbytes) that hold nothing: the unused arena
        tail, the K-row rounding bits of the records (rounded down to bytes) and empty window
        slots."""
        d = self.head_dim
        item = jnp.dtype(self.whole_k.dtype).itemsize
        lay = self.layout()
        tail = self.arena_bytes - lay.total.sum(-1)
        slack = self._k_row_slack(lay)
        n_win = jnp.minimum(self.window, self.lengths)
        empty_window = (self.window - n_win) * self.num_kv_heads * 2 * d * item
        return (tail + slack + empty_window).astype(jnp.int32)

    def _k_row_slack(self, lay) -> jax.Array:
        """int32 [B]: bytes of K rows that hold no code bits (each row's bits rounded up to
        bytes), per sequence, rounded down."""
        return (self.counts.sum(-1) * (8 * lay.row - k_row_bits(self.k_counts))).sum(-1) // 8

    def byte_terms(self) -> dict:
        """Where `nbytes` goes, summed over the batch (Python ints; they add up to `nbytes`):
        v_codes (V values of every record: codes, or 16-bit values), v_scales (scale and
        zero-point of the 2/4/8-bit records), positions (one per record), k_codes (the K rows),
        k_headers (scale and zero-point per stored channel and 32-token group), whole (the
        recent prompt tokens and decode slots in the cache dtype), metadata (counts, channel
        ranks, lengths) and padding (`padding_bytes` less its empty window slots, which are in
        `whole`: the arena tail and the K rows' rounding). Host-side (not traceable)."""
        counts = np.asarray(self.counts, np.int64)  # [B, K, 4], WIDTHS order
        n = counts.sum(-1)
        lay = self.layout()
        groups = (counts + GROUP - 1) // GROUP
        records = int((counts * np.asarray(v_record_sizes(self.head_dim, self.pos_bytes))).sum())
        v_scales = int(counts[..., 1:].sum() * VMETA_BYTES)  # the 8/4/2-bit records
        positions = int(n.sum() * self.pos_bytes)
        rows = int((n * np.asarray(lay.row, np.int64)).sum())  # K rows, bits rounded to bytes
        terms = dict(
            v_codes=records - v_scales - positions,
            v_scales=v_scales,
            positions=positions,
            k_codes=rows - int(np.asarray(self._k_row_slack(lay)).sum()),
            k_headers=int((groups.sum(-1) * np.asarray(lay.header, np.int64)).sum()),
            whole=int(array_nbytes(self.whole_k, self.whole_v)),
            metadata=int(array_nbytes(self.counts, self.k_channels, self.k_counts,
                                      self.whole_lengths, self.lengths)))
        terms["padding"] = int(self.nbytes()) - sum(terms.values())
        return terms

    def _dense_parts(self):
        """Per region present (WIDTHS order): (bits, k, v float32 [B, K, M, D], valid, pos)."""
        d = self.head_dim
        parts = []
        for w, view in self.views().items():
            m = view.valid.shape[-1]
            k_hat = (view.k_codes.astype(jnp.float32)
                     * group_expand(view.k_scale.astype(jnp.float32), m)
                     + group_expand(view.k_zero.astype(jnp.float32), m))
            v_hat = record_values(view.rows, w, d, self.pos_bytes, self.whole_v.dtype)
            ok = view.valid[..., None]
            pos = jnp.where(view.valid, record_positions(view.rows, self.pos_bytes), -1)
            parts.append((w, jnp.where(ok, k_hat, 0.0), jnp.where(ok, v_hat, 0.0), view.valid,
                          pos))
        return parts

    def to_dense(self) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """(k, v float32 [B, K, S, D] dequantised, valid [B, K, S]): the regions' views (16, 8,
        4, 2 bits) then the whole zone (for tests)."""
        parts = self._dense_parts()
        z = self.whole_k.shape[2]
        wvalid = jnp.broadcast_to((jnp.arange(z)[None, :] < self.whole_lengths[:, None])[:, None],
                                  self.whole_k.shape[:3])
        k = jnp.concatenate([p[1] for p in parts] + [self.whole_k.astype(jnp.float32)], 2)
        v = jnp.concatenate([p[2] for p in parts] + [self.whole_v.astype(jnp.float32)], 2)
        valid = jnp.concatenate([p[3] for p in parts] + [wvalid], 2)
        return k, v, valid

    def kept_positions(self, lengths, t: int) -> jax.Array:
        """bool [B, K, t]: the prompt positions whose key and value the cache holds, at any
        precision (the `LayerCache` protocol; `lengths` [B] are the prompt lengths)."""
        pos = jnp.arange(t)[None, None, :]
        return (self.token_bits(t) > 0) & (pos < jnp.asarray(lengths)[:, None, None])

    def slot_positions(self) -> jax.Array:
        """int32 [B, K, S] position of each slot of `to_dense` (-1 where invalid); whole-zone
        slots hold the window (length - min(W, length) ...) then the decoded tokens (length ...)."""
        z = self.whole_k.shape[2]
        n_win = jnp.minimum(self.window, self.lengths)[:, None]
        i = jnp.arange(z, dtype=jnp.int32)[None, :]
        wpos = self.lengths[:, None] - n_win + i  # window, then decoded tokens: consecutive
        wpos = jnp.where(i < self.whole_lengths[:, None], wpos, -1)
        wpos = jnp.broadcast_to(wpos[:, None, :], self.whole_k.shape[:3])
        return jnp.concatenate([p[4] for p in self._dense_parts()] + [wpos], 2)

    def token_bits(self, t: int) -> jax.Array:
        """int32 [B, K, t]: V width of every prompt position (16 for the whole-zone window, 0 for
        evicted tokens and padding)."""
        b, kh = self.counts.shape[:2]
        out = jnp.zeros((b, kh, t + 1), jnp.int32)  # slot t collects the empty slots
        bi = jnp.arange(b)[:, None, None]
        hi = jnp.arange(kh)[None, :, None]
        for w, view in self.views().items():
            pos = jnp.where(view.valid, record_positions(view.rows, self.pos_bytes), t)
            out = out.at[bi, hi, jnp.clip(pos, 0, t)].set(w)
        pos = jnp.arange(t)[None, :]
        n_win = jnp.minimum(self.window, self.lengths)[:, None]
        win = (pos >= self.lengths[:, None] - n_win) & (pos < self.lengths[:, None])
        return jnp.where(win[:, None, :], 16, out[..., :t])

    def channel_bits(self) -> jax.Array:
        """int32 [B, K, D]: K width of every channel (0 pruned)."""
        d = self.head_dim
        kc = self.k_counts
        rank = jnp.arange(d)[None, None, :]
        d8, d4, d2 = (kc[..., i:i + 1] for i in range(3))
        width = jnp.where(rank < d8, 8, jnp.where(rank < d8 + d4, 4,
                                                  jnp.where(rank < d8 + d4 + d2, 2, 0)))
        inv = jnp.argsort(self.k_channels.astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(width, inv, axis=-1).astype(jnp.int32)
