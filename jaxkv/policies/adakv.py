"""Head-wise budgets and value-aware re-scoring on top of SnapKV scores.

* AdaKV (Feng et al. 2024): one top-k over all KV heads of a layer (the layer keeps
  K * budget * T tokens, split among heads by score), with a safeguard giving every head its
  window and at least `safeguard` (0.2) of the mean per-head budget beyond the window.
* CriticalKV (Feng et al. 2025): keep the window and half the budget beyond it by score alone,
  then rank the rest by
  score * ||W_o v||_1 (a value's effect on the layer output). `adaptive=True` is Critical-AdaKV
  (both stages head-wise, as AdaKV); `adaptive=False` is CriticalKV with SnapKV's uniform budgets.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxkv.policies.registry import register_method
from jaxkv.policies.snapkv import (
    FORCED,
    SnapKV,
    per_row_keep,
    select_headwise,
    select_per_head,
    snap_settings,
    span_scores,
    value_norms,
)


def _check_fraction(name: str, value, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok or (low_open and value == 0.0):
        raise ValueError(f"{name}={value!r}: must be a number in {'(0' if low_open else '[0'}, 1]")
    return float(value)


@dataclasses.dataclass(frozen=True)
class AdaKV(SnapKV):
    """SnapKV scores with head-wise budgets (see module docstring)."""

    safeguard: float = 0.2

    name = "adakv"

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("safeguard", self.safeguard)

    def select(self, layer, scores, n_keep, n_max, cache, obs):
        return select_headwise(scores, n_keep, n_max, self.safeguard, self.window)


@dataclasses.dataclass(frozen=True)
class CriticalKV(AdaKV):
    """Two-stage selection (see module docstring). adaptive: head-wise budgets (Critical-AdaKV)."""

    adaptive: bool = True
    first_stage: float = 0.5  # fraction of the budget chosen by score alone

    name = "criticalkv"

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("first_stage", self.first_stage)

    def _select(self, scores, n_keep, n_max):
        if self.adaptive:
            return select_headwise(scores, n_keep, n_max, self.safeguard, self.window)
        return select_per_head(scores, n_keep, n_max)

    def select(self, layer, scores, n_keep, n_max, cache, obs):
        # stage 1: the window and half the budget beyond it by the attention score alone (the
        # authors' first stage splits the budget without the window, as AdaKV's floor does)
        beyond = jnp.maximum(n_keep - self.window, 0).astype(jnp.float32)
        n1 = jnp.minimum(self.window + jnp.floor(self.first_stage * beyond + 1e-6).astype(jnp.int32),
                         n_keep)
        first = self._select(scores, n1, n_max)
        # stage 2: the rest by score * ||W_o v||_1, stage-1 tokens forced in
        critical = span_scores(jnp.clip(scores, 0.0, 1.0) * value_norms(cache, obs), self.span)
        top = critical.max(axis=(1, 2), keepdims=True)
        rescored = critical / jnp.maximum(top, 1e-30)
        rescored = jnp.where(first, FORCED + rescored, jnp.where(scores < 0, scores, rescored))
        return self._select(rescored, n_keep, n_max)


@register_method("adakv")
def _adakv(budget: float, model, window: int = 32, kernel: int = 5, safeguard: float = 0.2,
           span: int = 1):
    """AdaKV: SnapKV scores, one top-k over the heads of a layer, safeguard 0.2."""
    return AdaKV(budget=budget, safeguard=safeguard, **snap_settings(model, window, kernel, span))


@register_method("criticalkv")
def _criticalkv(budget: float, model, window: int = 32, kernel: int = 5, span: int = 1):
    """CriticalKV with SnapKV's uniform per-head budgets."""
    return CriticalKV(budget=budget, adaptive=False, **snap_settings(model, window, kernel, span))


@register_method("critical_adakv")
def _critical_adakv(budget: float, model, window: int = 32, kernel: int = 5,
                    safeguard: float = 0.2, span: int = 1):
    """Critical-AdaKV: value-norm re-scoring with head-wise budgets (GRKV's retention)."""
    return CriticalKV(budget=budget, adaptive=True, safeguard=safeguard,
                      **snap_settings(model, window, kernel, span))


__all__ = ["AdaKV", "CriticalKV", "per_row_keep"]
