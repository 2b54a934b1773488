"""One dispatcher: choose the Pallas kernel by platform and cache type, else the XLA reference."""
from __future__ import annotations

from pallas_kernels.dense_decode import dense_decode_attention_reference


def dense_decode_attention(q, k, v, lengths, *, scale: float):
    """q: [B, H, D]; k, v: [B, K, S, D]; lengths: [B] -> [B, H, D]."""
    return dense_decode_attention_reference(q, k, v, lengths, scale)


def headsplit_decode_attention(q, full_k, full_v, full_lengths, stream_k, stream_v, stream_counts,
                               *, full_heads, stream_heads, sink: int, window: int, scale: float):
    """q: [B, H, D]; full part k, v [B, Kf, S, D] + lengths [B] (None if no full heads);
    streaming part k, v [B, Ks, sink + window, D] + counts [B] (None if no streaming heads)
    -> [B, H, D]. See pallas_kernels.headsplit_decode."""
    from pallas_kernels.headsplit_decode import headsplit_decode_attention_reference
    return headsplit_decode_attention_reference(
        q, full_k, full_v, full_lengths, stream_k, stream_v, stream_counts,
        full_heads=full_heads, stream_heads=stream_heads, sink=sink, window=window, scale=scale)


def sparse_decode_attention(q, k, v, heads, new_k, new_v, new_lengths, *, scale: float):
    """q: [B, H, D]; ragged prompt part k, v [B, N, D] + heads [B, N]; decode part new_k, new_v
    [B, K, E, D] + new_lengths [B] -> [B, H, D]. See pallas_kernels.sparse_decode."""
    from pallas_kernels.sparse_decode import sparse_decode_attention_reference
    return sparse_decode_attention_reference(q, k, v, heads, new_k, new_v, new_lengths, scale)
