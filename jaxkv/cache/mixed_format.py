"""The byte layout of RDKV's mixed-precision cache (`jaxkv.cache.MixedCache`): the cache writes
it, the decode kernels (`pallas_kernels.mixed_decode`, `mixed_decode_gpu`) read it through
`mixed_views`.

One layer (B batch, K KV heads, D head dim, S arena bytes per sequence, C head capacity):

    arena:         uint8 [B, S]      one byte arena per sequence; the heads' sections one after
                                     the other (head h starts where head h - 1 ends)
    counts:        int32 [B, K, 4]   records of each head at V width 16, 8, 4, 2
    k_channels:    uint8 [B, K, D]   (int32 when D > 256) channel stored at each rank: ranks sort
                                     the channels by K width, 8 first, then 4, 2, 0 (pruned)
    k_counts:      int32 [B, K, 3]   channels of each head at K width 8, 4, 2
    whole_k,
    whole_v:       [B, K, Z, D]      tokens kept in the cache dtype (the recent prompt tokens and
                                     the tokens generated while decoding)
    whole_lengths: int32 [B]

A head's section is its V section, then its K section:

    V section: the records of the 16-, 8-, 4- and 2-bit regions, each region dense, positions
      ascending inside it. A record is `v_record_bytes(bits)` bytes:
        [position: int16 (int32 for prompts over 32768 tokens)][V]
      V at 2/4/8 bits: float16 scale and zero-point, then D codes packed little-endian (the first
      code in the lowest bits); at 16 bits: the D values in the 16-bit tier's dtype,
      `tier16_dtype` (the cache dtype if it is 16-bit, else bfloat16: a float32 model's 16-bit
      tier is 16 bits, not 32).
    K section: the K rows of the same records in the same order (region by region), in groups of
      GROUP = 32 consecutive records of one region (a region's last group may be shorter). A
      group is a header, then its rows:
        header: (scale, zero-point) float16 pairs for the n_s stored channels, in rank order
                (4 n_s bytes): K is quantised per channel over the group's 32 tokens
        row:    the token's codes of the stored channels in rank order at their widths (8-bit
                codes first, then 4-bit, then 2-bit), packed little-endian, zeros after the
                last one: R = ceil((8 d8 + 4 d4 + 2 d2) / 8) bytes
      Both widths are per head and data-dependent (the K allocation decides d8, d4, d2 after the
      token allocation), so a group's size 4 n_s + 32 R is too: the layout is read through
      `head_layout`, never with static strides.

The allocator gives both channels of a RoPE pair (i, i + D / 2, rotate-half) one width, so
8 d8 + 4 d4 + 2 d2 is a multiple of 4 and R wastes at most 4 bits a row. Bytes of a head:

    sum_w n_w v_record_bytes(w) + sum_w ceil(n_w / 32) 4 n_s + (sum_w n_w) R

`mixed_views` cuts, per V width, static-size views of a head's section for decoding: the
V record bytes (a contiguous window: records have static sizes), the K codes unpacked to
uint8 [M, D] in channel order (a gather of one R_max = D byte window per row, then one shift and
mask per channel) and the group scales and zero-points [M / 32, D] in channel order (zero for
pruned channels), M = ceil(min(C // v_record_bytes(w), T) / 32) * 32 rows (T, the padded prompt
length, bounds a head's records), rows past the region's count zeroed. C, the head capacity, is
the most bytes one head may hold: the arena share of a head (RDKV's per-head split) or the whole
arena (one water level across the heads of a layer).
"""
from __future__ import annotations

from typing import Dict, NamedTuple

import jax
import jax.numpy as jnp

WIDTHS = (16, 8, 4, 2)   # V regions, in this order; counts[..., i] is region WIDTHS[i]
K_WIDTHS = (8, 4, 2)     # K channel widths (0 prunes a channel); k_counts[..., i] is K_WIDTHS[i]
GROUP = 32               # records per K scale group
VMETA_BYTES = 4          # float16 V scale + zero-point of a quantised record
KMETA_BYTES = 4          # float16 K scale + zero-point per stored channel and group
LONG_PROMPT = 2 ** 15    # prompts longer than this store int32 positions (else int16)


def tier16_dtype(cache_dtype) -> jnp.dtype:
    """The dtype of 16-bit V records: the cache dtype if it is 16-bit, else bfloat16."""
    dt = jnp.dtype(cache_dtype)
    return dt if dt.itemsize == 2 else jnp.dtype(jnp.bfloat16)


def position_bytes(prompt_tokens: int) -> int:
    """Bytes of a record's position: 2 (int16) for prompts of up to 32768 tokens, else 4."""
    return 2 if int(prompt_tokens) <= LONG_PROMPT else 4


def position_dtype(pos_bytes: int):
    return jnp.int16 if pos_bytes == 2 else jnp.int32


def v_record_bytes(bits: int, head_dim: int, pos_bytes: int) -> int:
    """Bytes of one V record at `bits` (2, 4, 8 or 16)."""
    if bits == 16:
        return pos_bytes + 2 * head_dim
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits!r}: a record holds V at 2, 4, 8 or 16 bits")
    return pos_bytes + VMETA_BYTES + head_dim * bits // 8


def v_record_sizes(head_dim: int, pos_bytes: int):
    """Record bytes of each region, WIDTHS order."""
    return tuple(v_record_bytes(w, head_dim, pos_bytes) for w in WIDTHS)


def k_row_bits(k_counts):
    """Code bits of one K row, [...] from k_counts [..., 3] (int32)."""
    kc = jnp.asarray(k_counts).astype(jnp.int32)
    return 8 * kc[..., 0] + 4 * kc[..., 1] + 2 * kc[..., 2]


def k_row_bytes(k_counts):
    """R: bytes of one K row, [...] (int32)."""
    return (k_row_bits(k_counts) + 7) // 8


def k_header_bytes(k_counts):
    """Bytes of one K group header, [...] (int32): a float16 scale and zero-point a stored
    channel."""
    return KMETA_BYTES * jnp.asarray(k_counts).astype(jnp.int32).sum(-1)


def n_groups(counts):
    """K groups of a head, [...] from counts [..., 4]: one per started run of 32 records of a
    region."""
    return ((jnp.asarray(counts).astype(jnp.int32) + GROUP - 1) // GROUP).sum(-1)


class HeadLayout(NamedTuple):
    """Byte offsets inside one head's section (int32; [...] = the counts' leading dims)."""
    v_offsets: jax.Array   # [..., 4] first byte of each V region
    k_start: jax.Array     # [...] first byte of the K section (= V bytes)
    row: jax.Array         # [...] R, K row bytes
    header: jax.Array      # [...] H, K group header bytes
    group_base: jax.Array  # [..., 4] K groups before each region's first group
    rec_base: jax.Array    # [..., 4] records before each region's first record
    total: jax.Array       # [...] bytes of the section


def head_layout(counts, k_counts, head_dim: int, pos_bytes: int) -> HeadLayout:
    counts = jnp.asarray(counts).astype(jnp.int32)
    rec = jnp.asarray(v_record_sizes(head_dim, pos_bytes), jnp.int32)
    vsize = counts * rec
    v_offsets = jnp.cumsum(vsize, -1) - vsize
    k_start = vsize.sum(-1)
    groups = (counts + GROUP - 1) // GROUP
    group_base = jnp.cumsum(groups, -1) - groups
    rec_base = jnp.cumsum(counts, -1) - counts
    row, header = k_row_bytes(k_counts), k_header_bytes(k_counts)
    total = k_start + groups.sum(-1) * header + counts.sum(-1) * row
    return HeadLayout(v_offsets, k_start, row, header, group_base, rec_base, total)


def head_starts(total):
    """int32 [B, K] first byte of each head's section: the sections of a sequence one after the
    other."""
    total = jnp.asarray(total).astype(jnp.int32)
    return jnp.cumsum(total, -1) - total


def view_rows(head_capacity: int, bits: int, head_dim: int, pos_bytes: int,
              max_records: int) -> int:
    """M: rows of a region's view: the records of this width the capacity could hold, at most
    `max_records` (a head has at most one record per prompt token), rounded up to a multiple of
    GROUP; 0 when no record fits the capacity."""
    m = min(head_capacity // v_record_bytes(bits, head_dim, pos_bytes), max_records)
    return -(-m // GROUP) * GROUP


def unpack_bits(packed: jax.Array, bits: int) -> jax.Array:
    """uint8 [..., n] -> uint8 [..., n * 8 // bits] codes (first code in the lowest bits)."""
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    codes = (packed[..., None] >> shifts) & jnp.uint8(2 ** bits - 1)
    return codes.reshape(packed.shape[:-1] + (packed.shape[-1] * per,))


def bytes_to(x: jax.Array, dtype, n: int) -> jax.Array:
    """uint8 [..., n * itemsize] -> dtype [..., n] (native byte order, as the cache wrote it)."""
    item = jnp.dtype(dtype).itemsize
    x = x.reshape(x.shape[:-1] + (n, item))
    if item == 1:
        return jax.lax.bitcast_convert_type(x[..., 0], dtype)
    return jax.lax.bitcast_convert_type(x, dtype)


def to_bytes(x: jax.Array) -> jax.Array:
    """[..., n] of a 1/2/4-byte dtype -> uint8 [..., n * itemsize] (native byte order)."""
    if x.dtype.itemsize == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8)
    out = jax.lax.bitcast_convert_type(x, jnp.uint8)  # [..., n, itemsize]
    return out.reshape(x.shape[:-1] + (x.shape[-1] * x.dtype.itemsize,))


def channel_code_map(k_channels, k_counts):
    """Where each channel's code sits in a K row: (byte int32 [B, K, D], shift uint8, mask uint8
    (0 for pruned channels)), channel order."""
    d = k_channels.shape[-1]
    kc = k_counts.astype(jnp.int32)
    d8, d4, d2 = (kc[..., i:i + 1] for i in range(3))  # [B, K, 1]
    rank_of = jnp.argsort(k_channels.astype(jnp.int32), axis=-1).astype(jnp.int32)
    rank = rank_of  # [B, K, D] rank of each channel
    width = jnp.where(rank < d8, 8, jnp.where(rank < d8 + d4, 4,
                                              jnp.where(rank < d8 + d4 + d2, 2, 0)))
    bit = (8 * jnp.minimum(rank, d8) + 4 * jnp.clip(rank - d8, 0, d4)
           + 2 * jnp.clip(rank - d8 - d4, 0, d2))
    byte = jnp.clip(bit // 8, 0, d - 1)
    shift = (bit % 8).astype(jnp.uint8)
    mask = ((1 << width) - 1).astype(jnp.uint8)
    return byte, shift, mask, rank


class RegionView(NamedTuple):
    """Static-size views of one V-width region of every head (`mixed_views`)."""
    valid: jax.Array    # bool [B, K, M]
    rows: jax.Array     # uint8 [B, K, M, v_record_bytes] V records (zero past the count)
    k_codes: jax.Array  # uint8 [B, K, M, D] K codes, channel order (0 for pruned channels)
    k_scale: jax.Array  # float16 [B, K, M / GROUP, D] per group, channel order (0: pruned)
    k_zero: jax.Array   # float16 [B, K, M / GROUP, D]


def _windows(flat: jax.Array, starts: jax.Array, size: int) -> jax.Array:
    """flat uint8 [B, L], starts int32 [B, ...] -> [B, ..., size]: one window per start (a gather
    with one index per window, not per byte)."""
    shape = starts.shape
    st = starts.reshape(shape[0], -1)
    cut = jax.vmap(lambda a, s: jax.vmap(
        lambda o: jax.lax.dynamic_slice_in_dim(a, o, size))(s))
    return cut(flat, st).reshape(shape + (size,))


def mixed_views(arena: jax.Array, counts: jax.Array, k_channels: jax.Array,
                k_counts: jax.Array, *, head_dim: int, pos_bytes: int, head_capacity: int,
                max_records: int) -> Dict[int, RegionView]:
    """{bits: RegionView} for the regions whose view has rows (see the module docstring);
    max_records: the most records a head holds (the padded prompt length)."""
    b, s = arena.shape
    kh = counts.shape[1]
    d = head_dim
    counts = counts.astype(jnp.int32)
    lay = head_layout(counts, k_counts, d, pos_bytes)
    starts = head_starts(lay.total)  # [B, K]
    rec = v_record_sizes(d, pos_bytes)
    ms = {w: view_rows(head_capacity, w, d, pos_bytes, max_records) for w in WIDTHS}
    v_win = max([ms[w] * rec[i] for i, w in enumerate(WIDTHS)] + [0])
    pad = max(v_win, 4 * d, d)
    flat = jnp.pad(arena, ((0, 0), (0, pad)))  # windows starting anywhere in S stay in bounds
    byte, shift, mask, rank = channel_code_map(k_channels, k_counts)
    n_s = k_counts.astype(jnp.int32).sum(-1)  # [B, K] stored channels
    stored_rank = jnp.arange(d)[None, None, :] < n_s[..., None]  # [B, K, D] (rank order)
    out = {}
    for i, w in enumerate(WIDTHS):
        m = ms[w]
        if m == 0:
            continue
        ng = m // GROUP
        n = counts[..., i]  # [B, K]
        valid = jnp.arange(m)[None, None, :] < n[..., None]  # [B, K, M]
        # V: one contiguous window per head
        vstart = jnp.minimum(starts + lay.v_offsets[..., i], s)
        rows = _windows(flat, vstart, m * rec[i]).reshape(b, kh, m, rec[i])
        rows = jnp.where(valid[..., None], rows, jnp.uint8(0))
        # K rows: record j of the region is in group g = j // 32 of it
        j = jnp.arange(m, dtype=jnp.int32)[None, None, :]
        gidx = lay.group_base[..., i:i + 1] + j // GROUP  # [B, K, M]
        row = lay.row[..., None]
        kbase = (starts + lay.k_start)[..., None]
        kstart = kbase + (gidx + 1) * lay.header[..., None] + (lay.rec_base[..., i:i + 1] + j) * row
        krows = _windows(flat, jnp.minimum(kstart, s), d)  # [B, K, M, D] (first R bytes: codes)
        picked = jnp.take_along_axis(krows, jnp.broadcast_to(byte[:, :, None, :], krows.shape),
                                     axis=-1)
        codes = (picked >> shift[:, :, None, :]) & mask[:, :, None, :]
        codes = jnp.where(valid[..., None], codes, jnp.uint8(0))
        # K group headers, rank order -> channel order
        jg = jnp.arange(ng, dtype=jnp.int32)[None, None, :]
        gabs = lay.group_base[..., i:i + 1] + jg  # [B, K, NG]
        hstart = kbase + gabs * lay.header[..., None] + (lay.rec_base[..., i:i + 1]
                                                        + GROUP * jg) * row
        heads = _windows(flat, jnp.minimum(hstart, s), KMETA_BYTES * d)  # [B, K, NG, 4D]
        pairs = bytes_to(heads, jnp.float16, 2 * d).reshape(b, kh, ng, d, 2)  # rank order
        gvalid = (jg * GROUP < n[..., None])[..., None] & stored_rank[:, :, None, :]
        pairs = jnp.where(gvalid[..., None], pairs, jnp.float16(0))
        idx = jnp.broadcast_to(rank[:, :, None, :], (b, kh, ng, d))
        ks = jnp.take_along_axis(pairs[..., 0], idx, axis=-1)  # channel order
        kz = jnp.take_along_axis(pairs[..., 1], idx, axis=-1)
        pruned = (mask == 0)[:, :, None, :]
        out[w] = RegionView(valid, rows, codes, jnp.where(pruned, jnp.float16(0), ks),
                            jnp.where(pruned, jnp.float16(0), kz))
    return out


def record_positions(rows: jax.Array, pos_bytes: int) -> jax.Array:
    """int32 [..., M] positions of V record rows [..., M, rec]."""
    return bytes_to(rows[..., :pos_bytes], position_dtype(pos_bytes), 1)[..., 0].astype(jnp.int32)


def record_values(rows: jax.Array, bits: int, head_dim: int, pos_bytes: int,
                  cache_dtype) -> jax.Array:
    """float32 [..., M, D] dequantised V of record rows [..., M, rec] at `bits`."""
    from jaxkv.cache.quant import unpack
    o = pos_bytes
    if bits == 16:
        return bytes_to(rows[..., o:], tier16_dtype(cache_dtype), head_dim).astype(jnp.float32)
    meta = bytes_to(rows[..., o:o + VMETA_BYTES], jnp.float16, 2).astype(jnp.float32)
    codes = unpack(rows[..., o + VMETA_BYTES:], bits, head_dim).astype(jnp.float32)
    return meta[..., 1:2] + meta[..., 0:1] * codes


def group_expand(x: jax.Array, m: int) -> jax.Array:
    """[..., M / GROUP, D] per-group values -> [..., M, D] per row."""
    return jnp.repeat(x, GROUP, axis=-2)[..., :m, :]


def check_head_dim(d: int) -> None:
    if d % 4:
        raise ValueError(f"head_dim={d}: the mixed cache packs D 2-bit codes into whole bytes, so "
                         f"D must be a multiple of 4")


__all__ = ["WIDTHS", "K_WIDTHS", "GROUP", "VMETA_BYTES", "KMETA_BYTES", "tier16_dtype",
           "position_bytes", "position_dtype", "v_record_bytes", "v_record_sizes", "k_row_bits",
           "k_row_bytes", "k_header_bytes", "n_groups", "HeadLayout", "head_layout",
           "head_starts", "view_rows", "unpack_bits", "bytes_to", "to_bytes",
           "channel_code_map", "RegionView", "mixed_views", "record_positions", "record_values",
           "group_expand", "check_head_dim"]
