"""RDKV's rate-distortion bit allocation (docs/methods.md, RDKV): reverse water-filling by one
Lagrangian solve per (layer, KV head).

Every item (a token for V, a channel for K) gets a bit width b from `choices` (0 evicts, 16 keeps
it whole). With a distortion weight w_i >= 0 per item and the calibrated table eps(b):

    minimise  sum_i w_i * eps(b_i)   subject to   sum_i cost(b_i) <= budget_bits

For a multiplier lam every item independently takes b_i(lam) = argmin_b w_i eps(b) + lam cost(b);
total cost falls as lam grows. lam is found by bisection: the upper bound starts at 1 and doubles
until the allocation fits (weights are first scaled to max 1 per head, which leaves the argmin
unchanged), then at most 64 bisection steps keep the invariant cost(lo) > budget >= cost(hi).
The bisection does not stop at the authors' 1% tolerance; it runs until the bracket cannot shrink
(adjacent float32 values), cost(hi) equals the budget, or 64 steps, so the result depends on the
budget monotonically (more budget never adds distortion; stopping anywhere inside a 1% window
would break that). The returned allocation is the one at
hi, so it never exceeds the budget, plus a fill step: the items whose choice differs between lo
and hi (those at the water level) are upgraded to their lo choice in order of distortion saved per
bit while the budget allows. That keeps every item's choice a minimiser of the Lagrangian at the
final lam, so the allocation is optimal for the cost it uses, and it leaves less than one item's
upgrade (at most cost(max bits) - cost(min bits)) of the budget unused; for budgets of a hundred
such upgrades or more that is within 1%. With eps(b) ~ c 4^-b this is reverse water-filling: items
under the water level get 0 bits. Lagrangian allocation is exactly optimal only at budgets on the
lower convex hull of the (cost, distortion) curve; between them a knapsack solver can do slightly
better (`exact_allocation` is one, for tests on small instances).

Cost model. Our budget counts everything the cache stores for an item, not only code bits (the
authors count only code bits): `BitCost(elements_per_item, overhead_bits_per_kept_item)` charges a
kept item b * elements_per_item code bits plus its overhead, and an evicted item nothing. E.g. a
V token of head dim 128 at b in {2, 4, 8}: 128 b code bits + 16 + 16 (fp16 scale and zero-point)
+ 32 (its int32 position) = BitCost(128, 64); kept whole at 16 bits it has no scale or zero-point:
`BitCost(128, 64, unquantized_overhead_bits=32)` charges 2048 + 32 there. Costs are integers and
totals are summed in int32, so one solve (one head) must stay under 2^31 bits (256 MiB).

Variants. `allocate_with_costs` takes a cost table per item ([..., N, C]) instead of one per
head: items whose costs differ share one budget and one multiplier, e.g. the tokens of every KV
head of a layer, each paying its own head's K row (RDKV's `water="layer"`: one water level
across the heads), or K channel pairs of several heads. `allocate_pair_bits` gives both channels
of a rotate-half RoPE pair (i, i + D/2: what `jaxkv.model.layers.apply_rope` rotates together,
`rope_pairs`) one width, a pair costing its codes over the kept tokens plus a float16 scale and
zero-point per channel and K group (`pair_costs`). `exact_allocation` (the knapsack DP) takes
per-item costs too, for the tests.

Shapes: weights [..., N] (leading dims, e.g. [L, K] layers and KV heads, solved independently),
budget_bits a scalar or [...] (one budget per head). Everything is jnp, float32 and int32, and
works under jit (with a traced budget, the checks that need its value are skipped).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache.quant import BIT_WIDTHS, CODE_BITS, check_bits
from jaxkv.checks import check_int

_INT32_MAX = 2 ** 31 - 1
_MAX_DOUBLINGS = 120   # 2^120 stays finite in float32 (max ~2^128)
_MAX_BISECTIONS = 64


@dataclasses.dataclass(frozen=True)
class BitCost:
    """Bits an item costs at bit width b: 0 at b = 0 (evicted); otherwise
    b * elements_per_item + overhead_bits_per_kept_item, except at b = 16, where
    `unquantized_overhead_bits` (default: the same overhead) replaces the overhead, because a
    token kept whole needs no scale or zero-point.

    elements_per_item: values one item holds (head dim D for a token, kept tokens for a channel).
    overhead_bits_per_kept_item: scale + zero-point + index bits, e.g. 2 * 16 + 32 = 64 for a
    quantised token with fp16 scale and zero-point and an int32 position.
    """

    elements_per_item: int
    overhead_bits_per_kept_item: int = 0
    unquantized_overhead_bits: Optional[int] = None

    def __post_init__(self):
        check_int("elements_per_item", self.elements_per_item, 1)
        check_int("overhead_bits_per_kept_item", self.overhead_bits_per_kept_item, 0)
        if self.unquantized_overhead_bits is not None:
            check_int("unquantized_overhead_bits", self.unquantized_overhead_bits, 0)

    def __call__(self, bits: int) -> int:
        bits = check_bits(bits)
        if bits == 0:
            return 0
        overhead = self.overhead_bits_per_kept_item
        if bits == 16 and self.unquantized_overhead_bits is not None:
            overhead = self.unquantized_overhead_bits
        return bits * self.elements_per_item + overhead


class Allocation(NamedTuple):
    """bits: int32 [..., N] chosen widths; cost: int32 [...] total bits used (<= budget);
    distortion: float32 [...] sum_i w_i eps(b_i); lam: float32 [...] the Lagrange multiplier
    (in the units of the given weights; the upper end of the final bisection bracket)."""
    bits: jax.Array
    cost: jax.Array
    distortion: jax.Array
    lam: jax.Array


# ---- argument checks -----------------------------------------------------------------------------
def _check_choices(choices) -> Tuple[int, ...]:
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or not choices:
        raise ValueError(f"choices={choices!r}: must be a non-empty sequence of bit widths from "
                         f"{{0, 2, 4, 8, 16}}")
    out = tuple(check_bits(b, name="choices bits") for b in choices)
    if len(set(out)) != len(out):
        raise ValueError(f"choices={choices!r}: bit widths must not repeat")
    return tuple(sorted(out))


def _eps_vector(eps, choices: Tuple[int, ...], name: str = "eps") -> np.ndarray:
    """eps(b) for each choice (float64 [C]); eps(0) = 1 and eps(16) = 0 unless given."""
    if not isinstance(eps, Mapping):
        raise ValueError(f"{name}={eps!r}: must be a mapping {{bits: normalised MSE}}, e.g. "
                         f"calibrate_eps(...)['v']")
    table = {}
    for b, e in eps.items():
        b = check_bits(int(b) if isinstance(b, str) and b.isdigit() else b, name=f"{name} bits")
        if isinstance(e, (bool, np.bool_)) or not isinstance(e, (int, float, np.floating,
                                                                  np.integer)) \
                or not math.isfinite(float(e)) or e < 0:
            raise ValueError(f"{name}[{b}]={e!r}: must be a finite number >= 0")
        table[b] = float(e)
    table.setdefault(0, 1.0)
    table.setdefault(16, 0.0)
    missing = [b for b in choices if b not in table]
    if missing:
        raise ValueError(f"{name}: no entry for bits={missing[0]} (choices={choices}; "
                         f"{name} has bits {sorted(table)})")
    return np.array([table[b] for b in choices], np.float64)


def _cost_vector(cost_fn, choices: Tuple[int, ...]) -> np.ndarray:
    """Integer cost of each choice (int64 [C]), checked nonnegative and nondecreasing in bits."""
    if cost_fn is None:
        cost_fn = BitCost(1)
    if not callable(cost_fn):
        raise ValueError(f"cost_fn={cost_fn!r}: must be a BitCost or a callable bits -> int bits")
    costs = []
    for b in choices:
        c = cost_fn(b)
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ValueError(f"cost_fn({b})={c!r}: must be an integer number of bits >= 0")
        costs.append(int(c))
    for (b0, c0), (b1, c1) in zip(zip(choices, costs), zip(choices[1:], costs[1:])):
        if c1 < c0:
            raise ValueError(f"cost_fn: cost({b1})={c1} < cost({b0})={c0}; more bits must not "
                             f"cost less")
    return np.array(costs, np.int64)


def _concrete(x) -> Optional[np.ndarray]:
    """x as a numpy array, or None under jit (a tracer)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_weights(weights, name: str = "weights") -> jax.Array:
    if isinstance(weights, jax.core.Tracer):
        w = weights
    else:
        w = jnp.asarray(weights)
    if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)):
        raise ValueError(f"{name}.dtype={w.dtype}: must be a real number dtype")
    if w.ndim < 1 or w.shape[-1] < 1:
        raise ValueError(f"{name}.shape={tuple(w.shape)}: must be [..., N] with N >= 1 items")
    w = w.astype(jnp.float32)
    if not isinstance(w, jax.core.Tracer):
        if not bool(jnp.all(jnp.isfinite(w))):
            raise ValueError(f"{name}: must be finite (found NaN or inf)")
        if bool(jnp.any(w < 0)):
            raise ValueError(f"{name}: must be >= 0 (distortion weights), found min "
                             f"{float(jnp.min(w))!r}")
    return w


def _check_budget(budget_bits, lead_shape, min_total=None) -> jax.Array:
    """budget as int32 [...] (floored; a cost <= budget iff <= floor(budget))."""
    b = None if isinstance(budget_bits, jax.core.Tracer) else _concrete(budget_bits)
    if b is None:   # traced: floor and clip, no checks
        budget = jnp.clip(jnp.floor(jnp.asarray(budget_bits, jnp.float32)), 0, _INT32_MAX)
        budget = budget.astype(jnp.int32)
    else:
        if b.dtype == bool or not (np.issubdtype(b.dtype, np.floating)
                                   or np.issubdtype(b.dtype, np.integer)):
            raise ValueError(f"budget_bits={budget_bits!r}: must be a number of bits >= 0")
        bf = b.astype(np.float64)
        if np.any(np.isnan(bf)) or np.any(bf < 0):
            raise ValueError(f"budget_bits={budget_bits!r}: must be a number of bits >= 0")
        if min_total is not None and np.any(bf < min_total):
            raise ValueError(f"budget_bits={budget_bits!r}: below the cheapest allocation "
                             f"({min_total} bits: every item at its cheapest choice); raise the "
                             f"budget or allow 0 bits in choices")
        budget = jnp.asarray(np.minimum(np.floor(bf), _INT32_MAX).astype(np.int32))
    try:
        return jnp.broadcast_to(budget, lead_shape)
    except ValueError:
        raise ValueError(f"budget_bits.shape={tuple(jnp.shape(budget_bits))}: must be a scalar or "
                         f"broadcast to the leading dims {tuple(lead_shape)} of weights") from None


# ---- the solver ----------------------------------------------------------------------------------
@jax.jit
def _solve(w, eps_vec, bits_tab, cost_tab, budget) -> Allocation:
    """w [..., N] float32 >= 0; eps_vec [C] float32; bits_tab [C] int32 ascending; cost_tab
    [..., N, C] int32, or [..., C] for every item alike (nondecreasing along C); budget [...]
    int32."""
    lead = w.shape[:-1]
    n = w.shape[-1]
    if cost_tab.ndim == len(lead) + 1:  # one cost table for every item of a head
        cost_tab = cost_tab[..., None, :]
    cost_tab = jnp.broadcast_to(cost_tab, lead + (n, cost_tab.shape[-1]))  # [..., N, C]
    wmax = jnp.max(w, axis=-1)                                            # [...]
    wn = w / jnp.where(wmax > 0, wmax, 1.0)[..., None]                    # [..., N], max 1
    cost_f = cost_tab.astype(jnp.float32)

    def item_cost(idx):  # idx [..., N] -> int32 [..., N]
        return jnp.take_along_axis(cost_tab, idx[..., None], axis=-1)[..., 0]

    def choose(lam):  # lam [...] -> choice index [..., N], total cost [...]
        obj = wn[..., :, None] * eps_vec + lam[..., None, None] * cost_f
        # obj: [..., N, C]
        idx = jnp.argmin(obj, axis=-1)             # ties: the fewest bits (costs ascend along C)
        return idx, jnp.sum(item_cost(idx), axis=-1)

    # The allocations themselves (not only lam) travel through the loops: recomputing the argmin
    # for the same lam elsewhere may round a near-tie differently (fused multiply-adds), and the
    # returned allocation must be the one whose cost was checked.
    zero = jnp.zeros(lead, jnp.float32)
    idx0, cost0 = choose(zero)
    done0 = cost0 <= budget                       # best allocation (lam = 0) already fits

    # Upper bound: double until it fits (or stops growing: infeasible budget).
    def expand_cond(state):
        hi, idx_hi, c_hi, k = state
        return (k < _MAX_DOUBLINGS) & jnp.any(~done0 & (c_hi > budget))

    def expand_body(state):
        hi, idx_hi, c_hi, k = state
        grow = ~done0 & (c_hi > budget)
        hi = jnp.where(grow, hi * 2.0, hi)
        idx_new, c_new = choose(hi)
        return (hi, jnp.where(grow[..., None], idx_new, idx_hi), jnp.where(grow, c_new, c_hi),
                k + 1)

    hi = jnp.ones(lead, jnp.float32)
    idx_hi, c_hi = choose(hi)
    hi, idx_hi, c_hi, _ = jax.lax.while_loop(expand_cond, expand_body,
                                             (hi, idx_hi, c_hi, jnp.int32(0)))
    feasible = c_hi <= budget

    # Bisection with cost(lo) > budget >= cost(hi).
    def active(lo, hi, c_hi):
        mid = 0.5 * (lo + hi)
        return ~done0 & feasible & (c_hi != budget) & (mid > lo) & (mid < hi)

    def bisect_cond(state):
        lo, idx_lo, hi, idx_hi, c_hi, k = state
        return (k < _MAX_BISECTIONS) & jnp.any(active(lo, hi, c_hi))

    def bisect_body(state):
        lo, idx_lo, hi, idx_hi, c_hi, k = state
        act = active(lo, hi, c_hi)
        mid = 0.5 * (lo + hi)
        idx_mid, c_mid = choose(mid)
        up, down = act & (c_mid <= budget), act & (c_mid > budget)
        return (jnp.where(down, mid, lo), jnp.where(down[..., None], idx_mid, idx_lo),
                jnp.where(up, mid, hi), jnp.where(up[..., None], idx_mid, idx_hi),
                jnp.where(up, c_mid, c_hi), k + 1)

    lo, idx_lo, hi, idx_hi, c_hi, _ = jax.lax.while_loop(
        bisect_cond, bisect_body, (zero, idx0, hi, idx_hi, c_hi, jnp.int32(0)))
    hi = jnp.where(done0, 0.0, hi)
    idx_hi = jnp.where(done0[..., None], idx0, idx_hi)
    c_hi = jnp.where(done0, cost0, c_hi)
    idx_lo = jnp.where((done0 | ~feasible)[..., None], idx_hi, idx_lo)   # nothing to fill from

    # Fill: upgrade items at the water level (choice differs between lo and hi), most distortion
    # saved per bit first, while the running total fits.
    item_cost_hi = item_cost(idx_hi)                                      # [..., N]
    item_cost_lo = item_cost(idx_lo)
    dc = item_cost_lo - item_cost_hi                                      # [..., N] (>= 0)
    dd = wn * (eps_vec[idx_hi] - eps_vec[idx_lo])                         # [..., N]
    cand = (dc > 0) & (dd > 0)
    prio = jnp.where(cand, dd / jnp.maximum(dc, 1).astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-prio, axis=-1, stable=True)                      # [..., N]
    dc_sorted = jnp.take_along_axis(jnp.where(cand, dc, 0), order, axis=-1)
    cum = jnp.cumsum(dc_sorted, axis=-1)                                  # [..., N] int32
    take_sorted = (cum <= (budget - c_hi)[..., None]) & jnp.take_along_axis(cand, order, axis=-1)
    upgrade = jnp.take_along_axis(take_sorted, jnp.argsort(order, axis=-1), axis=-1)
    idx = jnp.where(upgrade & feasible[..., None], idx_lo, idx_hi)        # [..., N]

    bits = bits_tab[idx]                                                  # [..., N] int32
    cost = jnp.sum(item_cost(idx), axis=-1)                               # [...]
    distortion = jnp.sum(w * eps_vec[idx], axis=-1)                       # [...]
    return Allocation(bits, cost, distortion, hi * wmax)


def allocate_bits(weights, eps: Mapping[int, float], budget_bits,
                  choices: Sequence[int] = BIT_WIDTHS,
                  cost_fn: Union[BitCost, Callable[[int], int], None] = None) -> Allocation:
    """Bit width per item minimising sum w_i eps(b_i) with total cost <= budget_bits.

    weights: [..., N] distortion weights >= 0 (per token or per channel); each leading index (e.g.
        layer, KV head) is solved on its own.
    eps: {bits: normalised MSE}, e.g. `calibrate_eps(...)['v']`; eps(0) = 1 and eps(16) = 0 unless
        given.
    budget_bits: total bits per head, a scalar or [...]; floored to an integer. It counts what
        `cost_fn` counts: with `BitCost`, code bits plus scales, zero-points and indices (the
        authors' budget counts only code bits).
    choices: the bit widths allowed, from {0, 2, 4, 8, 16}. Without 0, the budget must cover
        every item at its cheapest width.
    cost_fn: bits -> integer bits per item, nondecreasing in bits; a `BitCost` or any callable.
        Default `BitCost(1)`: cost(b) = b (the authors' code-bits-only model).

    Returns an `Allocation` (bits, cost, distortion, lam). The cost never exceeds the budget (under
    jit with an infeasible budget, the cheapest allocation is returned and its cost exceeds it).
    """
    choices = _check_choices(choices)
    eps_vec = _eps_vector(eps, choices)
    costs = _cost_vector(cost_fn, choices)
    w = _check_weights(weights)
    n = w.shape[-1]
    if n * int(costs[-1]) > _INT32_MAX:
        raise ValueError(f"weights.shape[-1]={n}: {n} items at up to {int(costs[-1])} bits each "
                         f"overflow int32 totals (2^31 - 1 bits per head); split the solve")
    budget = _check_budget(budget_bits, w.shape[:-1], min_total=n * int(costs[0]))
    return _solve(w, jnp.asarray(eps_vec, jnp.float32), jnp.asarray(choices, jnp.int32),
                  jnp.asarray(costs, jnp.int32), budget)


def allocate_channel_bits(u, eps_k: Mapping[int, float], budget_bits, max_bits: int = 8, *,
                          kept_tokens, overhead_bits_per_channel: int = 32) -> Allocation:
    """Second stage: bit width per K channel for the tokens kept by the first stage.

    u: [..., D] channel weights >= 0 (mean_q q_c^2 * mean_t k_c^2); eps_k: the K table
    (per-channel calibration); budget_bits: K bits per head (scalar or [...]); max_bits: the cap,
    from {2, 4, 8, 16} (K is capped at 8 bits in RDKV); choices are 0 (channel pruned) up to
    max_bits. A channel at b in {2, 4, 8} over `kept_tokens` tokens costs
    b * kept_tokens + overhead_bits_per_channel (default 32: its fp16 scale and zero-point; add
    index bits if the layout stores channel positions); at 16 bits it costs 16 * kept_tokens.
    kept_tokens: an int or int array [...] (one per head; may be traced under jit).
    """
    max_bits = check_bits(max_bits, (2, 4, 8, 16), name="max_bits")
    choices = tuple(b for b in BIT_WIDTHS if b <= max_bits)
    eps_vec = _eps_vector(eps_k, choices, name="eps_k")
    overhead = check_int("overhead_bits_per_channel", overhead_bits_per_channel, 0)
    w = _check_weights(u, name="u")
    lead = w.shape[:-1]
    bits_tab = np.array(choices, np.int64)
    over_tab = np.where(np.isin(bits_tab, CODE_BITS), overhead, 0)                       # [C]
    kt = None if isinstance(kept_tokens, jax.core.Tracer) else _concrete(kept_tokens)
    if kt is None:
        kept = jnp.asarray(kept_tokens).astype(jnp.int32)
    else:
        if kt.dtype == bool or not np.issubdtype(kt.dtype, np.integer) or np.any(kt < 0):
            raise ValueError(f"kept_tokens={kept_tokens!r}: must be an integer (or integer array "
                             f"[...]) >= 0")
        if w.shape[-1] * (max_bits * int(np.max(kt, initial=0)) + overhead) > _INT32_MAX:
            raise ValueError(f"kept_tokens={kept_tokens!r}: K costs overflow int32 totals "
                             f"(2^31 - 1 bits per head)")
        kept = jnp.asarray(kt.astype(np.int32))
    try:
        kept = jnp.broadcast_to(kept, lead)
    except ValueError:
        raise ValueError(f"kept_tokens.shape={tuple(jnp.shape(kept_tokens))}: must be a scalar "
                         f"or broadcast to the leading dims {tuple(lead)} of u") from None
    cost_tab = kept[..., None] * jnp.asarray(bits_tab, jnp.int32) \
        + jnp.asarray(over_tab, jnp.int32)                                               # [..., C]
    budget = _check_budget(budget_bits, lead)
    return _solve(w, jnp.asarray(eps_vec, jnp.float32), jnp.asarray(choices, jnp.int32), cost_tab,
                  budget)


def allocate_with_costs(weights, eps: Mapping[int, float], budget_bits, costs,
                        choices: Sequence[int] = BIT_WIDTHS) -> Allocation:
    """The Lagrangian allocation with a cost table per item: costs int [..., N, C] (bits of item
    n at choices[c]; nondecreasing along C), e.g. items of several heads that share one budget
    (one water level across the heads of a layer: weights [..., K * T]) or K channel pairs whose
    costs depend on their head's kept tokens. May be traced; checked when concrete. Otherwise as
    `allocate_bits`."""
    choices = _check_choices(choices)
    eps_vec = _eps_vector(eps, choices)
    w = _check_weights(weights)
    if isinstance(costs, jax.core.Tracer):
        tab = costs.astype(jnp.int32)
    else:
        c = np.asarray(costs)
        if c.dtype == bool or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"costs.dtype={c.dtype}: must be integer bits")
        if np.any(c < 0) or np.any(np.diff(c, axis=-1) < 0):
            raise ValueError("costs: must be >= 0 and nondecreasing in bits along the last axis")
        if c.size and int(c.max(-1).sum(-1).max()) > _INT32_MAX:
            raise ValueError("costs: totals overflow int32 (2^31 - 1 bits per solve)")
        tab = jnp.asarray(c.astype(np.int32))
    try:
        if tab.shape[-1] != len(choices) or tab.ndim != w.ndim + 1:
            raise ValueError
        tab = jnp.broadcast_to(tab, w.shape + (len(choices),))
    except (ValueError, TypeError):
        raise ValueError(f"costs.shape={tuple(tab.shape)}: must be [..., N, C] with [..., N] = "
                         f"weights.shape={tuple(w.shape)} and C={len(choices)} choices") from None
    budget = _check_budget(budget_bits, w.shape[:-1])
    return _solve(w, jnp.asarray(eps_vec, jnp.float32), jnp.asarray(choices, jnp.int32), tab,
                  budget)


def rope_pairs(x, axis: int = -1):
    """Sum of the two channels of each rotate-half RoPE pair (i, i + D/2): [..., D] -> [..., D/2].
    jaxkv.model.layers.apply_rope rotates x[i] with x[i + D/2] (the Hugging Face convention), so
    a rotation moves a key's energy between exactly these two channels."""
    x = jnp.moveaxis(jnp.asarray(x), axis, -1)
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"head_dim={d}: RoPE pairs need an even number of channels")
    return jnp.moveaxis(x[..., :d // 2] + x[..., d // 2:], -1, axis)


def pair_costs(kept_tokens, groups, max_bits: int = 8, header_bits: int = 32):
    """int32 [..., C] bits of one RoPE channel pair at each K width of (0, 2, 4, ...max_bits):
    2 * (b * kept_tokens + header_bits * groups) for b > 0 (both channels' codes over the kept
    tokens, and each channel's float16 scale and zero-point per K group), 0 when pruned."""
    choices = tuple(b for b in BIT_WIDTHS if b <= max_bits)
    kept = jnp.asarray(kept_tokens).astype(jnp.int32)[..., None]
    grp = jnp.asarray(groups).astype(jnp.int32)[..., None]
    bits = jnp.asarray(choices, jnp.int32)
    return jnp.where(bits > 0, 2 * (bits * kept + header_bits * grp), 0)


def allocate_pair_bits(u, eps_k: Mapping[int, float], budget_bits, *, kept_tokens, groups,
                       max_bits: int = 8, header_bits: int = 32) -> Allocation:
    """K widths per RoPE channel pair: both channels of a pair (i, i + D/2) get one width from
    (0, 2, ... max_bits) (0 prunes both), minimising sum_c u_c eps_k(b_c) under budget_bits per
    head; a pair costs `pair_costs(kept_tokens, groups)`. u: [..., D] channel weights;
    kept_tokens, groups: [...] (may be traced). Returns an Allocation whose bits are per channel
    [..., D] (the pair's width on both)."""
    max_bits = check_bits(max_bits, (2, 4, 8, 16), name="max_bits")
    choices = tuple(b for b in BIT_WIDTHS if b <= max_bits)
    w = _check_weights(u, name="u")
    up = rope_pairs(w)  # [..., D/2]
    tab = pair_costs(kept_tokens, groups, max_bits, header_bits)  # [..., C]
    budget = _check_budget(budget_bits, w.shape[:-1])
    a = _solve(up, jnp.asarray(_eps_vector(eps_k, choices, name="eps_k"), jnp.float32),
               jnp.asarray(choices, jnp.int32), tab, budget)
    return a._replace(bits=jnp.concatenate([a.bits, a.bits], axis=-1))


# ---- exact optimum (small instances, tests) ------------------------------------------------------
def exact_allocation(weights, eps: Mapping[int, float], budget_bits,
                     cost_fn: Union[BitCost, Callable[[int], int], None] = None,
                     choices: Sequence[int] = BIT_WIDTHS,
                     item_costs=None) -> Tuple[np.ndarray, float]:
    """The optimum of the same problem for one head, by dynamic programming over items with
    integer costs (numpy, float64): O(N * C * budget) time, for small instances and tests.

    weights: [N] >= 0; item_costs: optional int [N, C], a cost table per item (replaces cost_fn,
    as `allocate_with_costs`). Returns (bits int32 [N], distortion). Ties go to fewer bits.
    """
    choices = _check_choices(choices)
    eps_vec = _eps_vector(eps, choices)
    costs = _cost_vector(cost_fn, choices)
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or w.shape[0] < 1:
        raise ValueError(f"weights.shape={w.shape}: exact_allocation solves one head, [N], N >= 1")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights: must be finite and >= 0, found min {w.min()!r}")
    b = float(np.asarray(budget_bits))
    if math.isnan(b) or b < 0:
        raise ValueError(f"budget_bits={budget_bits!r}: must be a number of bits >= 0")
    n = w.shape[0]
    table = np.broadcast_to(costs, (n, len(choices))) if item_costs is None \
        else np.asarray(item_costs, np.int64)
    if table.shape != (n, len(choices)):
        raise ValueError(f"item_costs.shape={table.shape}: must be ({n}, {len(choices)})")
    if b < table[:, 0].sum():
        raise ValueError(f"budget_bits={budget_bits!r}: below the cheapest allocation "
                         f"({int(table[:, 0].sum())} bits)")
    cap = int(min(math.floor(b), int(table[:, -1].sum())))
    # best[c]: least distortion of the items so far with total cost <= c.
    best = np.zeros(cap + 1)
    picks = np.zeros((n, cap + 1), np.int64)
    for i in range(n):
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, np.int64)
        for j in range(len(choices)):
            c = int(table[i, j])
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = best[:cap + 1 - c] + w[i] * eps_vec[j]
            better = cand < new
            new = np.where(better, cand, new)
            arg = np.where(better, j, arg)
        best, picks[i] = new, arg
    idx = np.zeros(n, np.int64)
    c = cap
    for i in range(n - 1, -1, -1):
        idx[i] = picks[i, c]
        c -= int(table[i, idx[i]])
    bits = np.asarray(choices, np.int32)[idx]
    return bits, float(np.sum(w * eps_vec[idx]))
