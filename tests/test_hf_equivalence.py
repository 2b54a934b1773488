"""jaxkv against Hugging Face transformers on tiny random checkpoints of every architecture.

Forward logits agree to fp32 tolerance, greedy generation gives the very same tokens, sharded
checkpoints (with an index file) load identically, and bf16 loading stays within bf16 tolerance.
"""
import copy
import json
import os

import chex
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxkv  # noqa: E402
try:  # tests/ as a package (tests/__init__.py) or as a plain folder on sys.path
    from tests.helpers import (ARCHITECTURES, assert_close, hf_greedy,  # noqa: E402
                               tiny_hf_checkpoint, to_numpy)
except ImportError:  # pragma: no cover
    from helpers import (ARCHITECTURES, assert_close, hf_greedy,  # noqa: E402
                         tiny_hf_checkpoint, to_numpy)

NEW_TOKENS = 32
# A wider init than transformers' default 0.02 gives peakier, more varied logits, so greedy paths
# wander instead of settling at once into a short loop (a stronger test of the cache).
INIT = 0.1
# One token shape for every forward call on a checkpoint, so jit compiles once per config.
TOKENS = np.random.RandomState(0).randint(0, 128, (2, 24))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def ckpt(request, tmp_path_factory):
    """(arch, folder, torch model, jaxkv model) for one architecture, built once per module."""
    arch = request.param
    folder, torch_model = tiny_hf_checkpoint(arch, tmp_path_factory.mktemp(arch),
                                             initializer_range=INIT)
    return arch, folder, torch_model, jaxkv.load_hf(folder)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def test_config_read_from_checkpoint(ckpt):
    arch, _, torch_model, model = ckpt
    c, hf = model.config, torch_model.config
    assert c.architecture == type(torch_model).__name__
    assert (c.num_layers, c.num_heads, c.num_kv_heads) == (2, 8, 2)
    assert c.head_dim == (16 if arch == "qwen3" else 8)
    assert c.tie_word_embeddings == (arch == "qwen2")
    assert c.attention_bias == (arch == "qwen2")
    assert c.qk_norm == (arch == "qwen3")
    if arch == "llama":
        assert c.rope_scaling_dict["rope_type"] == "llama3"
        assert c.rope_scaling_dict["factor"] == 8.0
    assert c.vocab_size == hf.vocab_size == 128


def test_forward_logits_match(ckpt):
    _, _, torch_model, model = ckpt
    tokens = TOKENS
    ours = jaxkv.forward(model, tokens)
    assert ours.shape == (2, 24, 128)
    assert_close(ours, _torch_logits(torch_model, tokens), "float32")


def test_greedy_generate_matches(ckpt):
    _, _, torch_model, model = ckpt
    rng = np.random.RandomState(1)
    prompts = [rng.randint(3, 128, 5).tolist(), rng.randint(3, 128, 19).tolist()]
    gen = jaxkv.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_ids=())
    for i, prompt in enumerate(prompts):
        want = hf_greedy(torch_model, prompt, NEW_TOKENS)  # one unpadded prompt at a time
        assert len(want) == NEW_TOKENS
        assert gen.tokens[i] == want, f"prompt {i} (length {len(prompt)})"
    assert gen.prompt_lengths == [5, 19]


def test_sharded_checkpoint_loads_identically(ckpt, tmp_path):
    arch, _, torch_model, model = ckpt
    folder = os.path.join(tmp_path, "sharded")
    torch_model.save_pretrained(folder, max_shard_size="20KB")  # tiny shards + an index file
    index = os.path.join(folder, "model.safetensors.index.json")
    assert os.path.exists(index)
    with open(index) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    sharded = jaxkv.load_hf(folder)
    assert sharded.config == model.config
    chex.assert_trees_all_equal(sharded.params, model.params)  # same structure and values
    tokens = TOKENS
    np.testing.assert_array_equal(np.asarray(jaxkv.forward(sharded, tokens)),
                                  np.asarray(jaxkv.forward(model, tokens)))


def test_bf16_load_close_to_fp32(ckpt):
    _, folder, torch_model, model = ckpt
    bf16 = jaxkv.load_hf(folder, dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16"
    leaves = jax.tree_util.tree_leaves(bf16.params)
    assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in leaves)
    tokens = TOKENS
    low = to_numpy(jaxkv.forward(bf16, tokens))
    ref = to_numpy(jaxkv.forward(model, tokens))
    # bf16 rounding errors scale with the activations, so compare on the scale of the logits
    # (|logits| reach ~3 with this init; errors ~1% of that, as in torch's own bf16 run).
    scale = np.abs(ref).max()
    assert_close(low / scale, ref / scale, "bfloat16")
    # ... and no worse than transformers' bf16 forward on the same weights (plus some slack).
    with torch.no_grad():
        torch_low = copy.deepcopy(torch_model).to(torch.bfloat16)
        torch_err = np.abs(_torch_logits(torch_low, tokens) - ref).max()
    assert np.abs(low - ref).max() <= 1.5 * torch_err + 1e-3


def test_bf16_checkpoint_loads_as_bf16(tmp_path):
    """A checkpoint saved in bf16 (config dtype bfloat16) loads in bf16 by default."""
    folder, torch_model = tiny_hf_checkpoint("llama", tmp_path, dtype="bfloat16",
                                             initializer_range=INIT)
    model = jaxkv.load_hf(folder)
    assert model.config.dtype == "bfloat16"
    ref = torch_model.float()  # the same (bf16-rounded) weights, computed in fp32
    tokens = TOKENS
    want = _torch_logits(ref, tokens)
    scale = np.abs(want).max()
    assert_close(to_numpy(jaxkv.forward(model, tokens)) / scale, want / scale, "bfloat16")
