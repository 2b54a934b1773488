"""GRKV against its retention and the merging baselines on SmolLM2-135M-Instruct (float32): five
RULER tasks at 4K tokens, 10% and 20% of the cache, 50 prompts per point, greedy, plain prompts.

    python -m train eval --config configs/eval_grkv.py --out results/grkv_4k

GRKV retains whole spans of 10 tokens per head (its default) before the ridge step, so it is
paired with Critical-AdaKV as its authors define it (token level) and with Critical-AdaKV in the
same spans (`critical_adakv[span=10]`, GRKV's retention without the ridge step): the first pair
measures the method, the second the ridge step alone. CaM, nearest-survivor and KVMerger merge
into GRKV's retention (the same spans), so they differ from GRKV only in how the kept keys and
values change. New tokens: 16 for passkey and the single-answer NIAH tasks (a 7-digit
number fits in 9), 48 for niah_multivalue's four numbers, RULER's 30 for vt.

The records of configs/eval_real.py's sweep with the same key (task, length, method, budget,
prompts, model, dtype, batch size, new tokens, settings) are the same work: `results/chain.sh`
seeds one sweep's results.json with the other's matching records, so neither recomputes them.
"""
from jaxkv.eval import EvalConfig

CONFIG = EvalConfig(
    methods=("full", "grkv", "critical_adakv", "critical_adakv[span=10]", "cam", "nearest_merge",
             "kvmerger"),
    budgets=(0.1, 0.2),
    tasks=("passkey", "niah_single_2", "niah_multikey_1", "niah_multivalue", "vt"),
    lengths=(4096,),
    n_samples=50,
    task_settings={"niah_single_2": {"max_new_tokens": 16},
                   "niah_multikey_1": {"max_new_tokens": 16},
                   "niah_multivalue": {"max_new_tokens": 48}},
    batch_size=8,
    seed=0,
    model="smollm2-135m-instruct",
    pairs=(("grkv", "critical_adakv"), ("grkv", "critical_adakv[span=10]"), ("grkv", "cam"),
           ("grkv", "nearest_merge"), ("grkv", "kvmerger")),
)
