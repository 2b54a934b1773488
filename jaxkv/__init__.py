"""jaxkv: small and fast KV caches for JAX language models (RLKV, GRKV, RDKV and baselines)."""
from jaxkv.model import Model, ModelConfig, forward, init_model
# Eager, not lazy: the submodule `jaxkv.generate` would otherwise shadow the function once imported.
from jaxkv.generate import generate

__version__ = "0.1.0"


_LAZY = {"load_hf": "jaxkv.hf", "save_hf": "jaxkv.hf", "load_gguf": "jaxkv.gguf",
         "load": "jaxkv.models", "available_models": "jaxkv.models",
         "load_tokenizer": "jaxkv.models",
         "Tokenizer": "jaxkv.tokenizer", "make_policy": "jaxkv.policies.registry",
         "available_methods": "jaxkv.policies.registry"}
_SUBMODULES = ("policies", "cache", "eval", "tasks", "models", "gguf", "hf", "tokenizer",
               "embedded", "sharding")


def __getattr__(name):  # lazy: keep `import jaxkv` light
    import importlib
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxkv.{name}")
    raise AttributeError(f"module 'jaxkv' has no attribute {name!r}")


__all__ = ["Model", "ModelConfig", "forward", "init_model", "generate", "load", "load_hf",
           "save_hf", "load_gguf", "load_tokenizer", "available_models", "Tokenizer", "make_policy",
           "available_methods"]
