"""One dispatcher: choose the Pallas kernel by platform and cache type, else the XLA reference.

`jaxkv` calls only the functions here. Which implementation runs is decided once per call at trace
time by `kernel_mode()`:

    "tpu"        Pallas kernels lowered with Mosaic TPU (default on a TPU backend)
    "gpu"        Pallas kernels lowered with Mosaic GPU (default on a CUDA backend)
    "interpret"  the same Pallas kernels run in interpret mode (any backend; CPU tests)
    "reference"  the plain-jnp (XLA) references (default elsewhere, e.g. CPU)

`JAXKV_KERNELS=auto|tpu|gpu|interpret|reference` (environment) or `set_kernel_mode(...)` /
the `kernel_mode_override(...)` context manager override the platform default. A cache type
without a kernel for the chosen backend falls back to its reference.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import jax

from pallas_kernels.dense_decode import dense_decode_attention_reference

MODES = ("auto", "tpu", "gpu", "interpret", "reference")
_override: Optional[str] = None


def _check_mode(mode: str, name: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{name}={mode!r} is not allowed; expected one of {', '.join(MODES)}")
    return mode


def set_kernel_mode(mode: Optional[str]) -> None:
    """Force a mode for every later trace (None: back to JAXKV_KERNELS / the platform default).
    Functions already jit-compiled keep the implementation they were traced with."""
    global _override
    _override = None if mode is None else _check_mode(mode, "mode")


@contextlib.contextmanager
def kernel_mode_override(mode: str) -> Iterator[None]:
    """`with kernel_mode_override("interpret"): ...` traces with that mode inside the block."""
    global _override
    previous = _override
    set_kernel_mode(mode)
    try:
        yield
    finally:
        _override = previous


def kernel_mode() -> str:
    """The implementation the dispatcher uses now: tpu, gpu, interpret or reference."""
    mode = _override or _check_mode(os.environ.get("JAXKV_KERNELS", "auto"), "JAXKV_KERNELS")
    if mode != "auto":
        return mode
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda"):
        return "gpu"
    return "reference"


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


def mixed_decode_attention(q, arena, counts, k_channels, k_counts, k_scale, k_zero, whole_k,
                           whole_v, whole_lengths, *, scale: float, k_row_bytes: int):
    """q: [B, H, D]; RDKV's mixed-precision layer (byte arena of token records grouped by V bit
    width, per-channel K scales in rank order, a whole zone in the cache dtype) -> [B, H, D].
    See pallas_kernels.mixed_decode."""
    from pallas_kernels.mixed_decode import mixed_decode_attention_reference
    return mixed_decode_attention_reference(q, arena, counts, k_channels, k_counts, k_scale,
                                            k_zero, whole_k, whole_v, whole_lengths, scale=scale,
                                            k_row_bytes=k_row_bytes)


def quantized_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, q_lengths,
                               whole_k, whole_v, whole_lengths, *, scale: float, k_bits: int,
                               v_bits: int, k_group_tokens: int):
    """q: [B, H, D]; a uniformly quantised layer (KIVI, int8, SnapKV + KIVI) plus a whole zone
    -> [B, H, D]. See pallas_kernels.quantized_decode."""
    from pallas_kernels.quantized_decode import quantized_decode_attention_reference
    return quantized_decode_attention_reference(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, q_lengths, whole_k, whole_v,
        whole_lengths, scale=scale, k_bits=k_bits, v_bits=v_bits, k_group_tokens=k_group_tokens)
