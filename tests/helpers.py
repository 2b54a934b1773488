"""Shared test helpers: tolerances by dtype, tiny configs, tiny Hugging Face checkpoints.

Import with `from tests.helpers import ...` (tests/ is a package; `from helpers import ...` works
only when tests/ itself is on sys.path, i.e. without tests/__init__.py).

  tolerance(dtype)          -> dict(atol=, rtol=) for comparing arrays computed in `dtype`
  assert_close(a, b, dtype) -> np.testing.assert_allclose with that tolerance
  tiny_config(**changes)    -> a jaxkv ModelConfig small enough for CPU tests (no torch needed)
  tiny_model(seed, **changes) -> jaxkv.Model with random parameters of tiny_config
  tiny_hf_config(arch, **overrides) -> a transformers config of the same tiny shape
  tiny_hf_checkpoint(arch, tmp_path, **overrides) -> (folder, torch model) via save_pretrained
  SeededRng, normal(rng, shape, dtype) -> random kernel inputs (fixtures: tests/conftest.py)
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional, Tuple

import numpy as np

# ---- tolerances --------------------------------------------------------------------------------
# float32: reductions in a different order (XLA vs torch, cache vs full attention) differ by a few
# ulps per op; a 2-layer tiny model ends up within ~1e-6, so 1e-4 leaves a wide, still tight margin.
# bfloat16 has an 8-bit mantissa (eps 2^-8 ~ 3.9e-3); a couple of rounding steps per layer give
# ~1e-2 errors on O(1) values.
_TOLERANCES = {
    "float64": dict(atol=1e-8, rtol=1e-7),
    "float32": dict(atol=1e-4, rtol=1e-4),
    "float16": dict(atol=1e-2, rtol=1e-2),
    "bfloat16": dict(atol=2e-2, rtol=2e-2),
}


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            import jax.numpy as jnp
            name = jnp.dtype(dtype).name
        except TypeError:  # e.g. a torch dtype
            name = str(dtype).replace("torch.", "")
    return {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
            "f16": "float16", "half": "float16", "float": "float32"}.get(name, name)


def tolerance(dtype) -> dict:
    """dict(atol=, rtol=) for results computed in `dtype` (a name, numpy/jax or torch dtype)."""
    name = _dtype_name(dtype)
    if name not in _TOLERANCES:
        raise ValueError(f"dtype={dtype!r}: no tolerance known; known are {', '.join(_TOLERANCES)}")
    return dict(_TOLERANCES[name])


def to_numpy(x) -> np.ndarray:
    """jax / torch / numpy array -> float64 numpy (bf16 has no numpy dtype of its own)."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x).astype(np.float64)


def assert_close(actual, expected, dtype, err_msg: str = "", **override) -> None:
    """assert_allclose(actual, expected) with the tolerance of `dtype` (override atol/rtol)."""
    tol = {**tolerance(dtype), **override}
    np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), err_msg=err_msg, **tol)


# ---- kernel tests: fresh random inputs every run, the seed in failure messages -----------------
class SeededRng(np.random.Generator):
    """numpy Generator that remembers its seed for failure messages (`rng.seed_msg`)."""

    def __init__(self, seed: int):
        super().__init__(np.random.PCG64(seed))
        self.seed_msg = f"seed={seed}"


def normal(rng, shape, dtype):
    import jax.numpy as jnp
    return jnp.asarray(rng.standard_normal(shape), dtype)


# ---- pure-jax tiny models ----------------------------------------------------------------------
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8,
            num_kv_heads=2, head_dim=8, max_position_embeddings=256)


def tiny_config(**changes):
    """A tiny Llama-style jaxkv ModelConfig (V=128, E=64, L=2, H=8, K=2, D=8); no EOS token."""
    from jaxkv.model.config import ModelConfig
    return ModelConfig(**{**TINY, **changes})


def tiny_model(seed: int = 0, **changes):
    """jaxkv.Model with random parameters of `tiny_config(**changes)`.

    Built once per (seed, changes) in a test session (initialising compiles); each call returns
    a fresh Model holding the same (immutable) arrays, so do not mutate `params` dicts in place."""
    import dataclasses
    return dataclasses.replace(_tiny_model(seed, tuple(sorted(changes.items()))))


@functools.lru_cache(maxsize=None)
def _tiny_model(seed: int, changes: tuple):
    from jaxkv.model.model import init_model
    return init_model(tiny_config(**dict(changes)), seed=seed)


# ---- tiny Hugging Face checkpoints -------------------------------------------------------------
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")

_HF_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

_HF_ARCH = {
    # Llama 3 style RoPE scaling; original context 64 puts the 4 frequencies of head_dim 8 ...
    # into all three bands (high-frequency kept, smoothed, low-frequency divided by `factor`).
    "llama": dict(tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(tie_word_embeddings=True),  # Qwen2: bias on q/k/v (always), tied embeddings
    "qwen3": dict(head_dim=16, tie_word_embeddings=False),  # q/k norm, head_dim != E / H
    "mistral": dict(tie_word_embeddings=False, sliding_window=4096),
}


def _hf_classes(arch: str):
    import transformers
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[arch]
    return getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")


def tiny_hf_config(arch: str, **overrides):
    """The transformers config of a tiny `arch` model (see module docstring); overrides win."""
    config_cls, _ = _hf_classes(arch)
    return config_cls(**{**_HF_COMMON, **_HF_ARCH[arch], **overrides})


def tiny_hf_checkpoint(arch: str, tmp_path, *, seed: int = 0, dtype: str = "float32",
                       max_shard_size: Optional[Any] = None, **overrides) -> Tuple[str, Any]:
    """Build a random tiny transformers model of `arch`, save_pretrained it under tmp_path.

    arch: llama (llama3 rope_scaling), qwen2 (attention bias, tied embeddings), qwen3 (q/k norm,
    explicit head_dim 16), mistral. overrides: any transformers config field (e.g. eos_token_id=None,
    initializer_range=0.1). max_shard_size: e.g. "20KB" to write sharded files + an index.
    Returns (folder, torch model in eval mode, float32 unless `dtype` says otherwise).
    """
    import torch
    _, model_cls = _hf_classes(arch)
    config = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    folder = os.path.join(str(tmp_path), f"{arch}-seed{seed}")
    kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(folder, **kwargs)
    return folder, model


def hf_greedy(model, prompt, max_new_tokens: int) -> list:
    """transformers' greedy generate on one unpadded prompt -> exactly max_new_tokens new ids.

    EOS is switched off (eos_token_id=None), so every step is a plain argmax."""
    import torch
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             eos_token_id=None, pad_token_id=0, use_cache=True)
    return out[0, ids.shape[1]:].tolist()


# ---- model-level helpers shared by the cache / policy tests ------------------------------------

def random_params(config, seed: int = 0):
    """Random parameters of `config` drawn with numpy (no jit compile of the initialiser, which
    costs seconds on CPU), scaled as Flax initialises them: kernels normal(0, 1/sqrt(fan_in)),
    embeddings normal(0, 0.02), unit norm scales, zero biases."""
    import jax
    import jax.numpy as jnp

    from jaxkv.model.decoder import init_params
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "weight":  # RMSNorm scales
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        std = 0.02 if name == "embedding" else leaf.shape[0] ** -0.5
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

    shapes = jax.eval_shape(lambda: init_params(config))
    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _jitted_model_calls():
    import jax

    from jaxkv.model.decoder import Decoder

    @functools.partial(jax.jit, static_argnames=("config", "capacity", "static_policy"))
    def prefill_jit(params, policy_leaves, tokens, lengths, config, capacity, static_policy):
        policy = static_policy
        if isinstance(static_policy, jax.tree_util.PyTreeDef):
            policy = jax.tree_util.tree_unflatten(static_policy, policy_leaves)
        return Decoder(config).apply({"params": params}, tokens, lengths, capacity, policy,
                                     method=Decoder.prefill)

    @functools.partial(jax.jit, static_argnames=("config",))
    def decode_jit(params, tokens, positions, caches, config):
        return Decoder(config).apply({"params": params}, tokens, positions, caches,
                                     method=Decoder.decode)
    return prefill_jit, decode_jit


def prefill(params, tokens, lengths, config, capacity, policy=None):
    """Jitted `Decoder.prefill`; a pytree policy (e.g. GatedMixing) is traced, others static,
    as in `jaxkv.generate`. -> (last-token logits [B, V], per-layer caches)."""
    from jaxkv.generate import split_policy
    static, leaves = split_policy(policy)
    return _jitted_model_calls()[0](params, leaves, tokens, lengths, config=config,
                                    capacity=capacity, static_policy=static)


def decode(params, tokens, positions, caches, config):
    """Jitted `Decoder.decode`: one token per sequence -> (logits [B, V], new caches)."""
    return _jitted_model_calls()[1](params, tokens, positions, caches, config=config)
