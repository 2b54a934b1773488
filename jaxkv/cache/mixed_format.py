"""The byte layout of RDKV's mixed-precision cache (`jaxkv.cache.MixedCache`): the cache writes
it, the decode kernels (`pallas_kernels.mixed_decode`, `mixed_decode_gpu`) read it.

Layout of one layer (B batch, K KV heads, D head dim, P arena bytes per head, R = k_row_bytes):

    arena:         uint8 [B, K, P]   one byte arena per (sequence, head): token records grouped by
                                     V bit width into dense regions, in the order 16, 8, 4, 2 bits
    counts:        int32 [B, K, 4]   records in the 16-, 8-, 4- and 2-bit regions
    k_channels:    uint8 [B, K, D]   (int32 when D > 256) channel stored at each rank; ranks sort
                                     the channels by K bit width, 8 first, then 4, 2, 0 (pruned)
    k_counts:      int32 [B, K, 3]   channels at 8, 4 and 2 bits
    k_scale,
    k_zero:        float16 [B, K, D] per-channel K scale and zero-point, in rank order
    whole_k,
    whole_v:       [B, K, Z, D]      tokens kept in the cache dtype (the recent window of the prompt
                                     and the tokens generated while decoding)
    whole_lengths: int32 [B]         valid slots of the whole zone

A record (one kept prompt token outside the whole zone) is `record_bytes(bits)` bytes:

    [K row: R bytes][position: int32, 4 bytes][V scale, V zero-point: 2 x float16][V: D codes]

where the V codes are packed at `bits` (D * bits / 8 bytes) for bits in {2, 4, 8}; a 16-bit
record has no V scale and zero-point and holds V as D values of the cache dtype (raw bytes). The
K row holds the token's key quantised per channel: the rank-ordered channels' codes at their own
widths, 8-bit codes first, then 4-bit, then 2-bit, packed little-endian (the first code in the
lowest bits), and zeros after the last one (R * 8 bits >= sum of the channel widths).
Read at 8 bits the row gives codes [R] whose first d8 are the 8-bit channels; read at 4 bits,
codes [2R] whose [2 d8, 2 d8 + d4) are the 4-bit channels; read at 2 bits, codes [4R] whose
[4 d8 + 2 d4, 4 d8 + 2 d4 + d2) are the 2-bit channels.
"""
from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

WIDTHS = (16, 8, 4, 2)   # arena regions, in this order; counts[..., i] is region WIDTHS[i]
K_WIDTHS = (8, 4, 2)     # K channel widths (0 prunes a channel); k_counts[..., i] is K_WIDTHS[i]
META_BYTES = 4           # int32 position of every record
VMETA_BYTES = 4          # float16 V scale + zero-point of a quantised record


def record_bytes(bits: int, k_row_bytes: int, head_dim: int, value_itemsize: int) -> int:
    """Bytes of one arena record whose V is kept at `bits` (2, 4, 8 or 16)."""
    if bits == 16:
        return k_row_bytes + META_BYTES + head_dim * value_itemsize
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits!r}: an arena record holds V at 2, 4, 8 or 16 bits")
    return k_row_bytes + META_BYTES + VMETA_BYTES + head_dim * bits // 8


def region_offsets(counts: jax.Array, rec: Tuple[int, ...]) -> jax.Array:
    """int32 [..., 4] byte offset of each region (WIDTHS order) given counts [..., 4]."""
    sizes = counts.astype(jnp.int32) * jnp.asarray(rec, jnp.int32)
    return jnp.cumsum(sizes, axis=-1) - sizes


def unpack_bits(packed: jax.Array, bits: int) -> jax.Array:
    """uint8 [..., n] -> uint8 [..., n * 8 // bits] codes (first code in the lowest bits)."""
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    codes = (packed[..., None] >> shifts) & jnp.uint8(2 ** bits - 1)
    return codes.reshape(packed.shape[:-1] + (packed.shape[-1] * per,))


def region_views(arena: jax.Array, counts: jax.Array, k_row_bytes: int, head_dim: int,
                 value_dtype) -> Dict[int, Tuple[jax.Array, jax.Array]]:
    """{bits: (records uint8 [B, K, M, record_bytes(bits)], valid bool [B, K, M])} with
    M = P // record_bytes(bits): a static-size window of the arena starting at the region; rows
    past the region's count are zeros."""
    b, kh, p = arena.shape
    item = jnp.dtype(value_dtype).itemsize
    rec = tuple(record_bytes(w, k_row_bytes, head_dim, item) for w in WIDTHS)
    offsets = region_offsets(counts, rec)  # [B, K, 4]
    # contiguous windows, cut with dynamic_slice (a row copy) rather than a gather of every byte
    # (on CPU the byte gather made RDKV's decode 30x slower than a dense one); the arena is
    # zero-padded by one arena so that a window starting anywhere in it stays in bounds
    padded = jnp.pad(arena, ((0, 0), (0, 0), (0, p)))  # [B, K, 2P]
    out = {}
    for i, w in enumerate(WIDTHS):
        m = p // rec[i]
        if m:
            cut = lambda a, o: jax.lax.dynamic_slice_in_dim(a, o, m * rec[i])
            rows = jax.vmap(jax.vmap(cut))(padded, jnp.minimum(offsets[..., i], p))
        else:
            rows = jnp.zeros((b, kh, 0), jnp.uint8)
        rows = rows.reshape(b, kh, m, rec[i])
        valid = jnp.arange(m)[None, None, :] < counts[..., i:i + 1]
        # rows past the region hold other regions' bytes: zero them (they could read as NaN)
        rows = jnp.where(valid[..., None], rows, jnp.uint8(0))
        out[w] = (rows, valid)
    return out


def bytes_to(x: jax.Array, dtype, n: int) -> jax.Array:
    """uint8 [..., n * itemsize] -> dtype [..., n] (native byte order, as the cache wrote it)."""
    item = jnp.dtype(dtype).itemsize
    x = x.reshape(x.shape[:-1] + (n, item))
    if item == 1:
        return jax.lax.bitcast_convert_type(x[..., 0], dtype)
    return jax.lax.bitcast_convert_type(x, dtype)


def k_view_ranks(k_counts: jax.Array, k_row_bytes: int) -> Dict[int, Tuple[jax.Array, jax.Array]]:
    """{w: (rank int32 [B, K, J_w], valid bool [B, K, J_w])}: the channel rank whose code sits at
    each position of the K row read at w bits (J_w = R * 8 / w); see the module docstring."""
    d8, d4, d2 = (k_counts[..., i:i + 1].astype(jnp.int32) for i in range(3))
    out = {}
    for w in K_WIDTHS:
        j = jnp.arange(k_row_bytes * 8 // w, dtype=jnp.int32)[None, None, :]
        if w == 8:
            start, rank0, n = 0, 0, d8
        elif w == 4:
            start, rank0, n = 2 * d8, d8, d4
        else:
            start, rank0, n = 4 * d8 + 2 * d4, d8 + d4, d2
        valid = (j >= start) & (j < start + n)
        out[w] = (jnp.where(valid, rank0 + j - start, 0), valid)
    return out


def k_row_codes(rows: jax.Array, k_row_bytes: int) -> Dict[int, jax.Array]:
    """{w: uint8 codes [..., R * 8 / w]} of the K rows (the first R bytes of each record)."""
    krow = rows[..., :k_row_bytes]
    return {w: unpack_bits(krow, w) for w in K_WIDTHS}
