"""Pure-functional KV cache pytrees."""
from jaxkv.cache.base import LayerCache, array_nbytes, batched_write, cache_nbytes
from jaxkv.cache.dense import DenseCache
from jaxkv.cache.sparse import SparseCache

__all__ = ["LayerCache", "DenseCache", "SparseCache", "array_nbytes", "batched_write", "cache_nbytes"]
