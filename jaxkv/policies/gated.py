"""GatedMixing: sample from the gated (RLKV / DuoAttention training) model with `generate`.

    policy = GatedMixing(gates, sink=4, window=16)      # gates: [L, K] in [0, 1]
    gen = generate(model, prompts, 64, policy=policy, temperature=1.0, seed=step)

Prefill runs every head in full (as the deployed model does); each decode step mixes
`alpha * full + (1 - alpha) * streaming` per KV head over a dense cache (`GatedDenseCache`).
The policy is a pytree (`flax.struct.dataclass`): `gates` is a traced leaf and sink/window are
static, so `generate` compiles once and new gates every optimiser step do not recompile.
It keeps every token: it is for training rollouts, not for saving memory.
"""
from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from jaxkv.cache.gated import GatedDenseCache
from jaxkv.model.gated import check_streaming


@flax.struct.dataclass
class GatedMixing:
    """gates: [L, K] float (traced); sink, window: static ints (tokens)."""

    gates: jax.Array
    sink: int = flax.struct.field(pytree_node=False)
    window: int = flax.struct.field(pytree_node=False)

    name: ClassVar[str] = "gated_mixing"

    def __post_init__(self):
        # Only the static settings are checked here: jax rebuilds this object around tracers
        # (and other placeholders) when it flattens and unflattens it.
        check_streaming(self.sink, self.window)

    def observation_positions(self, lengths, t: int):
        return jnp.zeros((lengths.shape[0], 0), jnp.int32)

    def compress_layer(self, layer, cache, obs):
        gates = self.gates
        if gates.ndim != 2 or not 0 <= layer < gates.shape[0] or \
                gates.shape[1] != cache.k.shape[1]:
            raise ValueError(f"gates: shape {tuple(gates.shape)} does not fit layer {layer} with "
                             f"{cache.k.shape[1]} KV heads; expected [layers, kv_heads]")
        return GatedDenseCache.from_dense(cache, gates[layer], self.sink, self.window,
                                          extra_capacity=obs.extra_capacity)


__all__ = ["GatedMixing"]
