"""Data + tensor (Megatron-style) parallelism over a 2-D device mesh with axes ("data", "model").

  mesh = make_mesh(data=2, model=2)
  model = shard_model(model, mesh)                 # params split by name (param_specs)
  logits = jaxkv.forward(model, shard_batch(tokens, mesh))
  out = jaxkv.generate(model, prompts, 32, mesh=mesh)

Nothing else is needed: `jit` follows the shardings of its inputs (GSPMD), so the model code is the
same on one device and on a mesh. The layout (E hidden, H/K query/KV heads, D head dim, F MLP,
V vocab; kernels are stored [in, out]):

  q/k/v_proj kernel [E, H*D] / [E, K*D]   P(None, "model")   heads split: attention stays local
  q/k/v_proj bias   [H*D] / [K*D]         P("model")
  o_proj kernel     [H*D, E]              P("model", None)   one all-reduce after attention
  gate/up_proj      [E, F]                P(None, "model")
  down_proj         [F, E]                P("model", None)   one all-reduce after the MLP
  embed_tokens      [V, E]                P("model", None)   split along the vocabulary
  lm_head kernel    [E, V]                P(None, "model")   logits split along the vocabulary
  norms, anything unknown                 replicated
  caches [B, K, ...]                      P("data", "model")
  token batches [B, ...]                  P("data")

A dimension that the mesh axis does not divide is replicated instead (never an error).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")

# name of the module holding a kernel -> spec of its [in, out] kernel
_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")  # split outputs
_ROW = ("o_proj", "down_proj")  # split inputs


def make_mesh(data: int = 1, model: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A (data, model) mesh over the first data * model of `devices` (default: jax.devices())."""
    for name, value in (("data", data), ("model", model)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    devices = list(jax.devices() if devices is None else devices)
    if data * model > len(devices):
        raise ValueError(f"data={data} x model={model} needs {data * model} devices; only "
                         f"{len(devices)} available ({devices[0].platform})")
    return Mesh(np.array(devices[:data * model]).reshape(data, model), AXES)


def _axis_size(mesh, axis: str) -> Optional[int]:
    """Size of `axis` in a Mesh / AbstractMesh (None: no mesh, sizes unknown)."""
    return None if mesh is None else int(mesh.shape[axis])


def _fit(spec: tuple, shape: tuple, mesh: Optional[Mesh]) -> P:
    """Drop (replicate) every named dim of `spec` that the mesh axis does not divide."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    out = []
    for axis, dim in zip(spec, shape):
        size = _axis_size(mesh, axis) if axis is not None else None
        out.append(axis if axis is not None and (size is None or dim % size == 0) else None)
    if all(axis is None for axis in out):
        return P()  # replicated
    return P(*out)  # one entry per dim, e.g. P("model", None) for an o_proj kernel


def param_spec(path: Sequence[str], shape: tuple, mesh: Optional[Mesh] = None) -> P:
    """PartitionSpec of one parameter from its name path, e.g. ('layers_0','self_attn','q_proj',
    'kernel'). With a mesh, dims the "model" axis does not divide are replicated."""
    path = tuple(str(p) for p in path)
    leaf = path[-1] if path else ""
    owner = path[-2] if len(path) >= 2 else ""
    spec: tuple = ()
    if leaf == "kernel" and len(shape) == 2:
        if owner in _COLUMN:
            spec = (None, "model")
        elif owner in _ROW:
            spec = ("model", None)
    elif leaf == "bias" and len(shape) == 1 and owner in ("q_proj", "k_proj", "v_proj"):
        spec = ("model",)
    elif leaf == "embedding" and owner == "embed_tokens" and len(shape) == 2:
        spec = ("model", None)
    return _fit(spec, tuple(shape), mesh)


def _keys(key_path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in key_path)


def param_specs(params: Any, mesh: Optional[Mesh] = None) -> Any:
    """The pytree of PartitionSpecs for `params` (arrays or ShapeDtypeStructs), by name."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: param_spec(_keys(kp), np.shape(x), mesh), params)


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Place `params` on `mesh` as `param_specs` says."""
    specs = param_specs(params, mesh)
    shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                       is_leaf=lambda s: isinstance(s, P))
    return jax.device_put(params, shardings)


def shard_model(model, mesh: Mesh):
    """A copy of a `jaxkv.Model` whose params are sharded over `mesh`."""
    return dataclasses.replace(model, params=shard_params(model.params, mesh))


def batch_spec(shape: tuple, mesh: Optional[Mesh] = None) -> P:
    """[B, ...] -> P("data") when the data axis divides B, else replicated."""
    if len(shape) == 0:
        return P()
    return _fit(("data",), tuple(shape), mesh)


def shard_batch(x: Any, mesh: Mesh) -> Any:
    """Place an array (or pytree of arrays) with its leading batch dim on the "data" axis."""
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, NamedSharding(mesh, batch_spec(np.shape(a), mesh))), x)


def cache_spec(shape: tuple, mesh: Optional[Mesh] = None) -> P:
    """Spec of one cache array laid out [B, K, ...] (k, v, codes, indices; per-sequence [B]
    lengths): batch on "data", KV heads on "model", each only when divisible."""
    if len(shape) == 0:
        return P()
    if len(shape) < 3:  # [B] lengths, [B, X] per-sequence bookkeeping
        return _fit(("data",), tuple(shape), mesh)
    return _fit(("data", "model"), tuple(shape), mesh)


def cache_specs(caches: Any, mesh: Optional[Mesh] = None) -> Any:
    """PartitionSpecs for a cache pytree (e.g. the tuple of per-layer DenseCaches)."""
    return jax.tree_util.tree_map(lambda a: cache_spec(np.shape(a), mesh), caches)


def shard_cache(caches: Any, mesh: Mesh) -> Any:
    """Place a cache pytree on `mesh` as `cache_specs` says (inside jit use
    `jax.lax.with_sharding_constraint(caches, cache_shardings(caches, mesh))`)."""
    return jax.device_put(caches, cache_shardings(caches, mesh))


def cache_shardings(caches: Any, mesh: Mesh) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), cache_specs(caches, mesh),
                                  is_leaf=lambda s: isinstance(s, P))


__all__ = ["AXES", "make_mesh", "data_mesh", "replicate", "put_batch", "param_spec",
           "param_specs", "shard_params", "shard_model", "batch_spec", "shard_batch", "cache_spec", "cache_specs", "cache_shardings",
           "shard_cache"]


def data_mesh(data_parallel: int) -> Optional[Mesh]:
    """None for one device, else a (data=D, model=1) mesh; D = 0 takes every local device."""
    d = data_parallel or len(jax.devices())
    if d == 1:
        return None
    return make_mesh(data=d, model=1)


def replicate(x: Any, mesh: Optional[Mesh]) -> Any:
    """Place `x` on every device of `mesh` (as it is without a mesh)."""
    if mesh is None:
        return x
    return jax.device_put(x, NamedSharding(mesh, P()))


def put_batch(x: Any, mesh: Optional[Mesh]) -> Any:
    """A pytree of arrays as jax arrays, batch dim on the "data" axis when there is a mesh."""
    x = jax.tree_util.tree_map(jnp.asarray, x)
    return x if mesh is None else shard_batch(x, mesh)
