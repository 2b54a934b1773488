"""Head-split caches and the RLKV / DuoAttention / StreamingLLM deployments.

SinkWindowCache and HeadSplitCache against attention over the full sequence with per-head
sink + window masks (many decode steps, wrapping the ring, right-padded batches of different
lengths); end-to-end decoding == a forward pass with the same per-head masks; honest bytes;
global, rank-based head selection worked by hand; gate files; every bad input; no recompilation.
"""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv.cache.dense import DenseCache
from jaxkv.cache.headsplit import HeadSplitCache
from jaxkv.cache.streaming import SinkWindowCache
from jaxkv.generate import _compiled
from jaxkv.model.decoder import Decoder, init_params
from jaxkv.model.model import Model
from jaxkv.model.layers import causal_attention
from jaxkv.policies import registry
from jaxkv.policies.duo import DuoAttention
from jaxkv.policies.rlkv import (RLKV, load_gates, plot_gates, random_gates, save_gates,
                                 select_heads, sparsity_for_budget)
from jaxkv.policies.streaming import StreamingLLM
try:  # tests/ as a package (tests/__init__.py) or as a plain folder on sys.path
    from tests.helpers import assert_close, tiny_config
    from tests.helpers import decode as _decode, prefill as _prefill
except ImportError:  # pragma: no cover
    from helpers import assert_close, tiny_config
    from helpers import decode as _decode, prefill as _prefill

KV = 4  # tiny model with 4 KV heads per layer (2 layers, G = 2): 8 gates


@pytest.fixture(scope="module")
def model():
    """tiny_config with 4 KV heads; parameters drawn in numpy from the shapes Flax would build
    (eager Flax init costs seconds of CPU on this shared machine): norms 1, the rest
    N(0, 1/fan_in) (embeddings N(0, 1))."""
    config = tiny_config(num_kv_heads=KV)
    shapes = jax.eval_shape(functools.partial(init_params, config, 0))
    rng = np.random.RandomState(1)

    def draw(path, x):
        if path[-1].key == "weight":  # RMSNorm scale
            return jnp.ones(x.shape, x.dtype)
        fan_in = x.shape[0] if path[-1].key == "kernel" else 1
        return jnp.asarray(rng.randn(*x.shape) / np.sqrt(fan_in), x.dtype)

    return Model(config=config, params=jax.tree_util.tree_map_with_path(draw, shapes))


# ---- references ---------------------------------------------------------------------------------

def reference_attention(q, k_all, v_all, qpos, stream_kv_heads, sink, window, scale):
    """Attention of one query per sequence over the *full* sequence, positions known.

    q: [B, H, D]; k_all, v_all: [B, K, N, D] (slot n = position n); qpos: [B] query positions.
    KV head h in `stream_kv_heads` sees keys kp <= p with kp < sink or p - kp < window; the others
    see every kp <= p. float64 numpy."""
    q, k_all, v_all = (np.asarray(x, np.float64) for x in (q, k_all, v_all))
    b, h, d = q.shape
    kh, n = k_all.shape[1], k_all.shape[2]
    g = h // kh
    out = np.zeros((b, h, d))
    kp = np.arange(n)
    for bi in range(b):
        p = int(qpos[bi])
        for hi in range(h):
            kv = hi // g
            mask = kp <= p
            if kv in stream_kv_heads:
                mask &= (kp < sink) | (p - kp < window)
            s = k_all[bi, kv, mask] @ q[bi, hi] * scale
            w = np.exp(s - s.max())
            out[bi, hi] = (w / w.sum()) @ v_all[bi, kv, mask]
    return out


def prefill_cache(k_all, v_all, lengths, t):
    """DenseCache of capacity t holding each sequence's first lengths[b] tokens; the padding
    slots hold large garbage that must never be attended."""
    pad = np.arange(t)[None, None, :, None] >= lengths[:, None, None, None]
    k = np.where(pad, 1e3, k_all[:, :, :t])
    v = np.where(pad, -1e3, v_all[:, :, :t])
    return DenseCache(k=jnp.asarray(k, jnp.float32), v=jnp.asarray(v, jnp.float32),
                      lengths=jnp.asarray(lengths, jnp.int32))


def random_sequence(b=3, kh=3, g=2, n=32, d=8, seed=0):
    rng = np.random.RandomState(seed)
    k_all = rng.randn(b, kh, n, d).astype(np.float32)
    v_all = rng.randn(b, kh, n, d).astype(np.float32)
    qs = rng.randn(n, b, kh * g, d).astype(np.float32)  # one query per step
    return k_all, v_all, qs


@jax.jit
def _step(cache, k, v, q):
    cache = cache.append(k, v)
    return cache, cache.attend(q, 0.5)


def decode_and_compare(cache, k_all, v_all, qs, lengths, steps, stream_kv_heads, sink, window):
    """Append the true next token of each sequence and attend, `steps` times; compare every step
    with `reference_attention` over the full sequence."""
    rows = np.arange(k_all.shape[0])
    for s in range(steps):
        pos = lengths + s  # position of the appended token = the query's position
        k_new = jnp.asarray(k_all[rows, :, pos])  # [B, K, D]
        v_new = jnp.asarray(v_all[rows, :, pos])
        cache, out = _step(cache, k_new, v_new, jnp.asarray(qs[s]))
        ref = reference_attention(qs[s], k_all, v_all, pos, stream_kv_heads, sink, window, 0.5)
        assert_close(out, ref, "float32", err_msg=f"step {s}")
    return cache


# ---- SinkWindowCache ----------------------------------------------------------------------------

def test_sink_window_cache_matches_masked_full_attention():
    """Prompts of 3, 9 and 16 tokens (right-padded to 16), sink 2 + window 5: the short prompt
    keeps everything, the others are trimmed; 14 decode steps wrap the 5-slot ring ~3 times."""
    sink, window, t, steps = 2, 5, 16, 14
    lengths = np.array([3, 9, 16])
    k_all, v_all, qs = random_sequence(n=t + steps)
    cache = SinkWindowCache.from_dense(prefill_cache(k_all, v_all, lengths, t), sink, window,
                                       extra_capacity=steps)
    # Real memory: [B, K, sink + window, D], nothing of the prompt length.
    assert cache.k.shape == cache.v.shape == (3, 3, sink + window, 8)
    assert cache.nbytes() == 2 * 3 * 3 * 7 * 8 * 4 + 3 * 4
    # After prefill: sequence 0 (3 tokens) keeps positions 0, 1, 2 at slots 0, 1, 2; sequence 1
    # (9 tokens) keeps sinks 0, 1 and the last five 4..8, position p in ring slot 2 + (p-2) % 5.
    pos, valid = np.asarray(cache.positions()), np.asarray(cache.valid())
    assert valid.sum(1).tolist() == [3, 7, 7]
    assert pos[0, :3].tolist() == [0, 1, 2]
    assert pos[1].tolist() == [0, 1, 7, 8, 4, 5, 6]
    for b in range(3):
        np.testing.assert_array_equal(np.asarray(cache.k)[b][:, valid[b]],
                                      k_all[b][:, pos[b][valid[b]]])
    cache = decode_and_compare(cache, k_all, v_all, qs, lengths, steps, range(3), sink, window)
    assert np.asarray(cache.counts).tolist() == (lengths + steps).tolist()
    k, v, valid = cache.to_dense()
    assert k.shape == (3, 3, 7, 8) and bool(valid.all())


def test_sink_window_cache_without_sinks_and_clamped_to_capacity():
    """sink 0 is a pure ring; a window larger than the cache can ever need is clamped."""
    lengths = np.array([4, 7])
    k_all, v_all, qs = random_sequence(b=2, kh=1, g=2, n=16)
    dense = prefill_cache(k_all, v_all, lengths, 8)
    ring = SinkWindowCache.from_dense(dense, 0, 3, extra_capacity=8)
    assert ring.k.shape[2] == 3
    decode_and_compare(ring, k_all, v_all, qs, lengths, 8, (0,), 0, 3)
    big = SinkWindowCache.from_dense(dense, 4, 100, extra_capacity=8)
    assert (big.sink, big.window) == (4, 12)  # only 8 + 8 slots can ever be filled
    assert big.k.shape[2] == 16 and np.asarray(big.valid()).sum(1).tolist() == [4, 7]


# ---- HeadSplitCache -----------------------------------------------------------------------------

@pytest.mark.parametrize("full_heads,stream_heads", [((1,), (0, 2)), ((), (0, 1, 2))])
def test_headsplit_cache_matches_per_head_reference(full_heads, stream_heads):
    """Full heads attend to everything, streaming heads to sink + window, outputs in head order.
    (All heads full: `test_headsplit_all_full_is_exactly_dense`.)"""
    sink, window, t, steps = 2, 4, 12, 10
    lengths = np.array([5, 12, 2])
    k_all, v_all, qs = random_sequence(n=t + steps, seed=1)
    dense = prefill_cache(k_all, v_all, lengths, t)
    cache = HeadSplitCache.from_dense(dense, full_heads, stream_heads, sink, window, steps)
    if full_heads:
        assert cache.full.k.shape == (3, len(full_heads), t + steps, 8)
    else:
        assert cache.full is None
    if stream_heads:
        assert cache.stream.k.shape == (3, len(stream_heads), sink + window, 8)
    else:
        assert cache.stream is None
    expect = 2 * 3 * 8 * 4 * (len(full_heads) * (t + steps) + len(stream_heads) * (sink + window))
    expect += 3 * 4 * (bool(full_heads) + bool(stream_heads))  # int32 lengths / counts
    assert cache.nbytes() == expect
    cache = decode_and_compare(cache, k_all, v_all, qs, lengths, steps, stream_heads, sink,
                               window)
    k, v, valid = cache.to_dense()  # per-head masks: full heads hold length + steps tokens
    counts = np.asarray(valid).sum(-1)  # [B, K]
    for h in range(3):
        want = lengths + steps if h in full_heads else np.minimum(lengths + steps, sink + window)
        assert counts[:, h].tolist() == want.tolist()


def test_headsplit_all_full_is_exactly_dense():
    """All heads full: bit-identical to DenseCache with the same capacity, step by step."""
    lengths = np.array([5, 12, 2])
    k_all, v_all, qs = random_sequence(n=20, seed=2)
    dense = prefill_cache(k_all, v_all, lengths, 12)
    split = HeadSplitCache.from_dense(dense, (0, 1, 2), (), 16, 64, 8)
    plain = DenseCache.from_prefill(dense.k, dense.v, dense.lengths, 20)
    rows = np.arange(3)
    for s in range(8):
        kv = (jnp.asarray(k_all[rows, :, lengths + s]), jnp.asarray(v_all[rows, :, lengths + s]))
        split, a = _step(split, *kv, jnp.asarray(qs[s]))
        plain, b = _step(plain, *kv, jnp.asarray(qs[s]))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert split.nbytes() == plain.nbytes()


# ---- RLKV head selection ------------------------------------------------------------------------

def test_rlkv_selects_top_gates_globally():
    # 2 layers x 4 KV heads = 8 gates. Sorted: 0.1 (1,0) 0.2 (1,1) 0.3 (1,2) 0.6 (0,3) | 0.7 (0,2)
    # 0.8 (0,1) 0.9 (0,0) 0.95 (1,3). Sparsity 0.5 -> round(0.5 * 8) = 4 streaming heads: the
    # four lowest, three of them in layer 1. Equivalently, quantile threshold = the 5th smallest
    # gate 0.7: heads with alpha >= 0.7 keep the full cache. A per-layer rule would stream 2 + 2.
    gates = [[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.95]]
    p = RLKV(gates, 0.5)
    assert p.stream_heads == ((3,), (0, 1, 2))
    assert p.full_heads == ((0, 1, 2), (3,))
    assert np.array_equal(np.asarray(gates) >= 0.7,
                          [[h in f for h in range(4)] for f in p.full_heads])
    # Sparsity 0.25 -> 2 heads: 0.1 and 0.2, both in layer 1; layer 0 stays whole.
    assert RLKV(gates, 0.25).stream_heads == ((), (0, 1))
    # Sparsity 0 keeps everything; 1 - eps streams all round(8 - 8 eps) = 8 heads.
    assert RLKV(gates, 0.0).stream_heads == ((), ())
    assert RLKV(gates, 1 - 1e-9).full_heads == ((), ())
    # The head split is stored as tuples: the policy is hashable (a static jit key).
    assert hash(p) == hash(RLKV(np.asarray(gates), 0.5)) and p == RLKV(np.asarray(gates), 0.5)


def test_rlkv_tie_breaking_is_rank_based_and_stable():
    # Four equal gates 0.5: exactly round(s * 4) stream, the earliest in (layer, head) order.
    same = [[0.5, 0.5], [0.5, 0.5]]
    assert RLKV(same, 0.75).stream_heads == ((0, 1), (0,))  # round(3.0) = 3
    assert RLKV(same, 0.25).stream_heads == ((0,), ())  # round(1.0) = 1
    # Ties at the threshold: [[0.5, 0.5], [0.5, 0.9]] at 0.5 -> 2 of the three 0.5 heads stream,
    # (0, 0) and (0, 1); (1, 0) keeps its cache though its gate equals theirs.
    assert RLKV([[0.5, 0.5], [0.5, 0.9]], 0.5).stream_heads == ((0, 1), ())
    # Halves round up: 8 heads at 0.0625 -> 0.5 -> 1; at 0.05 -> 0.4 -> 0.
    g = [[0.4, 0.3, 0.2, 0.1], [0.5, 0.6, 0.7, 0.8]]
    assert RLKV(g, 0.0625).stream_heads == ((3,), ())
    assert RLKV(g, 0.05).stream_heads == ((), ())
    # Every sparsity streams exactly round(s * 8) heads, whatever the ties.
    rng = np.random.RandomState(0)
    for s in np.linspace(0, 0.99, 23):
        tied = rng.randint(0, 3, (2, 4)) / 2.0
        _, stream = select_heads(tuple(map(tuple, tied)), float(s))
        assert sum(map(len, stream)) == math.floor(s * 8 + 0.5)


def test_budget_to_sparsity_mapping(model):
    # T = 80 slots, sink + window = 16 -> (sink + window) / T = 0.2; budget 0.5:
    # s = (1 - 0.5) / (1 - 0.2) = 0.625 -> round(0.625 * 8) = 5 streaming heads.
    assert sparsity_for_budget(0.5, 4, 12, 80) == pytest.approx(0.625)
    assert sparsity_for_budget(1.0, 4, 12, 80) == 0.0
    with pytest.raises(ValueError, match="every head streaming"):  # 0.1 < 16 / 80
        sparsity_for_budget(0.1, 4, 12, 80)
    with pytest.raises(ValueError, match="every head streaming"):  # streaming saves nothing
        sparsity_for_budget(0.5, 64, 64, 100)
    gates = random_gates(2, KV, seed=3)
    p = registry.make_policy("rlkv", 0.5, model, gates=gates, sink=4, window=12, prompt_len=80)
    assert isinstance(p, RLKV) and p.sparsity == pytest.approx(0.625)
    assert sum(map(len, p.stream_heads)) == 5
    d = registry.make_policy("duo", 0.5, model, gates=gates, sink=4, window=12, prompt_len=80)
    assert isinstance(d, DuoAttention) and d.name == "duo" and d.stream_heads == p.stream_heads
    r = registry.make_policy("random_heads", 0.5, model, seed=3, sink=4, window=12,
                             prompt_len=80)
    assert r.gates == p.gates  # random_gates(2, 4, seed=3)
    # StreamingLLM: window = floor(budget * T) - sink = floor(0.25 * 100) - 4 = 21; a budget that
    # cannot hold the sink plus one token is refused.
    assert StreamingLLM.for_budget(0.25, 100, 4).window == 21
    assert StreamingLLM.for_budget(0.05, 100, 4).window == 1
    with pytest.raises(ValueError, match="budget=0.01"):
        StreamingLLM.for_budget(0.01, 100, 4)
    s = registry.make_policy("streaming", 0.25, model, sink=4, prompt_len=100)
    assert (s.sink, s.window) == (4, 21)


# ---- whole model --------------------------------------------------------------------------------

def test_rlkv_decoding_matches_forward_with_per_head_masks(model):
    """Prefill in full, then decode with RLKV (sparsity 0.5, sink 2 + window 4, the ring wraps):
    every decode step's logits equal a full forward pass in which the streaming heads' queries
    past the prompt see only sink + window keys (the prompt's own queries see everything)."""
    cfg = model.config
    sink, window, steps = 2, 4, 12
    policy = RLKV(random_gates(cfg.num_layers, KV, seed=5), 0.5, sink=sink, window=window)
    seqs = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24))
    lengths = np.array([5, 12], np.int32)
    t = int(lengths.max())
    g = cfg.group_size

    def attention_fn(layer, q, k, v, positions):  # q [B, T, H, D]
        full = causal_attention(q, k, v, cfg.head_dim ** -0.5, positions, positions)
        stream = causal_attention(q, k, v, cfg.head_dim ** -0.5, positions, positions,
                                  window=window, sink=sink)
        heads = jnp.asarray([h // g in policy.stream_heads[layer] for h in range(cfg.num_heads)])
        decoding = positions >= jnp.asarray(lengths)[:, None]  # [B, T]
        use = decoding[:, :, None, None] & heads[None, None, :, None]
        return jnp.where(use, stream, full)

    ref = jax.jit(lambda p, x: Decoder(cfg).apply({"params": p}, x, attention_fn,
                                                   method=Decoder.forward))(model.params, seqs)
    prompt = np.where(np.arange(t)[None] < lengths[:, None], seqs[:, :t], cfg.pad_token_id)
    logits, caches = _prefill(model.params, jnp.asarray(prompt), jnp.asarray(lengths), cfg,
                              capacity=t + steps, policy=policy)
    rows = np.arange(2)
    assert_close(logits, ref[rows, lengths - 1], cfg.dtype, err_msg="prefill")
    for s in range(steps):
        pos = lengths + s
        logits, caches = _decode(model.params, jnp.asarray(seqs[rows, pos]), jnp.asarray(pos),
                                 caches, cfg)
        assert_close(logits, ref[rows, pos], cfg.dtype, err_msg=f"decode step {s}")
    for layer, c in enumerate(caches):
        assert isinstance(c, HeadSplitCache)
        assert (c.full_heads, c.stream_heads) == (policy.full_heads[layer],
                                                  policy.stream_heads[layer])


def _cache_shapes(model, prompt, lengths, capacity, policy):
    """The per-layer caches prefill would build, as shapes only (traced, not compiled)."""
    return jax.eval_shape(lambda p, x, n: _prefill(p, x, n, model.config, capacity, policy)[1],
                          model.params, prompt, lengths)


def _slots(caches):
    """Token slots held over all layers and KV heads, read off the array shapes."""
    return sum(p.k.shape[1] * p.k.shape[2] for c in caches for p in (c.full, c.stream)
               if p is not None)


def test_sparsity_extremes_and_bytes_formula(model):
    """Sparsity 1 - eps: every head keeps exactly sink + window slots. Sparsity s: the cache holds
    (1 - s) * C + s * (sink + window) token slots per head (C = prompt + decode room)."""
    cfg = model.config
    prompt = jnp.zeros((2, 40), jnp.int32)
    lengths = jnp.asarray([40, 23], jnp.int32)
    cap, sink, window = 56, 4, 8  # C = 40 + 16
    heads = cfg.num_layers * KV
    gates = random_gates(cfg.num_layers, KV, seed=7)
    for c in _cache_shapes(model, prompt, lengths, cap, RLKV(gates, 1 - 1e-9, sink=sink,
                                                              window=window)):
        assert c.full is None and c.stream.k.shape == (2, KV, sink + window, cfg.head_dim)
    for s in (0.25, 0.5, 0.75):
        caches = _cache_shapes(model, prompt, lengths, cap, RLKV(gates, s, sink=sink,
                                                                  window=window))
        slots = _slots(caches)
        assert slots / heads == pytest.approx((1 - s) * cap + s * (sink + window))
        # nbytes: k and v of every slot (float32), plus an int32 [B] per non-empty part
        parts = sum((c.full is not None) + (c.stream is not None) for c in caches)
        nbytes = sum(c.nbytes() for c in caches)
        assert nbytes == 2 * 2 * cfg.head_dim * 4 * slots + parts * 2 * 4
        assert nbytes < cfg.kv_bytes_per_token() * 2 * cap  # the dense cache's bytes
    # Budget mode (what the "rlkv" factory builds without prompt_len): the sparsity comes from the
    # real capacity, 0.5 -> s = 0.5 / (1 - 12 / 56) = 0.636 -> 5.09 heads, rounded up to 6 of 8 so
    # the cache meets the budget: (2 * 56 + 6 * 12) / (8 * 56) = 0.41 <= 0.5.
    policy = registry.make_policy("rlkv", 0.5, model, gates=gates, sink=sink, window=window)
    caches = _cache_shapes(model, prompt, lengths, cap, policy)
    assert sum(len(c.stream_heads) for c in caches) == 6
    assert _slots(caches) / (heads * cap) == pytest.approx((2 * 56 + 6 * 12) / (8 * 56))
    # StreamingLLM in budget mode: the slots whose K and V (4 heads x 64 bytes) and int32 count
    # fit in a quarter of the dense cache's: floor((0.25 (56 * 256 + 4) - 4) / 256) = 13, so
    # window = 13 - 4 = 9.
    streaming = jax.eval_shape(
        lambda p, x, n: _prefill(p, x, n, cfg, cap, registry.make_policy("streaming", 0.25,
                                                                         model))[1],
        model.params, prompt, lengths)
    for c in streaming:
        assert isinstance(c, SinkWindowCache) and (c.sink, c.window) == (4, 9)
        assert c.k.shape == (2, KV, 13, cfg.head_dim)


def test_generate_sparsity_zero_equals_full(model):
    """RLKV at sparsity 0 keeps every head whole: exactly the full cache's tokens and bytes."""
    prompts = [[5, 17, 99, 3, 64, 8, 1], list(range(3, 33))]
    full = jaxkv.generate(model, prompts, 8)
    zero = jaxkv.generate(model, prompts, 8, policy=RLKV(random_gates(2, KV, 0), 0.0))
    assert zero.tokens == full.tokens
    assert zero.cache_bytes == full.cache_bytes


def test_generate_with_rlkv_compiles_once(model, monkeypatch):
    """A second generate call with the same RLKV policy (new prompts of the same bucket) reuses
    the compilation: no new `_compiled` entry and no new trace (compress_layer runs only while
    tracing). The measured bytes are those of the head split."""
    traces = []
    original = RLKV.compress_layer

    def counting(self, layer, cache, obs):
        traces.append(layer)
        return original(self, layer, cache, obs)

    monkeypatch.setattr(RLKV, "compress_layer", counting)
    policy = RLKV(random_gates(2, KV, 11), 0.5, sink=3, window=9)
    before = _compiled.cache_info()
    first = jaxkv.generate(model, [[5, 17, 99, 3, 64, 8, 1], list(range(3, 33))], 8,
                           policy=policy)
    assert _compiled.cache_info().misses == before.misses + 1
    assert traces == [0, 1]
    second = jaxkv.generate(model, [[9, 9, 2], list(range(40, 90))], 8, policy=policy)
    assert _compiled.cache_info().misses == before.misses + 1
    assert traces == [0, 1]  # not traced again
    assert [len(t) for t in second.tokens] == [8, 8]
    # C = 64 (prompt bucket) + 8; 4 of 8 heads full, 4 keep 3 + 9 slots; B = 2, D = 8, float32.
    parts = sum(bool(h) for h in policy.full_heads + policy.stream_heads)
    assert first.cache_bytes == 2 * 2 * 8 * 4 * (4 * 72 + 4 * 12) + parts * 2 * 4


# ---- gate files ---------------------------------------------------------------------------------

def test_gate_files_round_trip_and_plot(tmp_path):
    gates = random_gates(3, 4, seed=2)
    gates[0, 0], gates[2, 3] = 0.0, 1.0
    j = save_gates(tmp_path / "g.json", gates)
    data = json.load(open(j))
    assert (data["layers"], data["kv_heads"]) == (3, 4) and len(data["gates"]) == 3
    np.testing.assert_array_equal(load_gates(j), gates)  # exact: shortest round-trip repr
    tsv = save_gates(tmp_path / "g.tsv", gates)
    lines = open(tsv).read().splitlines()
    assert len(lines) == 3 and all(len(x.split("\t")) == 4 for x in lines)
    np.testing.assert_array_equal(load_gates(tsv), gates)
    assert RLKV(j, 0.5) == RLKV(gates, 0.5) == RLKV(str(tsv), 0.5)
    # A hand-written TSV with a comment and a blank line.
    (tmp_path / "hand.txt").write_text("# layer 0\n1\t0.5\n\n0.25\t0\n")
    np.testing.assert_array_equal(load_gates(tmp_path / "hand.txt"), [[1, 0.5], [0.25, 0]])
    png = plot_gates(gates, tmp_path / "gates.png", sparsity=0.5)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---- bad inputs ---------------------------------------------------------------------------------

G = [[0.5, 0.2, 0.9, 0.1], [0.3, 0.3, 0.7, 1.0]]


def _bad_cases(model, tmp_path):
    cfg = model.config
    (tmp_path / "bad.tsv").write_text("0.5\t0.2\n0.1\n")
    (tmp_path / "bad.json").write_text('{"layers": 3, "kv_heads": 4, '
                                       '"gates": [[0.1, 0.2, 0.3, 0.4]]}')
    dense = DenseCache(k=jnp.zeros((1, 3, 4, 8)), v=jnp.zeros((1, 3, 4, 8)),
                       lengths=jnp.array([4], jnp.int32))
    return [
        ("sparsity", lambda: RLKV(G, 1.0)),
        ("sparsity", lambda: RLKV(G, -0.1)),
        ("sparsity", lambda: RLKV(G, float("nan"))),
        ("sparsity", lambda: RLKV(G, True)),
        ("sparsity", lambda: RLKV(G)),  # neither sparsity nor budget
        ("budget", lambda: RLKV(G, budget=0.0)),
        ("gates", lambda: RLKV([[0.5, 1.5]], 0.5)),
        ("gates", lambda: RLKV([[float("nan"), 0.5]], 0.5)),
        ("gates", lambda: RLKV([0.5, 0.5], 0.5)),
        ("gates", lambda: RLKV([[]], 0.5)),
        ("gates", lambda: RLKV([["a", "b"]], 0.5)),
        ("gates", lambda: RLKV(str(tmp_path / "missing.json"), 0.5)),
        ("gates", lambda: RLKV(str(tmp_path / "bad.tsv"), 0.5)),
        ("gates", lambda: RLKV(str(tmp_path / "bad.json"), 0.5)),
        ("window", lambda: RLKV(G, 0.5, window=-1)),
        ("sink", lambda: RLKV(G, 0.5, sink=-1)),
        ("sink", lambda: RLKV(G, 0.5, sink=2.5)),
        ("gates", lambda: RLKV([[0.5] * 3] * 2, 0.5).check_model(cfg)),  # model has 4 KV heads
        ("gates", lambda: RLKV([[0.5] * 4] * 3, 0.5).check_model(cfg)),  # and 2 layers
        ("window", lambda: RLKV(G, 0.5, window=cfg.max_position_embeddings + 1).check_model(cfg)),
        ("gates", lambda: RLKV([[0.5] * 4] * 2, 0.5).compress_layer(0, dense, None)),
        ("gates", lambda: registry.make_policy("rlkv", 0.5, model)),
        ("gates", lambda: registry.make_policy("duo", 0.5, model)),
        ("gates", lambda: registry.make_policy("rlkv", 0.5, model, gates=[[0.5] * 3] * 2)),
        ("window", lambda: registry.make_policy("rlkv", 0.5, model, gates=G, window=10 ** 6)),
        ("budget", lambda: registry.make_policy("rlkv", 1.5, model, gates=G)),
        ("prompt_len", lambda: registry.make_policy("rlkv", 0.5, model, gates=G, prompt_len=0)),
        ("seed", lambda: registry.make_policy("random_heads", 0.5, model, seed="a")),
        ("window", lambda: StreamingLLM(window=0)),
        ("window", lambda: StreamingLLM()),
        ("sink", lambda: StreamingLLM(sink=-1, window=4)),
        ("budget", lambda: StreamingLLM.for_budget(0.0, 100)),
        ("prompt_len", lambda: StreamingLLM.for_budget(0.5, 0)),
        ("budget", lambda: registry.make_policy("streaming", 1.5, model)),
        ("window", lambda: StreamingLLM(window=10 ** 6).check_model(cfg)),
        ("path", lambda: save_gates(tmp_path / "g.csv", G)),
        ("gates", lambda: save_gates(tmp_path / "g.json", [[2.0]])),
        ("path", lambda: load_gates(tmp_path / "nothing.json")),
        ("layers", lambda: random_gates(0, 4)),
        ("kv_heads", lambda: random_gates(2, 0)),
        ("sink", lambda: SinkWindowCache.from_dense(dense, -1, 4)),
        ("window", lambda: SinkWindowCache.from_dense(dense, 2, -4)),
        ("extra_capacity", lambda: SinkWindowCache.from_dense(dense, 2, 4, -1)),
        ("full_heads", lambda: HeadSplitCache.from_dense(dense, (0,), (0, 1), 2, 4)),
        ("full_heads", lambda: HeadSplitCache.from_dense(dense, (0, 1), (2, 3), 2, 4)),
    ]


def test_bad_inputs_raise_value_error_naming_the_argument(model, tmp_path):
    cases = _bad_cases(model, tmp_path)
    for arg, fn in cases:
        with pytest.raises(ValueError, match=arg) as info:
            fn()
        assert arg in str(info.value), (arg, str(info.value))
