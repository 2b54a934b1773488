"""Real-model evaluation (the default of `python -m train eval` for any model that is not an
in-house one): four RULER tasks at 4K tokens, every method that needs no trained artifact at 10%
and 25% of the cache, 50 prompts per point, greedy, plain prompts ending in RULER's answer prefix.
New tokens: RULER's per-task lengths (passkey 16, vt 30), except 16 for the two NIAH tasks, whose
answer (a 7-digit number) fits in 9 tokens; RULER's 128 would only lengthen the continuation
after it.

    python -m train calibrate --model smollm2-135m-instruct      # RDKV's table, once per model
    python -m train eval --model smollm2-135m-instruct --out results/smollm2_4k

Methods with trained gates (rlkv, duo) join with `--methods ...,rlkv` once gates exist for the
model. Settings are the methods' published defaults (observation window 32, pooling kernel 5,
sink 16 + window 64 for head-level methods).
"""
from jaxkv.eval import EvalConfig

METHODS = ("full", "streaming", "snapkv", "pyramidkv", "chunkkv", "adakv", "criticalkv",
           "critical_adakv", "cam", "nearest_merge", "kvmerger", "grkv", "h2o", "rkv", "kivi2",
           "kivi4", "int8", "snapkv_kivi4", "rdkv", "random_heads")

CONFIG = EvalConfig(
    methods=METHODS,
    budgets=(0.1, 0.25),
    tasks=("passkey", "niah_single_2", "niah_multikey_1", "vt"),
    lengths=(4096,),
    n_samples=50,
    task_settings={"niah_single_2": {"max_new_tokens": 16}, "niah_multikey_1": {"max_new_tokens": 16}},
    batch_size=8,
    seed=0,
    model="smollm2-135m-instruct",
    pairs=(("grkv", "critical_adakv"), ("rdkv", "kivi2"), ("critical_adakv", "snapkv")),
    # 39 method x budget jobs in two groups, each group's compiled programs freed before the
    # next (all 39 at once kept ~20 GB of them alive on XLA:CPU and was killed for memory on a
    # 24 GB machine); the groups share one prefill per batch, stored on disk in between
    methods_per_prefill=20,
)
