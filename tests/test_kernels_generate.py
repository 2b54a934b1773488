"""End to end: `jaxkv.generate` through the dispatcher's Pallas kernels (TPU interpret mode on
CPU) gives the same greedy tokens as through the XLA references, for every cache layout."""
import numpy as np
import pytest

import jaxkv
from jaxkv.policies.registry import make_policy
from pallas_kernels.dispatch import kernel_mode, kernel_mode_override
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("reset_tpu_interpreter")

# (method, budget, settings, the kernel module and function its cache decodes with)
LAYOUTS = [
    ("full", 1.0, {}, "dense_decode", "dense_decode_attention"),
    ("rlkv", 0.6, {"gates": np.linspace(0.1, 0.9, 4).reshape(2, 2), "sink": 2, "window": 8},
     "headsplit_decode", "headsplit_decode_attention"),
    ("snapkv", 0.5, {"window": 4}, "sparse_decode", "sparse_decode_attention"),
    ("kivi4", 1.0, {"window": 4, "group_size": 8}, "quantized_decode",
     "quantized_decode_attention"),
    ("rdkv", 0.3, {"window": 4, "eps": "default"}, "mixed_decode",
     "mixed_decode_attention"),
]


@pytest.mark.parametrize("method, budget, settings, module, kernel", LAYOUTS,
                         ids=[m for m, *_ in LAYOUTS])
def test_generate_with_the_kernels_equals_the_references(method, budget, settings, module,
                                                         kernel, monkeypatch):
    import importlib
    mod = importlib.import_module(f"pallas_kernels.{module}")
    real, traced = getattr(mod, kernel), []

    def spy(*args, **kwargs):  # the dispatcher looks the kernel up at trace time
        traced.append(kwargs.get("interpret"))
        return real(*args, **kwargs)
    monkeypatch.setattr(mod, kernel, spy)
    model = tiny_model(seed=3, head_dim=16, num_heads=4)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, model.config.vocab_size, size=n).tolist() for n in (37, 22)]
    policy = None if method == "full" else make_policy(method, budget, model, **settings)
    out = {}
    for mode in ("reference", "interpret"):
        with kernel_mode_override(mode):
            assert kernel_mode() == mode
            out[mode] = jaxkv.generate(model, prompts, 6, policy=policy)
    assert traced and all(t is not False for t in traced)  # the Pallas kernel, interpreted
    assert out["interpret"].tokens == out["reference"].tokens
    assert out["interpret"].cache_bytes == out["reference"].cache_bytes
