"""Uniform asymmetric round-to-nearest (RTN) quantisation at 2, 4 and 8 bits, bit packing, the
per-model distortion table `eps(b)` that RDKV's bit allocation reads (docs/methods.md, RDKV), and
the uniformly quantised cache `QuantizedCache` of the KIVI / int8 baselines (its layout in the
comment above it).

Quantiser. Along `axis` (the reduction axis) each slice gets a float16 zero-point and scale:

    zero_point = min(x),   scale = (max(x) - min(x)) / (2^b - 1)
    code = clip(round((x - zero_point) / scale), 0, 2^b - 1)        uint8
    x_hat = zero_point + code * scale                               (in float32)

K is quantised per channel (reduce over the token axis: `axis=-2` for [B, K, T, D]), V per token
(reduce over the head dim: `axis=-1`). Because zero-point and scale are stored in float16, they
are rounded in the safe direction: the zero-point down to the largest float16 <= min(x) and the
scale up to the smallest float16 >= (max(x) - zero_point) / (2^b - 1), so the grid still covers
[min, max] and every element is within scale / 2 of its reconstruction (up to float32 rounding of
the reconstruction itself). A constant slice gets scale 0 and code 0 and is reconstructed exactly
when the constant is a float16 value (e.g. zero padding); otherwise within float16 resolution.
Values must lie within the float16 range (|x| <= 65504) for the bound to hold; beyond it the
zero-point and scale saturate at +-65504 and codes clip.

Packing (along the last axis, little-endian inside a byte: the first code in the lowest bits):
four 2-bit codes per byte, two 4-bit codes per byte, 8-bit codes as they are; a length that is
not a multiple of the codes per byte is padded with zero codes.

Distortion table. `eps(b) = ||X - Q_b(X)||^2 / ||X||^2` (normalised MSE), `eps(0) = 1` (evicted)
and `eps(16) = 0` (kept in 16 bits, by definition). `calibrate_eps` measures it once per model on
sample keys (per channel) and values (per token); `save_eps` / `load_eps` keep it in a JSON file
tied to a model fingerprint.

Notation: B batch, K kv heads, T tokens, D head dim, `...` any leading dims, N the packed axis.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache.base import array_nbytes, batched_write, positions_mask
from jaxkv.jsonio import write_json_atomic

BIT_WIDTHS = (0, 2, 4, 8, 16)   # every width a token or channel may get (0 evicts, 16 keeps whole)
CODE_BITS = (2, 4, 8)           # widths stored as uint8 codes with a scale and zero-point
_F16_MAX = float(np.finfo(np.float16).max)  # 65504


class Quantized(NamedTuple):
    """codes: uint8, the shape of x; scale, zero_point: float16, x's shape with `axis` kept as 1."""
    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array


# ---- validation ----------------------------------------------------------------------------------
def _allowed(values) -> str:
    return "{" + ", ".join(str(v) for v in values) + "}"


def check_bits(bits, allowed: Sequence[int] = BIT_WIDTHS, name: str = "bits") -> int:
    """`bits` as a Python int, or a ValueError naming `name`, the value and the allowed set."""
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)) \
            or int(bits) not in BIT_WIDTHS:
        raise ValueError(f"{name}={bits!r}: bit width must be one of {_allowed(BIT_WIDTHS)}")
    if int(bits) not in allowed:
        raise ValueError(f"{name}={bits!r}: must be one of {_allowed(allowed)} here "
                         f"(0 evicts and 16 keeps the value whole; neither has codes)")
    return int(bits)


def _check_axis(axis, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) \
            or not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis!r}: must be an integer in [{-ndim}, {ndim - 1}] for an array "
                         f"with {ndim} dims")
    return int(axis) % ndim


def _as_float(x, name: str = "x") -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}.dtype={x.dtype}: must be a floating dtype (float16, bfloat16, "
                         f"float32)")
    if x.ndim == 0:
        raise ValueError(f"{name}.shape=(): must have at least one axis to reduce over")
    return x.astype(jnp.float32)


# ---- quantise / dequantise -----------------------------------------------------------------------
def _f16_down(x: jax.Array) -> jax.Array:
    """Largest float16 <= x (x float32), saturating at -65504 / 65504."""
    h = jnp.clip(x, -_F16_MAX, _F16_MAX).astype(jnp.float16)
    h = jnp.where(h.astype(jnp.float32) > x, jnp.nextafter(h, jnp.float16(-jnp.inf)), h)
    return jnp.clip(h, -_F16_MAX, _F16_MAX)


def _f16_up(x: jax.Array) -> jax.Array:
    """Smallest float16 >= x (x float32), saturating at -65504 / 65504."""
    h = jnp.clip(x, -_F16_MAX, _F16_MAX).astype(jnp.float16)
    h = jnp.where(h.astype(jnp.float32) < x, jnp.nextafter(h, jnp.float16(jnp.inf)), h)
    return jnp.clip(h, -_F16_MAX, _F16_MAX)


def quantize(x, bits: int, axis: int, where=None) -> Quantized:
    """Uniform asymmetric RTN quantisation of x at `bits` in {2, 4, 8}, one float16 scale and
    zero-point per slice along `axis` (min and max taken over that axis).

    x: float array; axis: the axis reduced over (K per channel: the token axis; V per token: the
    head-dim axis); where: optional bool mask broadcastable to x: only True elements enter min and
    max (e.g. kept tokens of a padded segment); codes of False elements are 0; a slice with no True
    element gets scale 0 and zero-point 0. `bits` and `axis` are static under jit.
    """
    bits = check_bits(bits, CODE_BITS)
    x = _as_float(x)                                            # [..., n, ...] float32
    axis = _check_axis(axis, x.ndim)
    if where is not None:
        where = jnp.broadcast_to(jnp.asarray(where, bool), x.shape)
    return _quantize(x, bits, axis, where)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(x, bits: int, axis: int, where) -> Quantized:
    levels = float(2 ** bits - 1)
    if where is None:
        mn = jnp.min(x, axis=axis, keepdims=True)                # [..., 1, ...]
        mx = jnp.max(x, axis=axis, keepdims=True)
    else:
        mn = jnp.min(jnp.where(where, x, jnp.inf), axis=axis, keepdims=True)
        mx = jnp.max(jnp.where(where, x, -jnp.inf), axis=axis, keepdims=True)
        empty = ~jnp.any(where, axis=axis, keepdims=True)
        mn = jnp.where(empty, 0.0, mn)
        mx = jnp.where(empty, 0.0, mx)
    zero_point = _f16_down(mn)                                  # float16, <= min
    z = zero_point.astype(jnp.float32)
    scale = _f16_up((mx - z) / levels)                          # float16, grid covers [min, max]
    s = scale.astype(jnp.float32)
    safe = jnp.where(s > 0, s, 1.0)                             # constant slice: scale 0, code 0
    codes = jnp.where(s > 0, jnp.round((x - z) / safe), 0.0)
    codes = jnp.clip(codes, 0.0, levels).astype(jnp.uint8)
    if where is not None:
        codes = jnp.where(where, codes, jnp.uint8(0))
    return Quantized(codes, scale, zero_point)


def dequantize(codes, scale, zero_point, dtype=jnp.float32) -> jax.Array:
    """zero_point + codes * scale in float32, cast to `dtype` (scale and zero-point broadcast)."""
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"codes.dtype={codes.dtype}: must be an integer dtype (uint8 codes)")
    return _dequantize(codes, jnp.asarray(scale), jnp.asarray(zero_point), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=3)
def _dequantize(codes, scale, zero_point, dtype):
    out = zero_point.astype(jnp.float32) + codes.astype(jnp.float32) * scale.astype(jnp.float32)
    return out.astype(dtype)


def fake_quantize(x, bits: int, axis: int, where=None) -> jax.Array:
    """Q_b(x): x quantised and dequantised (float32). bits 0 gives zeros, 16 gives x unchanged
    (as the allocation treats them: evicted, or kept whole)."""
    bits = check_bits(bits)
    x = _as_float(x)
    if bits == 0:
        return jnp.zeros_like(x)
    if bits == 16:
        return x
    return dequantize(*quantize(x, bits, axis, where))


# ---- packing -------------------------------------------------------------------------------------
def packed_length(n: int, bits: int) -> int:
    """Bytes that `pack` makes of n codes at `bits` (ceil(n * bits / 8))."""
    bits = check_bits(bits, CODE_BITS)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n={n!r}: must be an integer >= 0")
    per = 8 // bits
    return -(-int(n) // per)


def pack(codes, bits: int) -> jax.Array:
    """codes [..., n] integer (each < 2^bits; higher bits are dropped) -> uint8
    [..., ceil(n * bits / 8)], 8 // bits codes per byte, the first in the lowest bits; n padded
    with zero codes."""
    bits = check_bits(bits, CODE_BITS)
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"codes.dtype={codes.dtype}: must be an integer dtype (uint8 codes)")
    if codes.ndim == 0:
        raise ValueError("codes.shape=(): must have a last axis to pack along")
    return _pack(codes.astype(jnp.uint8), bits)


@functools.partial(jax.jit, static_argnums=1)
def _pack(codes, bits: int):
    if bits == 8:
        return codes
    per, n = 8 // bits, codes.shape[-1]
    m = packed_length(n, bits)
    codes = codes & jnp.uint8(2 ** bits - 1)
    if m * per != n:                                            # pad to whole bytes
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, m * per - n)])
    grouped = codes.reshape(codes.shape[:-1] + (m, per))        # [..., m, per]
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)  # [per]
    # Disjoint bit fields, so the sum is the bitwise OR and stays below 256.
    return jnp.sum(grouped << shifts, axis=-1, dtype=jnp.uint8)  # [..., m]


def unpack(packed, bits: int, n: int) -> jax.Array:
    """packed uint8 [..., ceil(n*bits/8)] -> codes uint8 [..., n] (inverse of `pack`)."""
    bits = check_bits(bits, CODE_BITS)
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise ValueError(f"packed.dtype={packed.dtype}: must be uint8 (the output of pack)")
    if packed.ndim == 0:
        raise ValueError("packed.shape=(): must have a last axis to unpack along")
    m = packed_length(n, bits)
    if packed.shape[-1] != m:
        raise ValueError(f"n={n!r}: {n} codes at {bits} bits take {m} bytes, but "
                         f"packed.shape[-1]={packed.shape[-1]}")
    return _unpack(packed, bits, n)


def unpack_codes(codes: jax.Array, bits: int, d: int) -> jax.Array:
    """Packed uint8 [..., d * bits / 8] -> uint8 [..., d]; int8 codes are returned as they are.
    Unchecked (`unpack` checks): what the quantised caches and their decode kernels read."""
    if codes.dtype == jnp.int8 or bits == 8:
        return codes
    return _unpack(codes, bits, d)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unpack(packed, bits: int, n: int):
    if bits == 8:
        return packed[..., :n]
    per, m = 8 // bits, packed.shape[-1]
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)  # [per]
    codes = (packed[..., None] >> shifts) & jnp.uint8(2 ** bits - 1)       # [..., m, per]
    return codes.reshape(packed.shape[:-1] + (m * per,))[..., :n]


# ---- distortion --------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(1, 2))
def _squared_error_sums(x, bits: int, axis: int, where=None):
    """(sum (x - Q_b(x))^2, sum x^2) over the (valid) elements, float32 scalars. x float32,
    axis nonnegative, where None or bool of x's shape."""
    err = x - dequantize(*_quantize(x, bits, axis, where))
    if where is not None:
        err = jnp.where(where, err, 0.0)
        x = jnp.where(where, x, 0.0)
    return jnp.sum(err * err), jnp.sum(x * x)


def normalized_mse(x, bits: int, axis: int, where=None) -> jax.Array:
    """eps_b(x) = ||x - Q_b(x)||^2 / ||x||^2 (float32 scalar); eps(0) = 1 and eps(16) = 0 by
    definition; 0 when x is all zeros (and bits is not 0). `where`: as in `quantize`."""
    bits = check_bits(bits)
    if bits == 0:
        return jnp.float32(1.0)
    if bits == 16:
        return jnp.float32(0.0)
    x = _as_float(x)
    axis = _check_axis(axis, x.ndim)
    if where is not None:
        where = jnp.broadcast_to(jnp.asarray(where, bool), x.shape)
    num, den = _squared_error_sums(x, bits, axis, where)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


EpsTable = Dict[str, Dict[int, float]]


def calibrate_eps(keys, values, key_axis: int = -2, value_axis: int = -1) -> EpsTable:
    """Distortion table {"k": {2: e, 4: e, 8: e}, "v": {...}} (Python floats) from sample keys and
    values: K per channel (min/max over tokens, `key_axis`, default -2 of [..., T, D]), V per token
    (over the head dim, `value_axis`, default -1). keys / values: one array or a sequence of arrays
    (e.g. one per prompt or layer); the error and the norm are summed over all of them before
    dividing. eps(0) = 1 and eps(16) = 0 are not stored (they hold by definition)."""
    out = {}
    for name, arrays, axis in (("k", keys, key_axis), ("v", values, value_axis)):
        if isinstance(arrays, (list, tuple)):
            if not arrays:
                raise ValueError(f"{'keys' if name == 'k' else 'values'}=[]: give at least one "
                                 f"sample array")
        else:
            arrays = [arrays]
        table = {}
        for bits in CODE_BITS:
            num = den = 0.0
            for a in arrays:
                a = _as_float(a, "keys" if name == "k" else "values")
                n, d = _squared_error_sums(a, bits, _check_axis(axis, a.ndim))
                num, den = num + float(n), den + float(d)
            table[bits] = num / den if den > 0 else 0.0
        out[name] = table
    return out


def _check_eps_table(eps, where: str) -> EpsTable:
    if not isinstance(eps, Mapping) or set(eps) != {"k", "v"}:
        raise ValueError(f"{where}: must be a mapping with keys 'k' and 'v' "
                         f"(each {{bits: eps}}), got {eps!r}")
    out = {}
    for name in ("k", "v"):
        table = eps[name]
        if not isinstance(table, Mapping) or not table:
            raise ValueError(f"{where}[{name!r}]={table!r}: must be a non-empty mapping "
                             f"{{bits: eps}}")
        clean = {}
        for b, e in table.items():
            b = check_bits(int(b) if isinstance(b, str) and b.isdigit() else b,
                           name=f"{where}[{name!r}] bits")
            if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) \
                    or e < 0:
                raise ValueError(f"{where}[{name!r}][{b}]={e!r}: must be a finite number >= 0")
            clean[b] = float(e)
        out[name] = dict(sorted(clean.items()))
    return out


def _check_fingerprint(fp) -> str:
    if not isinstance(fp, str) or not fp:
        raise ValueError(f"model_fingerprint={fp!r}: must be a non-empty string identifying the "
                         f"model (e.g. checkpoint name and a hash of its config)")
    return fp


def save_eps(path: Union[str, os.PathLike], eps: EpsTable, model_fingerprint: str,
             extra: Optional[Mapping] = None) -> None:
    """Write the table as JSON, atomically (a temporary file in the same folder, then os.replace).
    {"format": 1, "model_fingerprint": ..., "eps": {"k": {"2": e, ...}, "v": {...}}}, plus the
    keys of `extra` (JSON values describing how it was measured, e.g. RDKV's k_group_tokens)."""
    eps = _check_eps_table(eps, "eps")
    _check_fingerprint(model_fingerprint)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path={path!r}: folder {folder!r} does not exist")
    doc = {"format": 1, "model_fingerprint": model_fingerprint,
           "eps": {name: {str(b): e for b, e in table.items()} for name, table in eps.items()}}
    for key, value in (extra or {}).items():
        if key in doc:
            raise ValueError(f"extra[{key!r}]: {key!r} is one of the table's own keys")
        doc[key] = value
    write_json_atomic(doc, path, indent=2, sort_keys=True, trailing_newline=True)


def load_eps(path: Union[str, os.PathLike], model_fingerprint: str) -> EpsTable:
    """Read a table written by `save_eps` for the model `model_fingerprint`; {"k": {2: e, ...},
    "v": {...}} with int keys. A file for another model raises ValueError naming the file and
    both fingerprints; a missing file raises FileNotFoundError."""
    _check_fingerprint(model_fingerprint)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path={path!r}: no eps calibration file there (write one with "
                                f"calibrate_eps + save_eps)")
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"path={path!r}: not a JSON eps calibration file ({e})") from None
    if not isinstance(doc, dict) or "model_fingerprint" not in doc or "eps" not in doc:
        raise ValueError(f"path={path!r}: not an eps calibration file (needs 'model_fingerprint' "
                         f"and 'eps')")
    if doc["model_fingerprint"] != model_fingerprint:
        raise ValueError(f"path={path!r}: calibrated for model_fingerprint="
                         f"{doc['model_fingerprint']!r}, not for model_fingerprint="
                         f"{model_fingerprint!r}; calibrate this model again")
    return _check_eps_table(doc["eps"], f"{path!r} eps")

# ---- the uniformly quantised cache (KIVI, int8, SnapKV + KIVI) ------------------------------

# Uniformly quantised cache: every stored token at one bit width (the baselines RDKV is compared
# with: KIVI, MaxText-style int8, SnapKV eviction + KIVI), plus a zone of tokens kept in the cache
# dtype (KIVI's 16-bit recent window, SnapKV's observation window, tokens generated while decoding).
#
# Layout of one layer (B batch, K KV heads, N quantised slots, Z whole slots, D head dim):
#
#     k_codes:       uint8 [B, K, N, D * k_bits / 8]  packed codes, asymmetric (KIVI), or
#                    int8 [B, K, N, D]                symmetric absmax codes (int8)
#     k_scale:       float16 [B, K, ceil(N / kg), D]  K per channel over groups of kg tokens (KIVI),
#                    float16 [B, K, N, D / cg]        or per token over groups of cg channels (int8:
#                                                     cg = D, one scale per token and head)
#     k_zero:        like k_scale, or None            (None: symmetric, no zero-point)
#     v_codes:       like k_codes
#     v_scale,
#     v_zero:        float16 [B, K, N, D / vg]        V per token over groups of vg channels
#     positions:     int32 [B, K, N] or None          prompt position of each slot (None: slot n
#                                                     holds position n, no eviction)
#     q_lengths:     int32 [B]                        filled quantised slots (same for every head)
#     whole_k,
#     whole_v:       [B, K, Z, D]                     tokens in the cache dtype
#     whole_lengths: int32 [B]
#
# `nbytes` counts every array: codes, scales, zero-points, positions, lengths and the padding of
# sequences shorter than the padded prompt. Appended tokens go to the whole zone, except with
# `append_quantized` (int8, as MaxText quantises every token it writes), where each new token is
# quantised per token into the next quantised slot.

def quantize_symmetric(x: jax.Array, groups: int = 1) -> Tuple[jax.Array, jax.Array]:
    """Absmax int8 per token: x [..., D] -> (codes int8 [..., D], scale float16 [..., groups]).

    scale = max |x| / 127 over each group of D / groups channels, rounded up to float16 so that
    |x| / scale <= 127; code = round(x / scale); x_hat = code * scale. A zero group gets scale 0."""
    d = x.shape[-1]
    xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, d // groups))
    amax = jnp.abs(xf).max(-1, keepdims=True) / 127.0
    s16 = jnp.clip(amax, 0, 65504).astype(jnp.float16)
    s16 = jnp.where(s16.astype(jnp.float32) < amax, jnp.nextafter(s16, jnp.float16(jnp.inf)), s16)
    s = s16.astype(jnp.float32)
    codes = jnp.where(s > 0, jnp.round(xf / jnp.where(s > 0, s, 1.0)), 0.0)
    codes = jnp.clip(codes, -127, 127).astype(jnp.int8).reshape(x.shape)
    return codes, s16[..., 0]


def quantize_per_token(x: jax.Array, bits: int, group: int, where=None):
    """Asymmetric RTN per token over groups of `group` channels: x [..., N, D] ->
    (packed uint8 [..., N, D * bits / 8], scale, zero float16 [..., N, D / group])."""
    d = x.shape[-1]
    xg = x.reshape(x.shape[:-1] + (d // group, group))
    w = None if where is None else where[..., None, None]
    qz = quantize(xg, bits, axis=-1, where=w)
    codes = qz.codes.reshape(x.shape)
    return pack(codes, bits), qz.scale[..., 0], qz.zero_point[..., 0]


def quantize_per_channel(x: jax.Array, bits: int, group: int, valid: jax.Array):
    """Asymmetric RTN per channel over groups of `group` consecutive slots (KIVI's keys):
    x [B, K, N, D], valid bool [B, K, N] (slots entering min / max) ->
    (packed uint8 [B, K, N, D * bits / 8], scale, zero float16 [B, K, ceil(N / group), D])."""
    b, kh, n, d = x.shape
    j = -(-n // group)
    pad = j * group - n
    xp = jnp.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]).reshape(b, kh, j, group, d)
    vp = jnp.pad(valid, [(0, 0), (0, 0), (0, pad)]).reshape(b, kh, j, group, 1)
    qz = quantize(xp, bits, axis=3, where=vp)
    codes = qz.codes.reshape(b, kh, j * group, d)[:, :, :n]
    return pack(codes, bits), qz.scale[:, :, :, 0], qz.zero_point[:, :, :, 0]


@flax.struct.dataclass
class QuantizedCache:
    """One layer's uniformly quantised cache (see module docstring)."""

    k_codes: jax.Array
    k_scale: jax.Array
    k_zero: Optional[jax.Array]
    v_codes: jax.Array
    v_scale: jax.Array
    v_zero: Optional[jax.Array]
    positions: Optional[jax.Array]
    q_lengths: jax.Array
    whole_k: jax.Array
    whole_v: jax.Array
    whole_lengths: jax.Array
    k_bits: int = flax.struct.field(pytree_node=False)
    v_bits: int = flax.struct.field(pytree_node=False)
    k_group_tokens: int = flax.struct.field(pytree_node=False)
    append_quantized: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def head_dim(self) -> int:
        return self.whole_k.shape[3]

    @property
    def n_slots(self) -> int:
        return self.k_codes.shape[2]

    def append(self, k: jax.Array, v: jax.Array) -> "QuantizedCache":
        """k, v: [B, K, D]. Whole zone at whole_lengths[b], or (append_quantized) quantised per
        token into slot q_lengths[b]. `generate` sizes the arrays so they never overflow."""
        if not self.append_quantized:
            return self.replace(whole_k=batched_write(self.whole_k, k, self.whole_lengths),
                                whole_v=batched_write(self.whole_v, v, self.whole_lengths),
                                whole_lengths=jnp.minimum(self.whole_lengths + 1,
                                                          self.whole_k.shape[2]))
        if self.k_zero is not None or self.k_group_tokens:
            raise NotImplementedError("append_quantized supports symmetric per-token caches")
        kc, ks = quantize_symmetric(k, self.k_scale.shape[-1])  # [B, K, D], [B, K, groups]
        vc, vs = quantize_symmetric(v, self.v_scale.shape[-1])
        at = self.q_lengths
        return self.replace(k_codes=batched_write(self.k_codes, kc, at),
                            k_scale=batched_write(self.k_scale, ks, at),
                            v_codes=batched_write(self.v_codes, vc, at),
                            v_scale=batched_write(self.v_scale, vs, at),
                            q_lengths=jnp.minimum(at + 1, self.n_slots))

    def attend(self, q: jax.Array, scale: float) -> jax.Array:
        """q: [B, H, D] -> [B, H, D] (pallas_kernels.quantized_decode), no dequantised copy."""
        from pallas_kernels import dispatch
        return dispatch.quantized_decode_attention(
            q, self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero,
            self.q_lengths, self.whole_k, self.whole_v, self.whole_lengths, scale=scale,
            k_bits=self.k_bits, v_bits=self.v_bits, k_group_tokens=self.k_group_tokens)

    def nbytes(self) -> int:
        return array_nbytes(self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale,
                            self.v_zero, self.positions, self.q_lengths, self.whole_k,
                            self.whole_v, self.whole_lengths)

    def kept_positions(self, lengths, t: int) -> jax.Array:
        """The quantised slots' positions (slot n = position n when `positions` is None) and the
        whole zone's prompt tokens, the last whole_lengths[b] before lengths[b] (asked right
        after compression, when the whole zone holds only prompt tokens)."""
        lengths = jnp.asarray(lengths, jnp.int32)
        b, kh = self.k_codes.shape[:2]
        pos = jnp.arange(t)[None, None, :]
        whole = (pos < lengths[:, None, None]) & \
            (pos >= (lengths - self.whole_lengths)[:, None, None])
        if self.positions is None:
            quantised = pos < self.q_lengths[:, None, None]
        else:
            heads = jnp.broadcast_to(jnp.arange(kh)[None, :, None], self.positions.shape)
            quantised = positions_mask(heads.reshape(b, -1), self.positions.reshape(b, -1), kh, t)
        return jnp.broadcast_to(quantised | whole, (b, kh, t))

    def _dequantized(self):
        """(k, v) float32 [B, K, N, D] of the quantised slots (for tests)."""
        from jaxkv.cache.quant import unpack_codes
        d, n = self.head_dim, self.n_slots
        b, kh = self.k_codes.shape[:2]
        kc = unpack_codes(self.k_codes, self.k_bits, d).astype(jnp.float32)
        vc = unpack_codes(self.v_codes, self.v_bits, d).astype(jnp.float32)
        if self.k_group_tokens:
            rep = lambda x: jnp.repeat(x.astype(jnp.float32), self.k_group_tokens, axis=2)[:, :, :n]
            k = kc * rep(self.k_scale) + (0.0 if self.k_zero is None else rep(self.k_zero))
        else:
            nc = self.k_scale.shape[-1]
            rep = lambda x: jnp.repeat(x.astype(jnp.float32), d // nc, axis=-1)
            k = kc * rep(self.k_scale) + (0.0 if self.k_zero is None else rep(self.k_zero))
        nv = self.v_scale.shape[-1]
        rep = lambda x: jnp.repeat(x.astype(jnp.float32), d // nv, axis=-1)
        v = vc * rep(self.v_scale) + (0.0 if self.v_zero is None else rep(self.v_zero))
        return k, v

    def to_dense(self) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """(k, v float32 [B, K, N + Z, D] dequantised, valid [B, K, N + Z]): the quantised slots,
        then the whole zone (for tests)."""
        k, v = self._dequantized()
        b, kh, n, d = k.shape
        z = self.whole_k.shape[2]
        qv = jnp.arange(n)[None, :] < self.q_lengths[:, None]
        qv = jnp.broadcast_to(qv[:, None], (b, kh, n))
        wv = jnp.broadcast_to((jnp.arange(z)[None, :] < self.whole_lengths[:, None])[:, None],
                              (b, kh, z))
        k = jnp.concatenate([jnp.where(qv[..., None], k, 0.0), self.whole_k.astype(jnp.float32)], 2)
        v = jnp.concatenate([jnp.where(qv[..., None], v, 0.0), self.whole_v.astype(jnp.float32)], 2)
        return k, v, jnp.concatenate([qv, wv], 2)
