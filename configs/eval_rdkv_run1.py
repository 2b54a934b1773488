"""configs/eval_rdkv_tiny.py and configs/eval_quant_tiny.py restricted to the long-context tasks
run 1's model (runs/tiny/model) solves with the full cache (see configs/eval_longctx_run1.py).

    python -m train eval --config configs/eval_rdkv_run1.py --model runs/tiny/model --out runs/eval_rdkv
"""
import dataclasses

from configs.eval_longctx_run1 import TASKS
from configs.eval_quant_tiny import CONFIG as _QUANT
from configs.eval_rdkv_tiny import CONFIG as _RDKV


def _restrict(config):
    return dataclasses.replace(
        config, tasks=TASKS,
        task_settings={t: s for t, s in config.task_settings.items() if t in TASKS})


CONFIG = _restrict(_RDKV)
QUANT = _restrict(_QUANT)
