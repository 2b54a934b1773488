"""StreamingLLM (Xiao et al., 2023): every head keeps `sink` first tokens + a `window` of recent
tokens (a ring buffer while decoding). Keys keep the RoPE of their original positions (no
re-positioning inside the cache), which is how DuoAttention / RLKV deploy their streaming heads.

Sizing by budget: the full cache holds T slots per sequence and head (T = prompt + generated
tokens, the capacity `generate` allocates); StreamingLLM holds sink + window. For a budget b
(fraction of the full cache's bytes):

    window = max(1, floor(b * T) - sink)

(floor: the cache never holds more than b of the bytes; the int32 token counts of both caches
cancel).

`StreamingLLM.for_budget(b, T, sink)` does this for a given average T. Without T
(`StreamingLLM(sink, budget=b)`) the window is computed at compression time from the real
capacity of the cache being compressed (padded prompt + decode room), which is exactly the T that
`generate` uses for `full_cache_bytes`, so the measured budget matches the requested one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax.numpy as jnp

from jaxkv.cache.streaming import SinkWindowCache
from jaxkv.checks import check_int
from jaxkv.policies.base import Policy, check_budget
from jaxkv.policies.registry import register_method


def window_for_budget(budget: float, prompt_len: int, sink: int, slot_bytes: int = 0) -> int:
    """Recent-window size so that sink + window = floor(budget * prompt_len) slots, or, given
    `slot_bytes` (K and V bytes of one slot over all heads of a sequence), the most slots whose
    bytes and int32 token count fit in budget x (prompt_len slots and an int32 length). A budget
    that cannot hold the sink and one recent token is a ValueError (the cache would exceed it)."""
    budget = check_budget(budget)
    check_int("prompt_len", prompt_len, 1)
    check_int("sink", sink, 0)
    if slot_bytes:
        slots = int(math.floor((budget * (prompt_len * slot_bytes + 4) - 4) / slot_bytes + 1e-9))
    else:
        slots = int(math.floor(budget * prompt_len + 1e-9))
    window = slots - sink
    if window < 1 and sink + 1 < prompt_len:
        raise ValueError(f"budget={budget}: {max(slots, 0)} of {prompt_len} cache "
                         f"slots cannot hold sink={sink} plus one recent token; StreamingLLM "
                         f"needs budget >= {(sink + 1) / prompt_len:.4g} here (or a smaller sink)")
    return max(1, window)


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Policy):
    """sink: attention-sink tokens kept per head (>= 0); window: recent tokens kept (>= 1).
    Give `budget` instead of `window` to size the window from the actual cache capacity."""

    sink: int = 4
    window: Optional[int] = None
    budget: Optional[float] = None

    name = "streaming"
    layer_invariant = True

    def __post_init__(self):
        check_int("sink", self.sink, 0)
        if self.window is None and self.budget is None:
            raise ValueError("window=None: give window (recent tokens kept, >= 1) or budget "
                             "(fraction of the full cache in (0, 1])")
        if self.window is not None and self.budget is not None:
            raise ValueError(f"window={self.window!r}, budget={self.budget!r}: give one of them, "
                             f"not both")
        if self.window is not None:
            check_int("window", self.window, 1)
        else:
            check_budget(self.budget)

    @classmethod
    def for_budget(cls, budget: float, prompt_len: int, sink: int = 4) -> "StreamingLLM":
        """The window that makes the cache `budget` of a full cache of `prompt_len` slots."""
        return cls(sink=sink, window=window_for_budget(budget, prompt_len, sink))

    def check_model(self, config) -> None:
        """Sizes must fit the model's context (max_position_embeddings)."""
        limit = config.max_position_embeddings
        for name in ("sink", "window"):
            value = getattr(self, name)
            if value is not None and value > limit:
                raise ValueError(f"{name}={value}: larger than the model's context "
                                 f"max_position_embeddings={limit}")

    def window_for_capacity(self, capacity: int, slot_bytes: int = 0) -> int:
        return self.window if self.window is not None else \
            window_for_budget(self.budget, capacity, self.sink, slot_bytes)

    def compress_layer(self, layer, cache, obs):
        b, kh, _, d = cache.k.shape
        slot_bytes = kh * 2 * d * jnp.dtype(cache.k.dtype).itemsize
        window = self.window_for_capacity(cache.capacity + obs.extra_capacity, slot_bytes)
        return SinkWindowCache.from_dense(cache, self.sink, window, obs.extra_capacity)


@register_method("streaming")
def _streaming(budget: float, model, sink: int = 4, prompt_len: Optional[int] = None):
    """StreamingLLM at `budget`: window = max(1, floor(budget * prompt_len) - sink).

    prompt_len: slots per sequence of the full cache (prompt + generated tokens); when omitted
    the window is sized at compression time from the real capacity (see module docstring)."""
    if prompt_len is None:
        policy = StreamingLLM(sink=sink, budget=budget)
    else:
        policy = StreamingLLM.for_budget(budget, prompt_len, sink)
    policy.check_model(model.config)
    return policy


__all__ = ["StreamingLLM", "window_for_budget"]
