"""RDKV: rate-distortion bit allocation that unifies eviction and quantisation (docs/methods.md,
RDKV), stored in a `jaxkv.cache.MixedCache` (layout: `jaxkv.cache.mixed_format`).

Per layer, right after prefill (`compress_layer`, so only one layer's dense cache ever exists):

1. The last `whole` prompt tokens (default: the `window` observation tokens) are kept whole (K
   and V in the cache dtype) in the whole zone, which also receives the tokens generated while
   decoding. Everything else competes for bits (with `whole=0` the window tokens too, which is
   what fits a budget of a token or two, e.g. 1% of a 224-token prompt).
2. V token weights: w_t = attention the last `window` prompt queries (all G query heads of the
   KV head; fewer when the prompt is shorter) pay to token t, divided by G times the number of
   those queries that can see t, then 1-D average-pooled with `kernel` (as SnapKV pools), then
   summed over spans of `span` consecutive positions (default 5; `span_scores`), every token of
   a span weighing the span, so spans are kept or evicted whole and a number's digits stay
   together. Per-token weights (`span=1`, the recipe) keep a few digits of a passkey per head,
   and the model writes the first ones and stops (SmolLM2, passkey at 2K and 4K, 10% of the
   bytes: 0 of 8 prompts at span 1, 8 of 8 at span 5).
3. Tokens (V): every other prompt token gets a V width b_t in `bit_widths` (default {0, 2, 4, 8,
   16}; 0 evicts the token, K and V) minimising sum_t w_t eps_V(b_t) with its V records within
   (1 - k_share) of the bytes, by the Lagrangian bisection of
   `jaxkv.policies.rd_alloc.allocate_bits`: per KV head (`water="head"`, each head its share
   of the bytes) or with one water level across the heads of the layer (`water="layer"`: one
   multiplier, the heads' tokens compete for the layer's bytes, a head may take more than its
   share).
4. Channels (K): u_c = mean over the same queries (and the G heads) of q_c^2 times the mean over
   the kept tokens of k_c^2; both channels of a RoPE pair (i, i + D/2) get one width in
   {0, 2, 4, 8} (0 prunes them; K is capped at 8 bits) minimising sum_c u_c eps_K(b_c) within
   the bytes the tokens left (`allocate_pair_bits`: a pair costs its codes over the kept tokens
   and its float16 scale and zero-point per group of 32 kept tokens). When K would fit at 8 bits
   with bytes to spare (few tokens kept, a generous budget), step 3 is solved again with every
   kept token paying its K row at 8 bits, so the spare bytes keep more tokens instead of being
   padding; K then has less than k_share.

Budget. `budget` is a fraction of the bytes of this layer's dense cache (K and V of the prompt
and of the decode slots in the cache dtype, plus its int32 lengths), per sequence: the decode
slots, which the whole zone holds in the cache dtype as the dense cache does, are taken off first
and the prompt part gets the rest (`jaxkv.policies.base.prompt_byte_budget`); a sequence shorter
than the padded prompt gets proportionally less. Everything the compressed prompt part stores is
counted, not only code bits (the authors count code bits only): a kept token's V record (int16
position, float16 V scale and zero-point, codes, or its V in the 16-bit tier), its K row (the
stored channels' codes, rounded up to whole bytes) and, per group of 32 kept tokens, each stored
channel's float16 K scale and zero-point; the whole zone, the channel ranks and the counts are
taken off the budget first. The arena (the array) is sized from the padded prompt length, so
`MixedCache.nbytes()` minus the decode slots is at most budget x the dense cache less those
slots, and each solve's cost never exceeds its bytes, so the sections always fit.

K/V split. `k_share` (r, default 0.5) is the share of the arena bytes that K gets: V records are
allocated within (1 - r) of them, K gets the rest (r, plus what V left unused), unless K fills up
at 8 bits (then V gets more, see 4).

Distortion table eps(b). The recipe calibrates it once per model on sample prompts: use
`calibrate_model(model, prompts)` and `save_calibration(model, prompts, path)` (JSON tied to
`model_fingerprint(model)`), then `RDKV(eps=table)` or `make_policy("rdkv", budget, model,
eps_path=path)`; a file for another model is a ValueError. With neither, `make_policy` reads the
table `python -m train calibrate --model NAME_OR_PATH` stored for this model (the user cache
folder, `eps_cache_path`), or `<model folder>/rdkv_eps.json` (the in-house models ship theirs);
a model without a table is a ValueError naming that command. K is calibrated as it is stored:
per channel over groups of 32 consecutive tokens (tables written before the groups say
`k_group_tokens` is missing and get a warning naming the calibrate command). `eps="default"`
takes the published Llama-3.1-8B table (DEFAULT_EPS: K 0.149 / 0.0062 / 2.2e-5, V 0.313 / 0.0140
/ 4.9e-5 at 2 / 4 / 8 bits) on purpose.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from jaxkv.cache import quant
from jaxkv.cache.mixed import MixedCache
from jaxkv.cache.mixed_format import GROUP, KMETA_BYTES, position_bytes, v_record_bytes
from jaxkv.checks import check_int
from jaxkv.model.model import model_fingerprint
from jaxkv.policies.base import Policy, check_budget, last_positions, prompt_byte_budget
from jaxkv.policies.rd_alloc import (allocate_bits, allocate_pair_bits, allocate_with_costs,
                                     pair_costs, rope_pairs)
from jaxkv.policies.registry import register_method
from jaxkv.policies.snapkv import avg_pool, span_scores, window_attention

#: Llama-3.1-8B, docs/methods.md, RDKV (normalised MSE of RTN at 2 / 4 / 8 bits).
DEFAULT_EPS = {"k": {2: 0.149, 4: 0.0062, 8: 2.2e-5}, "v": {2: 0.313, 4: 0.0140, 8: 4.9e-5}}
EPS_FILE = "rdkv_eps.json"
WATER = ("head", "layer")
K_MAX_BITS = 8
HEADER_BITS = 32  # float16 K scale + zero-point, per stored channel and group


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
    """Rate-distortion bit allocation over tokens (V) and RoPE channel pairs (K); see module
    docstring.

    budget: fraction of the layer's dense prompt cache bytes, in (0, 1]; window: the observation
    window (last prompt queries whose attention weighs the tokens and whose squares weigh the K
    channels); whole: recent prompt tokens kept whole (None: the window; 0: none, all compete for
    bits); kernel: pooling of the V weights (odd); k_share: share r of the arena bytes for K, in
    [0, 1); water: "head" (one allocation per KV head, each its share of the bytes) or "layer"
    (one water level across the heads of a layer); bit_widths: V widths allowed, from
    {0, 2, 4, 8, 16}, including 0; eps: the distortion table (dict or frozen), default
    DEFAULT_EPS."""

    budget: float = 0.1
    window: int = 32
    kernel: int = 5
    k_share: float = 0.5
    bit_widths: Tuple[int, ...] = quant.BIT_WIDTHS
    eps: Any = None
    whole: Optional[int] = None  # recent prompt tokens kept whole; None: `window`
    water: str = "head"
    span: int = 5  # V weights summed over spans of this many consecutive tokens (1: per token)

    name = "rdkv"
    layer_invariant = True

    def __post_init__(self):
        check_budget(self.budget)
        check_int("window", self.window, 1)
        object.__setattr__(self, "whole", self.window if self.whole is None
                           else check_int("whole", self.whole, 0))
        check_int("kernel", self.kernel, 1)
        check_int("span", self.span, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel}: the pooling kernel must be odd")
        r = self.k_share
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) \
                or not 0 <= r < 1:
            raise ValueError(f"k_share={r!r}: the share of the bytes for K must be in [0, 1)")
        object.__setattr__(self, "k_share", float(r))
        if self.water not in WATER:
            raise ValueError(f"water={self.water!r}: must be 'head' (one allocation per KV "
                             f"head) or 'layer' (one water level across a layer's heads)")
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
    def fixed_bytes_per_sequence(self, kv_heads: int, head_dim: int, itemsize: int) -> int:
        """Prompt-part bytes outside the arena per sequence: every head's window, channel ranks
        and counts, plus the cache's two int32 lengths."""
        return kv_heads * MixedCache.fixed_bytes_per_head(head_dim, self.whole, itemsize) + 8

    def arena_sizes(self, t: int, extra: int, kv_heads: int, head_dim: int,
                    itemsize: int) -> Tuple[int, int]:
        """(S, C): static arena bytes per sequence and head capacity for a padded prompt of t
        tokens and `extra` decode slots (C = S / K per head, or S with one water level per
        layer). ValueError if the budget does not even cover the window and the fixed parts."""
        total = math.floor(prompt_byte_budget(self.budget, t, extra, kv_heads, head_dim, itemsize))
        fixed = self.fixed_bytes_per_sequence(kv_heads, head_dim, itemsize)
        if total < fixed:
            raise ValueError(
                f"budget={self.budget}: {total} bytes per sequence for a {t}-token prompt next "
                f"to {extra} decode slots, fewer than the {fixed} that the tokens kept whole "
                f"(whole={self.whole}), the channel ranks and the counts take; raise the budget "
                f"or keep fewer tokens whole")
        if self.water == "head":
            c = (total - fixed) // kv_heads
            return kv_heads * c, c
        return total - fixed, total - fixed

    # ---- weights --------------------------------------------------------------------------------
    def _query_valid(self, obs) -> jax.Array:
        """bool [B, W]: window queries at distinct prompt positions (a prompt shorter than the
        window has fewer; last_positions repeats position 0 for the rest)."""
        w = self.window
        return jnp.arange(w)[None, :] >= (w - obs.lengths.astype(jnp.int32))[:, None]

    def token_weights(self, cache, obs) -> jax.Array:
        """float32 [B, K, T] V weights (step 2 of the module docstring), 0 outside the arena
        candidates (whole zone and padding)."""
        w = self.window
        probs = window_attention(cache, obs, w)  # [B, K, G, W, T]
        b, kh, g, _, t = probs.shape
        qok = self._query_valid(obs)  # [B, W]
        qpos = obs.query_positions[:, :w]  # [B, W]
        pos = jnp.arange(t)[None, None, :]
        visible = (pos <= qpos[:, :, None]) & (pos < obs.lengths[:, None, None]) \
            & qok[:, :, None]  # [B, W, T]
        seen = visible.sum(1).astype(jnp.float32)  # [B, T]
        probs = probs * qok[:, None, None, :, None]
        mass = probs.sum(axis=(2, 3)) / (g * jnp.maximum(seen, 1.0))[:, None, :]
        pooled = avg_pool(mass, self.kernel)
        if self.span > 1:  # every token of a span weighs what the span weighs: kept together
            pooled = jnp.maximum(span_scores(pooled, self.span), 0.0)
        n_whole = jnp.minimum(self.whole, obs.lengths)
        candidate = pos[:, 0] < (obs.lengths - n_whole)[:, None]  # [B, T]
        return jnp.where(candidate[:, None, :], pooled, 0.0)

    def channel_weights(self, cache, obs, kept) -> jax.Array:
        """float32 [B, K, D] u_c = mean over the window queries of q_c^2 * mean over the kept
        tokens of k_c^2."""
        b, kh, t, d = cache.k.shape
        q = obs.queries[:, :, :self.window].astype(jnp.float32)  # [B, H, W, D]
        qok = self._query_valid(obs).astype(jnp.float32)  # [B, W]
        g = q.shape[1] // kh
        q2 = (q * q * qok[:, None, :, None]).reshape(b, kh, g, self.window, d).sum((2, 3))
        q2 = q2 / (g * jnp.maximum(qok.sum(-1), 1.0))[:, None, None]  # [B, K, D]
        k = cache.k.astype(jnp.float32)
        n = jnp.maximum(kept.sum(-1), 1).astype(jnp.float32)  # [B, K]
        k2 = jnp.where(kept[..., None], k * k, 0.0).sum(2) / n[..., None]
        return q2 * k2

    # ---- allocation -----------------------------------------------------------------------------
    def allocate(self, w, u_fn, avail, kh: int, d: int, pos_b: int):
        """(token_bits int32 [B, K, T], channel_bits int32 [B, K, D]) for V weights w [B, K, T],
        u_fn(kept [B, K, T]) -> channel weights [B, K, D], and `avail` [B] arena bytes of each
        sequence (steps 3 and 4 of the module docstring, then the joint pass):

        1. V records within (1 - k_share) of a head's bytes (per head, or per layer with one
           water level) -> the kept tokens;
        2. K widths per RoPE pair for those tokens within the bytes V left;
        3. only where K took every pair at 8 bits with bytes to spare: V again over the whole
           bytes, every kept token paying its V record plus its 8-bit K row and its share of a
           group header, then the lowest-value tokens evicted until the regions' partial last
           groups' headers fit too.
        """
        b, _, t = w.shape
        eps = self.eps_table
        choices = self.bit_widths
        nc = len(choices)
        vrec = jnp.asarray([0 if bw == 0 else v_record_bytes(bw, d, pos_b) for bw in choices],
                           jnp.int32)  # [C] V record bytes
        layer = self.water == "layer"
        if layer:  # one solve per sequence over every head's tokens
            arena = avail.astype(jnp.int32)  # [B]
        else:
            arena = jnp.broadcast_to((avail.astype(jnp.int32) // kh)[:, None], (b, kh))

        def items(x):  # [B, K, T, ...] -> the solve's items
            return x.reshape((b, kh * t) + x.shape[3:]) if layer else x

        def heads(x):  # the solve's items -> [B, K, T]
            return x.reshape(b, kh, t)

        def per_head_sum(x):  # [B, K] -> the solve's lead shape
            return x.sum(-1) if layer else x

        def counts_of(bits):  # [B, K, T] -> [B, K, 4]
            return jnp.stack([(bits == bw).sum(-1) for bw in (16, 8, 4, 2)], -1)

        # 1. V within (1 - r) of the bytes
        first = allocate_bits(items(w), eps["v"],
                              8 * jnp.floor((1.0 - self.k_share) * arena.astype(jnp.float32)),
                              choices=choices, cost_fn=lambda bw: 0 if bw == 0 else
                              8 * v_record_bytes(bw, d, pos_b))
        bits1 = heads(first.bits)
        kept1 = (bits1 > 0).sum(-1)  # [B, K]
        groups1 = ((counts_of(bits1) + GROUP - 1) // GROUP).sum(-1)
        vbytes1 = jnp.take(vrec, jnp.searchsorted(jnp.asarray(choices), bits1)).sum(-1)

        # 2. K widths per RoPE pair within what V left (less the K-row rounding, <= 4 bits a row)
        u = u_fn(bits1 > 0)  # [B, K, D]
        kb = jnp.maximum(8 * (arena - per_head_sum(vbytes1)) - 4 * per_head_sum(kept1), 0)
        if layer:
            pc = pair_costs(kept1, groups1, K_MAX_BITS, HEADER_BITS)  # [B, K, C]
            pc = jnp.broadcast_to(pc[:, :, None, :], (b, kh, d // 2, pc.shape[-1]))
            a = allocate_with_costs(rope_pairs(u).reshape(b, kh * d // 2), eps["k"], kb,
                                    pc.reshape(b, kh * d // 2, -1), choices=(0, 2, 4, 8))
            pb = a.bits.reshape(b, kh, d // 2)
            channel_bits = jnp.concatenate([pb, pb], -1)
        else:
            channel_bits = allocate_pair_bits(u, eps["k"], kb, kept_tokens=kept1, groups=groups1,
                                              max_bits=K_MAX_BITS, header_bits=HEADER_BITS).bits
        row = (channel_bits.sum(-1) + 7) // 8  # [B, K] R bytes
        header = KMETA_BYTES * (channel_bits > 0).sum(-1)  # [B, K] H bytes

        # 3. K at 8 bits with bytes to spare: V again over the whole bytes, each kept token
        #    paying its V record, its K row and its share of a group header, then the partial
        #    groups' extra headers trimmed off (lowest distortion per byte evicted first)
        sat = ((channel_bits == K_MAX_BITS) | (u <= 0)).all(-1)  # [B, K]
        sat = sat.all(-1) if layer else sat
        tok = jnp.where(jnp.asarray(choices) > 0,
                        8 * (vrec + row[..., None]) + header[..., None] // KMETA_BYTES, 0)
        tok = items(jnp.broadcast_to(tok[:, :, None, :], (b, kh, t, nc)))  # [..., N, C] bits
        again = allocate_with_costs(items(w), eps["v"], 8 * arena, tok, choices=choices).bits
        bits3 = heads(again)

        def exact(bits):  # [B, K, T] -> bytes of every head's section [B, K]
            counts = counts_of(bits)
            groups = ((counts + GROUP - 1) // GROUP).sum(-1)
            return (jnp.take(vrec, jnp.searchsorted(jnp.asarray(choices), bits)).sum(-1)
                    + (bits > 0).sum(-1) * row + groups * header)

        over = per_head_sum(exact(bits3)) - arena  # < 4 headers a head
        freed = jnp.where(bits3 > 0, jnp.take(vrec, jnp.searchsorted(jnp.asarray(choices), bits3))
                          + row[..., None], 0)  # [B, K, T] bytes at least freed by an eviction
        eps_v = jnp.asarray([1.0 if bw == 0 else 0.0 if bw == 16 else eps["v"][bw]
                             for bw in choices], jnp.float32)
        loss = w * (1.0 - jnp.take(eps_v, jnp.searchsorted(jnp.asarray(choices), bits3)))
        prio = items(jnp.where(bits3 > 0, loss / jnp.maximum(freed, 1), jnp.inf))
        order = jnp.argsort(prio, axis=-1)
        fs = jnp.take_along_axis(items(freed), order, -1)
        cut = (jnp.cumsum(fs, -1) - fs) < over[..., None]  # evict until the overflow is freed
        evict = jnp.take_along_axis(cut, jnp.argsort(order, axis=-1), -1)
        bits3 = jnp.where(heads(evict), 0, bits3)
        sat = sat[:, None] if layer else sat
        return jnp.where(sat[..., None], bits3, bits1), channel_bits

    # ---- compression ----------------------------------------------------------------------------
    def compress_layer(self, layer, cache, obs):
        finite = jnp.isfinite(cache.k).all() & jnp.isfinite(cache.v).all()
        if not isinstance(finite, jax.core.Tracer) and not bool(finite):
            raise ValueError(f"cache: layer {layer}'s keys/values hold NaN or Inf; refusing to "
                             f"compress them")
        b, kh, t, d = cache.k.shape
        item = jnp.dtype(cache.k.dtype).itemsize
        s, c = self.arena_sizes(t, obs.extra_capacity, kh, d, item)
        # per-sequence arena bytes, float32 arithmetic
        total = jnp.floor(prompt_byte_budget(self.budget, obs.lengths.astype(jnp.float32),
                                             obs.extra_capacity, kh, d, item))
        fixed = self.fixed_bytes_per_sequence(kh, d, item)
        avail = jnp.clip(total - fixed, 0, s)  # [B]
        bits, channel_bits = self.allocate(
            self.token_weights(cache, obs), lambda kept: self.channel_weights(cache, obs, kept),
            avail, kh, d, position_bytes(t))
        out = MixedCache.from_allocation(cache.k, cache.v, obs.lengths, bits, channel_bits,
                                         window=self.whole, arena_bytes=s, head_capacity=c,
                                         extra_capacity=obs.extra_capacity)
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


def _key_groups(k):
    """Keys [K, T, D] -> [K, T // 32, 32, D] (the tail past the last whole group dropped; a prompt
    under 32 tokens is one group): RDKV quantises K per channel over groups of 32 tokens."""
    kh, t, d = k.shape
    g = GROUP if t >= GROUP else t
    n = t // g * g
    return k[:, :n].reshape(kh, n // g, g, d)


def calibrate_model(model, prompts) -> quant.EpsTable:
    """The eps(b) table of `model` at 2, 4, 8 bits, measured on the keys (per channel over groups
    of 32 consecutive tokens, as `MixedCache` stores them) and values (per token) of every layer
    and KV head while it reads `prompts` (token-id lists or strings), errors and norms summed over
    all of them before dividing (`jaxkv.cache.quant.calibrate_eps`). A few prompts of a few
    hundred tokens are enough; use text like the deployment's."""
    from jaxkv.generate import as_token_lists
    from jaxkv.model.model import check_tokens
    token_lists = as_token_lists(model, prompts)
    fn = _prompt_kv_jit()
    keys, values = [], []
    for ids in token_lists:
        tokens = check_tokens([ids], model.config, "prompts")
        for k, v in fn(model.params, tokens, config=model.config):
            keys.append(_key_groups(k[0].transpose(1, 0, 2)))  # [K, J, 32, D]: over axis -2
            values.append(v[0].transpose(1, 0, 2))
    return quant.calibrate_eps(keys, values, key_axis=-2, value_axis=-1)


def save_calibration(model, prompts, path) -> quant.EpsTable:
    """calibrate_model, then write the table to `path` (JSON) tied to model_fingerprint(model)
    and marked `k_group_tokens: 32`; the recipe keeps it beside the model as `rdkv_eps.json`."""
    eps = calibrate_model(model, prompts)
    quant.save_eps(path, eps, model_fingerprint(model), extra={"k_group_tokens": GROUP})
    return eps


def load_calibration(path, model) -> quant.EpsTable:
    """The table at `path`, which must have been calibrated for `model` (else ValueError). A table
    whose K was not calibrated over groups of 32 tokens (written before K groups) warns."""
    table = quant.load_eps(path, model_fingerprint(model))
    with open(path) as f:
        group = json.load(f).get("k_group_tokens")
    if group != GROUP:
        warnings.warn(f"{os.fspath(path)}: K calibrated per channel over "
                      f"{'whole prompts' if group is None else f'{group} tokens'}, not over the "
                      f"{GROUP}-token groups RDKV stores; recalibrate with "
                      f"`{calibrate_command(model)}`", stacklevel=2)
    return table


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
def _rdkv(budget: float, model, window: int = 32, kernel: int = 5, k_share: float = 0.5,
          bit_widths: Sequence[int] = quant.BIT_WIDTHS, eps: Optional[Mapping] = None,
          eps_path: Optional[str] = None, whole: Optional[int] = None, water: str = "head",
          span: int = 5):
    """RDKV at `budget` of each layer's dense prompt cache bytes. eps: a table, or "default" for
    the published Llama-3.1-8B one (DEFAULT_EPS); eps_path: a file from save_calibration for this
    model; neither: this model's calibration (`find_calibration`), and a ValueError naming the
    calibrate command when it has none. whole: recent prompt tokens kept whole (None: window);
    k_share: share of the arena bytes for K; water: "head" or "layer" (one water level across a
    layer's heads); span: V weights summed over spans of that many consecutive tokens, so a span
    is kept or evicted as one (`RDKV.span`; 1: the recipe's per-token weights)."""
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
    return RDKV(budget=budget, window=window, kernel=kernel, k_share=k_share,
                bit_widths=tuple(bit_widths), eps=eps, whole=whole, water=water, span=span)


__all__ = ["RDKV", "DEFAULT_EPS", "calibrate_model", "save_calibration", "load_calibration",
           "model_fingerprint", "freeze_eps", "eps_cache_path", "find_calibration"]
