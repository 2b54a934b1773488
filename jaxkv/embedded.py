"""The embedded default model: a tiny decoder trained by `python -m train pretrain` on the
generated tasks and shipped in the package (jaxkv/assets/tiny) so demos and tests start at once."""
from __future__ import annotations

import json
import os
from typing import Optional

ASSET_DIR = os.path.join(os.path.dirname(__file__), "assets", "tiny")


def embedded_model_path(run_dir: Optional[str] = None) -> Optional[str]:
    """The shipped model folder, else `run_dir/model` if a local run exported one, else None."""
    for path in (ASSET_DIR, os.path.join(run_dir, "model") if run_dir else None):
        if path and os.path.exists(os.path.join(path, "model.safetensors")):
            return path
    return None


def load_embedded(path: Optional[str] = None, dtype: str = "float32"):
    """Load the embedded model (a `jaxkv.Model` with its word-level tokenizer)."""
    from jaxkv.hf import load_hf
    path = path or embedded_model_path()
    if path is None:
        raise FileNotFoundError(
            f"{ASSET_DIR}: the embedded model is missing; train it with "
            "`python -m train pretrain --config configs/tiny.py --out runs/tiny`")
    return load_hf(path, dtype=dtype)


def embedded_report(path: Optional[str] = None) -> dict:
    """The training report shipped beside the model (steps, seed, accuracy per task)."""
    path = path or embedded_model_path()
    with open(os.path.join(path, "train_report.json")) as f:
        return json.load(f)
