"""RDKV issue: accuracy against cache bytes on the embedded long-context family, 200 prompts per
point, RDKV against the baselines that can be sized to a byte budget.

    python -m train eval --config configs/eval_rdkv_tiny.py --out runs/eval_rdkv
    python -m train eval --config configs/eval_quant_tiny.py --out runs/eval_quant   # fixed-size

Budgets are fractions of the full cache's bytes (RDKV counts codes, scales, zero-points, positions
and its 16-bit window; SnapKV's budget is the fraction of prompt tokens, whose bytes are that
fraction plus 8 bytes of indices per token: see measured_budget). Scaled to the 224-token prompts:
window 4 (the recipe's 32 is 14% of such a prompt). The issue's 1% point is in
configs/eval_rdkv_1pct_tiny.py: 1% of a 224-token prompt is 2.2 tokens' worth of bytes, less than
the 4-token window kept whole here, so it runs with nothing kept whole. KIVI-2/4 and int8 have one fixed size each and
are evaluated once, in configs/eval_quant_tiny.py.
"""
from configs.eval_longctx_tiny import LONG_CONTEXT
from jaxkv.eval import EvalConfig

WINDOW = 4
METHODS = ("full", "rdkv", "snapkv", "snapkv_kivi4")

CONFIG = EvalConfig(
    methods=METHODS,
    budgets=(0.025, 0.05, 0.1, 0.25),
    tasks=tuple(t.name for t in LONG_CONTEXT),
    task_settings={t.name: dict(t.settings) for t in LONG_CONTEXT},
    method_settings={m: {"window": WINDOW} for m in METHODS if m != "full"},
    n_samples=200,
    batch_size=50,
    seed=0,
    pairs=(("rdkv", "snapkv"), ("rdkv", "snapkv_kivi4")),
)
