"""Statistics of evaluation records: Wilson intervals, the paired bootstrap, family averages."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

_Z95 = 1.959963984540054  # two-sided 95% standard normal quantile


def wilson_interval(k: float, n: int, z: float = _Z95) -> Tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default); (0, 1) when n = 0.
    k may be fractional (an averaged count)."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    # the interval contains p; rounding could leave it just outside (10 of 10 gave an upper end of
    # 0.9999999999999999, a negative error bar in a plot)
    return min(p, max(0.0, center - half)), max(p, min(1.0, center + half))


def paired_bootstrap(correct_a: Sequence[float], correct_b: Sequence[float], n_boot: int = 10000,
                     seed: int = 0, level: float = 0.95) -> Tuple[float, float, float]:
    """Mean of (a - b) over the same examples and its percentile bootstrap interval.

    Resamples examples with replacement (keeping each a/b pair together) `n_boot` times.
    Returns (mean_diff, lo, hi) for method A minus method B.
    """
    a = np.asarray(correct_a, np.float64).ravel()
    b = np.asarray(correct_b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: correct_a has {a.size} examples, correct_b has "
                         f"{b.size}; a paired comparison needs the same examples")
    if a.size == 0:
        raise ValueError("paired_bootstrap: no examples")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r}: must be a positive integer")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: must lie in (0, 1)")
    diff = a - b
    rng = np.random.default_rng(seed)
    n = diff.size
    means = np.empty(n_boot, np.float64)
    chunk = max(1, 4_000_000 // n)  # bound the index array to ~32 MB
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(diff.mean()), float(lo), float(hi)


def family_averages(records: Sequence[Mapping[str, Any]]) -> List[dict]:
    """Unweighted mean accuracy over the tasks of each family, per prompt length, method and
    budget.

    Returns [] unless the records span several tasks. `n` is the total number of examples and
    the interval is Wilson's for accuracy * n successes out of n (exact pooling when every task
    has the same n); measured_budget is bytes-weighted over the tasks.
    """
    if len({r["task"] for r in records}) < 2:
        return []
    groups: Dict[tuple, List[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r.get("family", "?"), r.get("length"), r["method"],
                           float(r["budget"])), []).append(r)
    out = []
    for (family, length, method, budget), rs in groups.items():
        acc = float(np.mean([r["accuracy"] for r in rs]))
        total = int(sum(r["n"] for r in rs))
        lo, hi = wilson_interval(acc * total, total)
        cache = sum(r.get("cache_bytes", 0) for r in rs)
        full = sum(r.get("full_cache_bytes", 0) for r in rs)
        out.append({"task": f"avg:{family}", "family": family, "length": length, "method": method,
                    "budget": budget, "measured_budget": cache / full if full else float("nan"),
                    "accuracy": acc, "n": total, "ci_low": lo, "ci_high": hi,
                    "tasks": [r["task"] for r in rs]})
    return out


__all__ = ["wilson_interval", "paired_bootstrap", "family_averages"]
