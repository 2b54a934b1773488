"""Evaluation of every available method on the embedded benchmark tasks (configs/tiny.py BENCHMARK_TASKS) at their default settings (what
`python -m train demo` runs, with fewer samples).

Methods that need a trained artifact (RLKV / DuoAttention gates) join once their gate files
exist beside the embedded model (`python -m train rlkv` / `python -m train duo` write them).
Window / sink sizes are scaled to the tiny model (configs/tiny.py: method_settings). Budgets are
fractions of the full cache (of the prompt for the prompt-eviction family); results.json has the
budget each method really used (measured_budget, read off the arrays).
"""
import os

from configs.tiny import BENCHMARK_TASKS, method_settings
from jaxkv.embedded import ASSET_DIR
from jaxkv.eval import EvalConfig
from jaxkv.policies.registry import available_methods, get_factory

GATE_FILES = {"rlkv": os.path.join(ASSET_DIR, "gates_rlkv.json"),
              "duo": os.path.join(ASSET_DIR, "gates_duo.json")}
METHODS = tuple(m for m in available_methods()
                if m not in GATE_FILES or os.path.exists(GATE_FILES[m]))

SETTINGS = {m: method_settings(m, get_factory(m)) for m in METHODS if m != "full"}
for m, path in GATE_FILES.items():
    if m in METHODS:
        SETTINGS[m]["gates"] = path

CONFIG = EvalConfig(
    methods=METHODS,
    budgets=(0.25, 0.5),
    tasks=tuple(t.name for t in BENCHMARK_TASKS),
    task_settings={t.name: dict(t.settings) for t in BENCHMARK_TASKS},
    method_settings={m: s for m, s in SETTINGS.items() if s},
    n_samples=200,
    batch_size=50,
    seed=0,
)
