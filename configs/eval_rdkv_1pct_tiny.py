"""RDKV issue, the 1% point: 1% of a 224-token prompt's cache is 2.2 tokens' worth of bytes, less
than the 4-token window the other budgets keep whole (configs/eval_rdkv_tiny.py), so here nothing
is kept whole (`whole=0`): RDKV lets the window tokens compete for bits like the rest, SnapKV +
KIVI-4 quantises its window too; both still observe the last 4 prompt queries. SnapKV alone can
keep only round(0.01 * 224) = 2 tokens, its window (window=2).

    python -m train eval --config configs/eval_rdkv_1pct_tiny.py --out runs/eval_rdkv_1pct
"""
from configs.eval_longctx_tiny import LONG_CONTEXT
from jaxkv.eval import EvalConfig

METHODS = ("full", "rdkv", "snapkv", "snapkv_kivi4")

CONFIG = EvalConfig(
    methods=METHODS,
    budgets=(0.01,),
    tasks=tuple(t.name for t in LONG_CONTEXT),
    task_settings={t.name: dict(t.settings) for t in LONG_CONTEXT},
    method_settings={"rdkv": {"window": 4, "whole": 0}, "snapkv": {"window": 2},
                     "snapkv_kivi4": {"window": 4, "whole": 0}},
    n_samples=200,
    batch_size=50,
    seed=0,
    pairs=(("rdkv", "snapkv"), ("rdkv", "snapkv_kivi4")),
)
