"""What every compression policy is: a frozen, hashable dataclass of settings (a static jit
argument) with a pure per-layer `compress_layer`.

  observation_positions(lengths [B], T) -> [B, Q] int32 prompt positions whose post-RoPE queries
      the policy needs (e.g. the last W prompt tokens for SnapKV); Q may be 0.
  compress_layer(layer, cache: DenseCache, obs: LayerObservation) -> a per-layer cache pytree
      holding only what the policy keeps, with room for `obs.extra_capacity` decoded tokens.

`generate` calls compress_layer inside prefill right after each layer, so the dense cache of all
layers never exists at once.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import jax.numpy as jnp
import numpy as np


def check_budget(budget, name: str = "budget") -> float:
    """A budget is a fraction of the full cache in (0, 1] (a Python or numpy number)."""
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, numbers.Real) \
            or math.isnan(budget) or not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"{name}={budget!r}: must be a fraction in (0, 1]")
    return float(budget)


def prompt_byte_budget(budget: float, length, extra: int, kv_heads: int, head_dim: int,
                       itemsize: int):
    """Bytes a compressed prompt may take per sequence and layer: `budget` of the dense cache of
    `length` prompt tokens and `extra` decode slots (K and V of every KV head in the cache dtype,
    plus its int32 length), less those decode slots, which the compressed caches hold densely
    too. `length` may be an array of per-sequence lengths."""
    tb = 2 * head_dim * itemsize
    return budget * (kv_heads * (length + extra) * tb + 4) - kv_heads * extra * tb


def last_positions(lengths, window: int):
    """[B, W] positions of the last `window` prompt tokens of each sequence (clamped at 0)."""
    offs = jnp.arange(window, dtype=jnp.int32) - window  # -W .. -1
    return jnp.maximum(lengths[:, None].astype(jnp.int32) + offs[None, :], 0)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base class. Subclasses validate their settings in __post_init__."""

    name = "policy"
    #: True when compress_layer's computation does not depend on the layer index (only on the
    #: shapes of the cache and observation): `generate_shared` then compiles one layer's
    #: compression and runs it for every layer instead of compiling all layers into one program.
    #: False (the safe default) for policies with per-layer settings (PyramidKV, head splits).
    layer_invariant = False

    def observation_positions(self, lengths, t: int):
        return jnp.zeros((lengths.shape[0], 0), jnp.int32)

    def compress_layer(self, layer, cache, obs):
        raise NotImplementedError(f"{type(self).__name__} must implement compress_layer")
