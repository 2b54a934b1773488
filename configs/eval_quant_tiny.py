"""The fixed-size quantised caches of the RDKV comparison (KIVI-2, KIVI-4 with a 4-token 16-bit
window, uniform int8), once each on the embedded long-context family; their bytes are in
measured_budget (the requested budget is recorded only). See configs/eval_rdkv_tiny.py."""
from configs.eval_longctx_tiny import LONG_CONTEXT
from jaxkv.eval import EvalConfig

METHODS = ("kivi2", "kivi4", "int8")

CONFIG = EvalConfig(
    methods=METHODS,
    budgets=(1.0,),
    tasks=tuple(t.name for t in LONG_CONTEXT),
    task_settings={t.name: dict(t.settings) for t in LONG_CONTEXT},
    method_settings={m: {"window": 4} for m in METHODS},
    n_samples=200,
    batch_size=50,
    seed=0,
)
