"""`python -m train eval`: methods x budgets x tasks x lengths -> DIR/results.json and a plot.

    python -m train eval --model smollm2-135m-instruct --tasks passkey,niah_single_2 \
        --lengths 2048,4096 --n 32 --methods full,snapkv,chunkkv --budgets 0.1,0.25 --out DIR

A config file (--config, a Python module or path defining CONFIG) gives the defaults; every flag
given overrides it. Without --config: configs/eval_tiny.py for the in-house models, else
configs/eval_real.py.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from jaxkv.embedded import EMBEDDED_CONFIGS

TINY_CONFIG = "configs.eval_tiny"
REAL_CONFIG = "configs.eval_real"


def load_config_model(spec: Optional[str], dtype: str = "float32"):
    """An eval config's model: None (the in-house default), a registered name, a folder or a
    .gguf file (`jaxkv.load`)."""
    from jaxkv.embedded import load_model
    return load_model(spec, dtype=dtype)


def is_in_house(spec: Optional[str]) -> bool:
    return spec is None or spec == "embedded" or spec in EMBEDDED_CONFIGS


def build_config(config_spec: Optional[str], out_dir: str, model: Optional[str] = None, *,
                 n: Optional[int] = None, tasks: Optional[Sequence[str]] = None,
                 lengths: Optional[Sequence[int]] = None,
                 methods: Optional[Sequence[str]] = None,
                 budgets: Optional[Sequence[float]] = None, batch_size: Optional[int] = None,
                 max_new_tokens: Optional[int] = None, seed: Optional[int] = None,
                 chat: Optional[bool] = None, methods_per_prefill: Optional[int] = None):
    """The config file (default by model) with the given flags applied."""
    from jaxkv.eval import EvalConfig
    from train.config_loading import load_config
    if config_spec is None:
        config_spec = TINY_CONFIG if is_in_house(model) else REAL_CONFIG
    config = load_config(config_spec, expected=EvalConfig)
    changes = {"out_dir": out_dir}
    for name, value in (("n_samples", n), ("tasks", tasks), ("lengths", lengths),
                        ("methods", methods), ("budgets", budgets), ("batch_size", batch_size),
                        ("max_new_tokens", max_new_tokens), ("seed", seed), ("chat", chat),
                        ("model", model), ("methods_per_prefill", methods_per_prefill)):
        if value is not None:
            changes[name] = tuple(value) if isinstance(value, list) else value
    if methods is not None:  # settings of methods no longer asked for are dropped
        changes["method_settings"] = {m: s for m, s in config.method_settings.items()
                                      if m in methods}
        changes["pairs"] = tuple(p for p in config.pairs if all(m in methods for m in p))
    if tasks is not None:
        changes["task_settings"] = {t: s for t, s in config.task_settings.items() if t in tasks}
    return dataclasses.replace(config, **changes)


def run_eval(config_spec: Optional[str], out_dir: str, model_path: Optional[str] = None,
             progress: bool = True, model=None, **flags):
    """Build the config (file + flags), load its model (or use `model`, already loaded), run it,
    print the table (and paired comparisons) and write the files."""
    from jaxkv.eval import (PAIRED_FILE, evaluate, format_paired, format_table,
                            paired_comparisons, write_json)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r} is a file; give a folder for results.json and the "
                         f"plot")
    config = build_config(config_spec, out_dir, model_path, **flags)
    if model is None:
        model = load_config_model(config.model, dtype=config.dtype)
    records = evaluate(model, config, progress=progress)
    print(format_table(records))
    if config.pairs:
        rows = paired_comparisons(records, config.pairs)
        print(format_paired(rows))
        write_json(rows, os.path.join(out_dir, PAIRED_FILE))
        print(f"wrote {out_dir}/{PAIRED_FILE}")
    print(f"wrote {out_dir}/results.json and {out_dir}/accuracy_vs_budget.png")
    return records
