"""GRKV: global ridge-regression merging after span retention (docs/methods.md, GRKV).

Retention is Critical-AdaKV (SnapKV scores pooled into spans, head-wise budgets with safeguard,
value-norm re-scoring). Then, per layer, sequence and KV head, the kept keys and values are
adjusted so the compressed cache reproduces the full cache's attention outputs on reference
queries:

    min_{K', V'}  sum_q w_q ||Attn(q; K', V') - y_q||^2 + lam (||K' - K0||^2 + ||V' - V0||^2)

* frozen: the window tokens and a guard (the top `guard` fraction of the kept prompt tokens by
  score); mutable: every other kept token.
* reference queries: `n_ref` = 32 context-stratified positions (midpoints of 32 equal slices of
  the prompt), their post-RoPE queries re-rotated as if they stood at the last prompt position
  (RoPE composes: R(last) = R(last - p) R(p)), weight w_q = 6 / 32; y_q their full-cache
  attention outputs (per query head, before the output projection).
* the solve runs on each head's kept tokens only, gathered into the smallest of a few static
  sizes (`slot_buckets`: half a head's mean share, growing by 1.5x, up to the layer's K * n_max)
  that holds them, so its cost scales with what each head keeps, not with T or with the largest
  head (`grkv_adjust(max_kept=..., bucketed=True)`);
* one round: exact value step in the (G*Q)-dim dual, dV = A^T (A A^T + lam I)^-1 R, capped at
  0.1 ||V0_mutable||_F; linearised key step dK = J^T (J J^T + lam I)^-1 r by conjugate gradients
  (16 iterations, tol 1e-6) with Jacobian-vector products, capped at 0.025 ||K0_mutable||_F;
  the safeguard keeps the best of {no update, V only, K and V} by the true objective.

Everything is float32 and batched over sequences and heads with vmap; the work per head is
O(G * Q * T * D) (masked dense layout, linear in T) plus (G*Q)-dim dense solves.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from jaxkv.checks import check_int
from jaxkv.model.layers import apply_rope
from jaxkv.policies.adakv import CriticalKV
from jaxkv.policies.base import last_positions
from jaxkv.policies.registry import register_method
from jaxkv.policies.snapkv import NEG_INF, kept_first, snap_settings, window_mask


def reference_positions(lengths: jax.Array, n_ref: int) -> jax.Array:
    """int32 [B, n_ref]: midpoints of n_ref equal slices of each prompt."""
    i = jnp.arange(n_ref, dtype=jnp.float32)[None, :]
    return jnp.floor((i + 0.5) * lengths.astype(jnp.float32)[:, None] / n_ref).astype(jnp.int32)


def rotate_to(queries: jax.Array, positions: jax.Array, target: jax.Array,
              inv_freq: jax.Array) -> jax.Array:
    """Re-rotate post-RoPE queries [B, H, Q, D] at `positions` [B, Q] to position target [B]."""
    delta = target[:, None] - positions  # [B, Q]
    x = queries.transpose(0, 2, 1, 3)  # [B, Q, H, D]
    return apply_rope(x, delta, inv_freq).transpose(0, 2, 1, 3)


class RidgeStats(NamedTuple):
    """Per sequence and head: the objective of each candidate and which one was kept
    (0 none, 1 V only, 2 K and V)."""

    objective: jax.Array  # [B, K, 3]
    choice: jax.Array  # [B, K] int32


def _attend(q, k, v, mask, scale):
    """q [R, D], k, v [T, D], mask [T] -> out [R, D], probs [R, T] (float32)."""
    logits = jnp.where(mask[None, :], (q @ k.T) * scale, NEG_INF)
    p = jax.nn.softmax(logits, axis=-1) * mask[None, :]
    return p @ v, p


def ridge_value_step(a: jax.Array, r: jax.Array, lam: float) -> jax.Array:
    """argmin_dV ||a dV - r||^2 + lam ||dV||^2 in the dual: a^T (a a^T + lam I)^-1 r.
    a: [R, T] (weighted probabilities, zero columns for slots that may not move); r: [R, D]."""
    gram = a @ a.T + lam * jnp.eye(a.shape[0], dtype=a.dtype)
    return a.T @ jnp.linalg.solve(gram, r)


def attention_jacobian(q, p, v, out, sw, mut, scale: float):
    """Closed forms of J and J^T for g(dK) = sw * Attn(q; K + dK * mut, V) at dK = 0.

    q: [R, D] queries; p: [R, T] their attention probabilities over K (zero where masked);
    v: [T, D]; out = p v: [R, D]; sw: [R]; mut: [T, 1] (1 where a key may move).
    With a = p o (q dK^T): J dK = c o (a V - rowsum(a) out), and
    J^T u = mut o (W^T q) with W = c o p o (u V^T - rowdot(u, out)), c = sw * scale.
    Four [R, T] x D matmuls for J^T then J, written out so the tests can pin them (about as
    fast as jax.linearize + linear_transpose on XLA:CPU: 47-62 against 51-58 ms for 16 CG
    iterations of three heads at 1,122 slots). Returns (jvp: [T, D] -> [R, D],
    jt: [R, D] -> [T, D])."""
    c = (sw * scale)[:, None]

    def jvp(x):
        a = p * (q @ (x * mut).T)
        return c * (a @ v - a.sum(-1, keepdims=True) * out)

    def jt(u):
        w = c * p * (u @ v.T - (u * out).sum(-1, keepdims=True))
        return (w.T @ q) * mut
    return jvp, jt


def ridge_adjust_head(q, y, sw, k0, v0, keep, mutable, *, scale: float, lam: float,
                      v_cap: float, k_cap: float, cg_iters: int, cg_tol: float):
    """One round of GRKV for one sequence and KV head.

    q: [R, D] reference queries (R = G * Q, all at the last position); y: [R, D] targets;
    sw: [R] sqrt of the query weights; k0, v0: [T, D]; keep, mutable: bool [T].
    Returns (k, v [T, D], objectives [3], choice)."""
    mut = mutable.astype(jnp.float32)[:, None]

    def objective(dk, dv):
        out, _ = _attend(q, k0 + dk, v0 + dv, keep, scale)
        err = (sw[:, None] * (out - y)) ** 2
        return err.sum() + lam * ((dk ** 2).sum() + (dv ** 2).sum())

    def cap(d, ref, frac):
        limit = frac * jnp.sqrt(((ref * mut) ** 2).sum())
        norm = jnp.sqrt((d ** 2).sum())
        return d * jnp.minimum(1.0, limit / jnp.maximum(norm, 1e-30))

    # value step (exact, dual form)
    out0, p = _attend(q, k0, v0, keep, scale)
    a = sw[:, None] * p * mut[:, 0][None, :]  # [R, T], columns of frozen/dropped tokens zero
    r = sw[:, None] * (y - out0)  # [R, D]
    dv = ridge_value_step(a, r, lam)  # [T, D]
    dv = cap(dv, v0, v_cap)
    v1 = v0 + dv
    out_v = out0 + p @ dv  # V only: the keys, hence the probabilities, are unchanged

    # key step, linearised at (K0, V1): conjugate gradients in the dual
    jvp, jt = attention_jacobian(q, p, v1, out_v, sw, mut, scale)
    r1 = sw[:, None] * (y - out_v)  # [R, D]
    jj = lambda u: jvp(jt(u)) + lam * u

    def cg(bvec):
        x = jnp.zeros_like(bvec)
        res = bvec
        pdir = res
        rs = (res * res).sum()
        tol2 = (cg_tol ** 2) * jnp.maximum(rs, 1e-30)

        def body(i, state):
            x, res, pdir, rs = state
            ap = jj(pdir)
            alpha = rs / jnp.maximum((pdir * ap).sum(), 1e-30)
            live = rs > tol2
            x = jnp.where(live, x + alpha * pdir, x)
            res_new = jnp.where(live, res - alpha * ap, res)
            rs_new = (res_new * res_new).sum()
            pdir = jnp.where(live, res_new + (rs_new / jnp.maximum(rs, 1e-30)) * pdir, pdir)
            return x, res_new, pdir, jnp.where(live, rs_new, rs)
        return jax.lax.fori_loop(0, cg_iters, body, (x, res, pdir, rs))[0]

    dk = jt(cg(r1)) * mut
    dk = cap(dk, k0, k_cap)

    def error(out):
        return ((sw[:, None] * (out - y)) ** 2).sum()

    objs = jnp.stack([error(out0), error(out_v) + lam * (dv ** 2).sum(), objective(dk, dv)])
    choice = jnp.argmin(objs).astype(jnp.int32)
    k_new = jnp.where(choice == 2, k0 + dk, k0)
    v_new = jnp.where(choice >= 1, v1, v0)
    return k_new, v_new, objs, choice


def guard_mask(keep: jax.Array, scores: jax.Array, forced: jax.Array, guard: float) -> jax.Array:
    """bool [B, K, T]: the top ceil(guard * n) of the n kept non-window tokens of each head."""
    cand = keep & ~forced
    s = jnp.where(cand, scores, -jnp.inf)
    order = jnp.argsort(-s, axis=-1)
    rank = jnp.argsort(order, axis=-1)  # rank of each token by score within its head
    n_guard = jnp.ceil(guard * cand.sum(-1, keepdims=True)).astype(jnp.int32)
    return cand & (rank < n_guard)


def slot_buckets(max_kept: int, n_heads: int) -> Tuple[int, ...]:
    """The static sizes a bucketed GRKV solve gathers a head's kept tokens into: half the mean
    share of a head (max_kept / n_heads), then 1.5 times the previous size, each rounded up to a
    multiple of 8, up to max_kept (always the last size). A head is solved at the smallest size
    that holds its kept tokens, so padding is at most a third of any solve above the first
    size."""
    check_int("max_kept", max_kept, 1)
    check_int("n_heads", n_heads, 1)
    sizes, s = [], 0.5 * max_kept / n_heads
    while not sizes or sizes[-1] < max_kept:
        sizes.append(min(max_kept, 8 * math.ceil(s / 8)))
        s = 1.5 * sizes[-1]
    return tuple(sizes)


def grkv_adjust(k, v, keep, scores, obs, *, window: int, n_ref: int, ref_weight: float,
                guard: float, lam: float, v_cap: float, k_cap: float, cg_iters: int,
                cg_tol: float, max_kept: Optional[int] = None, bucketed: bool = True):
    """GRKV on one layer: k, v [B, K, T, D], keep [B, K, T], raw scores [B, K, T];
    obs.queries[:, :, window:window + n_ref] are the reference queries. max_kept: a static bound
    on the tokens any head keeps (None: T); the solve then runs on each head's kept tokens
    gathered into max_kept slots instead of on all T masked ones (the dropped tokens take no
    part in the compressed attention), which is the same problem at max_kept / T of the cost;
    bucketed: each head at the smallest of `slot_buckets(max_kept, K)` that holds its tokens
    instead. Returns (k', v' [B, K, T, D] in the cache dtype, RidgeStats)."""
    b, kh, t, d = k.shape
    lengths = obs.lengths
    valid = jnp.arange(t)[None, :] < lengths[:, None]  # [B, T]
    forced = window_mask(lengths, t, window)[:, None, :]
    mutable = keep & ~forced & ~guard_mask(keep, scores, forced, guard)
    q_ref = obs.queries[:, :, window:window + n_ref].astype(jnp.float32)  # [B, H, Q, D]
    q_ref = rotate_to(q_ref, obs.query_positions[:, window:window + n_ref], lengths - 1,
                      obs.inv_freq)
    g = q_ref.shape[1] // kh
    q_ref = q_ref.reshape(b, kh, g * n_ref, d)  # [B, K, R, D]
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    full = jnp.broadcast_to(valid[:, None, :], keep.shape)
    att = lambda q_, k_, v_, m_: _attend(q_, k_, v_, m_, obs.scale)[0]
    y = jax.vmap(jax.vmap(att))(q_ref, kf, vf, full)  # [B, K, R, D] full-cache targets
    sw = jnp.full((g * n_ref,), math.sqrt(ref_weight), jnp.float32)
    fn = lambda q_, y_, k_, v_, keep_, mut_: ridge_adjust_head(
        q_, y_, sw, k_, v_, keep_, mut_, scale=obs.scale, lam=lam, v_cap=v_cap, k_cap=k_cap,
        cg_iters=cg_iters, cg_tol=cg_tol)
    if max_kept is None or max_kept >= t:
        k_new, v_new, objs, choice = jax.vmap(jax.vmap(fn))(q_ref, y, kf, vf, keep, mutable)
    else:
        # one (sequence, head) problem at a time, each gathered into the smallest of a few static
        # sizes that holds its kept tokens: head-wise budgets give one head of a layer up to all
        # of its slots and the others far fewer (SmolLM2 at 4K, 10%: the largest head holds about
        # half of the layer's K * n_max), so solving every head at max_kept wastes most of the
        # conjugate-gradient work on empty slots (bucketed=False: max_kept for every head).
        # Dropped tokens take no part in the compressed attention, and only the gathered slots
        # are written back (idx holds distinct positions per head).
        sizes = slot_buckets(max_kept, kh) if bucketed else (max_kept,)
        flat = lambda x: x.reshape((b * kh,) + x.shape[2:])
        ops = tuple(flat(x) for x in (q_ref, y, kf, vf, keep, mutable))

        def branch(s):
            def run(o):
                q_, y_, k_, v_, keep_, mut_ = o
                idx, ok = kept_first(keep_[None, None], s)
                idx, ok = idx[0, 0], ok[0, 0]
                kc, vc, objs_, choice_ = fn(q_, y_, k_[idx], v_[idx], ok, mut_[idx] & ok)
                return k_.at[idx].set(kc), v_.at[idx].set(vc), objs_, choice_
            return run

        def one(o):
            i = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), o[4].sum().astype(jnp.int32))
            return jax.lax.switch(jnp.minimum(i, len(sizes) - 1), [branch(s) for s in sizes], o)
        k_new, v_new, objs, choice = (x.reshape((b, kh) + x.shape[1:])
                                      for x in jax.lax.map(one, ops))
    return k_new.astype(k.dtype), v_new.astype(v.dtype), RidgeStats(objs, choice)


@dataclasses.dataclass(frozen=True)
class GRKV(CriticalKV):
    """Critical-AdaKV retention + one round of ridge-regression merging (module docstring).

    Defaults are the recipe's: n_ref 32 reference queries of weight 6/32, guard 10%, lam 0.01,
    value cap 0.1, key cap 0.025, 16 CG iterations at tol 1e-6."""

    n_ref: int = 32
    ref_weight: float = 6.0 / 32.0
    guard: float = 0.1
    lam: float = 0.01
    v_cap: float = 0.1
    k_cap: float = 0.025
    cg_iters: int = 16
    cg_tol: float = 1e-6
    update_keys: bool = True
    bucketed: bool = True  # each head solved at the smallest of `slot_buckets` holding its tokens

    name = "grkv"

    def __post_init__(self):
        super().__post_init__()
        check_int("n_ref", self.n_ref, 1)
        check_int("cg_iters", self.cg_iters, 0)
        for name in ("ref_weight", "lam", "v_cap", "k_cap", "cg_tol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not value >= 0 or not math.isfinite(value):
                raise ValueError(f"{name}={value!r}: must be a finite number >= 0")
        if not 0.0 <= self.guard < 1.0:
            raise ValueError(f"guard={self.guard!r}: a fraction in [0, 1)")

    def observation_positions(self, lengths, t: int):
        return jnp.concatenate([last_positions(lengths, self.window),
                                reference_positions(lengths, self.n_ref)], axis=1)

    def min_keep(self) -> int:
        # the window plus at least one guard token and one mutable token
        return self.window + 2

    def _guard_text(self) -> str:
        return f", plus guard={self.guard} of the rest and at least one mutable token"

    def adjust(self, layer, k, v, keep, scores, cache, obs):
        k_cap = self.k_cap if self.update_keys else 0.0
        k_new, v_new, _ = grkv_adjust(
            k, v, keep, scores, obs, window=self.window, n_ref=self.n_ref,
            ref_weight=self.ref_weight, guard=self.guard, lam=self.lam, v_cap=self.v_cap,
            k_cap=k_cap, cg_iters=self.cg_iters, cg_tol=self.cg_tol,
            max_kept=self.max_kept(layer, k.shape[2], cache, obs), bucketed=self.bucketed)
        return k_new, v_new


@register_method("grkv")
def _grkv(budget: float, model, window: int = 32, kernel: int = 5, n_ref: int = 32,
          lam: float = 0.01, span: int = 10, bucketed: bool = True):
    """GRKV: Critical-AdaKV retention in spans of `span` tokens (the seeds' span retention;
    span=1: token-level Critical-AdaKV retention) + ridge-regression merging of the kept
    keys/values (bucketed=False: every head solved at the layer's K * n_max slots; the same
    result, slower)."""
    return GRKV(budget=budget, n_ref=n_ref, lam=lam, bucketed=bool(bucketed),
                **snap_settings(model, window, kernel, span))


__all__ = ["GRKV", "grkv_adjust", "kept_first", "ridge_adjust_head", "attention_jacobian",
           "ridge_value_step", "reference_positions", "rotate_to", "guard_mask", "RidgeStats",
           "slot_buckets"]
