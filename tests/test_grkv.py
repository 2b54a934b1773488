"""GRKV: the ridge value step against a dense solve, the safeguard, reference-query rotation,
and held-out attention error against no merging and the merging baselines."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.diagnostics import held_out_errors, spread_positions
from jaxkv.model.layers import apply_rope, rope_inv_freq
from jaxkv.policies.adakv import CriticalKV
from jaxkv.policies.base import last_positions
from jaxkv.policies.grkv import (GRKV, _attend, attention_jacobian, reference_positions,
                                 ridge_adjust_head, ridge_value_step, rotate_to, slot_buckets)
from jaxkv.policies.merging import CaM, KVMerger, NearestMerge
from tests.helpers import tiny_config

# one compilation for every instance of the same shapes (eager op-by-op dispatch is slow)
_ridge = jax.jit(ridge_adjust_head, static_argnames=("scale", "lam", "v_cap", "k_cap", "cg_iters",
                                                     "cg_tol"))


@pytest.mark.parametrize("seed", range(5))
def test_value_step_equals_a_dense_primal_solve(seed):
    rng = np.random.default_rng(seed)
    r_rows, t, d, lam = int(rng.integers(2, 9)), int(rng.integers(5, 30)), 4, 0.01
    # as in GRKV: rows are attention probabilities (softmax of random logits) times sqrt(w_q),
    # with the columns of frozen / dropped slots zero
    logits = rng.normal(scale=2.0, size=(r_rows, t))
    a = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) * np.sqrt(6 / 32)
    a[:, rng.uniform(size=t) < 0.3] = 0.0
    r = rng.normal(size=(r_rows, d))
    got = np.asarray(ridge_value_step(jnp.asarray(a, jnp.float32), jnp.asarray(r, jnp.float32), lam))
    # primal normal equations in float64: (A^T A + lam I) dV = A^T R
    want = np.linalg.solve(a.T @ a + lam * np.eye(t), a.T @ r)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _random_head(rng, t=40, d=8, rows=12):
    q = rng.normal(size=(rows, d)).astype(np.float32)
    k0 = rng.normal(size=(t, d)).astype(np.float32)
    v0 = rng.normal(size=(t, d)).astype(np.float32)
    keep = rng.uniform(size=t) < 0.4
    keep[-4:] = True
    mutable = keep.copy()
    mutable[-4:] = False
    # targets: attention over the full cache
    logits = q @ k0.T * 0.35
    p = np.exp(logits - logits.max(-1, keepdims=True))
    y = (p / p.sum(-1, keepdims=True)) @ v0
    return [jnp.asarray(x) for x in (q, y, k0, v0, keep, mutable)]


@pytest.mark.parametrize("seed", range(3))
def test_closed_form_jacobian_equals_autodiff(seed):
    """The key step's J and J^T (attention_jacobian) against jax.jvp / jax.vjp of the masked
    attention, with frozen keys (mut 0) and dropped slots (keep False)."""
    rng = np.random.default_rng(seed)
    q, _, k0, v0, keep, mutable = _random_head(rng)
    sw = jnp.asarray(rng.uniform(0.2, 1.0, size=q.shape[0]), jnp.float32)
    mut = mutable.astype(jnp.float32)[:, None]
    g = lambda dk: sw[:, None] * _attend(q, k0 + dk * mut, v0, keep, 0.35)[0]
    out, p = _attend(q, k0, v0, keep, 0.35)
    jvp, jt = attention_jacobian(q, p, v0, out, sw, mut, 0.35)
    x = jnp.asarray(rng.normal(size=k0.shape), jnp.float32)
    u = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
    want = jax.jvp(g, (jnp.zeros_like(k0),), (x,))[1]
    np.testing.assert_allclose(np.asarray(jvp(x)), np.asarray(want), rtol=1e-4, atol=1e-5)
    want_t = jax.vjp(g, jnp.zeros_like(k0))[1](u)[0]
    np.testing.assert_allclose(np.asarray(jt(u)), np.asarray(want_t), rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(jt(u))[~np.asarray(mutable)] == 0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("caps", [(0.1, 0.025), (10.0, 10.0)])
def test_safeguard_is_never_worse_than_no_update(seed, caps):
    rng = np.random.default_rng(seed)
    q, y, k0, v0, keep, mutable = _random_head(rng)
    sw = jnp.full((q.shape[0],), np.sqrt(6 / 32), jnp.float32)
    k, v, objs, choice = _ridge(q, y, sw, k0, v0, keep, mutable, scale=0.35, lam=0.01,
                                v_cap=caps[0], k_cap=caps[1], cg_iters=16, cg_tol=1e-6)
    objs = np.asarray(objs)
    assert objs[int(choice)] <= objs[0] + 1e-7
    assert objs[int(choice)] == objs.min()
    # frozen and dropped slots never move
    fixed = ~np.asarray(mutable)
    np.testing.assert_array_equal(np.asarray(k)[fixed], np.asarray(k0)[fixed])
    np.testing.assert_array_equal(np.asarray(v)[fixed], np.asarray(v0)[fixed])
    # the caps hold: ||dV|| <= 0.1 ||V0_mutable|| (same for keys at 0.025)
    m = np.asarray(mutable)
    dv = np.linalg.norm(np.asarray(v - v0))
    assert dv <= caps[0] * np.linalg.norm(np.asarray(v0)[m]) * (1 + 1e-5)
    dk = np.linalg.norm(np.asarray(k - k0))
    assert dk <= caps[1] * np.linalg.norm(np.asarray(k0)[m]) * (1 + 1e-5)


def test_the_ridge_round_lowers_the_reference_error():
    rng = np.random.default_rng(0)
    improved = 0
    for _ in range(8):
        q, y, k0, v0, keep, mutable = _random_head(rng)
        sw = jnp.ones((q.shape[0],), jnp.float32)
        _, _, objs, choice = _ridge(q, y, sw, k0, v0, keep, mutable, scale=0.35, lam=0.01,
                                    v_cap=0.1, k_cap=0.025, cg_iters=16, cg_tol=1e-6)
        improved += int(choice) > 0 and float(objs[int(choice)]) < float(objs[0])
    assert improved == 8  # a cache that drops 60% of the tokens can always be improved


def test_solving_on_the_gathered_kept_tokens_equals_the_masked_solve():
    """grkv_adjust(max_kept=S) gathers each head's kept tokens into S slots before the solve;
    the dropped tokens take no part in the compressed attention, so the result is the masked
    solve over all T tokens (up to float32 rounding) and nothing else moves."""
    from jaxkv.model.decoder import LayerObservation
    from jaxkv.policies.grkv import grkv_adjust
    rng = np.random.default_rng(1)
    b, kh, h, t, d, win, n_ref = 2, 2, 4, 48, 8, 4, 6
    k = jnp.asarray(rng.normal(size=(b, kh, t, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kh, t, d)), jnp.float32)
    lengths = jnp.asarray([t, 37], jnp.int32)
    pos = jnp.concatenate([last_positions(lengths, win), reference_positions(lengths, n_ref)], 1)
    obs = LayerObservation(queries=jnp.asarray(rng.normal(size=(b, h, win + n_ref, d)), jnp.float32),
                           query_positions=pos, lengths=lengths, o_proj=jnp.zeros((h * d, 4)),
                           inv_freq=jnp.asarray(rope_inv_freq(tiny_config(head_dim=d))), layer=0,
                           extra_capacity=2, scale=d ** -0.5)
    valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    # heads keep different shares, so the bucketed solve puts them in different sizes
    keep = (rng.uniform(size=(b, kh, t)) < np.asarray([0.1, 0.5])[None, :, None]) & valid[:, None]
    for i, n in enumerate(np.asarray(lengths)):
        keep[i, :, n - win:n] = True
    most = int(keep.sum(-1).max())
    scores = jnp.asarray(rng.uniform(size=(b, kh, t)), jnp.float32)
    run = jax.jit(lambda m, bucketed: grkv_adjust(
        k, v, jnp.asarray(keep), scores, obs, window=win, n_ref=n_ref, ref_weight=6 / 32,
        guard=0.1, lam=0.01, v_cap=10.0, k_cap=10.0, cg_iters=16, cg_tol=1e-6, max_kept=m,
        bucketed=bucketed), static_argnums=(0, 1))
    k_full, v_full, st_full = run(None, False)
    assert most < t
    for bucketed in (False, True):
        _check_same_solve(run(most, bucketed), (k_full, v_full, st_full), k, v, keep)
    # the four heads fall in different buckets of slot_buckets(most, kh)
    counts = keep.sum(-1).ravel()
    sizes = np.asarray(slot_buckets(most, kh))
    assert len(set(np.searchsorted(sizes, counts))) > 1


def _check_same_solve(got, want, k, v, keep):
    (k_c, v_c, st_c), (k_full, v_full, st_full) = got, want
    # float32 conjugate gradients summed in another order: one key of 1,536 (|k| 1.56) was off
    # by 1.06e-4 with jax 0.10.2 on this CPU, so the bound is relative as well as absolute
    np.testing.assert_allclose(np.asarray(k_c), np.asarray(k_full), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(v_c), np.asarray(v_full), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(st_c.objective), np.asarray(st_full.objective),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(k_c)[~keep], np.asarray(k)[~keep])
    np.testing.assert_array_equal(np.asarray(v_c)[~keep], np.asarray(v)[~keep])
    assert (np.asarray(st_c.choice) > 0).any()  # something was adjusted


@pytest.mark.parametrize("max_kept,heads",
                         [(1122, 3), (3003, 3), (100, 8), (10, 3), (1, 1), (5000, 8)])
def test_slot_buckets_grow_by_half_and_end_at_max_kept(max_kept, heads):
    sizes = slot_buckets(max_kept, heads)
    assert sizes[-1] == max_kept and list(sizes) == sorted(set(sizes))
    assert sizes[0] <= max(8, max_kept / heads)  # half a head's mean share, rounded up to 8
    for small, large in zip(sizes, sizes[1:]):
        assert large <= max(1.5 * small + 8, 8)  # so padding is at most about a third
    with pytest.raises(ValueError, match="max_kept"):
        slot_buckets(0, 3)


def test_reference_positions_are_slice_midpoints():
    pos = np.asarray(reference_positions(jnp.asarray([64, 100]), 4))
    np.testing.assert_array_equal(pos, [[8, 24, 40, 56], [12, 37, 62, 87]])


def test_rotate_to_equals_rope_at_the_target_position():
    cfg = tiny_config()
    inv = rope_inv_freq(cfg)
    rng = np.random.default_rng(0)
    raw = jnp.asarray(rng.normal(size=(1, 3, 2, cfg.head_dim)), jnp.float32)  # [B, Q, H, D]
    pos = jnp.asarray([[3, 17, 40]])
    post = apply_rope(raw, pos, inv).transpose(0, 2, 1, 3)  # [B, H, Q, D]
    got = rotate_to(post, pos, jnp.asarray([63]), inv)
    want = apply_rope(raw, jnp.full((1, 3), 63), inv).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_held_out_error_grkv_beats_critical_adakv_kvmerger_and_nearest():
    """On the embedded model (tiny) and its retrieval prompts (niah_multikey and
    variable_tracking in its benchmark forms, 224 tokens) at 20% of the prompt, GRKV's
    attention-output error on queries it never saw (random positions away from its references
    and the window, re-rotated to the last position, plus the last token's own query) is lower
    than Critical-AdaKV's without merging (its retention) by more than 5%, lower than
    KVMerger's and NearestMerge's, and on par with CaM's.
    (A random-weight model is no test of this: its attention is near uniform, and there merging
    that averages many values wins; see benchmarks/grkv_error.py for the full table.)"""
    from configs.tiny import BENCHMARK_TASKS
    from jaxkv.embedded import embedded_model_path, load_embedded
    from jaxkv.tasks import make_task
    from jaxkv.tasks.batching import pad_prompts
    assert embedded_model_path() is not None, "jaxkv/assets/tiny is shipped with the package"
    model = load_embedded()
    forms = {t.name: dict(t.settings) for t in BENCHMARK_TASKS}
    rng = np.random.default_rng(3)
    ids = []
    for name in ("niah_multikey", "variable_tracking"):
        task = make_task(name, **forms[name])
        ids += [model.tokenizer.encode(task.sample(rng).prompt) for _ in range(2)]
    tokens, lengths = pad_prompts(ids)
    lengths = jnp.asarray(lengths)
    settings = dict(budget=0.2, window=8, kernel=5)
    policies = {"none": CriticalKV(**settings), "cam": CaM(**settings),
                "nearest": NearestMerge(**settings), "kvmerger": KVMerger(**settings),
                "grkv": GRKV(**settings)}
    held = spread_positions(lengths, 16, [reference_positions(lengths, 32),
                                          last_positions(lengths, 8)], seed=5)
    errs = {k: float(np.mean(v)) for k, v in held_out_errors(model, tokens, lengths, policies,
                                                             held).items()}
    # Measured here (prompt seed 3): none 0.551, nearest 0.718, kvmerger 0.548, cam 0.484,
    # grkv 0.479. Over prompt seeds 3-8, GRKV / none was 0.867-0.882, GRKV / kvmerger
    # 0.875-0.925, GRKV < nearest always; GRKV / CaM 0.97-1.02 (lower on 3 of 6 seeds), so
    # beating CaM is not asserted on this model (the earlier model of this test, not shipped
    # any more, gave GRKV the lowest error of all five on every seed).
    assert errs["grkv"] < 0.95 * errs["none"], errs
    for name in ("nearest", "kvmerger"):
        assert errs["grkv"] < errs[name], errs
    assert errs["grkv"] < 1.05 * errs["cam"], errs


def test_grkv_settings_are_checked():
    with pytest.raises(ValueError, match="lam"):
        GRKV(budget=0.2, lam=-1.0)
    with pytest.raises(ValueError, match="guard"):
        GRKV(budget=0.2, guard=1.0)
    with pytest.raises(ValueError, match="n_ref"):
        GRKV(budget=0.2, n_ref=0)
