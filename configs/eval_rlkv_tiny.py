"""RLKV issue: the embedded reasoning family at sparsity 0.2, 0.4, 0.5, 0.6, 0.8, every method at
the same cache bytes, greedy pass@1, 200 problems per point.

    python -m train eval --config configs/eval_rlkv_tiny.py --out runs/eval_rlkv

Budgets are fractions of the full cache's bytes. A head-split cache at sparsity s holds
(1 - s) * T + s * (sink + window) slots per head; with the tiny configs' sink 4 + window 16 and
T ~ 190 slots (running_sum at 24 digits: a 51-token prompt padded to 64, plus the 125-token chain
of thought and room to spare; var_chain at 16 variables: 98 -> 128 + 52), sparsity s is
budget = 1 - s * (1 - 20 / 190):

    s     0.2    0.4    0.5    0.6    0.8
    b     0.82   0.64   0.55   0.46   0.28

(16 KV heads: 3, 6, 8, 10 and 13 of them stream, sparsity 0.19, 0.38, 0.50, 0.63, 0.81.)

RLKV, DuoAttention and random heads turn the budget back into a sparsity from the real capacity
of each batch (jaxkv.policies.rlkv), so the sparsity they run at is the one in the table up to
rounding to whole heads; StreamingLLM, H2O and R-KV size their caches to the same bytes
(measured_budget in results.json is read off the arrays). Random heads: seeds 0, 1, 2.
"""
import os

from configs.tiny_run3 import BENCHMARK_TASKS
from jaxkv.embedded import RUN3_DIR
from jaxkv.eval import EvalConfig

# Measured on run 3 (jaxkv/assets/tiny_run3, with the gates trained on it): the reasoning tasks of
# its benchmark, running_sum (it does not solve var_chain, configs/tiny_run3.py BENCHMARK)
REASONING = tuple(t for t in BENCHMARK_TASKS if t.name in ("running_sum", "var_chain"))
SINK, WINDOW = 4, 16  # the streaming heads of configs/rlkv/tiny.py and configs/duo/tiny.py
# Gate files: beside the embedded model, or in $JAXKV_GATE_DIR when evaluating another model
# (e.g. runs/tiny_reasoning/model with gates trained on it).
GATE_DIR = os.environ.get("JAXKV_GATE_DIR", RUN3_DIR)
GATES = {"rlkv": os.path.join(GATE_DIR, "gates_rlkv.json"),
         "duo": os.path.join(GATE_DIR, "gates_duo.json")}
HEAD_METHODS = tuple(m for m in ("rlkv", "duo") if os.path.exists(GATES[m])) + (
    "random_heads", "random_heads_1", "random_heads_2")
METHODS = ("full",) + HEAD_METHODS + ("streaming", "h2o", "rkv")

method_settings = {m: {"sink": SINK, "window": WINDOW} for m in HEAD_METHODS}
for m in ("rlkv", "duo"):
    if m in method_settings:
        method_settings[m]["gates"] = GATES[m]
method_settings["streaming"] = {"sink": SINK}
method_settings["h2o"] = {"window": WINDOW}
method_settings["rkv"] = {"window": WINDOW}

CONFIG = EvalConfig(
    methods=METHODS,
    budgets=(0.82, 0.64, 0.55, 0.46, 0.28),
    tasks=tuple(t.name for t in REASONING),
    task_settings={t.name: dict(t.settings) for t in REASONING},
    method_settings=method_settings,
    n_samples=200,
    batch_size=50,
    seed=0,
    model="tiny_run3",  # the published figures' model (--model overrides)
    pairs=tuple((a, b) for a in ("rlkv",) if a in METHODS
                for b in METHODS if b not in ("full", "rlkv")),
)
