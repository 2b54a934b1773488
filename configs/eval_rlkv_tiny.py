"""RLKV issue: the embedded reasoning family at sparsity 0.2, 0.4, 0.5, 0.6, 0.8, every method at
the same cache bytes, greedy pass@1, 200 problems per point.

    python -m train eval --config configs/eval_rlkv_tiny.py --out runs/eval_rlkv

Budgets are fractions of the full cache's bytes. A head-split cache at sparsity s holds
(1 - s) * T + s * (sink + window) slots per head; with the tiny configs' sink 4 + window 16 and
T slots per sequence (the prompt padded to a multiple of 64 plus the longest chain of thought:
running_sum at 24 digits, 51 -> 64 + 125 = 189; var_chain at 16 variables in its backward form,
98 -> 128 + 114 = 242), sparsity s is budget = 1 - s * (1 - 20 / T); at T = 189:

    s     0.2    0.4    0.5    0.6    0.8
    b     0.82   0.64   0.55   0.46   0.28

(16 KV heads: 3, 6, 8, 10 and 13 of them stream, sparsity 0.19, 0.38, 0.50, 0.63, 0.81; on
var_chain, T = 242, the same budgets stream 3, 6, 8, 9 and 13 heads.)

RLKV, DuoAttention and random heads turn the budget back into a sparsity from the real capacity
of each batch (jaxkv.policies.rlkv), so the sparsity they run at is the one in the table up to
rounding to whole heads; StreamingLLM, H2O and R-KV size their caches to the same bytes
(measured_budget in results.json is read off the arrays). Random heads: seed 0, or
$JAXKV_RANDOM_HEADS_SEED; a mean and spread over seeds is one run per seed, e.g.

    JAXKV_RANDOM_HEADS_SEED=1 python -m train eval --config configs/eval_rlkv_tiny.py \
        --methods random_heads --out runs/eval_rlkv_random1
"""
import os

from configs.tiny import BENCHMARK_TASKS
from jaxkv.embedded import ASSET_DIR
from jaxkv.eval import EvalConfig

# the reasoning tasks of the benchmark (configs/tiny.py BENCHMARK: running_sum, var_chain)
REASONING = tuple(t for t in BENCHMARK_TASKS if t.name in ("running_sum", "var_chain"))
SINK, WINDOW = 4, 16  # the streaming heads of configs/rlkv/tiny.py and configs/duo/tiny.py
# Gate files: beside the embedded model, or in $JAXKV_GATE_DIR when evaluating another model
# (e.g. runs/tiny_1k/model with gates trained on it).
GATE_DIR = os.environ.get("JAXKV_GATE_DIR", ASSET_DIR)
GATES = {"rlkv": os.path.join(GATE_DIR, "gates_rlkv.json"),
         "duo": os.path.join(GATE_DIR, "gates_duo.json")}
HEAD_METHODS = tuple(m for m in ("rlkv", "duo") if os.path.exists(GATES[m])) + ("random_heads",)
METHODS = ("full",) + HEAD_METHODS + ("streaming", "h2o", "rkv")

method_settings = {m: {"sink": SINK, "window": WINDOW} for m in HEAD_METHODS}
for m in ("rlkv", "duo"):
    if m in method_settings:
        method_settings[m]["gates"] = GATES[m]
method_settings["random_heads"]["seed"] = int(os.environ.get("JAXKV_RANDOM_HEADS_SEED", "0"))
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
    pairs=tuple((a, b) for a in ("rlkv",) if a in METHODS
                for b in METHODS if b not in ("full", "rlkv")),
)
