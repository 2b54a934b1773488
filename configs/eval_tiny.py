"""Evaluation of every available method on the embedded tasks at their default settings.

Methods that need a trained artifact (RLKV / DuoAttention gates) join once their gate files
exist beside the embedded model (`python -m train rlkv` / `python -m train duo` write them).
"""
import os

from configs.tiny import EVAL_TASKS
from jaxkv.embedded import ASSET_DIR
from jaxkv.eval import EvalConfig
from jaxkv.policies.registry import available_methods

GATE_FILES = {"rlkv": os.path.join(ASSET_DIR, "gates_rlkv.json"),
              "duo": os.path.join(ASSET_DIR, "gates_duo.json")}
METHODS = tuple(m for m in available_methods()
                if m not in GATE_FILES or os.path.exists(GATE_FILES[m]))

CONFIG = EvalConfig(
    methods=METHODS,
    budgets=(0.2, 0.4, 0.6, 0.8),
    tasks=tuple(t.name for t in EVAL_TASKS),
    task_settings={t.name: dict(t.settings) for t in EVAL_TASKS},
    method_settings={m: {"gates": GATE_FILES[m]} for m in METHODS if m in GATE_FILES},
    n_samples=200,
    batch_size=50,
    seed=0,
)
