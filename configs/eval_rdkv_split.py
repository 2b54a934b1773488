"""RDKV's allocation choices on the real model: the K/V split r (`k_share`, the share of each
head's bytes that K gets; 0.5 is the default) and one water level across the heads of a layer
(`water="layer"`, classical reverse water-filling) against one allocation per KV head (the
default), on SmolLM2-135M-Instruct in bfloat16 at 4K tokens, at the two budgets where the
quantisation baselines separate (5% and 10% of the dense bfloat16 cache), on the two tasks the
model answers only in part with its full cache (a needle in English text, one of several keys).

    python -m train eval --config configs/eval_rdkv_split.py --out results/rdkv_split_4k

Every setting is paired with the default (`rdkv`), on the same prompts. The default's records
are configs/eval_rdkv.py's (the same key): `results/chain.sh` seeds this sweep with them.
"""
import dataclasses

from configs.eval_rdkv import CONFIG as RDKV

VARIANTS = ("rdkv[k_share=0.3]", "rdkv[k_share=0.7]", "rdkv[water=layer]")
TASKS = ("niah_single_2", "niah_multikey_1")

# the RDKV sweep's model, dtype, length, prompts and answer lengths: the default's records are
# its records
CONFIG = dataclasses.replace(
    RDKV,
    methods=("rdkv",) + VARIANTS,
    budgets=(0.05, 0.1),
    tasks=TASKS,
    task_settings={t: RDKV.task_settings[t] for t in TASKS},
    pairs=tuple((v, "rdkv") for v in VARIANTS),
)
