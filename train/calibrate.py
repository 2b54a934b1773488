"""`python -m train calibrate`: RDKV's distortion table eps(b) for a model, measured on sample
prompts and written beside it (`<model>/rdkv_eps.json`, tied to the model's fingerprint), where
`make_policy("rdkv", ...)` finds it.

The prompts are drawn from the embedded tasks (the deployment's text for the embedded model) with
a seed of their own, unlike the evaluation's; for another model pass --prompts, a JSONL file with
one {"prompt": "..."} per line.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

DEFAULT_TASKS = ("niah_single", "passkey", "niah_multikey", "running_sum")
CALIBRATION_SEED = 20261202


def calibration_prompts(tasks: Sequence[str], n: int, seed: int = CALIBRATION_SEED):
    """n prompts of each embedded task (default settings), as token-id lists."""
    from jaxkv.tasks import make_task, sample_examples
    out = []
    for i, name in enumerate(tasks):
        out += [ex.prompt_ids for ex in sample_examples(make_task(name), n, seed + i)]
    return out


def read_prompts(path: str):
    prompts = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise ValueError(f"{path}:{i + 1}: expected an object with a string 'prompt'")
                prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def run_calibration(model_path: Optional[str] = None, out: Optional[str] = None,
                    tasks: Sequence[str] = DEFAULT_TASKS, n: int = 8,
                    prompts_file: Optional[str] = None) -> dict:
    from jaxkv.embedded import embedded_model_path, load_embedded
    from jaxkv.hf import load_hf
    from jaxkv.policies.rdkv import EPS_FILE, save_calibration
    if model_path is None:
        model_path = embedded_model_path()
        model = load_embedded(model_path)
    else:
        model = load_hf(model_path)
    prompts = read_prompts(prompts_file) if prompts_file else calibration_prompts(tasks, n)
    path = out or os.path.join(model_path, EPS_FILE)
    eps = save_calibration(model, prompts, path)
    print(f"{len(prompts)} prompts -> {path}")
    for name in ("k", "v"):
        print(f"  eps_{name}: " + ", ".join(f"{b} bits {e:.4g}" for b, e in sorted(eps[name].items())))
    return eps
