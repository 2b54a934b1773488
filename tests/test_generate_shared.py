"""One prefill per prompt batch for many methods (`jaxkv.generate.generate_shared`, what the
evaluation harness runs) gives the very tokens and bytes of a separate `generate` per method."""
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv.generate import generate, generate_shared
from jaxkv.tasks import make_task, sample_examples

# dense, prompt eviction, GRKV (its layers once deadlocked XLA's CPU runtime when
# compressed side by side), mixed precision, head split; the others: tests/test_eval_real.py
METHODS = ("full", "snapkv", "grkv", "rdkv", "random_heads")


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
