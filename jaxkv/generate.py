"""Jit-compiled generation: prefill (with an optional compression policy) + a `lax.while_loop`
decode over the cache pytree. One compilation per (batch, padded prompt length, max_new_tokens,
policy, sampling mode); prompt lengths are bucketed so varied prompts reuse compilations."""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import pickle
import time
from typing import Any, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache.base import cache_nbytes
from jaxkv.cache.dense import DenseCache
from jaxkv.model.config import ModelConfig
from jaxkv.model.decoder import Decoder, depend_on
from jaxkv.model.model import Model

PROMPT_BUCKET = 64


@dataclasses.dataclass
class Generation:
    """tokens: the new tokens of each prompt, cut after the first EOS (EOS included).
    cache_bytes: bytes of the cache arrays actually held (kept prompt + decode room);
    full_cache_bytes: bytes the dense cache of the same batch and capacity holds;
    kept_positions: (`generate_shared` only) bool [L, B, K, T], the prompt positions each layer's
    KV heads held right after compression (`LayerCache.kept_positions`), None where a cache type
    does not report them.
    seconds: (`generate_shared` only) wall time of this policy's compression and decoding
    (compilation included when it happens) plus an equal share of the one shared prefill."""

    tokens: List[List[int]]
    texts: Optional[List[str]]
    cache_bytes: int
    full_cache_bytes: int
    prompt_lengths: List[int]
    kept_positions: Optional[np.ndarray] = None
    seconds: Optional[float] = None

    @property
    def budget(self) -> float:
        return self.cache_bytes / self.full_cache_bytes


def _sample(logits, rng, temperature, top_p, greedy: bool):
    """logits: [B, V] -> [B] int32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # smallest set whose mass reaches top_p: keep tokens whose preceding mass is < top_p
    keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def prefill_and_decode(params, tokens, lengths, rng, temperature, top_p, *, config: ModelConfig,
                       policy: Any, max_new_tokens: int, greedy: bool, eos_ids: tuple):
    """Traceable core. tokens: [B, T]; lengths: [B] -> (new tokens [B, N], final caches,
    bool: some logits were not finite)."""
    module = Decoder(config)
    b, t = tokens.shape
    capacity = t + max_new_tokens
    query_positions = None
    if policy is not None:
        query_positions = policy.observation_positions(lengths, t)
    logits, caches = module.apply({"params": params}, tokens, lengths, capacity, policy,
                                  query_positions, method=Decoder.prefill)
    rng, sub = jax.random.split(rng)
    first = _sample(logits, sub, temperature, top_p, greedy)
    out, caches, bad = decode_loop(params, first, lengths, caches, rng, temperature, top_p,
                                   config=config, max_new_tokens=max_new_tokens, greedy=greedy,
                                   eos_ids=eos_ids)
    return out, caches, bad | ~jnp.isfinite(logits).all()


def decode_loop(params, first, lengths, caches, rng, temperature, top_p, *, config: ModelConfig,
                max_new_tokens: int, greedy: bool, eos_ids: tuple):
    """Traceable decode from the first sampled token `first` [B] over `caches` (the prompts' per
    layer caches) -> (new tokens [B, N] with `first` at 0, final caches, bool: some step's logits
    were not finite). Stops early when every sequence has written an EOS id; tokens after a
    sequence's EOS are the pad id."""
    module = Decoder(config)
    b = first.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    out = jnp.full((b, max_new_tokens), config.pad_token_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)

    def cond(state):
        step, _, _, done, _, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, out, caches, done, last, rng, bad = state
        positions = lengths + step - 1  # position of `last` in each sequence
        logits, caches = module.apply({"params": params}, last, positions, caches,
                                      method=Decoder.decode)
        bad = bad | ~jnp.all(jnp.isfinite(logits) | done[:, None])  # live rows only
        rng, sub = jax.random.split(rng)
        nxt = _sample(logits, sub, temperature, top_p, greedy)
        nxt = jnp.where(done, config.pad_token_id, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], step, axis=1)
        done = done | jnp.isin(nxt, eos)
        return step + 1, out, caches, done, nxt, rng, bad

    state = (jnp.int32(1), out, caches, done, first, rng, jnp.bool_(False))
    _, out, caches, _, _, _, bad = jax.lax.while_loop(cond, body, state)
    return out, caches, bad


def check_finite_caches(caches) -> None:
    """Raise ValueError if a compressed cache holds NaN/Inf. Policies built on
    `jaxkv.policies.snapkv` poison their whole output when their input cache is not finite, so a
    NaN that the selection happened to drop still surfaces here instead of a silently wrong cache."""
    for i, cache in enumerate(caches):
        leaves = [x for x in jax.tree_util.tree_leaves(cache) if jnp.issubdtype(x.dtype, jnp.floating)]
        if leaves and not bool(jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))):
            raise ValueError(f"layer {i}: the KV cache holds NaN or Inf after prefill (the model's "
                             f"keys/values are not finite: check the weights and dtype); "
                             f"compression on it would be meaningless")


def split_policy(policy):
    """(static part, traced leaves) of a policy.

    A policy that is a pytree (a `flax.struct.dataclass` whose settings are `pytree_node=False`
    fields and whose arrays, e.g. RLKV gates being trained, are leaves) is traced: changing its
    arrays does not recompile. Any other policy (a frozen dataclass) is static, part of the key.
    """
    leaves, treedef = jax.tree_util.tree_flatten(policy)
    if policy is None or (len(leaves) == 1 and leaves[0] is policy):
        return policy, ()
    return treedef, tuple(leaves)


@functools.lru_cache(maxsize=64)
def _compiled(config, static_policy, max_new_tokens, greedy, eos_ids, kernel_mode):
    """The jitted generation program; `kernel_mode` (pallas_kernels.dispatch) is part of the key
    because the dispatcher picks kernel or reference while tracing."""
    def fn(params, policy_leaves, *args):
        policy = static_policy
        if isinstance(static_policy, jax.tree_util.PyTreeDef):
            policy = jax.tree_util.tree_unflatten(static_policy, policy_leaves)
        return prefill_and_decode(params, *args, config=config, policy=policy,
                                  max_new_tokens=max_new_tokens, greedy=greedy, eos_ids=eos_ids)
    return jax.jit(fn)


def _is_token_id(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def as_token_lists(model: Model, prompts) -> List[List[int]]:
    """prompts: a string, a conversation ([{"role", "content"}, ...]), a list of token ids, a 1-D
    or 2-D integer array (rows = prompts), or a list mixing strings, conversations and id lists.
    Strings are encoded with the model's tokenizer (its BOS included), conversations rendered by
    its chat template."""
    from jaxkv.tokenizer import is_conversation
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim not in (1, 2):
            raise ValueError(f"prompts: an array of token ids must be 1-D (one prompt) or 2-D "
                             f"[batch, length], got shape {arr.shape}")
        prompts = [arr] if arr.ndim == 1 else list(arr)
    elif isinstance(prompts, str) or is_conversation(prompts) or (
            isinstance(prompts, Sequence) and prompts and _is_token_id(prompts[0])):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError("prompts: give a string, a conversation, a list of token ids, a 2-D "
                         "integer array, or a non-empty list of these")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = model.encode(p)
        elif is_conversation(p):
            ids = model.encode_chat(p)
        else:
            arr = np.asarray(p)
            if isinstance(p, Sequence) and any(isinstance(x, (bool, np.bool_)) for x in p):
                arr = arr.astype(np.bool_)  # refused below: booleans are not token ids
            if arr.ndim != 1 or (arr.size and (arr.dtype == np.bool_
                                               or not np.issubdtype(arr.dtype, np.integer))):
                if arr.ndim == 1 and arr.dtype == object and all(_is_token_id(x) for x in p):
                    arr = np.asarray([int(x) for x in p], np.int64)
                else:
                    raise ValueError(f"prompts[{i}]: expected a string, a conversation or a 1-D "
                                     f"list of integer token ids, got {type(p).__name__} of "
                                     f"dtype {arr.dtype} and shape {arr.shape}")
            ids = [int(x) for x in arr]
        if not ids:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        out.append(ids)
    return out


def pad_batch(prompts: List[List[int]], pad_id: int, bucket: int = PROMPT_BUCKET):
    """Right-pad to a multiple of `bucket` -> (tokens int32 [B, T], lengths int32 [B])."""
    longest = max(len(p) for p in prompts)
    t = -(-longest // bucket) * bucket
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def generate(model: Model, prompts, max_new_tokens: int, policy: Any = None,
             temperature: float = 0.0, top_p: float = 1.0, seed=0,
             eos_ids: Optional[Sequence[int]] = None, mesh: Any = None) -> Generation:
    """Generate up to `max_new_tokens` after each prompt: a string, a conversation
    ([{"role", "content"}, ...], rendered by the model's chat template), a list of token ids, a
    2-D integer array (rows are prompts), or a list of these.

    temperature 0 is greedy; otherwise temperature / top-p sampling with `seed` (any integer, or
    a jax.random key). Non-finite logits (NaN weights, say) raise ValueError.
    `policy` (see `jaxkv.policies`) compresses each layer's cache right after prefill.
    Generation stops per sequence at an EOS id (default: the model config's).
    mesh: a `jaxkv.sharding.make_mesh` mesh: the batch goes on its "data" axis (shard the params
    with `jaxkv.sharding.shard_model`); jit propagates the shardings through prefill and decode.
    """
    cfg = model.config
    max_new_tokens = _check_new_tokens(max_new_tokens)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value):
            raise ValueError(f"{name}={value!r}: must be a finite number")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 means greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must lie in (0, 1]")
    key = rng_key(seed)
    token_lists = as_token_lists(model, prompts)
    limit = cfg.max_position_embeddings
    for i, ids in enumerate(token_lists):
        if (policy is not None and cfg.sliding_window is not None
                and len(ids) + max_new_tokens > cfg.sliding_window):
            raise ValueError(f"prompts[{i}] has {len(ids)} tokens; with max_new_tokens="
                             f"{max_new_tokens} it passes the model's sliding_window="
                             f"{cfg.sliding_window}, and compressed caches do not implement a "
                             f"sliding window: use policy=None (the dense cache) for it")
        if len(ids) + max_new_tokens > limit:
            raise ValueError(f"prompts[{i}] has {len(ids)} tokens; with max_new_tokens="
                             f"{max_new_tokens} that exceeds the model's context of {limit}")
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise ValueError(f"prompts[{i}]: token ids must lie in [0, {cfg.vocab_size})")
    tokens, lengths = pad_batch(token_lists, cfg.pad_token_id)
    eos = tuple(int(e) for e in (eos_ids if eos_ids is not None else cfg.eos_ids))
    static_policy, policy_leaves = split_policy(policy)
    from pallas_kernels.dispatch import kernel_mode
    fn = _compiled(cfg, static_policy, max_new_tokens, temperature == 0.0, eos, kernel_mode())
    tokens_in, lengths_in = jnp.asarray(tokens), jnp.asarray(lengths)
    if mesh is not None:
        from jaxkv.sharding import shard_batch
        tokens_in, lengths_in = shard_batch((tokens_in, lengths_in), mesh)
    out, caches, bad = fn(model.params, policy_leaves, tokens_in, lengths_in, key,
                          jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p))
    _check_logits(bad)
    return _generation(model, np.asarray(out), caches, tokens.shape[1] + max_new_tokens,
                       token_lists, eos, check_finite=policy is not None)


def _check_new_tokens(max_new_tokens) -> int:
    if isinstance(max_new_tokens, (bool, np.bool_)) or not isinstance(
            max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    return int(max_new_tokens)


def _check_logits(bad) -> None:
    if bool(bad):
        raise ValueError("the model produced non-finite logits (NaN or Inf) while generating: "
                         "check its weights and dtype; no tokens are returned")


def cut_after_eos(out, eos) -> List[List[int]]:
    """Rows of generated tokens [B, N] as lists, each cut after its first EOS id (kept)."""
    rows = []
    for row in np.asarray(out).tolist():
        cut = next((j + 1 for j, x in enumerate(row) if x in eos), len(row))
        rows.append(row[:cut])
    return rows


def _generation(model: Model, out: np.ndarray, caches, capacity: int, token_lists, eos,
                check_finite: bool) -> Generation:
    """Cut each row after its first EOS, decode, and count the bytes of the caches."""
    cfg = model.config
    new_tokens = cut_after_eos(out, eos)
    texts = [model.decode(t) for t in new_tokens] if model.tokenizer is not None else None
    full = cfg.kv_bytes_per_token() * len(token_lists) * capacity + 4 * cfg.num_layers * len(
        token_lists)  # + int32 lengths per layer, as DenseCache holds
    kept = cache_nbytes(caches)  # shapes are fixed through decoding: read off the final arrays
    if check_finite:
        check_finite_caches(caches)
    return Generation(tokens=new_tokens, texts=texts, cache_bytes=kept, full_cache_bytes=full,
                      prompt_lengths=[len(p) for p in token_lists])


# ---- one prefill, many policies ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _KeepDense:
    """A pseudo-policy for the shared prefill: keeps each layer's dense prompt cache and its
    observation (the queries at the positions asked for) uncompressed."""

    def compress_layer(self, layer, cache, obs):
        return cache, obs


@functools.lru_cache(maxsize=32)
def _compiled_shared_prefill(config, max_new_tokens: int, kernel_mode):
    def fn(params, tokens, lengths, qpos):
        b, t = tokens.shape
        logits, states = Decoder(config).apply(
            {"params": params}, tokens, lengths, t + max_new_tokens, _KeepDense(), qpos,
            method=Decoder.prefill)
        return (jnp.argmax(logits, axis=-1).astype(jnp.int32), states,
                ~jnp.isfinite(logits).all())
    return jax.jit(fn)


def observation_union(policies, lengths, t: int):
    """The positions every policy observes, each distinct set once (SnapKV-family methods with
    the same window share theirs): (positions int32 [B, Q], offset and width of each policy's
    columns in it)."""
    unique, where = [], []
    for p in policies:
        if p is None:
            where.append((0, 0))
            continue
        pos = np.asarray(p.observation_positions(lengths, t), np.int32)  # [B, Q_p]
        for j, seen in enumerate(unique):
            if seen.shape == pos.shape and np.array_equal(seen, pos):
                break
        else:
            unique.append(pos)
            j = len(unique) - 1
        where.append((j, pos.shape[1]))
    starts = np.cumsum([0] + [u.shape[1] for u in unique]).tolist()
    columns = [(starts[j], w) if w else (0, 0) for j, w in where]
    union = np.concatenate(unique, axis=1) if unique else np.zeros((len(lengths), 0), np.int32)
    return union, columns


@functools.lru_cache(maxsize=128)
def _compiled_compress_all(policy, offset: int, width: int, max_new_tokens: int, kernel_mode):
    """Every layer's compression in one program (layers chained one after the other, as in
    prefill: see `depend_on`; XLA's CPU runtime also deadlocked running GRKV's layers side by
    side in one program, jax 0.10.2)."""
    def fn(lengths, states):
        caches = []
        for i, (dense, obs) in enumerate(states):
            if caches:
                dense = dense.replace(k=depend_on(dense.k, caches[-1]))
            caches.append(_compress(policy, i, dense, obs, lengths, offset, width, max_new_tokens))
        return tuple(caches)
    return jax.jit(fn)


@functools.lru_cache(maxsize=128)
def _compiled_compress_one(policy, offset: int, width: int, max_new_tokens: int, kernel_mode):
    """One layer's compression for a `layer_invariant` policy: compiled once, run per layer."""
    return jax.jit(lambda lengths, dense, obs: _compress(policy, 0, dense, obs, lengths, offset,
                                                        width, max_new_tokens))


def _compress(policy, layer, dense, obs, lengths, offset, width, max_new_tokens):
    if policy is None:
        t = dense.k.shape[2]
        return DenseCache.from_prefill(dense.k, dense.v, lengths, t + max_new_tokens)
    obs = obs.replace(queries=obs.queries[:, :, offset:offset + width],
                      query_positions=obs.query_positions[:, offset:offset + width])
    return policy.compress_layer(layer, dense, obs)


@functools.lru_cache(maxsize=32)
def _compiled_greedy_decode(config, max_new_tokens: int, eos_ids: tuple, kernel_mode):
    """The greedy decode loop over any caches: jit compiles it once per cache structure and
    shapes, so methods producing the same layout (the SnapKV family at one budget) share it."""
    def fn(params, first, lengths, caches):
        return decode_loop(params, first, lengths, caches, jax.random.PRNGKey(0),
                           jnp.float32(1.0), jnp.float32(1.0), config=config,
                           max_new_tokens=max_new_tokens, greedy=True, eos_ids=eos_ids)
    return jax.jit(fn)


def release_compiled() -> None:
    """Drop every compiled program `generate_shared` and `generate` keep (jax's caches included:
    clearing only this module's caches frees nothing, jax holds the executables too) and hand
    freed memory back to the system (glibc's malloc_trim where there is one). On XLA:CPU each
    policy with its own cache layout keeps about 0.6 GB alive until then (SmolLM2, 4K prompts,
    two sequences, measured by RSS: three PyramidKV budgets 4.9 GB, after this 1.7 GB); the
    evaluation harness calls this after each method group (`EvalConfig.methods_per_prefill`).
    Later calls compile again."""
    import ctypes
    import gc

    for fn in (_compiled_compress_all, _compiled_compress_one, _compiled_greedy_decode,
               _compiled_shared_prefill, _compiled):
        fn.cache_clear()
    jax.clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator keeps its pages
        pass


def rng_key(seed, name: str = "seed") -> jax.Array:
    """A PRNG key from any Python / numpy int (0 <= seed < 2**32: `PRNGKey(seed)`, as before;
    larger or negative ints fold every 32-bit chunk and the sign in, so no two ints share a key)
    or from a `jax.random` key (raw uint32[2] or typed)."""
    if isinstance(seed, (bool, np.bool_)):
        raise ValueError(f"{name}={seed!r}: give an integer or a jax.random key, not a bool")
    if isinstance(seed, (int, np.integer)):
        seed = int(seed)
        if 0 <= seed < 2 ** 32:
            return jax.random.PRNGKey(seed)
        n, chunks = abs(seed), []
        while n:
            chunks.append(n & 0xFFFFFFFF)
            n >>= 32
        key = jax.random.fold_in(jax.random.PRNGKey(int(seed < 0)), 0x9E3779B9 + len(chunks))
        for chunk in reversed(chunks):
            key = jax.random.fold_in(key, chunk)
        return key
    if isinstance(seed, jax.Array):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(seed)
        if seed.shape == (2,) and seed.dtype == jnp.uint32:
            return seed
    raise ValueError(f"{name}={seed!r}: give an integer or a jax.random key "
                     f"(jax.random.PRNGKey(n) or jax.random.key(n))")


def kept_positions(caches, lengths, t: int) -> Optional[np.ndarray]:
    """bool [L, B, K, t]: the prompt positions every layer's cache holds (None if a cache type
    does not say: `LayerCache.kept_positions`)."""
    if not all(hasattr(c, "kept_positions") for c in caches):
        return None
    return np.stack([np.asarray(c.kept_positions(lengths, t)) for c in caches])


def compress_shared(policy, states, lengths, offset: int, width: int, max_new_tokens: int,
                    mode: str):
    """The per-layer caches `policy` keeps of a shared prefill's `states`."""
    if policy is None or getattr(policy, "layer_invariant", False):
        fn = _compiled_compress_one(policy, offset, width, max_new_tokens, mode)
        caches = []
        for dense, obs in states:
            # one layer at a time (see _compiled_compress_all); layer index 0 for every layer
            caches.append(jax.block_until_ready(fn(lengths, dense, obs.replace(layer=0))))
        return tuple(caches)
    return _compiled_compress_all(policy, offset, width, max_new_tokens, mode)(lengths, states)


def generate_shared(model: Model, prompts, max_new_tokens: int, policies: Sequence[Any],
                    eos_ids: Optional[Sequence[int]] = None,
                    pad_to: Optional[int] = None, observe: Optional[Sequence[Any]] = None,
                    prefill_file: Optional[str] = None) -> List[Generation]:
    """Greedy generation of the same prompts under each of `policies` (None: the dense cache)
    with ONE prefill: the prompts are prefilled once, keeping every layer's dense cache and the
    post-RoPE queries every policy observes; then each policy compresses those caches and decodes.

    Gives the tokens `generate(model, prompts, max_new_tokens, policy=p)` gives for each p (every
    policy's prefill is the plain dense one: compression happens after each layer's attention and
    changes nothing upstream), at one prefill's cost instead of len(policies). Holds the dense
    cache of all layers at once (the evaluation harness's trade; `generate` never does).
    pad_to: pad the prompts to this many tokens (default: the next multiple of 64), so batches of
    slightly different lengths share one compiled program.
    observe: the policies of every call that will share this prefill (default: `policies`; each
    of `policies` must be equal to one of them): the prefill collects all their observations,
    so the calls see the same prefill and lay it out the same way.
    prefill_file: a path: when it holds the prefill of these prompts (same tokens, observations
    and shapes), that prefill is loaded instead of computed; otherwise it is computed and saved
    there. Methods run in groups (to free each group's compiled programs) then pay one prefill
    per batch, not one per group and batch. Each policy's `seconds` carries an equal share of
    the prefill's time among the observed policies (plus the load, for a loaded one).
    """
    cfg = model.config
    max_new_tokens = _check_new_tokens(max_new_tokens)
    policies = list(policies)
    observed = list(policies if observe is None else observe)
    for i, p in enumerate(policies):
        if observe is not None and not any(p == o for o in observed):
            raise ValueError(f"policies[{i}] ({type(p).__name__}) is not among `observe`: the "
                             f"shared prefill would not hold its observations")
    start = time.perf_counter()
    token_lists, tokens, lengths_in, columns, first, states, eos, mode, prefill_s = \
        _shared_prefill(model, prompts, max_new_tokens, policies, eos_ids, pad_to,
                        observed=observed, prefill_file=prefill_file)
    jax.block_until_ready((first, states))
    elapsed = time.perf_counter() - start
    if prefill_s is None:  # computed here, not loaded
        prefill_s, elapsed = elapsed, 0.0
    prefill_share = prefill_s / len(observed) + elapsed / len(policies)  # + the load, if any
    out = []
    decode = _compiled_greedy_decode(cfg, max_new_tokens, eos, mode)
    for p, (offset, width) in zip(policies, columns):
        start = time.perf_counter()
        caches = compress_shared(p, states, lengths_in, offset, width, max_new_tokens, mode)
        kept = kept_positions(caches, lengths_in, tokens.shape[1])
        toks, caches, bad = decode(model.params, first, lengths_in, caches)
        _check_logits(bad)
        out.append(_generation(model, np.asarray(toks), caches, tokens.shape[1] + max_new_tokens,
                               token_lists, eos, check_finite=p is not None))
        out[-1].kept_positions = kept
        out[-1].seconds = prefill_share + time.perf_counter() - start
        del caches
    return out


def _shared_prefill(model: Model, prompts, max_new_tokens: int, policies: List[Any], eos_ids,
                    pad_to, observed: Optional[List[Any]] = None,
                    prefill_file: Optional[str] = None):
    """generate_shared's checks and its one prefill: (token lists, padded tokens, lengths, each
    policy's observation columns, first tokens, per-layer (dense cache, observation), eos ids,
    kernel mode, seconds of the prefill when it was loaded from `prefill_file`, else None).
    observed: the policies whose observations the prefill collects (default: policies), laid out
    in their order; each policy's columns are those of an equal observed one."""
    from pallas_kernels.dispatch import kernel_mode

    cfg = model.config
    if not policies:
        raise ValueError("policies: give at least one policy (None for the dense cache)")
    for i, p in enumerate(policies):
        static, leaves = split_policy(p)
        if leaves:
            raise ValueError(f"policies[{i}]: a pytree policy ({type(p).__name__}) is traced by "
                             f"`generate`; give it to `generate` itself")
    token_lists = as_token_lists(model, prompts)
    for i, ids in enumerate(token_lists):
        if len(ids) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompts[{i}] has {len(ids)} tokens; with max_new_tokens="
                             f"{max_new_tokens} that exceeds the model's context of "
                             f"{cfg.max_position_embeddings}")
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise ValueError(f"prompts[{i}]: token ids must lie in [0, {cfg.vocab_size})")
    if cfg.sliding_window is not None and any(p is not None for p in policies):
        raise ValueError("generate_shared: compressed caches do not implement a sliding window; "
                         "use generate for sliding-window models")
    longest = max(len(p) for p in token_lists)
    if pad_to is not None and (not isinstance(pad_to, int) or pad_to < longest):
        raise ValueError(f"pad_to={pad_to!r}: must be an integer >= the longest prompt ({longest})")
    tokens, lengths = pad_batch(token_lists, cfg.pad_token_id,
                                bucket=pad_to if pad_to is not None else PROMPT_BUCKET)
    eos = tuple(int(e) for e in (eos_ids if eos_ids is not None else cfg.eos_ids))
    mode = kernel_mode()
    tokens_in, lengths_in = jnp.asarray(tokens), jnp.asarray(lengths)
    observed = policies if observed is None else observed
    union, columns = observation_union(list(observed) + policies, lengths_in, tokens.shape[1])
    columns = columns[len(observed):]
    prefill = _compiled_shared_prefill(cfg, max_new_tokens, mode)
    args = (model.params, tokens_in, lengths_in, jnp.asarray(union))
    loaded = None if prefill_file is None else _load_prefill(prefill_file, prefill, args)
    if loaded is not None:
        (first, states), seconds = loaded
        return token_lists, tokens, lengths_in, columns, first, states, eos, mode, seconds
    start = time.perf_counter()
    first, states, bad = prefill(*args)
    _check_logits(bad)
    if prefill_file is not None:
        jax.block_until_ready(states)
        _save_prefill(prefill_file, args, (first, states), time.perf_counter() - start)
    return token_lists, tokens, lengths_in, columns, first, states, eos, mode, None


def _prefill_key(args) -> dict:
    """What identifies a shared prefill besides the weights: the tokens, lengths and observed
    positions (the weights are the caller's: one model per evaluation)."""
    _, tokens, lengths, union = args
    return dict(tokens=np.asarray(tokens), lengths=np.asarray(lengths), union=np.asarray(union))


def _save_prefill(path: str, args, out, seconds: float) -> None:
    """Write a shared prefill's (first tokens, states) leaves to `path` (atomically)."""
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(out)]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump(dict(key=_prefill_key(args), leaves=leaves, seconds=seconds), f, protocol=5)
    os.replace(tmp, path)


def _load_prefill(path: str, prefill, args):
    """((first tokens, states), seconds) saved at `path` for the same tokens, lengths and observed
    positions, with the leaves' shapes and dtypes the prefill gives now; None otherwise."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        saved = pickle.load(f)
    key = _prefill_key(args)
    if set(saved["key"]) != set(key) or not all(
            saved["key"][k].shape == v.shape and np.array_equal(saved["key"][k], v)
            for k, v in key.items()):
        return None
    first, states, _ = jax.eval_shape(prefill, *args)
    shapes, tree = jax.tree_util.tree_flatten((first, states))
    leaves = saved["leaves"]
    if len(leaves) != len(shapes) or any(
            x.shape != s.shape or x.dtype != s.dtype for x, s in zip(leaves, shapes)):
        return None
    out = jax.tree_util.tree_unflatten(tree, [jnp.asarray(x) for x in leaves])
    return out, float(saved["seconds"])


def shared_caches(model: Model, prompts, max_new_tokens: int, policies: Sequence[Any],
                  pad_to: Optional[int] = None) -> List[tuple]:
    """The caches `generate_shared` with the same arguments decodes from, one tuple of per-layer
    caches per policy (None: the dense cache): the prompts' caches right after compression, before
    any token is decoded, with room for `max_new_tokens` decoded tokens. It runs the same compiled
    programs, so called after `generate_shared` it shows what each method kept (positions,
    widths, bytes) at the cost of one more prefill and no new compilation."""
    max_new_tokens = _check_new_tokens(max_new_tokens)
    policies = list(policies)
    _, _, lengths_in, columns, _, states, _, mode, _ = _shared_prefill(
        model, prompts, max_new_tokens, policies, None, pad_to)
    return [compress_shared(p, states, lengths_in, offset, width, max_new_tokens, mode)
            for p, (offset, width) in zip(policies, columns)]
