"""Local Hugging Face checkpoints: config.json, single or sharded *.safetensors, tokenizer.json.

Nothing is downloaded: `path` must be a local folder (as written by `save_pretrained`).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.model.config import ModelConfig
from jaxkv.model.decoder import init_params
from jaxkv.model.model import Model

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def _hf_to_flax_name(name: str):
    """'model.layers.3.self_attn.q_proj.weight' -> (('layers_3','self_attn','q_proj','kernel'), True)

    Returns (path in the Flax params tree, whether the tensor must be transposed) or None.
    """
    parts = name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    if parts == ["embed_tokens", "weight"]:
        return ("embed_tokens", "embedding"), False
    if parts == ["norm", "weight"]:
        return ("norm", "weight"), False
    if parts == ["lm_head", "weight"]:
        return ("lm_head", "kernel"), True
    if parts[0] == "layers" and len(parts) >= 4:
        layer = f"layers_{int(parts[1])}"
        rest = parts[2:]
        if rest[-1] == "weight" and rest[-2].endswith("norm"):
            return (layer, *rest[:-1], "weight"), False
        if rest[-1] == "weight":
            return (layer, *rest[:-1], "kernel"), True
        if rest[-1] == "bias":
            return (layer, *rest[:-1], "bias"), False
    return None


def _read_tensors(folder: str) -> Dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    index_path = os.path.join(folder, _INDEX)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index_path}: no 'weight_map' in the index file")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(folder, _SINGLE)):
        files = [_SINGLE]
    else:
        found = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
        if not found:
            raise FileNotFoundError(f"{folder}: no {_SINGLE}, {_INDEX} or *.safetensors file")
        files = sorted(found)
    tensors = {}
    for fname in files:
        fpath = os.path.join(folder, fname)
        if not os.path.exists(fpath):
            raise FileNotFoundError(f"{fpath}: listed in {_INDEX} but missing")
        try:
            with safe_open(fpath, framework="flax") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{fpath}: not a readable safetensors file ({e})") from e
    return tensors


def load_config(path: str, dtype=None) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a local folder (jaxkv never downloads checkpoints)")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; a checkpoint folder needs config.json")
    with open(cfg_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
    config = ModelConfig.from_hf_dict(hf, dtype=dtype)
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_path):  # chat models list their end-of-turn ids here
        with open(gen_path) as f:
            try:
                gen = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{gen_path}: invalid JSON ({e})") from e
        extra = gen.get("eos_token_id")
        extra = [] if extra is None else extra if isinstance(extra, list) else [extra]
        eos = tuple(dict.fromkeys(list(config.eos_ids) + [int(e) for e in extra]))
        if eos != config.eos_ids:
            config = config.replace(eos_token_id=eos)
    return config


def load_hf(path: str, dtype=None) -> Model:
    """Load a local HF checkpoint folder into a `jaxkv.Model`.

    dtype: float32, bfloat16 or float16, as a name ("bf16", "float32", ...) or a dtype
    (jnp.bfloat16, np.float16); default: the checkpoint's torch_dtype.
    """
    config = load_config(path, dtype)
    tensors = _read_tensors(path)
    # Build the expected tree from shapes only (no random init of a big model).
    shapes = jax.eval_shape(lambda: init_params(config))
    flat_expected = {tuple(k.key for k in kp): v for kp, v in
                     jax.tree_util.tree_flatten_with_path(shapes)[0]}
    flat, sample = {}, {}
    for name, value in tensors.items():
        mapped = _hf_to_flax_name(name)
        if mapped is None:
            if "rotary_emb" not in name:
                warnings.warn(f"{path}: ignoring tensor {name!r} (not part of the model)")
            continue
        key, transpose = mapped
        if key not in flat_expected:
            if key == ("lm_head", "kernel") and config.tie_word_embeddings:
                continue
            raise ValueError(f"{path}: tensor {name!r} does not fit a {config.architecture} with "
                             f"{config.num_layers} layers")
        arr = jnp.asarray(value)
        if transpose:
            arr = arr.T
        want = flat_expected[key]
        if arr.shape != want.shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(value.shape)}, expected "
                             f"{tuple(want.shape[::-1]) if transpose else tuple(want.shape)}")
        sample[jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in key))] = \
            np.asarray(jnp.ravel(arr)[:16], np.float32)  # the stored values, before the cast
        flat[key] = arr.astype(config.jnp_dtype)
    missing = [".".join(k) for k in flat_expected if k not in flat]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    params = {}
    for key, arr in flat.items():
        node = params
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = arr
    from jaxkv.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_folder(path)
    model = Model(config=config, params=params, tokenizer=tokenizer, path=path)
    model._weights_sample = sample
    return model


def save_hf(model: Model, path: str) -> None:
    """Write config.json, model.safetensors (torch layout) and tokenizer.json (if any)."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for kp, value in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        key = tuple(k.key for k in kp)
        arr = np.asarray(jnp.asarray(value, jnp.float32))
        if key[0] == "embed_tokens":
            name = "model.embed_tokens.weight"
        elif key[0] == "norm":
            name = "model.norm.weight"
        elif key[0] == "lm_head":
            name, arr = "lm_head.weight", arr.T
        else:
            layer = key[0].split("_")[1]
            leaf = key[-1]
            mid = ".".join(key[1:-1])
            if leaf == "kernel":
                leaf, arr = "weight", arr.T
            name = f"model.layers.{layer}.{mid}.{leaf}"
        tensors[name] = np.ascontiguousarray(arr)
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = "float32"  # stored as float32; load_hf(dtype=...) converts
    tmp = os.path.join(path, _SINGLE + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(path, _SINGLE))  # never leave a half-written checkpoint
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if model.tokenizer is not None:
        model.tokenizer.save(path)
