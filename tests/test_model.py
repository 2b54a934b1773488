"""The jaxkv decoder on its own (no torch): cached decoding == full forward, generate == argmax
of forward, seeded sampling, and Llama-3 RoPE scaling worked by hand."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv.model.layers import apply_rope, rope_inv_freq
try:  # tests/ as a package (tests/__init__.py) or as a plain folder on sys.path
    from tests.helpers import assert_close, tiny_config, tiny_model
    from tests.helpers import decode as _decode, prefill as _prefill
except ImportError:  # pragma: no cover
    from helpers import assert_close, tiny_config, tiny_model
    from helpers import decode as _decode, prefill as _prefill

# Shared by the generate tests so that greedy and sampled runs compile once each.
PROMPTS = [[5, 17, 99, 3, 64], [42, 7, 7, 64, 3, 120, 11, 8, 90, 1, 33]]
NEW = 12

@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def test_cached_decoding_matches_forward(model):
    """Prefill prompts of different lengths (right-padded), then feed the rest of each sequence
    one token at a time: the logits at every step equal the full forward pass at that position.
    (Qwen2/3 variants of the same path are checked token for token against transformers in
    test_hf_equivalence.)"""
    m = model
    cfg = m.config
    seqs = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24))  # [B, N]
    lengths = np.array([5, 12], np.int32)  # prompt lengths
    steps = 12  # row 0 decodes positions 5..16, row 1 positions 12..23
    full = jaxkv.forward(m, seqs)  # [B, N, V]

    t = int(lengths.max())
    prompt = np.where(np.arange(t)[None] < lengths[:, None], seqs[:, :t], cfg.pad_token_id)
    logits, caches = _prefill(m.params, jnp.asarray(prompt), jnp.asarray(lengths), cfg,
                              capacity=t + steps)
    rows = np.arange(2)
    assert_close(logits, full[rows, lengths - 1], cfg.dtype, err_msg="prefill")
    for i in range(steps):
        pos = lengths + i  # [B]
        logits, caches = _decode(m.params, jnp.asarray(seqs[rows, pos]), jnp.asarray(pos),
                                 caches, cfg)
        assert_close(logits, full[rows, pos], cfg.dtype, err_msg=f"decode step {i}")
    assert np.asarray(caches[0].lengths).tolist() == (lengths + steps).tolist()


def _greedy_by_forward(m, prompts, new):
    """Repeated argmax of the full forward pass. Sequences are right-padded to one fixed length,
    which the causal mask makes harmless, so `forward` compiles once."""
    total = max(len(p) for p in prompts) + new
    seqs = np.zeros((len(prompts), total), np.int32)
    for b, p in enumerate(prompts):
        seqs[b, :len(p)] = p
    out = [[] for _ in prompts]
    for i in range(new):
        logits = np.asarray(jaxkv.forward(m, seqs))
        for b, p in enumerate(prompts):
            tok = int(np.argmax(logits[b, len(p) + i - 1]))
            seqs[b, len(p) + i] = tok
            out[b].append(tok)
    return out


def test_generate_greedy_equals_argmax_of_forward(model):
    gen = jaxkv.generate(model, PROMPTS, max_new_tokens=NEW)
    assert gen.tokens == _greedy_by_forward(model, PROMPTS, NEW)
    assert gen.prompt_lengths == [5, 11]
    assert 0 < gen.cache_bytes <= gen.full_cache_bytes


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model):
    a = jaxkv.generate(model, PROMPTS, NEW, temperature=1.0, seed=7).tokens
    b = jaxkv.generate(model, PROMPTS, NEW, temperature=1.0, seed=7).tokens
    c = jaxkv.generate(model, PROMPTS, NEW, temperature=1.0, seed=8).tokens
    assert a == b
    assert a != c  # 24 draws from 128 tokens at temperature 1: equal only by a miracle
    assert all(len(t) == NEW for t in a)
    # top_p -> 0 keeps only the most likely token: sampling collapses to greedy
    tiny = jaxkv.generate(model, PROMPTS, NEW, temperature=1.0, top_p=1e-6, seed=7).tokens
    assert tiny == jaxkv.generate(model, PROMPTS, NEW).tokens


LLAMA3 = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
          ("original_max_position_embeddings", 64), ("rope_type", "llama3"))


def test_llama3_rope_scaling_by_hand():
    """head_dim 8, theta 10000: inv_freq_i = 10000^(-2i/8) = 1, 0.1, 0.01, 0.001.
    Wavelengths 2*pi/inv = 6.28, 62.8, 628, 6283. With original context 64, low_freq_factor 1 and
    high_freq_factor 4: low_wavelen = 64 / 1 = 64, high_wavelen = 64 / 4 = 16.
      i=0: 6.28 < 16          high-frequency band, kept:         1.0
      i=1: 16 <= 62.8 <= 64   smoothed: s = (64 / 62.83 - 1) / (4 - 1) = 0.0185916 / 3 = 0.0061972
           inv = (1 - s) * 0.1 / 8 + s * 0.1 = 0.1 * (0.1242254 + 0.0061972) = 0.0130423
      i=2: 628 > 64           low-frequency band, divided by 8:  0.01 / 8 = 0.00125
      i=3:                                                       0.001 / 8 = 0.000125
    """
    plain = rope_inv_freq(tiny_config())
    np.testing.assert_allclose(plain, [1.0, 0.1, 0.01, 0.001], rtol=1e-6)
    scaled = rope_inv_freq(tiny_config(rope_scaling=LLAMA3))
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [1.0, 0.0130423, 0.00125, 0.000125], rtol=1e-5)
    assert scaled[0] == plain[0]  # high band untouched, bit for bit
    assert 0.1 / 8 < scaled[1] < 0.1  # smoothed lies between scaled and unscaled
    # linear scaling divides every frequency
    linear = rope_inv_freq(tiny_config(rope_scaling=(("factor", 4.0), ("rope_type", "linear"))))
    np.testing.assert_allclose(linear, plain / 4, rtol=1e-6)


def test_apply_rope_rotates_pairs_by_position_times_frequency():
    """A unit vector on dim i of the first half rotates into dim i + D/2 by angle pos * inv_i."""
    inv = rope_inv_freq(tiny_config(rope_scaling=LLAMA3))  # [4]
    x = np.zeros((1, 1, 1, 8), np.float32)
    x[..., 1] = 1.0
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.array([[100]]), inv))[0, 0, 0]
    angle = 100 * 0.0130423
    np.testing.assert_allclose([out[1], out[5]], [math.cos(angle), math.sin(angle)], atol=1e-5)
    np.testing.assert_allclose(np.delete(out, [1, 5]), 0, atol=1e-7)


@pytest.mark.parametrize("t, window", [(1100, None), (700, 48)])
def test_query_blocked_attention_equals_one_block_and_holds_less(t, window):
    from jaxkv.model.layers import causal_attention
    rng = np.random.default_rng(t)
    q = jnp.asarray(rng.normal(size=(1, t, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, t, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, t, 2, 16)), jnp.float32)
    pos = jnp.arange(t)[None]
    fn = lambda block: jax.jit(lambda q, k, v: causal_attention(q, k, v, 0.25, pos, pos, window, 4,
                                                                query_block=block))
    whole, blocked = fn(None), fn(256)
    np.testing.assert_allclose(np.asarray(blocked(q, k, v)), np.asarray(whole(q, k, v)),
                               atol=1e-5, rtol=1e-5)
    # XLA's own accounting of the compiled programs: the [B, K, G, T, T] scores are gone
    temp = lambda f: f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    scores, block_scores = 4 * t * t * 4, 4 * 256 * t * 4  # float32, all 4 query heads
    assert temp(whole) >= scores and temp(blocked) < 3 * block_scores


def test_tiled_attention_skips_nothing_it_needs_and_has_the_same_gradients():
    """600 queries at positions 200.. / 150.. (a continued prefill) over 800 keys, causal, with a
    window and sinks, and in bfloat16: the tiled path (which skips the tiles the mask removes)
    equals the one-block path, values and gradients."""
    from jaxkv.model.layers import causal_attention
    t, s = 600, 800
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, t, 8, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, s, 2, 16)), jnp.float32) for _ in range(2))
    pos = jnp.stack([jnp.arange(t) + 200, jnp.arange(t) + 150])
    kpos = jnp.broadcast_to(jnp.arange(s), (2, s))
    w = jnp.asarray(rng.normal(size=(2, t, 8, 16)), jnp.float32)
    for window, sink, dtype, tol in [(None, 0, jnp.float32, 1e-5), (100, 4, jnp.float32, 1e-5),
                                     (None, 0, jnp.bfloat16, 2e-2)]:
        def loss(q, k, v, block):
            out = causal_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), 0.25, pos,
                                   kpos, window, sink, query_block=block)
            return (out.astype(jnp.float32) * w).sum(), out
        (l1, o1), g1 = jax.jit(jax.value_and_grad(lambda *a: loss(*a, None), (0, 1, 2),
                                                  has_aux=True))(q, k, v)
        (l2, o2), g2 = jax.jit(jax.value_and_grad(lambda *a: loss(*a, 128), (0, 1, 2),
                                                  has_aux=True))(q, k, v)
        assert o2.dtype == dtype
        np.testing.assert_allclose(np.asarray(o2, np.float32), np.asarray(o1, np.float32),
                                   atol=tol, rtol=tol)
        for a, b in zip(g1, g2):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=10 * tol, rtol=10 * tol)


def test_long_prompt_blocks_shrink_to_the_score_budget(monkeypatch):
    from jaxkv.model import layers
    assert layers._fit_block(512, 1000) == 512  # fits: unchanged
    assert layers._fit_block(512, layers.SCORE_BLOCK_BYTES // 100) == 64  # largest power of two
    assert layers._fit_block(512, layers.SCORE_BLOCK_BYTES) == 16  # never below 16
    monkeypatch.setattr(layers, "SCORE_BLOCK_BYTES", 64 * 2**10)
    t = 600
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, t, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, t, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, t, 2, 16)), jnp.float32)
    pos = jnp.arange(t)[None]
    fn = lambda block: jax.jit(lambda q, k, v: layers.causal_attention(
        q, k, v, 0.25, pos, pos, query_block=block))
    whole, blocked = fn(None), fn(512)  # 512 < t: blocked, and 4 x 600 x 4 B rows give 16
    np.testing.assert_allclose(np.asarray(blocked(q, k, v)), np.asarray(whole(q, k, v)),
                               atol=1e-5, rtol=1e-5)
    temp = blocked.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    assert temp < 3 * 4 * 32 * t * 4  # far below one 512-query block's scores (4 * 512 * t * 4)


def test_forward_positions_default_and_shift_invariance(model):
    """Explicit RoPE positions (position-skip training): 0..T-1 is the default, and adding one
    constant to every position leaves the logits unchanged (RoPE sees relative distances only);
    a skip in the middle changes them only after the skip."""
    from jaxkv.model import Decoder
    tokens = jnp.asarray([PROMPTS[1]], jnp.int32)
    t = tokens.shape[1]
    run = lambda pos: Decoder(model.config).apply({"params": model.params}, tokens,
                                                   method=Decoder.forward, positions=pos)
    base = run(None)
    assert_close(run(jnp.arange(t, dtype=jnp.int32)[None]), base, "float32", atol=1e-6)
    assert_close(run(jnp.arange(t, dtype=jnp.int32)[None] + 700), base, "float32", atol=2e-4)
    skipped = run(jnp.asarray([np.r_[np.arange(4), np.arange(4, t) + 300]], jnp.int32))
    assert_close(skipped[:, :4], base[:, :4], "float32", atol=1e-6)
    assert float(jnp.abs(skipped[:, 4:] - base[:, 4:]).max()) > 1e-3


def test_init_params_after_a_traced_first_call():
    """The per-config init is cached; a first call under a trace (load_hf's eval_shape) must not
    leave a tracer in the cached function that a later eager call then leaks."""
    from jaxkv.model import ModelConfig
    from jaxkv.model.decoder import init_params
    config = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=32)
    shapes = jax.eval_shape(lambda: init_params(config, 0))
    params = init_params(config, 0)
    chex.assert_trees_all_equal_shapes_and_dtypes(params, shapes)
    chex.assert_tree_all_finite(params)
