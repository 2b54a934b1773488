"""RDKV: rate-distortion bit allocation that unifies eviction and quantisation (docs/methods.md,
RDKV), stored in a `jaxkv.cache.MixedCache`.

Per layer, right after prefill (`compress_layer`, so only one layer's dense cache ever exists):

1. The last `whole` prompt tokens (default: the `window` observation tokens) are kept whole (K
   and V in the cache dtype) in the whole zone, which also receives the tokens generated while
   decoding. Everything else competes for bits (with `whole=0` the window tokens too, which is
   what fits a budget of a token or two, e.g. 1% of a 224-token prompt).
2. V token weights: w_t = attention the `window` last prompt queries (all G query heads of the KV
   head) pay to token t, divided by G times the number of window queries that can see t, then
   1-D average-pooled with `kernel` (as SnapKV pools).
3. Per sequence and KV head, every other prompt token gets a V width b_t in `bit_widths`
   (default {0, 2, 4, 8, 16}; 0 evicts the token, K and V) minimising sum_t w_t eps_V(b_t) under
   the head's byte budget, by the Lagrangian bisection of `jaxkv.policies.rd_alloc.allocate_bits`.
4. K channel weights u_c = mean over the window queries (and the G heads) of q_c^2 times the mean
   over the kept tokens of k_c^2; each channel gets a K width in {0, 2, 4, 8} (0 prunes it, K is
   capped at 8 bits) minimising sum_c u_c eps_K(b_c) with sum_c b_c <= k_bits * D
   (`allocate_channel_bits`).

Budget. `budget` is a fraction of the bytes of this layer's dense cache (K and V of the prompt
and of the decode slots in the cache dtype, plus its int32 lengths), per sequence: the decode
slots, which the whole zone holds in the cache dtype as the dense cache does, are taken off first
and the prompt part gets the rest (`jaxkv.policies.base.prompt_byte_budget`); a sequence shorter
than the padded prompt gets proportionally less. Everything the compressed prompt part stores is
counted, not only code bits (the authors count code bits only): a kept token costs a whole
`MixedCache` record, i.e. its K row (k_bits * D bits), its int32 position, its V codes and, when
quantised, its float16 V scale and zero-point; the window (K and V whole), the per-channel K
scales, zero-points and ranks, and the counts are taken off the budget first. The arena (the
arrays) is sized from the padded prompt length, so `MixedCache.nbytes()` minus the decode slots
is at most budget x the dense cache less those slots; the allocation never uses more than the
arena (the solver's cost never exceeds its budget).

K/V split. The recipe splits a budget between K and V with a ratio; with static array shapes the
K row of a record must have a static width, so here K gets `k_bits` bits per channel on average
for every kept token (default 4; k_bits * D must be a multiple of 8) and the per-channel widths
are chosen inside that row; V gets the rest of the budget through the token allocation (which
also pays the K row of every token it keeps, so eviction trades K and V bytes together).

Distortion table eps(b). The recipe calibrates it once per model on sample prompts: use
`calibrate_model(model, prompts)` and `save_calibration(model, prompts, path)` (JSON tied to
`model_fingerprint(model)`), then `RDKV(eps=table)` or `make_policy("rdkv", budget, model,
eps_path=path)`; a file for another model is a ValueError. With neither, `make_policy` reads the
table `python -m train calibrate --model NAME_OR_PATH` stored for this model (the user cache
folder, `eps_cache_path`), or `<model folder>/rdkv_eps.json` (the in-house models ship theirs);
a model without a table is a ValueError naming that command. `eps="default"` takes the published
Llama-3.1-8B table (DEFAULT_EPS: K 0.149 / 0.0062 / 2.2e-5, V 0.313 / 0.0140 / 4.9e-5 at 2 / 4 /
8 bits) on purpose.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from jaxkv.cache import quant
from jaxkv.cache.mixed import MixedCache
from jaxkv.cache.mixed_format import record_bytes
from jaxkv.checks import check_int
from jaxkv.model.model import model_fingerprint
from jaxkv.policies.base import Policy, check_budget, last_positions, prompt_byte_budget
from jaxkv.policies.rd_alloc import allocate_bits, allocate_channel_bits
from jaxkv.policies.registry import register_method
from jaxkv.policies.snapkv import avg_pool, window_attention

#: Llama-3.1-8B, docs/methods.md, RDKV (normalised MSE of RTN at 2 / 4 / 8 bits).
DEFAULT_EPS = {"k": {2: 0.149, 4: 0.0062, 8: 2.2e-5}, "v": {2: 0.313, 4: 0.0140, 8: 4.9e-5}}
EPS_FILE = "rdkv_eps.json"


def freeze_eps(eps) -> Tuple:
    """A validated eps table {"k": {bits: e}, "v": {...}} as a hashable tuple
    (("k", ((2, e), ...)), ("v", ...)); a frozen table is returned unchanged."""
    if isinstance(eps, tuple):
        eps = {name: dict(table) for name, table in eps}
    table = quant._check_eps_table(eps, "eps")
    for name in ("k", "v"):
        missing = [b for b in quant.CODE_BITS if b not in table[name]]
        if missing:
            raise ValueError(f"eps[{name!r}]: no entry for bits={missing[0]}; give eps at 2, 4 "
                             f"and 8 bits (e.g. from calibrate_model)")
    return tuple((name, tuple(sorted(table[name].items()))) for name in ("k", "v"))


@dataclasses.dataclass(frozen=True)
class RDKV(Policy):
    """Rate-distortion bit allocation over tokens (V) and channels (K); see module docstring.

    budget: fraction of the layer's dense prompt cache bytes, in (0, 1]; window: the observation
    window (last prompt queries whose attention weighs the tokens); whole: recent prompt tokens
    kept whole (None: the window; 0: none, all compete for bits); kernel: pooling of the V weights
    (odd); k_bits: average K bits per channel of every kept token (1..8; k_bits * D a multiple of
    8); bit_widths: V widths allowed, from {0, 2, 4, 8, 16}, including 0; eps: the distortion table
    (dict or frozen), default DEFAULT_EPS."""

    budget: float = 0.1
    window: int = 32
    kernel: int = 5
    k_bits: int = 4
    bit_widths: Tuple[int, ...] = quant.BIT_WIDTHS
    eps: Any = None
    whole: Optional[int] = None  # recent prompt tokens kept whole; None: `window`

    name = "rdkv"
    layer_invariant = True

    def __post_init__(self):
        check_budget(self.budget)
        check_int("window", self.window, 1)
        object.__setattr__(self, "whole", self.window if self.whole is None
                           else check_int("whole", self.whole, 0))
        check_int("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel}: the pooling kernel must be odd")
        check_int("k_bits", self.k_bits, 1, 8)
        widths = self.bit_widths
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
            raise ValueError(f"bit_widths={widths!r}: must be a non-empty sequence of bit widths "
                             f"from {{0, 2, 4, 8, 16}}")
        widths = tuple(sorted(quant.check_bits(b, name="bit_widths bits") for b in widths))
        if len(set(widths)) != len(widths):
            raise ValueError(f"bit_widths={self.bit_widths!r}: bit widths must not repeat")
        if 0 not in widths or len(widths) < 2:
            raise ValueError(f"bit_widths={self.bit_widths!r}: must contain 0 (eviction, so any "
                             f"budget can be met) and at least one kept width")
        object.__setattr__(self, "bit_widths", widths)
        object.__setattr__(self, "eps", freeze_eps(DEFAULT_EPS if self.eps is None else self.eps))

    @property
    def eps_table(self) -> dict:
        return {name: dict(table) for name, table in self.eps}

    def observation_positions(self, lengths, t: int):
        return last_positions(lengths, self.window)

    # ---- layout ---------------------------------------------------------------------------------
    def k_row_bytes(self, head_dim: int) -> int:
        if (self.k_bits * head_dim) % 8:
            raise ValueError(f"k_bits={self.k_bits}: k_bits * head_dim ({head_dim}) must be a "
                             f"multiple of 8 (the K row of a record is whole bytes)")
        return self.k_bits * head_dim // 8

    def fixed_bytes_per_sequence(self, kv_heads: int, head_dim: int, itemsize: int) -> int:
        """Prompt-part bytes outside the arena per sequence: every head's window and K metadata,
        plus the cache's two int32 lengths."""
        return kv_heads * MixedCache.fixed_bytes_per_head(head_dim, self.whole, itemsize) + 8

    def arena_bytes(self, t: int, extra: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
        """Static arena bytes per head for a padded prompt of t tokens and `extra` decode slots
        (ValueError if the budget does not even cover the window and the K metadata)."""
        total = math.floor(prompt_byte_budget(self.budget, t, extra, kv_heads, head_dim, itemsize))
        fixed = self.fixed_bytes_per_sequence(kv_heads, head_dim, itemsize)
        if total < fixed:
            raise ValueError(
                f"budget={self.budget}: {total} bytes per sequence for a {t}-token prompt next "
                f"to {extra} decode slots, fewer than the {fixed} that the tokens kept whole "
                f"(whole={self.whole}) and the per-channel K scales take; raise the budget or "
                f"keep fewer tokens whole")
        return (total - fixed) // kv_heads

    # ---- weights --------------------------------------------------------------------------------
    def token_weights(self, cache, obs) -> jax.Array:
        """float32 [B, K, T] V weights (step 2 of the module docstring), 0 outside the arena
        candidates (window and padding)."""
        w = self.window
        probs = window_attention(cache, obs, w)  # [B, K, G, W, T]
        b, kh, g, _, t = probs.shape
        qpos = obs.query_positions[:, :w]  # [B, W]
        pos = jnp.arange(t)[None, None, :]
        visible = (pos <= qpos[:, :, None]) & (pos < obs.lengths[:, None, None])  # [B, W, T]
        seen = visible.sum(1).astype(jnp.float32)  # [B, T]
        mass = probs.sum(axis=(2, 3)) / (g * jnp.maximum(seen, 1.0))[:, None, :]
        pooled = avg_pool(mass, self.kernel)
        n_whole = jnp.minimum(self.whole, obs.lengths)
        candidate = pos[:, 0] < (obs.lengths - n_whole)[:, None]  # [B, T]
        return jnp.where(candidate[:, None, :], pooled, 0.0)

    def channel_weights(self, cache, obs, kept) -> jax.Array:
        """float32 [B, K, D] u_c = mean_q q_c^2 * mean over kept tokens of k_c^2."""
        b, kh, t, d = cache.k.shape
        q = obs.queries[:, :, :self.window].astype(jnp.float32)  # [B, H, W, D]
        q = q.reshape(b, kh, -1, d)
        q2 = (q * q).mean(2)  # [B, K, D]
        k = cache.k.astype(jnp.float32)
        n = jnp.maximum(kept.sum(-1), 1).astype(jnp.float32)  # [B, K]
        k2 = jnp.where(kept[..., None], k * k, 0.0).sum(2) / n[..., None]
        return q2 * k2

    # ---- compression ----------------------------------------------------------------------------
    def compress_layer(self, layer, cache, obs):
        finite = jnp.isfinite(cache.k).all() & jnp.isfinite(cache.v).all()
        if not isinstance(finite, jax.core.Tracer) and not bool(finite):
            raise ValueError(f"cache: layer {layer}'s keys/values hold NaN or Inf; refusing to "
                             f"compress them")
        b, kh, t, d = cache.k.shape
        item = jnp.dtype(cache.k.dtype).itemsize
        r = self.k_row_bytes(d)
        p = self.arena_bytes(t, obs.extra_capacity, kh, d, item)
        # per-sequence arena budget (bytes per head), float32 arithmetic
        total = jnp.floor(prompt_byte_budget(self.budget, obs.lengths.astype(jnp.float32),
                                             obs.extra_capacity, kh, d, item))
        fixed = self.fixed_bytes_per_sequence(kh, d, item)
        per_head = jnp.clip(jnp.floor((total - fixed) / kh), 0, p).astype(jnp.int32)  # [B]

        def cost(bits: int) -> int:
            return 0 if bits == 0 else 8 * record_bytes(bits, r, d, item)

        eps = self.eps_table
        alloc = allocate_bits(self.token_weights(cache, obs), eps["v"], 8 * per_head[:, None],
                              choices=self.bit_widths, cost_fn=cost)
        kept = alloc.bits > 0
        u = self.channel_weights(cache, obs, kept)
        channels = allocate_channel_bits(u, eps["k"], 8 * r, max_bits=8, kept_tokens=1,
                                         overhead_bits_per_channel=0)
        out = MixedCache.from_allocation(cache.k, cache.v, obs.lengths, alloc.bits,
                                         channels.bits, window=self.whole, arena_bytes=p,
                                         k_row_bytes=r, extra_capacity=obs.extra_capacity)
        # a non-finite input poisons the output (generate then raises, see check_finite_caches)
        return out.replace(whole_k=jnp.where(finite, out.whole_k, jnp.nan))


# ----------------------------------------------------------------------------- calibration


@functools.lru_cache(maxsize=None)
def _prompt_kv_jit():
    from jaxkv.diagnostics import layer_qkv
    from jaxkv.model.model import Model

    @functools.partial(jax.jit, static_argnames=("config",))
    def fn(params, tokens, config):
        qkv = layer_qkv(Model(config=config, params=params), tokens)
        return [(k, v) for _, k, v in qkv]  # [1, T, K, D] each
    return fn


def calibrate_model(model, prompts) -> quant.EpsTable:
    """The eps(b) table of `model` at 2, 4, 8 bits, measured on the keys (per channel) and values
    (per token) of every layer and KV head while it reads `prompts` (token-id lists or strings),
    errors and norms summed over all of them before dividing (`jaxkv.cache.quant.calibrate_eps`).
    A few prompts of a few hundred tokens are enough; use text like the deployment's."""
    from jaxkv.generate import as_token_lists
    from jaxkv.model.model import check_tokens
    token_lists = as_token_lists(model, prompts)
    fn = _prompt_kv_jit()
    keys, values = [], []
    for ids in token_lists:
        tokens = check_tokens([ids], model.config, "prompts")
        for k, v in fn(model.params, tokens, config=model.config):
            keys.append(k[0].transpose(1, 0, 2))  # [K, T, D]: per channel = over axis -2
            values.append(v[0].transpose(1, 0, 2))
    return quant.calibrate_eps(keys, values, key_axis=-2, value_axis=-1)


def save_calibration(model, prompts, path) -> quant.EpsTable:
    """calibrate_model, then write the table to `path` (JSON) tied to model_fingerprint(model);
    the recipe keeps it beside the model as `rdkv_eps.json`."""
    eps = calibrate_model(model, prompts)
    quant.save_eps(path, eps, model_fingerprint(model))
    return eps


def load_calibration(path, model) -> quant.EpsTable:
    """The table at `path`, which must have been calibrated for `model` (else ValueError)."""
    return quant.load_eps(path, model_fingerprint(model))


# ----------------------------------------------------------------------------- registry


def eps_cache_path(model) -> str:
    """Where `python -m train calibrate` stores a model's table: the user cache folder
    (`jaxkv.paths.user_cache_dir`), one file per model fingerprint."""
    from jaxkv.paths import user_cache_dir
    return os.path.join(user_cache_dir(), "rdkv", f"{model_fingerprint(model)}.json")


def find_calibration(model) -> Optional[str]:
    """The calibration file of `model`: the user cache's, else one beside a model folder
    (`<folder>/rdkv_eps.json`, how the in-house models ship theirs); None if neither exists."""
    cached = eps_cache_path(model)
    if os.path.exists(cached):
        return cached
    folder = getattr(model, "path", None)
    if folder and os.path.isdir(folder) and os.path.exists(os.path.join(folder, EPS_FILE)):
        return os.path.join(folder, EPS_FILE)
    return None


def calibrate_command(model) -> str:
    spec = getattr(model, "name", None) or getattr(model, "path", None) or "NAME_OR_PATH"
    return f"python -m train calibrate --model {spec}"


@register_method("rdkv")
def _rdkv(budget: float, model, window: int = 32, kernel: int = 5, k_bits: int = 4,
          bit_widths: Sequence[int] = quant.BIT_WIDTHS, eps: Optional[Mapping] = None,
          eps_path: Optional[str] = None, whole: Optional[int] = None):
    """RDKV at `budget` of each layer's dense prompt cache bytes. eps: a table, or "default" for
    the published Llama-3.1-8B one (DEFAULT_EPS); eps_path: a file from save_calibration for this
    model; neither: this model's calibration (`find_calibration`), and a ValueError naming the
    calibrate command when it has none. whole: recent prompt tokens kept whole (None: window)."""
    if window > model.config.max_position_embeddings:
        raise ValueError(f"window={window}: larger than the model's context "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    if eps is not None and eps_path is not None:
        raise ValueError("eps and eps_path: give one of them, not both")
    if isinstance(eps, str):
        if eps != "default":
            raise ValueError(f"eps={eps!r}: give a table {{'k': {{bits: e}}, 'v': ...}} or "
                             f"'default' (the Llama-3.1-8B table)")
        eps = DEFAULT_EPS
    if eps_path is None and eps is None:
        eps_path = find_calibration(model)
        if eps_path is None:
            raise ValueError(f"rdkv: no distortion table eps(b) for this model (fingerprint "
                             f"{model_fingerprint(model)}); measure one with "
                             f"`{calibrate_command(model)}`, or pass eps='default' for the "
                             f"Llama-3.1-8B table")
    if eps_path is not None:
        eps = load_calibration(eps_path, model)
    return RDKV(budget=budget, window=window, kernel=kernel, k_bits=k_bits,
                bit_widths=tuple(bit_widths), eps=eps, whole=whole)


__all__ = ["RDKV", "DEFAULT_EPS", "calibrate_model", "save_calibration", "load_calibration",
           "model_fingerprint", "freeze_eps", "eps_cache_path", "find_calibration"]
