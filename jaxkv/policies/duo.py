"""DuoAttention (Xiao et al., 2024): the same head-split deployment as RLKV (gates [layers,
kv_heads], global quantile, full heads + sink/window streaming heads); only the gates differ,
trained by distillation on synthetic retrieval instead of RL (`python -m train duo`).
See docs/methods.md, RLKV and `jaxkv.policies.rlkv` for selection, budgets and gate files.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from jaxkv.policies.registry import register_method
from jaxkv.policies.rlkv import RLKV, policy_for_budget


@dataclasses.dataclass(frozen=True)
class DuoAttention(RLKV):
    """RLKV's deployment with distillation-trained gates (a gate file or array)."""

    name = "duo"


@register_method("duo")
def _duo(budget: float, model, gates=None, sink: int = 16, window: int = 64,
         prompt_len: Optional[int] = None, allow_other_model: bool = False):
    """DuoAttention at `budget`; `gates` is the path of a gate file written by `train duo`
    (or an array). Budget -> sparsity as for "rlkv"; a gate file recording another model's
    fingerprint is refused unless allow_other_model."""
    return policy_for_budget(DuoAttention, budget, model, gates, sink, window, prompt_len, "duo",
                             allow_other_model)


__all__ = ["DuoAttention"]
