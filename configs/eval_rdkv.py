"""RDKV on the real model: RDKV against the quantisation baselines on SmolLM2-135M-Instruct in
bfloat16, four RULER tasks at 4K tokens, 50 prompts per point, budgets from 2.5% to 25% of the
dense cache's bytes (the fixed-width methods, KIVI-2/4 and int8, take their own size whatever the
budget: one record per budget, the same bytes).

    python -m train calibrate --model smollm2-135m-instruct   # RDKV's table (K over 32-token groups)
    python -m train eval --config configs/eval_rdkv.py --out results/rdkv_4k

The model is loaded in bfloat16 (`dtype`): the dense cache, hence every budget, is in bfloat16
bytes, and RDKV's 16-bit tier is the cache dtype. RDKV runs its defaults (observation window 32,
k_share 0.5, one allocation per KV head); settings are the methods' published defaults otherwise.
New tokens: RULER's per-task lengths (passkey 16, vt 30), 16 for the two NIAH tasks (as
configs/eval_real.py).
"""
from jaxkv.eval import EvalConfig

CONFIG = EvalConfig(
    methods=("full", "rdkv", "kivi2", "kivi4", "int8", "snapkv_kivi4"),
    budgets=(0.025, 0.05, 0.1, 0.15, 0.25),
    tasks=("passkey", "niah_single_2", "niah_multikey_1", "vt"),
    lengths=(4096,),
    n_samples=50,
    task_settings={"niah_single_2": {"max_new_tokens": 16},
                   "niah_multikey_1": {"max_new_tokens": 16}},
    batch_size=8,
    seed=0,
    model="smollm2-135m-instruct",
    dtype="bfloat16",
    pairs=(("rdkv", "kivi2"), ("rdkv", "snapkv_kivi4"), ("rdkv", "kivi4")),
)
