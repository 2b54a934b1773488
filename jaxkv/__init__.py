"""jaxkv: small and fast KV caches for JAX language models (RLKV, GRKV, RDKV and baselines)."""
from jaxkv.model import Model, ModelConfig, forward, init_model
# Eager, not lazy: the submodule `jaxkv.generate` would otherwise shadow the function once imported.
from jaxkv.generate import generate

__version__ = "0.1.0"


def __getattr__(name):  # lazy: keep `import jaxkv` light
    if name in ("load_hf", "save_hf"):
        from jaxkv import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'jaxkv' has no attribute {name!r}")


__all__ = ["Model", "ModelConfig", "forward", "init_model", "generate", "load_hf", "save_hf"]
