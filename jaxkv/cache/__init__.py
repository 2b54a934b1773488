"""Pure-functional KV cache pytrees."""
from jaxkv.cache.base import LayerCache, array_nbytes, batched_write, cache_nbytes
from jaxkv.cache.dense import DenseCache

__all__ = ["LayerCache", "DenseCache", "array_nbytes", "batched_write", "cache_nbytes"]
