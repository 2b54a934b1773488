"""`python -m train demo`: make sure the embedded model exists (train it if absent), then evaluate
every registered method on the embedded tasks and print the table."""
from __future__ import annotations

import os
from typing import Optional

DEFAULT_N = 100


def run_demo(out_dir: str, n: Optional[int] = None, train_dir: str = "runs/tiny"):
    from jaxkv.embedded import embedded_model_path, embedded_report
    from train.config_loading import load_config
    from train.evaluate import run_eval
    from train.pretrain import pretrain

    path = embedded_model_path(train_dir)
    if path is None:
        print("embedded model not found: training it (python -m train pretrain)")
        pretrain(load_config("configs.tiny"), train_dir)
        path = embedded_model_path(train_dir)
    report = embedded_report(path)
    print(f"embedded model: {path} ({report['steps']} steps, seed {report['seed']})")
    return run_eval("configs.eval_tiny", out_dir, model_path=path, n=n or DEFAULT_N)
