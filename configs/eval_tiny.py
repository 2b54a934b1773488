"""Evaluation of every registered method on the embedded tasks at their default settings."""
from configs.tiny import EVAL_TASKS
from jaxkv.eval import EvalConfig
from jaxkv.policies.registry import available_methods

CONFIG = EvalConfig(
    methods=available_methods(),
    budgets=(0.2, 0.4, 0.6, 0.8),
    tasks=tuple(t.name for t in EVAL_TASKS),
    task_settings={t.name: dict(t.settings) for t in EVAL_TASKS},
    n_samples=200,
    batch_size=50,
    seed=0,
)
