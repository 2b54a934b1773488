"""The `Model` bundle (config + params + tokenizer) and the jit-compiled full forward pass."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
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
    #: a `jaxkv.tokenizer.Tokenizer` (a bare `tokenizers.Tokenizer` is wrapped in one), or None
    tokenizer: Any = None
    path: Optional[str] = None
    #: the registered name it was loaded by (`jaxkv.load`), else None
    name: Optional[str] = None

    def __post_init__(self):
        from jaxkv.tokenizer import as_tokenizer
        self.tokenizer = as_tokenizer(self.tokenizer)

    @property
    def module(self) -> Decoder:
        return Decoder(self.config)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (its checkpoint has none): pass token "
                             "ids instead of text")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Token ids of `text`, with the special tokens (BOS) the checkpoint prepends."""
        return self._need_tokenizer().encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._need_tokenizer().decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """The model's chat template rendered for `messages` ([{"role", "content"}, ...])."""
        return self._need_tokenizer().chat_prompt(messages, add_generation_prompt, **kwargs)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list:
        """Token ids of a conversation, rendered by the chat template (which writes its own
        special tokens, so none are added)."""
        text = self.chat_prompt(messages, add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def fingerprint(self) -> str:
        """Architecture, shape and a hash of the config and weights (`model_fingerprint`)."""
        return model_fingerprint(self)


def weights_sample(params) -> dict:
    """keystr(path) -> the first 16 values of each parameter array as float32: what
    `model_fingerprint` hashes. Loaders take it from the checkpoint's stored values before casting
    to the requested dtype, so one checkpoint has one fingerprint in any dtype."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(p): np.asarray(jnp.ravel(x)[:16], np.float32) for p, x in leaves}


def model_fingerprint(model: Model) -> str:
    """A string identifying `model`'s weights: its architecture and shape, and a SHA-256 over its
    config (without the dtype) and the first 16 values of every parameter array (cheap, and
    different for differently trained or initialised weights). The same checkpoint loaded in
    float32 or bfloat16 has the same fingerprint (the loaders record the stored values); weights
    made in memory are sampled from `params`. Cached on the model object."""
    cached = getattr(model, "_fingerprint", None)
    if cached is not None and cached[0] is model.params:
        return cached[1]
    c = model.config
    settings = {k: v for k, v in dataclasses.asdict(c).items() if k != "dtype"}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    sample = getattr(model, "_weights_sample", None) or weights_sample(model.params)
    for path in sorted(sample):
        h.update(path.encode())
        h.update(np.asarray(sample[path], np.float32).tobytes())
    out = (f"{c.architecture}-L{c.num_layers}-H{c.num_heads}-K{c.num_kv_heads}-D{c.head_dim}-"
           f"{h.hexdigest()[:16]}")
    model._fingerprint = (model.params, out)
    return out


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
    if arr.shape[1] > limit:
        raise ValueError(f"{name}: length {arr.shape[1]} exceeds the model's context of {limit}")
    if isinstance(tokens, jax.Array) and tokens.shape == arr.shape:
        return tokens.astype(jnp.int32)  # keep the caller's placement (e.g. batch on a mesh)
    return jnp.asarray(arr, jnp.int32)


def forward(model: Model, tokens, return_hidden: bool = False):
    """Full causal forward pass, no cache. tokens: [B, T] (or [T]) -> logits [B, T, V]."""
    tokens = check_tokens(tokens, model.config)
    return _forward(model.params, tokens, model.config, return_hidden)
