"""The `Model` bundle (config + params + tokenizer) and the jit-compiled full forward pass."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.model.config import ModelConfig
from jaxkv.model.decoder import Decoder, init_params


@dataclasses.dataclass
class Model:
    """What `jaxkv.load_hf` returns. params is the Flax parameter pytree of `Decoder(config)`."""

    config: ModelConfig
    params: Any
    tokenizer: Any = None  # a `tokenizers.Tokenizer`, when the checkpoint has tokenizer.json
    path: Optional[str] = None

    @property
    def module(self) -> Decoder:
        return Decoder(self.config)

    def encode(self, text: str) -> list:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids instead of text")
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return self.tokenizer.decode(list(ids))


def init_model(config: ModelConfig, seed: int = 0, tokenizer: Any = None) -> Model:
    return Model(config=config, params=init_params(config, seed), tokenizer=tokenizer)


@functools.partial(jax.jit, static_argnames=("config", "return_hidden"))
def _forward(params, tokens, config: ModelConfig, return_hidden: bool = False):
    return Decoder(config).apply({"params": params}, tokens, return_hidden=return_hidden,
                                 method=Decoder.forward)


def check_tokens(tokens, config: ModelConfig, name: str = "tokens") -> jnp.ndarray:
    """Validate a [B, T] batch of token ids; raises ValueError with what is allowed."""
    arr = np.asarray(tokens)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected shape [batch, length], got {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: empty sequence; give at least one token")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer token ids, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= config.vocab_size:
        raise ValueError(f"{name}: ids must lie in [0, {config.vocab_size}), got range "
                         f"[{arr.min()}, {arr.max()}]")
    limit = config.max_position_embeddings
    if config.sliding_window is not None:
        limit = min(limit, config.sliding_window)
    if arr.shape[1] > limit:
        raise ValueError(f"{name}: length {arr.shape[1]} exceeds the model's context of {limit}")
    if isinstance(tokens, jax.Array) and tokens.shape == arr.shape:
        return tokens.astype(jnp.int32)  # keep the caller's placement (e.g. batch on a mesh)
    return jnp.asarray(arr, jnp.int32)


def forward(model: Model, tokens, return_hidden: bool = False):
    """Full causal forward pass, no cache. tokens: [B, T] (or [T]) -> logits [B, T, V]."""
    tokens = check_tokens(tokens, model.config)
    return _forward(model.params, tokens, model.config, return_hidden)
