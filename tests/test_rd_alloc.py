"""jaxkv.policies.rd_alloc: RDKV's Lagrangian bit allocation, checked against an exact knapsack
DP: per token, per K channel, per RoPE channel pair, and with one water level across heads (a cost
table per item)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxkv.policies.rd_alloc import (BitCost, allocate_bits, allocate_channel_bits,
                                     allocate_pair_bits, allocate_with_costs, exact_allocation,
                                     pair_costs, rope_pairs)

SETTINGS = settings(max_examples=40, deadline=None)
CHOICES = (0, 2, 4, 8, 16)
EPS_V = {2: 0.313, 4: 0.0140, 8: 4.9e-5}  # Llama-3.1-8B V (docs/methods.md); eps(0)=1, eps(16)=0
EPS_K = {2: 0.149, 4: 0.0062, 8: 2.2e-5}
TOKEN_COST = BitCost(16, 64, unquantized_overhead_bits=32)  # D=16: 16b + scale/zp 32 + index 32


def _weights(rng, shape, zero_frac=0.1):
    """Attention-like weights: heavy-tailed, a random overall scale, some exact zeros."""
    w = rng.lognormal(0.0, 2.0, size=shape) * 10.0 ** rng.uniform(-6, 2)
    return np.where(rng.random(shape) < zero_frac, 0.0, w).astype(np.float32)


def _np_cost(bits, cost):
    return sum(cost(int(b)) for b in np.asarray(bits).ravel())


def _np_distortion(w, bits, eps):
    table = {0: 1.0, 16: 0.0, **eps}
    return float(sum(float(wi) * table[int(b)] for wi, b in zip(np.asarray(w, np.float64), bits)))


def _unconstrained_cost(w, eps, cost, choices=CHOICES):
    """Cost of the best allocation with no budget (lam = 0; ties to fewer bits), per item sum."""
    table = {0: 1.0, 16: 0.0, **eps}
    e = np.array([table[b] for b in choices], np.float32)
    idx = np.argmin(np.asarray(w, np.float32)[..., None] * e, axis=-1)
    return np.vectorize(lambda j: cost(choices[j]))(idx).sum(-1)


# ---- the cost model ------------------------------------------------------------------------------
def test_bit_cost_hand_worked():
    v = BitCost(128, 64, unquantized_overhead_bits=32)   # D=128 token: fp16 scale+zp, int32 index
    assert [v(b) for b in CHOICES] == [0, 2 * 128 + 64, 4 * 128 + 64, 8 * 128 + 64, 16 * 128 + 32]
    assert [BitCost(1)(b) for b in CHOICES] == list(CHOICES)   # the authors' code-bits-only model
    assert BitCost(4, 8)(16) == 72


def test_two_items_by_hand():
    # choices 0 or 2 bits at cost 2 each; eps(2) = 0.25. Budget 2 buys one item: the heavier
    # (saves 1 * 0.75 vs 0.5 * 0.75): distortion 1 * 0.25 + 0.5 * 1 = 0.75. Budget 3 cannot buy
    # the second; budget 4 buys both: 0.25 + 0.125 = 0.375.
    w = np.array([1.0, 0.5], np.float32)
    for budget, bits, dist in [(0, [0, 0], 1.5), (2, [2, 0], 0.75), (3, [2, 0], 0.75),
                               (4, [2, 2], 0.375), (100, [2, 2], 0.375)]:
        a = allocate_bits(w, {2: 0.25}, budget, choices=(0, 2))
        np.testing.assert_array_equal(a.bits, bits)
        assert int(a.cost) == sum(bits) and float(a.distortion) == pytest.approx(dist)


def test_water_filling_shape():
    # eps(b) = 4^-b: tokens far under the water level get 0 bits, bits rise with the weight.
    eps = {2: 4.0 ** -2, 4: 4.0 ** -4, 8: 4.0 ** -8}
    w = np.array([1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4], np.float32)
    a = allocate_bits(w, eps, 30, choices=(0, 2, 4, 8))
    bits = np.asarray(a.bits)
    assert bits[0] == 0 and np.all(np.diff(bits) >= 0) and bits[-1] == 8, bits
    assert int(a.cost) <= 30


# ---- budget ------------------------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 1), frac=st.floats(0.0, 1.2))
def test_budget_met_never_exceeded(seed, frac):
    rng = np.random.default_rng(seed)
    w = _weights(rng, (2, 3, 256))                                    # [L, K, N]
    full = _unconstrained_cost(w, EPS_V, TOKEN_COST)                   # [L, K]
    budget = np.floor(full * frac * rng.uniform(0.5, 1.0, size=full.shape))
    a = allocate_bits(w, EPS_V, budget, cost_fn=TOKEN_COST)
    cost = np.asarray(a.cost)
    for idx in np.ndindex(cost.shape):
        assert cost[idx] == _np_cost(np.asarray(a.bits)[idx], TOKEN_COST)
    assert np.all(cost <= budget)
    # Short of the unconstrained optimum, less than one item's upgrade is left unused...
    step = TOKEN_COST(16) - TOKEN_COST(0)
    assert np.all((budget - cost < step) | (cost == full)), (budget, cost, full)
    # ... so a budget of 100 such upgrades or more is met within 1%.
    big = budget >= 100 * step
    assert np.all(cost[big] >= 0.99 * np.minimum(budget, full)[big])
    # Distortion matches the returned bits; heavier tokens never get fewer bits.
    for idx in np.ndindex(cost.shape):
        bits = np.asarray(a.bits)[idx]
        assert float(a.distortion[idx]) == pytest.approx(_np_distortion(w[idx], bits, EPS_V),
                                                         rel=1e-5, abs=1e-30)
        wi = w[idx]
        assert not np.any((wi[:, None] > wi[None, :]) & (bits[:, None] < bits[None, :]))


def test_leading_dims_solved_independently():
    rng = np.random.default_rng(1)
    w = _weights(rng, (2, 3, 256))
    budget = rng.uniform(1e3, 5e4, size=(2, 3))
    a = allocate_bits(w, EPS_V, budget, cost_fn=TOKEN_COST)
    for idx in np.ndindex(2, 3):
        one = allocate_bits(w[idx], EPS_V, budget[idx], cost_fn=TOKEN_COST)
        np.testing.assert_array_equal(a.bits[idx], one.bits)
        assert int(a.cost[idx]) == int(one.cost)
    # A scalar budget is shared by every head.
    s = allocate_bits(w, EPS_V, 20000.0, cost_fn=TOKEN_COST)
    assert s.bits.shape == (2, 3, 256) and np.all(np.asarray(s.cost) <= 20000)


def test_under_jit_with_traced_budget():
    rng = np.random.default_rng(2)
    w = _weights(rng, (2, 3, 256))
    budget = np.array([[5e3, 1e4, 2e4], [3e4, 4e4, 6e4]], np.float32)
    f = jax.jit(lambda w, b: allocate_bits(w, EPS_V, b, cost_fn=TOKEN_COST))
    a, b = f(w, budget), allocate_bits(w, EPS_V, budget, cost_fn=TOKEN_COST)
    np.testing.assert_array_equal(a.bits, b.bits)
    assert a.bits.dtype == jnp.int32 and a.distortion.dtype == jnp.float32


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), n=st.sampled_from([8, 256]))
def test_more_budget_never_more_distortion(seed, n):
    rng = np.random.default_rng(seed)
    w = np.broadcast_to(_weights(rng, (n,)), (16, n))                 # one head, 16 budgets
    full = int(_unconstrained_cost(w[0], EPS_V, TOKEN_COST))
    budget = np.sort(rng.uniform(0, 1.1 * full + 1, size=16))
    a = allocate_bits(w, EPS_V, budget, cost_fn=TOKEN_COST)
    d = np.asarray(a.distortion, np.float64)
    assert np.all(np.diff(d) <= 1e-6 * d[:-1] + 1e-30), d
    assert np.all(np.diff(np.asarray(a.cost)) >= 0)


# ---- optimality against the exact DP -------------------------------------------------------------
def _brute_force(w, eps, budget, cost, choices=CHOICES):
    table = {0: 1.0, 16: 0.0, **eps}
    best = np.inf
    for bits in itertools.product(choices, repeat=len(w)):
        if sum(cost(b) for b in bits) <= budget:
            best = min(best, sum(float(wi) * table[b] for wi, b in zip(w, bits)))
    return best


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_exact_allocation_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5))
    w = _weights(rng, (n,), zero_frac=0.2).astype(np.float64)
    cost = BitCost(int(rng.integers(1, 4)), int(rng.integers(0, 9)))
    eps = dict(zip((2, 4, 8), rng.uniform(0, 1, size=3)))           # any table, not only convex
    budget = int(rng.integers(0, n * cost(16) + 5))
    bits, dist = exact_allocation(w, eps, budget, cost)
    assert _np_cost(bits, cost) <= budget
    assert dist == pytest.approx(_np_distortion(w, bits, eps), rel=1e-12, abs=1e-300)
    assert dist == pytest.approx(_brute_force(w, eps, budget, cost), rel=1e-12, abs=1e-300)


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 1), frac=st.floats(0.0, 1.1), convex=st.booleans())
def test_optimal_for_the_budget_it_uses(seed, frac, convex):
    # Lagrangian allocation is exactly optimal at the cost it ends up using (any lam-minimiser is);
    # at the budget itself only where the budget lies on the lower convex hull, so there we only
    # check it is no better than the optimum (it cannot be) and within the feasible set.
    rng = np.random.default_rng(seed)
    n = 8
    w = _weights(rng, (n,), zero_frac=0.2)
    cost = BitCost(int(rng.integers(1, 5)), int(rng.integers(0, 17)),
                   unquantized_overhead_bits=int(rng.integers(0, 17)) if rng.random() < 0.5
                   else None)
    if not cost(16) >= cost(8):
        return
    eps = EPS_V if convex else dict(zip((2, 4, 8), np.sort(rng.uniform(0, 1, size=3))[::-1]))
    budget = int(frac * n * cost(16))
    a = allocate_bits(w, eps, budget, cost_fn=cost)
    used, dist = int(a.cost), float(a.distortion)
    assert used <= budget and used == _np_cost(a.bits, cost)
    _, opt_used = exact_allocation(w, eps, used, cost)
    _, opt_budget = exact_allocation(w, eps, budget, cost)
    tol = 1e-5 * (dist + opt_used) + 1e-7 * float(np.sum(w))   # float32 sums and near-ties
    assert dist <= opt_used + tol, (a.bits, dist, opt_used)
    assert dist >= opt_budget - tol


# ---- second stage: K channels --------------------------------------------------------------------
def test_channel_bits():
    rng = np.random.default_rng(3)
    u = _weights(rng, (2, 3, 16), zero_frac=0.0)                     # [L, K, D]
    kept = np.array([[10, 40, 0], [7, 100, 33]])
    budget = np.array([[800, 2000, 50], [100, 20000, 3000]])
    a = allocate_channel_bits(u, EPS_K, budget, kept_tokens=kept)
    bits = np.asarray(a.bits)
    assert set(np.unique(bits)) <= {0, 2, 4, 8}                       # capped at 8, 0 prunes
    for idx in np.ndindex(2, 3):
        c = BitCost(int(kept[idx]), 32) if kept[idx] > 0 else (lambda b: 32 if b else 0)
        assert int(a.cost[idx]) == _np_cost(bits[idx], c) <= budget[idx]
        if kept[idx] > 0:   # the same as stage one with a per-channel cost model
            one = allocate_bits(u[idx], EPS_K, budget[idx], choices=(0, 2, 4, 8), cost_fn=c)
            np.testing.assert_array_equal(bits[idx], one.bits)
    assert np.all(bits[1, 1] == 8)              # 16 * (8 * 100 + 32) = 13312 <= 20000
    # Traced kept_tokens and budget under jit.
    f = jax.jit(lambda u, b, k: allocate_channel_bits(u, EPS_K, b, kept_tokens=k).bits)
    np.testing.assert_array_equal(f(u, budget, kept), bits)
    # max_bits=4 caps lower; overhead 0 counts code bits only.
    b4 = allocate_channel_bits(u, EPS_K, budget, 4, kept_tokens=kept, overhead_bits_per_channel=0)
    assert np.asarray(b4.bits).max() <= 4


# ---- errors --------------------------------------------------------------------------------------
def test_errors():
    w = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"weights: must be >= 0 .*found min -1\.0"):
        allocate_bits(np.array([1.0, -1.0]), EPS_V, 10)
    with pytest.raises(ValueError, match=r"weights: must be finite"):
        allocate_bits(np.array([1.0, np.nan]), EPS_V, 10)
    with pytest.raises(ValueError,
                       match=r"weights\.shape=\(0,\): must be \[\.\.\., N\] with N >= 1"):
        allocate_bits(np.zeros(0), EPS_V, 10)
    with pytest.raises(ValueError, match=r"budget_bits=-1: must be a number of bits >= 0"):
        allocate_bits(w, EPS_V, -1)
    with pytest.raises(ValueError, match=r"budget_bits=nan"):
        allocate_bits(w, EPS_V, float("nan"))
    with pytest.raises(ValueError, match=r"budget_bits=7: below the cheapest allocation \(8 bits"):
        allocate_bits(w, EPS_V, 7, choices=(2, 4))
    with pytest.raises(ValueError, match=r"choices bits=3: bit width must be one of "
                                         r"\{0, 2, 4, 8, 16\}"):
        allocate_bits(w, EPS_V, 10, choices=(0, 3))
    with pytest.raises(ValueError, match=r"choices=\(0, 2, 2\): bit widths must not repeat"):
        allocate_bits(w, EPS_V, 10, choices=(0, 2, 2))
    with pytest.raises(ValueError, match=r"eps bits=5: bit width must be one of"):
        allocate_bits(w, {5: 0.1}, 10)
    with pytest.raises(ValueError, match=r"eps\[4\]=-0\.1: must be a finite number >= 0"):
        allocate_bits(w, {2: 0.3, 4: -0.1, 8: 0.0}, 10)
    with pytest.raises(ValueError, match=r"eps: no entry for bits=4"):
        allocate_bits(w, {2: 0.3, 8: 0.0}, 10)
    with pytest.raises(ValueError, match=r"cost_fn: cost\(16\)=1 < cost\(8\)=8"):
        allocate_bits(w, EPS_V, 10, cost_fn=lambda b: 1 if b == 16 else b)
    with pytest.raises(ValueError, match=r"cost_fn\(0\)=0\.5: must be an integer"):
        allocate_bits(w, EPS_V, 10, cost_fn=lambda b: b + 0.5)
    with pytest.raises(ValueError, match=r"budget_bits\.shape=\(3,\): must be a scalar or "
                                         r"broadcast to the leading dims \(2,\)"):
        allocate_bits(np.ones((2, 4)), EPS_V, np.ones(3))
    with pytest.raises(ValueError, match=r"weights\.shape\[-1\]=2000000: .*overflow int32"):
        allocate_bits(np.ones(2_000_000, np.float32), EPS_V, 10, cost_fn=BitCost(128, 64))
    with pytest.raises(ValueError, match=r"elements_per_item=0: must be an integer >= 1"):
        BitCost(0)
    with pytest.raises(ValueError, match=r"overhead_bits_per_kept_item=-1"):
        BitCost(4, -1)
    with pytest.raises(ValueError, match=r"max_bits=3: bit width must be one of"):
        allocate_channel_bits(w, EPS_K, 10, 3, kept_tokens=4)
    with pytest.raises(ValueError, match=r"max_bits=0: must be one of \{2, 4, 8, 16\}"):
        allocate_channel_bits(w, EPS_K, 10, 0, kept_tokens=4)
    with pytest.raises(ValueError, match=r"kept_tokens=-2: must be an integer"):
        allocate_channel_bits(w, EPS_K, 10, kept_tokens=-2)
    with pytest.raises(ValueError, match=r"u: must be >= 0"):
        allocate_channel_bits(-w, EPS_K, 10, kept_tokens=4)
    with pytest.raises(ValueError, match=r"budget_bits=-5"):
        exact_allocation(w, EPS_V, -5)
    with pytest.raises(ValueError, match=r"weights\.shape=\(2, 4\): exact_allocation solves one"):
        exact_allocation(np.ones((2, 4)), EPS_V, 10)


# ---- RoPE channel pairs and one water level across heads ----------------------------------------
def test_rope_pairs_are_what_apply_rope_rotates():
    """apply_rope (rotate-half) keeps x_i^2 + x_{i+D/2}^2 at every position: those two channels
    are the pair that shares a K width."""
    from jaxkv.model.layers import apply_rope
    rng = np.random.default_rng(4)
    d = 16
    x = jnp.asarray(rng.normal(size=(1, 5, 2, d)), jnp.float32)  # [B, T, N, D]
    inv = (10000.0 ** (-np.arange(0, d, 2) / d)).astype(np.float32)
    y = apply_rope(x, jnp.asarray([[0, 3, 17, 250, 4000]]), inv)
    np.testing.assert_allclose(rope_pairs(y * y), rope_pairs(x * x), rtol=1e-5)
    assert not np.allclose(y * y, x * x)  # single channels do change
    with pytest.raises(ValueError, match="head_dim=5"):
        rope_pairs(np.ones(5))


def test_pair_costs_hand_worked():
    # 10 kept tokens in 2 groups: a pair at b bits costs 2 * (10 b + 32 * 2)
    np.testing.assert_array_equal(pair_costs(10, 2), [0, 2 * (20 + 64), 2 * (40 + 64),
                                                      2 * (80 + 64)])
    np.testing.assert_array_equal(pair_costs(np.array([3, 0]), np.array([1, 0]), 4).shape, (2, 3))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), frac=st.floats(0.0, 1.1), convex=st.booleans())
def test_pair_allocation_is_optimal_for_the_budget_it_uses(seed, frac, convex):
    rng = np.random.default_rng(seed)
    d = 2 * int(rng.integers(1, 5))                                   # 1..4 RoPE pairs
    u = _weights(rng, (d,), zero_frac=0.2)
    kept, groups = int(rng.integers(1, 70)), int(rng.integers(1, 4))
    eps = EPS_K if convex else dict(zip((2, 4, 8), np.sort(rng.uniform(0, 1, size=3))[::-1]))
    table = np.asarray(pair_costs(kept, groups))                      # [C]
    budget = int(frac * (d // 2) * table[-1])
    a = allocate_pair_bits(u, eps, budget, kept_tokens=kept, groups=groups)
    bits = np.asarray(a.bits)
    np.testing.assert_array_equal(bits[:d // 2], bits[d // 2:])       # one width a pair
    used = int(a.cost)
    assert used <= budget
    assert used == sum(table[(0, 2, 4, 8).index(int(b))] for b in bits[:d // 2])
    up = np.asarray(rope_pairs(u), np.float64)
    costs = np.broadcast_to(table, (d // 2, 4))
    pb, opt_used = exact_allocation(up, eps, used, choices=(0, 2, 4, 8), item_costs=costs)
    _, opt_budget = exact_allocation(up, eps, budget, choices=(0, 2, 4, 8), item_costs=costs)
    dist = float(a.distortion)  # over pair weights: the channels' u_i eps + u_j eps
    assert dist == pytest.approx(_np_distortion(up, bits[:d // 2], eps), rel=1e-5, abs=1e-30)
    tol = 1e-5 * (dist + opt_used) + 1e-7 * float(np.sum(up))
    assert dist <= opt_used + tol and dist >= opt_budget - tol
    # the exhaustive optimum over every pair width (a brute force of the DP on these sizes)
    if d // 2 <= 3:
        best = min(sum(float(ui) * {0: 1.0, 2: eps[2], 4: eps[4], 8: eps[8]}[b]
                       for ui, b in zip(up, combo))
                   for combo in itertools.product((0, 2, 4, 8), repeat=d // 2)
                   if sum(table[(0, 2, 4, 8).index(b)] for b in combo) <= used)
        assert opt_used == pytest.approx(best, rel=1e-12, abs=1e-300)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), frac=st.floats(0.0, 1.1))
def test_one_water_level_across_heads_is_optimal_for_the_budget_it_uses(seed, frac):
    """The tokens of K heads in one solve (`allocate_with_costs` over [K * T] items, each head's
    tokens paying its own K row): the layer optimum at the cost it uses, and never worse than the
    per-head split of the same bytes beyond one upgrade's distortion."""
    rng = np.random.default_rng(seed)
    kh, t = 2, 4
    w = _weights(rng, (kh, t), zero_frac=0.2)
    rows = rng.integers(0, 40, size=kh)                               # K bits a token, per head
    per_head = np.stack([[0 if b == 0 else 8 * b + 16 + r for b in CHOICES] for r in rows])
    costs = np.repeat(per_head[:, None, :], t, axis=1).reshape(kh * t, len(CHOICES))
    budget = int(frac * costs[:, -1].sum())
    a = allocate_with_costs(w.reshape(kh * t), EPS_V, budget, costs)
    bits = np.asarray(a.bits)
    used = int(a.cost)
    assert used <= budget
    assert used == sum(costs[i, CHOICES.index(int(b))] for i, b in enumerate(bits))
    flat = w.reshape(-1).astype(np.float64)
    _, opt_used = exact_allocation(flat, EPS_V, used, item_costs=costs)
    _, opt_budget = exact_allocation(flat, EPS_V, budget, item_costs=costs)
    dist = float(a.distortion)
    tol = 1e-5 * (dist + opt_used) + 1e-7 * float(np.sum(flat))
    assert dist <= opt_used + tol and dist >= opt_budget - tol
    # the per-head split of the same budget is a feasible point of the layer problem
    split = sum(exact_allocation(w[h].astype(np.float64), EPS_V, budget // kh,
                                 item_costs=np.repeat(per_head[h][None], t, 0))[1]
                for h in range(kh))
    assert opt_budget <= split + tol


# traced costs, jitted once for every example (one compilation per example took 30 s of CI)
_traced_cost_bits = jax.jit(lambda w, b, c: allocate_with_costs(w, EPS_V, b, c).bits)


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 1), frac=st.floats(0.0, 1.0))
def test_per_item_costs_meet_the_budget_within_one_percent(seed, frac):
    rng = np.random.default_rng(seed)
    w = _weights(rng, (2, 3 * 256))                                   # 3 heads' tokens a row
    rows = rng.integers(0, 512, size=(2, 3))
    per_head = np.where(np.asarray(CHOICES) > 0,
                        np.asarray([TOKEN_COST(b) for b in CHOICES])[None, None, :]
                        + rows[..., None], 0)                          # [2, 3, C]
    costs = np.repeat(per_head[:, :, None, :], 256, axis=2).reshape(2, 3 * 256, len(CHOICES))
    full = np.where(w > 0, costs[..., -1], 0).sum(-1)
    budget = np.floor(full * frac)
    a = allocate_with_costs(w, EPS_V, budget, costs)
    cost = np.asarray(a.cost)
    assert np.all(cost <= budget)
    step = costs[..., -1].max()
    big = budget >= 100 * step
    assert np.all(cost[big] >= 0.99 * budget[big])
    np.testing.assert_array_equal(_traced_cost_bits(w, budget, jnp.asarray(costs, jnp.int32)),
                                  a.bits)
    with pytest.raises(ValueError, match="nondecreasing"):
        allocate_with_costs(w, EPS_V, budget, costs[..., ::-1])
    with pytest.raises(ValueError, match=r"costs.shape"):
        allocate_with_costs(w, EPS_V, budget, costs[:, :5])
