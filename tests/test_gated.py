"""Gated mixed attention (RLKV / DuoAttention): the forward attention function, the decode cache
and the GatedMixing policy agree with each other and with the plain attention they reduce to."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv.cache.dense import DenseCache
from jaxkv.cache.gated import GatedDenseCache
from jaxkv.generate import _compiled
from jaxkv.model.decoder import Decoder
from jaxkv.model.model import Model
from jaxkv.model.gated import (gate_stats, init_gates, load_gates, mix_softmax,
                               mixed_attention_fn, save_gates)
from jaxkv.model.layers import causal_attention
from jaxkv.policies.gated import GatedMixing
try:
    from tests.helpers import assert_close, tiny_config, random_params
    from tests.helpers import decode as _decode, prefill as _prefill
except ImportError:  # tests/ on sys.path rather than a package
    from helpers import assert_close, tiny_config, random_params
    from helpers import decode as _decode, prefill as _prefill

SINK, WINDOW = 2, 4
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2,
             head_dim=8)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(**SMALL)
    return Model(config=cfg, params=random_params(cfg, 0))


@functools.partial(jax.jit, static_argnames=("config", "mode", "remat"))
def _fwd(params, tokens, gates, lengths, config, mode, remat=False):
    """Forward logits with attention `mode`: full | mixed | mixed_prompt | streaming."""
    scale = config.head_dim ** -0.5
    fn = {"full": None,
          "mixed": lambda: mixed_attention_fn(gates, SINK, WINDOW, remat=remat),
          "mixed_prompt": lambda: mixed_attention_fn(gates, SINK, WINDOW, lengths, remat=remat),
          "streaming": lambda: (lambda layer, q, k, v, pos: causal_attention(
              q, k, v, scale, pos, pos, window=WINDOW, sink=SINK))}[mode]
    return Decoder(config).apply({"params": params}, tokens,
                                 attention_fn=None if fn is None else fn(),
                                 method=Decoder.forward)


def _forward(m, tokens, mode, gates=None, lengths=None):
    gates = jnp.ones((2, 2)) if gates is None else gates
    lengths = jnp.zeros((np.shape(tokens)[0],), jnp.int32) if lengths is None else lengths
    return _fwd(m.params, jnp.asarray(tokens), gates, jnp.asarray(lengths), m.config, mode)


def _tokens(m, shape, seed=0):
    return np.random.RandomState(seed).randint(0, m.config.vocab_size, shape).astype(np.int32)


def test_gates_one_is_full_attention(model):
    tokens = _tokens(model, (2, 24))
    gates = jnp.ones((2, 2))
    full = _forward(model, tokens, "full")  # what jaxkv.forward computes
    assert_close(_forward(model, tokens, "mixed", gates), full, "float32")
    # with prompt_lengths too (prompt part in full either way)
    assert_close(_forward(model, tokens, "mixed_prompt", gates, jnp.array([3, 10])), full,
                 "float32")
    # sampled at temperature 1 with one seed: the same tokens (same shapes as the next test,
    # so the gated generate compiles once for both)
    prompts = [[5, 17, 9, 3, 44, 21, 8], [42, 7]]
    want = jaxkv.generate(model, prompts, 16, temperature=1.0, seed=5, eos_ids=()).tokens
    got = jaxkv.generate(model, prompts, 16, policy=GatedMixing(gates, SINK, WINDOW),
                         temperature=1.0, seed=5, eos_ids=()).tokens
    assert got == want and all(len(t) == 16 for t in got)


def test_gates_zero_is_sink_plus_window(model):
    tokens = _tokens(model, (2, 24), seed=1)
    want = _forward(model, tokens, "streaming")
    got = _forward(model, tokens, "mixed", jnp.zeros((2, 2)))
    assert_close(got, want, "float32")
    assert np.abs(np.asarray(want) - np.asarray(_forward(model, tokens, "full"))).max() > 1e-3


def test_mixing_is_per_kv_head_and_linear(model):
    """One layer, one head group at a time: out = a * full + (1 - a) * streaming, a per KV head,
    shared by the G = 2 query heads of the group."""
    rs = np.random.RandomState(2)
    q = jnp.asarray(rs.randn(1, 9, 4, 8), jnp.float32)  # [B, T, H=4, D]
    k = jnp.asarray(rs.randn(1, 9, 2, 8), jnp.float32)  # [B, T, K=2, D]
    v = jnp.asarray(rs.randn(1, 9, 2, 8), jnp.float32)
    pos = jnp.arange(9)[None]
    a = jnp.array([[0.25, 0.9]])
    got = mixed_attention_fn(a, SINK, WINDOW)(0, q, k, v, pos)
    full = causal_attention(q, k, v, 8 ** -0.5, pos, pos)
    stream = causal_attention(q, k, v, 8 ** -0.5, pos, pos, window=WINDOW, sink=SINK)
    alpha = jnp.array([0.25, 0.25, 0.9, 0.9])[None, None, :, None]  # heads 0,1 -> KV 0
    assert_close(got, alpha * full + (1 - alpha) * stream, "float32")


@pytest.mark.parametrize("gap", [120.0, 300.0, 1e4])
def test_mix_softmax_far_below_max_stays_normalised(gap):
    """Streaming scores far below the row max (exp(-gap) underflows, and a shared shift would
    overflow for gaps past ~150 nats) still give a normalised streaming softmax, and finite
    gradients for the gate and the scores."""
    scores = jnp.array([0.0, -gap, -gap - 1.0])[None, None, None, None, :]  # [1,1,1,1,S=3]
    full = jnp.array([True, True, True])
    stream = jnp.array([False, True, True])
    p = np.asarray(mix_softmax(scores, full, stream, jnp.array([0.5]))[0, 0, 0, 0])
    z = 1 + np.exp(-1.0)  # streaming row: e^0 + e^-1 relative to its own max
    # 0.5 * full ([1, ~0, ~0]) + 0.5 * streaming ([0, 1/z, e^-1/z])
    np.testing.assert_allclose(p, [0.5, 0.5 / z, 0.5 * np.exp(-1.0) / z], rtol=1e-6)
    assert np.isfinite(p).all()
    w = jnp.array([1.0, 2.0, 3.0])
    g_alpha, g_scores = jax.grad(lambda a, s: (mix_softmax(s, full, stream, a) * w).sum(),
                                 argnums=(0, 1))(jnp.array([0.5]), scores)
    assert np.isfinite(np.asarray(g_alpha)).all() and np.isfinite(np.asarray(g_scores)).all()
    # d/d alpha of sum(w * p) = sum(w * p_full) - sum(w * p_stream) = 1 - (2 + 3/e) / z
    np.testing.assert_allclose(float(g_alpha[0]), 1 - (2 + 3 * np.exp(-1.0)) / z, rtol=1e-6)


def test_gated_decoding_matches_mixed_forward(model):
    """Prefill (full) + decode over GatedDenseCache, teacher-forced, gives the logits of
    forward(mixed_attention_fn(prompt_lengths=...)) at every completion position."""
    cfg = model.config
    gates = jnp.array([[0.3, 0.8], [0.0, 0.55]])
    seqs = _tokens(model, (2, 24), seed=3)
    lengths = np.array([5, 9], np.int32)
    steps = 14
    want = _forward(model, seqs, "mixed_prompt", gates, lengths)  # [B, N, V]
    t = int(lengths.max())
    prompt = np.where(np.arange(t)[None] < lengths[:, None], seqs[:, :t], 0)
    policy = GatedMixing(gates, SINK, WINDOW)
    logits, caches = _prefill(model.params, jnp.asarray(prompt), jnp.asarray(lengths), cfg,
                              capacity=t + steps, policy=policy)
    assert all(isinstance(c, GatedDenseCache) for c in caches)
    rows = np.arange(2)
    assert_close(logits, want[rows, lengths - 1], cfg.dtype, err_msg="prefill")
    for i in range(steps):
        pos = lengths + i
        logits, caches = _decode(model.params, jnp.asarray(seqs[rows, pos]), jnp.asarray(pos),
                                 caches, cfg)
        assert_close(logits, want[rows, pos], cfg.dtype, err_msg=f"decode step {i}")
    # and the mixed model really differs from the full one at those positions
    full = _forward(model, seqs, "full")
    assert np.abs(np.asarray(full[rows, lengths + steps - 1]) -
                  np.asarray(want[rows, lengths + steps - 1])).max() > 1e-3


def test_new_gates_do_not_recompile(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [4, 5]]

    def sample(gates):
        return jaxkv.generate(model, prompts, 16, policy=GatedMixing(gates, SINK, WINDOW),
                              temperature=1.0, seed=5, eos_ids=()).tokens

    a = sample(jnp.full((2, 2), 0.5))
    misses = _compiled.cache_info().misses
    b = sample(jnp.zeros((2, 2)))
    assert _compiled.cache_info().misses == misses
    assert sample(jnp.full((2, 2), 0.5)) == a and b != a


def test_gradient_wrt_gates(model):
    """(remat=True, the same gradient recomputed, runs in tests/test_rlkv_train.py's paper
    configs.)"""
    tokens = jnp.asarray(_tokens(model, (2, 24), seed=4))
    lengths = jnp.array([4, 7])

    def loss(gates):
        logits = _fwd(model.params, tokens, gates, lengths, model.config, "mixed_prompt")
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    g = jax.jit(jax.grad(loss))(jnp.full((2, 2), 0.7))
    assert g.shape == (2, 2)
    assert np.isfinite(np.asarray(g)).all()
    assert (np.abs(np.asarray(g)) > 0).all(), g


def test_gated_cache_protocol():
    rs = np.random.RandomState(0)
    k = jnp.asarray(rs.randn(2, 2, 6, 8), jnp.float32)  # [B, K, T, D]
    dense = DenseCache.from_prefill(k, k + 1, jnp.array([6, 3]), 6)
    cache = GatedDenseCache.from_dense(dense, jnp.array([1.0, 0.0]), SINK, WINDOW,
                                       extra_capacity=4)
    assert cache.capacity == 10
    cache = cache.append(jnp.ones((2, 2, 8)), jnp.ones((2, 2, 8)))
    assert np.asarray(cache.lengths).tolist() == [7, 4]
    kd, vd, valid = cache.to_dense()
    assert np.asarray(valid).sum(-1).tolist() == [[7, 7], [4, 4]]
    # bytes: k and v [2, 2, 10, 8] float32, lengths [2] int32, alpha [2] float32
    assert cache.nbytes() == 2 * (2 * 2 * 10 * 8 * 4) + 2 * 4 + 2 * 4
    # alpha = 1 on KV head 0 equals the dense decode attention there
    q = jnp.asarray(rs.randn(2, 4, 8), jnp.float32)
    from pallas_kernels.dense_decode import dense_decode_attention_reference
    ref = dense_decode_attention_reference(q, cache.k, cache.v, cache.lengths, 0.3)
    out = cache.attend(q, 0.3)
    assert_close(out[:, :2], ref[:, :2], "float32")
    assert np.abs(np.asarray(out[:, 2:] - ref[:, 2:])).max() > 1e-4
    with pytest.raises(ValueError, match=r"alpha: shape \(3,\)"):
        GatedDenseCache.from_dense(dense, jnp.ones(3), SINK, WINDOW)
    with pytest.raises(ValueError, match=r"window=0"):
        GatedMixing(jnp.ones((2, 2)), sink=1, window=0)
    with pytest.raises(ValueError, match=r"sink=-1"):
        mixed_attention_fn(jnp.ones((2, 2)), -1, 4)


def test_gates_file_roundtrip(tmp_path, model):
    """jaxkv.model.gated's save_gates / load_gates are jaxkv.policies.rlkv's (one gate-file API:
    float64, the model's fingerprint recorded; tests/test_gate_files.py has the details)."""
    from jaxkv.policies import rlkv
    assert (save_gates, load_gates) == (rlkv.save_gates, rlkv.load_gates)
    g = np.array([[0.1, 1.0], [0.5, 0.0]], np.float32)
    path = str(tmp_path / "gates.json")
    save_gates(path, g, model=model)
    with open(path) as f:
        payload = json.load(f)
    assert payload["layers"] == 2 and payload["kv_heads"] == 2
    assert payload["model_fingerprint"] == model.fingerprint
    np.testing.assert_array_equal(load_gates(path, model), g.astype(np.float64))
    assert gate_stats(g) == {"mean_gate": pytest.approx(0.4), "sparsity": 0.5}
    assert init_gates(model.config).shape == (2, 2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": 3, "kv_heads": 2, "gates": g.tolist()}))
    with pytest.raises(ValueError, match='"layers"=3 but "gates" has 2'):
        load_gates(str(bad))
