"""The embedded in-house model: a tiny decoder trained by `python -m train pretrain` on the
generated tasks and shipped in the package (jaxkv/assets/<name>) so demos and tests start at once.

* ``tiny`` (configs/tiny.py): the default and only one; retrieval prompts of 224 tokens, every task
  in the forms its recipe trains (configs/tiny.py: EVAL_TASKS). Its RLKV / DuoAttention gates
  (gates_rlkv.json, gates_duo.json) and RDKV eps table (rdkv_eps.json) are shipped beside it.
"""
from __future__ import annotations

import json
import os
from typing import Optional

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
#: name -> the config module whose `python -m train pretrain` run reproduces it
EMBEDDED_CONFIGS = {"tiny": "configs.tiny"}


def _asset_dir(name: str) -> str:
    if name not in EMBEDDED_CONFIGS:
        raise ValueError(f"name={name!r} is not an embedded model; allowed: "
                         f"{sorted(EMBEDDED_CONFIGS)}")
    return os.path.join(ASSETS, name)


ASSET_DIR = _asset_dir("tiny")  # the default model's folder (its gates and eps table live there)


def embedded_model_path(run_dir: Optional[str] = None, name: str = "tiny") -> Optional[str]:
    """The shipped model folder, else `run_dir/model` if a local run exported one, else None."""
    for path in (_asset_dir(name), os.path.join(run_dir, "model") if run_dir else None):
        if path and os.path.exists(os.path.join(path, "model.safetensors")):
            return path
    return None


def load_embedded(path: Optional[str] = None, dtype: str = "float32", name: str = "tiny"):
    """Load an embedded model (a `jaxkv.Model` with its word-level tokenizer)."""
    from jaxkv.hf import load_hf
    path = path or embedded_model_path(name=name)
    if path is None:
        config = EMBEDDED_CONFIGS[name].replace(".", "/") + ".py"
        raise FileNotFoundError(
            f"{_asset_dir(name)}: the embedded model is missing; train it with "
            f"`python -m train pretrain --config {config} --out runs/{name}`")
    return load_hf(path, dtype=dtype)


def load_model(spec: Optional[str] = None, dtype: Optional[str] = None):
    """A model by spec: None or "embedded" -> the default tiny model (its asset, else
    runs/tiny/model); else anything `jaxkv.load` takes (a registered name such as "tiny" or
    "smollm2-135m-instruct", a folder, a .gguf file). `dtype` None keeps the checkpoint's."""
    from jaxkv.models import load
    return load("tiny" if spec in (None, "embedded") else spec, dtype=dtype)


def embedded_report(path: Optional[str] = None, name: str = "tiny") -> dict:
    """The training report shipped beside the model (steps, seed, accuracy per task)."""
    path = path or embedded_model_path(name=name)
    with open(os.path.join(path, "train_report.json")) as f:
        return json.load(f)
