"""Model configuration for the Llama / Qwen2 / Qwen3 / Mistral family of decoders.

Notation used across jaxkv (shape comments use these letters):
  B batch, T sequence (prompt) length, S cache slots, L layers, H query heads, K (Hkv) KV heads,
  G = H / K query heads per KV head (GQA group), D head dim, E hidden size, F MLP size, V vocab.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax.numpy as jnp

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
)
#: "freq_factors": per-frequency divisors (`factors`, D/2 of them), how GGUF files of Llama 3.1
#: store its scaling (the `rope_freqs.weight` tensor)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "freq_factors")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "bf16": "bfloat16",
                  "fp16": "float16", "f16": "float16", "half": "float16"}
#: model_type (config.json) -> architecture, for configs whose "architectures" is missing or null
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}


def normalize_dtype(dtype, name: str = "dtype"):
    """A dtype name ("float32", "bfloat16", "float16") from a string ("bf16", "fp32", ...), a
    numpy / jax dtype or scalar type (np.float16, jnp.bfloat16); None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        key = _DTYPE_ALIASES.get(key, key)
    else:
        try:
            key = jnp.dtype(dtype).name
        except TypeError:
            key = None
    if key not in _DTYPES:
        raise ValueError(f"{name}={dtype!r} is not allowed; expected one of float32, bfloat16, "
                         f"float16 (a name such as 'bf16', or jnp.float32 / np.float16)")
    return key


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static settings of a decoder. Frozen and hashable, so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # rope_scaling as a tuple of (key, value) pairs so the config stays hashable.
    rope_scaling: Optional[tuple] = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k, v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    # Mistral: each query attends to the last `sliding_window` keys (itself included); longer
    # sequences are allowed (up to max_position_embeddings)
    sliding_window: Optional[int] = None
    architecture: str = "LlamaForCausalLM"
    dtype: str = "float32"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[tuple] = None
    pad_token_id: int = 0

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r}: supported are "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id}: outside the vocabulary [0, "
                             f"{self.vocab_size}); generation would pad with a token the model "
                             f"does not have")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window < 1):
            raise ValueError(f"sliding_window={self.sliding_window!r}: must be None or a positive "
                             f"integer (tokens each query attends to)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}: RoPE needs an even head dimension")
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported are "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling) if self.rope_scaling else {}

    @property
    def eos_ids(self) -> tuple:
        return tuple(self.eos_token_id or ())

    @property
    def total_kv_heads(self) -> int:
        return self.num_layers * self.num_kv_heads

    def kv_bytes_per_token(self) -> int:
        """Bytes of a dense K+V cache for one token over all layers at this dtype."""
        itemsize = jnp.dtype(self.jnp_dtype).itemsize
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json <-> ModelConfig -------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], dtype: Optional[str] = None) -> "ModelConfig":
        archs = hf.get("architectures")
        arch = archs[0] if archs else MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} in config.json is not supported; supported are "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type "
                             f"{', '.join(MODEL_TYPES)})")
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        # transformers >= 5 moves rope settings into `rope_parameters`.
        params = hf.get("rope_parameters")
        if isinstance(params, Mapping):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_scaling.setdefault("rope_type", rope_scaling.pop("type", "default"))
            rope_scaling.pop("rope_theta", None)
            rope_scaling = tuple(sorted((k, _hashable(v)) for k, v in rope_scaling.items()))
        eos = hf.get("eos_token_id")
        if eos is not None and not isinstance(eos, (list, tuple)):
            eos = [eos]
        sliding = None
        if arch == "MistralForCausalLM" or hf.get("use_sliding_window"):
            sliding = hf.get("sliding_window")
        torch_dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        dtype = normalize_dtype(dtype)
        if dtype is None:
            dtype = torch_dtype if torch_dtype in _DTYPES else "float32"
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=sliding,
            architecture=arch,
            dtype=dtype,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if eos else None,
            pad_token_id=0 if hf.get("pad_token_id") is None else int(hf["pad_token_id"]),
        )

    def to_hf_dict(self) -> dict:
        model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                      "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral"}[self.architecture]
        out = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict or None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "torch_dtype": self.dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_ids) if self.eos_ids else None,
            "pad_token_id": self.pad_token_id,
        }
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        return out


def _hashable(v):
    if isinstance(v, list):
        return tuple(v)
    return v
