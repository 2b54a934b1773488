"""One prefill per prompt batch for many methods (`jaxkv.generate.generate_shared`, what the
evaluation harness runs) gives the very tokens and bytes of a separate `generate` per method."""
import importlib

import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv.generate import generate, generate_shared
from jaxkv.tasks import make_task, sample_examples

# dense, prompt eviction + merging (GRKV: its layers once deadlocked XLA's CPU runtime when
# compressed side by side), quantisation, mixed precision, head split
METHODS = ("full", "grkv", "kivi2", "rdkv", "random_heads")


@pytest.fixture(scope="module")
def tiny():
    return jaxkv.load("tiny")


def test_shared_prefill_gives_the_tokens_of_separate_prefills(tiny):
    from configs.tiny import method_settings
    from jaxkv.policies.registry import get_factory
    prompts = [ex.prompt_ids for ex in sample_examples(make_task("niah_single"), 4, 1)]
    prompts[1] = prompts[1][:150]  # unequal lengths: right padding
    policies = [jaxkv.make_policy(m, 0.5, tiny, **(method_settings(m, get_factory(m))
                                                   if m != "full" else {})) for m in METHODS]
    shared = generate_shared(tiny, prompts, 8, policies, eos_ids=[2])
    for name, policy, got in zip(METHODS, policies, shared):
        want = generate(tiny, prompts, 8, policy=policy, eos_ids=[2])
        assert got.tokens == want.tokens, name
        assert (got.cache_bytes, got.full_cache_bytes) == (want.cache_bytes, want.full_cache_bytes)
        assert got.seconds > 0 and want.seconds is None  # per-policy time: generate_shared only
    assert shared[0].texts == generate(tiny, prompts, 8, eos_ids=[2]).texts


def test_shared_prefill_checks_its_arguments(tiny):
    from jaxkv.policies.gated import GatedMixing
    gated = GatedMixing(jnp.ones((4, 4)), sink=4, window=8)
    with pytest.raises(ValueError, match="policies\\[1\\].*pytree"):
        generate_shared(tiny, [[1, 5, 6]], 4, [None, gated])
    with pytest.raises(ValueError, match="pad_to=2"):
        generate_shared(tiny, [[1, 5, 6]], 4, [None], pad_to=2)
    with pytest.raises(ValueError, match="at least one policy"):
        generate_shared(tiny, [[1, 5, 6]], 4, [])
    out, = generate_shared(tiny, np.array([[1, 5, 6]]), 4, [None], pad_to=16, eos_ids=())
    assert len(out.tokens[0]) == 4


def test_a_stored_prefill_serves_later_groups_with_the_same_tokens(tiny, tmp_path, monkeypatch):
    """Groups of methods sharing one prefill through `prefill_file`: the first group computes and
    stores it (collecting every observed policy's queries), a later group loads it instead of
    prefilling and decodes the tokens a separate generate gives; a file made for other prompts
    is not used."""
    gen_mod = importlib.import_module("jaxkv.generate")  # jaxkv.generate is the function
    prompts = [ex.prompt_ids for ex in sample_examples(make_task("niah_single"), 2, 4)]
    snap = jaxkv.make_policy("snapkv", 0.5, tiny, window=4)
    grkv = jaxkv.make_policy("grkv", 0.5, tiny, window=4, n_ref=4)
    observe = [None, snap, grkv]
    path = str(tmp_path / "batch.pkl")
    computed = []
    real = gen_mod._save_prefill
    monkeypatch.setattr(gen_mod, "_save_prefill", lambda *a: (computed.append(1), real(*a)))
    first = generate_shared(tiny, prompts, 6, [None, snap], observe=observe, prefill_file=path)
    later = generate_shared(tiny, prompts, 6, [grkv], observe=observe, prefill_file=path)
    assert computed == [1]  # the later group loaded it
    for policy, got in zip([None, snap, grkv], first + later):
        assert got.tokens == generate(tiny, prompts, 6, policy=policy).tokens
        assert got.seconds > 0
    other = [p[:-3] for p in prompts]
    again = generate_shared(tiny, other, 6, [grkv], observe=observe, prefill_file=path)
    assert computed == [1, 1] and again[0].tokens == generate(tiny, other, 6, policy=grkv).tokens
    with pytest.raises(ValueError, match="not among `observe`"):
        generate_shared(tiny, prompts, 6, [grkv], observe=[None, snap])


def test_shared_caches_are_the_caches_generate_shared_decodes_from(tiny):
    """`shared_caches`: per policy, the per-layer caches right after compression; their bytes are
    generate_shared's cache_bytes, the dense ones hold the forward pass's keys and values, and a
    sparse cache's kept positions lie in the prompt and include its last `window` tokens."""
    from jaxkv.cache import DenseCache, SparseCache, cache_nbytes
    from jaxkv.diagnostics import layer_qkv
    from jaxkv.generate import shared_caches
    prompts = [ex.prompt_ids for ex in sample_examples(make_task("niah_single"), 2, 3)]
    prompts[1] = prompts[1][:150]
    policies = [None, jaxkv.make_policy("snapkv", 0.5, tiny, window=8)]
    runs = generate_shared(tiny, prompts, 4, policies)
    caches = shared_caches(tiny, prompts, 4, policies)
    assert len(caches) == 2 and all(len(c) == tiny.config.num_layers for c in caches)
    for out, layers in zip(runs, caches):
        assert cache_nbytes(layers) == out.cache_bytes
    tokens = np.zeros((2, max(map(len, prompts))), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    for layer, (dense, (_, k, v)) in enumerate(zip(caches[0], layer_qkv(tiny, tokens))):
        assert isinstance(dense, DenseCache)
        n = len(prompts[1])
        np.testing.assert_allclose(np.asarray(dense.k[1, :, :n]),
                                   np.asarray(k[1, :n].transpose(1, 0, 2)), atol=1e-5)
    for cache in caches[1]:
        assert isinstance(cache, SparseCache)
        for i, p in enumerate(prompts):
            pos = np.asarray(cache.positions[i])
            heads = np.asarray(cache.heads[i])
            assert pos.max() < len(p)
            for h in range(tiny.config.num_kv_heads):
                assert set(range(len(p) - 8, len(p))) <= set(pos[heads == h].tolist())
