"""Pure-functional KV cache pytrees."""
from jaxkv.cache.base import LayerCache, array_nbytes, batched_write, cache_nbytes
from jaxkv.cache.dense import DenseCache
from jaxkv.cache.sparse import SparseCache
from jaxkv.cache.mixed import MixedCache
from jaxkv.cache.quantized import QuantizedCache

__all__ = ["LayerCache", "DenseCache", "SparseCache", "MixedCache", "QuantizedCache",
           "array_nbytes", "batched_write", "cache_nbytes"]
