"""Compression policies: one module per method (docs/architecture.md). Build any method by name
with `make_policy(name, budget, model, **settings)` (`jaxkv.policies.registry`); every policy class
is importable from here as well as from its module (loaded on first use, so importing
`jaxkv.policies` stays light)."""
import importlib

from jaxkv.policies.base import Policy, check_budget, last_positions

_CLASSES = {
    "StreamingLLM": "streaming", "RLKV": "rlkv", "DuoAttention": "duo", "GatedMixing": "gated",
    "SnapKV": "snapkv", "PyramidKV": "snapkv", "ChunkKV": "snapkv",
    "AdaKV": "adakv", "CriticalKV": "adakv",
    "CaM": "merging", "NearestMerge": "merging", "KVMerger": "merging",
    "GRKV": "grkv", "RDKV": "rdkv", "KIVI": "kivi", "Int8": "kivi", "SnapKVKIVI": "kivi",
    "H2O": "h2o", "RKV": "rkv",
}
_FUNCTIONS = {"make_policy": "registry", "available_methods": "registry",
              "register_method": "registry"}


def __getattr__(name):
    module = _CLASSES.get(name) or _FUNCTIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxkv.policies' has no attribute {name!r}")
    return getattr(importlib.import_module(f"jaxkv.policies.{module}"), name)


__all__ = ["Policy", "check_budget", "last_positions", *_CLASSES, *_FUNCTIONS]
