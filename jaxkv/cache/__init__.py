"""Pure-functional KV cache pytrees, one class per layout; each counts the bytes its arrays hold
(`nbytes`)."""
from jaxkv.cache.base import LayerCache, array_nbytes, batched_write, cache_nbytes
from jaxkv.cache.budget import BudgetCache
from jaxkv.cache.dense import DenseCache
from jaxkv.cache.gated import GatedDenseCache
from jaxkv.cache.headsplit import HeadSplitCache
from jaxkv.cache.mixed import MixedCache
from jaxkv.cache.quant import QuantizedCache
from jaxkv.cache.sparse import SparseCache
from jaxkv.cache.streaming import SinkWindowCache

__all__ = ["LayerCache", "DenseCache", "SparseCache", "MixedCache", "QuantizedCache",
           "HeadSplitCache", "SinkWindowCache", "BudgetCache", "GatedDenseCache",
           "array_nbytes", "batched_write", "cache_nbytes"]
