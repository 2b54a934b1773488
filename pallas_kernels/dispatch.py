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

Mode "gpu": every decode layout has a Mosaic GPU kernel (`*_decode_gpu` modules); each comes with a
`*_supported(...) -> Optional[str]` check (16-bit caches, head dim a multiple of 64, at most 64
query heads per KV head, ...), and a call it refuses runs the reference. "interpret" runs the TPU
kernels in interpret mode (the GPU kernels' own tests run them in Pallas' Mosaic GPU interpreter,
with `interpret=True`). Mixed prefill has no GPU kernel: "gpu" runs its reference.
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


def dense_decode_attention(q, k, v, lengths, *, scale: float, window: Optional[int] = None):
    """q: [B, H, D]; k, v: [B, K, S, D]; lengths: [B] -> [B, H, D].
    Kernels: pallas_kernels.dense_decode (TPU, Mosaic) and pallas_kernels.dense_decode_gpu
    (Mosaic GPU: 16-bit caches, head dim a multiple of 64; other shapes run the reference).
    window: a sliding-window model's span (the last `window` slots): the reference, which the
    kernels do not cover."""
    if window is not None:
        return dense_decode_attention_reference(q, k, v, lengths, scale, window=window)
    mode = kernel_mode()
    if mode == "gpu":
        from pallas_kernels.dense_decode_gpu import dense_decode_attention_gpu, gpu_kernel_supported
        if gpu_kernel_supported(q, k) is None:
            return dense_decode_attention_gpu(q, k, v, lengths, scale)
    if mode not in ("tpu", "interpret"):
        return dense_decode_attention_reference(q, k, v, lengths, scale)
    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels.dense_decode import dense_decode_attention as kernel
    return kernel(q, k, v, lengths, scale=scale,
                  interpret=pltpu.InterpretParams() if mode == "interpret" else False)


def headsplit_decode_attention(q, full_k, full_v, full_lengths, stream_k, stream_v, stream_counts,
                               *, full_heads, stream_heads, sink: int, window: int, scale: float):
    """q: [B, H, D]; full part k, v [B, Kf, S, D] + lengths [B] (None if no full heads);
    streaming part k, v [B, Ks, sink + window, D] + counts [B] (None if no streaming heads)
    -> [B, H, D]. See pallas_kernels.headsplit_decode (TPU) and headsplit_decode_gpu."""
    from pallas_kernels import headsplit_decode
    mode = kernel_mode()
    if mode == "gpu":
        from pallas_kernels import headsplit_decode_gpu as gpu
        heads = dict(full_heads=tuple(full_heads), stream_heads=tuple(stream_heads))
        if gpu.headsplit_gpu_supported(q, full_k, stream_k, **heads) is None:
            return gpu.headsplit_decode_attention_gpu(
                q, full_k, full_v, full_lengths, stream_k, stream_v, stream_counts, **heads,
                sink=sink, window=window, scale=scale)
    if mode not in ("tpu", "interpret"):
        return headsplit_decode.headsplit_decode_attention_reference(
            q, full_k, full_v, full_lengths, stream_k, stream_v, stream_counts,
            full_heads=full_heads, stream_heads=stream_heads, sink=sink, window=window,
            scale=scale)
    from jax.experimental.pallas import tpu as pltpu
    return headsplit_decode.headsplit_decode_attention(
        q, full_k, full_v, full_lengths, stream_k, stream_v, stream_counts,
        full_heads=full_heads, stream_heads=stream_heads, sink=sink, window=window, scale=scale,
        interpret=pltpu.InterpretParams() if mode == "interpret" else False)


def sparse_decode_attention(q, k, v, heads, new_k, new_v, new_lengths, *, scale: float):
    """q: [B, H, D]; ragged prompt part k, v [B, N, D] + heads [B, N]; decode part new_k, new_v
    [B, K, E, D] + new_lengths [B] -> [B, H, D]. See pallas_kernels.sparse_decode (TPU) and
    sparse_decode_gpu."""
    from pallas_kernels import sparse_decode
    mode = kernel_mode()
    if mode == "gpu":
        from pallas_kernels import sparse_decode_gpu as gpu
        if gpu.sparse_gpu_supported(q, k, new_k) is None:
            return gpu.sparse_decode_attention_gpu(q, k, v, heads, new_k, new_v, new_lengths,
                                                   scale=scale)
    if mode not in ("tpu", "interpret"):
        return sparse_decode.sparse_decode_attention_reference(q, k, v, heads, new_k, new_v,
                                                               new_lengths, scale)
    from jax.experimental.pallas import tpu as pltpu
    return sparse_decode.sparse_decode_attention(
        q, k, v, heads, new_k, new_v, new_lengths, scale=scale,
        interpret=pltpu.InterpretParams() if mode == "interpret" else False)


def mixed_decode_attention(q, arena, counts, k_channels, k_counts, whole_k, whole_v,
                           whole_lengths, *, scale: float, head_capacity: int, pos_bytes: int,
                           max_records: int):
    """q: [B, H, D]; RDKV's mixed-precision layer (a byte arena per sequence of V records grouped
    by bit width and K rows in groups of 32 with float16 headers, per-head channel ranks, a whole
    zone in the cache dtype; `jaxkv.cache.mixed_format`) -> [B, H, D].
    Kernels: pallas_kernels.mixed_decode (TPU) and mixed_decode_gpu; see there."""
    from pallas_kernels import mixed_decode
    args = (q, arena, counts, k_channels, k_counts, whole_k, whole_v, whole_lengths)
    settings = dict(scale=scale, head_capacity=head_capacity, pos_bytes=pos_bytes,
                    max_records=max_records)
    mode = kernel_mode()
    if mode == "gpu":
        from pallas_kernels import mixed_decode_gpu as gpu
        if gpu.mixed_gpu_supported(q, whole_k, whole_v) is None:
            return gpu.mixed_decode_attention_gpu(*args, **settings)
    if mode not in ("tpu", "interpret"):
        return mixed_decode.mixed_decode_attention_reference(*args, **settings)
    from jax.experimental.pallas import tpu as pltpu
    return mixed_decode.mixed_decode_attention(
        *args, **settings, interpret=pltpu.InterpretParams() if mode == "interpret" else False)


def quantized_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, q_lengths,
                               whole_k, whole_v, whole_lengths, *, scale: float, k_bits: int,
                               v_bits: int, k_group_tokens: int):
    """q: [B, H, D]; a uniformly quantised layer (KIVI, int8, SnapKV + KIVI) plus a whole zone
    -> [B, H, D]. Kernels: pallas_kernels.quantized_decode (TPU, with a block size that holds
    whole K scale groups: `default_block_size`) and quantized_decode_gpu."""
    from pallas_kernels import quantized_decode
    settings = dict(scale=scale, k_bits=k_bits, v_bits=v_bits, k_group_tokens=k_group_tokens)
    mode = kernel_mode()
    if mode == "gpu":
        from pallas_kernels import quantized_decode_gpu as gpu
        if gpu.quantized_gpu_supported(q, k_codes, k_scale, v_codes, v_scale, whole_k,
                                       k_bits=k_bits, v_bits=v_bits,
                                       k_group_tokens=k_group_tokens) is None:
            return gpu.quantized_decode_attention_gpu(
                q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, q_lengths, whole_k,
                whole_v, whole_lengths, **settings)
    if mode not in ("tpu", "interpret"):
        return quantized_decode.quantized_decode_attention_reference(
            q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, q_lengths, whole_k, whole_v,
            whole_lengths, **settings)
    from jax.experimental.pallas import tpu as pltpu
    return quantized_decode.quantized_decode_attention(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, q_lengths, whole_k, whole_v,
        whole_lengths, **settings, block_size=quantized_decode.default_block_size(k_group_tokens),
        interpret=pltpu.InterpretParams() if mode == "interpret" else False)


def mixed_prefill_attention(alpha, q, k, v, positions, prompt_lengths, *, sink: int, window: int,
                            block_q: Optional[int] = None, block_k: Optional[int] = None):
    """Mixed full + streaming causal prefill attention (RLKV / DuoAttention gate training):
    alpha [K]; q [B, T, H, D]; k, v [B, T, K, D]; positions [B, T] (arange(T) in every row for
    the kernel); prompt_lengths [B] or None -> [B, T, H, D]; differentiable in alpha, q, k, v.
    Kernel: pallas_kernels.mixed_prefill (TPU; "gpu" and "reference" run its jnp reference,
    `mixed_prefill_attention_reference`). block_q, block_k: None for the kernel's defaults."""
    from pallas_kernels import mixed_prefill
    mode = kernel_mode()
    if mode not in ("tpu", "interpret"):
        return mixed_prefill.mixed_prefill_attention_reference(alpha, q, k, v, positions,
                                                               prompt_lengths, sink, window)
    from jax.experimental.pallas import tpu as pltpu
    blocks = {name: size for name, size in (("block_q", block_q), ("block_k", block_k))
              if size is not None}
    return mixed_prefill.mixed_prefill_attention(
        alpha, q, k, v, positions, prompt_lengths, sink=sink, window=window, **blocks,
        interpret=pltpu.InterpretParams() if mode == "interpret" else False)


def mixed_prefill_attention_reference(alpha, q, k, v, positions, prompt_lengths, *, sink: int,
                                      window: int):
    """The jnp math of `mixed_prefill_attention` in every kernel mode (what gate training runs
    off TPU: any positions, rematerialisable with jax.checkpoint)."""
    from pallas_kernels import mixed_prefill
    return mixed_prefill.mixed_prefill_attention_reference(alpha, q, k, v, positions,
                                                           prompt_lengths, sink, window)
