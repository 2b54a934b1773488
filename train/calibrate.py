"""`python -m train calibrate --model NAME_OR_PATH`: RDKV's distortion table eps(b) of a model,
measured on the keys and values it computes while reading sample prompts made with its own
tokenizer, stored per model fingerprint in the user cache folder (`jaxkv.paths.user_cache_dir`,
never inside the installed package), where `make_policy("rdkv", ...)` finds it.

Prompts: for a real model, English text (Python's bundled documentation, from different topics)
and real-text task prompts (passkey, niah_single_2) of --length tokens; for the in-house models,
their own tasks. --prompts: a JSONL file with one {"prompt": "..."} per line instead.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

EMBEDDED_TASKS = ("niah_single", "passkey", "niah_multikey", "running_sum")
TEXT_TASKS = ("passkey", "niah_single_2")
CALIBRATION_SEED = 20261202


def calibration_prompts(tasks: Sequence[str], n: int, seed: int = CALIBRATION_SEED):
    """n prompts of each in-house task (default settings), as token-id lists."""
    from jaxkv.tasks import make_task, sample_examples
    out = []
    for i, name in enumerate(tasks):
        out += [ex.prompt_ids for ex in sample_examples(make_task(name), n, seed + i)]
    return out


def text_calibration_prompts(model, n: int, length: int, seed: int = CALIBRATION_SEED):
    """n passages of Python's docs and n prompts of each real-text task in TEXT_TASKS, each of
    about `length` tokens of the model's tokenizer."""
    import numpy as np

    from jaxkv.tasks.haystack import essay_corpus
    from jaxkv.tasks.text import make_text_examples
    sentences = essay_corpus()[0]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = int(rng.integers(len(sentences)))
        text = " ".join(sentences[(start + i) % len(sentences)] for i in range(4 * length // 10))
        out.append(model.tokenizer.encode(text)[:length])
    for i, task in enumerate(TEXT_TASKS):
        out += [ex.prompt_ids for ex in
                make_text_examples(task, model.tokenizer, length, n, seed + 1 + i)]
    shortest = min(len(p) for p in out)  # one length: one compiled program
    return [p[:shortest] for p in out]


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


def run_calibration(model_spec: Optional[str] = None, out: Optional[str] = None, n: int = 4,
                    length: int = 1024, prompts_file: Optional[str] = None,
                    dtype: str = "float32", model=None) -> dict:
    from jaxkv.embedded import load_model
    from jaxkv.eval.prompts import EMBEDDED, task_suite
    from jaxkv.policies.rdkv import eps_cache_path, save_calibration
    if model is None:
        model = load_model(model_spec, dtype=dtype)
    if prompts_file:
        prompts = read_prompts(prompts_file)
    elif task_suite(model) == EMBEDDED:
        prompts = calibration_prompts(EMBEDDED_TASKS, 2 * n)
    else:
        prompts = text_calibration_prompts(model, n, length)
    path = out or eps_cache_path(model)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    eps = save_calibration(model, prompts, path)
    print(f"{len(prompts)} prompts -> {path}")
    for name in ("k", "v"):
        print(f"  eps_{name}: " + ", ".join(f"{b} bits {e:.4g}" for b, e in sorted(eps[name].items())))
    return eps
