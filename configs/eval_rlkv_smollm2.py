"""RLKV against DuoAttention and the head-level and decode-time baselines on SmolLM2-135M-Instruct,
at equal cache bytes (issue: RLKV and DuoAttention gates for the real model).

    python -m train eval --config configs/eval_rlkv_smollm2.py --out results/rlkv_eval_1k
    python -m train eval --config configs/eval_rlkv_smollm2.py --tasks passkey,niah_multikey_1 \
        --no-chat --out results/rlkv_eval_1k_retrieval

The generation task is `copy_list` (5 numbers, in the chat template, where the model copies at
0.875 with its full cache and 0.125 with every head streaming); the retrieval tasks (passkey,
niah_multikey_1) run on plain prompts, where the model answers them (the second command).
`rlkv` and `duo` use the gate files shipped for the model (`python -m train rlkv|duo --config
configs/rlkv|duo/smollm2.py` writes them; copy DIR/gates.json to
jaxkv/assets/gates/smollm2-135m-instruct/gates_rlkv.json or gates_duo.json), or give
`rlkv[gates=DIR/gates.json]`. Random heads over three seeds.

Budgets are the byte shares of the head split at sparsity s = 0.25, 0.5 and 0.75 for a
1,024-token prompt and 48 new tokens (1,072 slots; sink 16 + window 64):
(1 - s) + s * 80 / 1072 = 0.769, 0.537, 0.306. H2O and R-KV get the same bytes.
"""
from jaxkv.eval import EvalConfig

SLOTS, STREAM = 1024 + 48, 16 + 64
BUDGETS = tuple(round((1 - s) + s * STREAM / SLOTS, 4) for s in (0.25, 0.5, 0.75))

CONFIG = EvalConfig(
    methods=("full", "rlkv", "duo", "random_heads", "random_heads[seed=1]",
             "random_heads[seed=2]", "streaming", "h2o", "rkv"),
    budgets=BUDGETS,
    tasks=("copy_list",),
    lengths=(1024,),
    n_samples=100,
    batch_size=10,
    seed=0,
    chat=True,
    model="smollm2-135m-instruct",
    pairs=(("rlkv", "duo"), ("rlkv", "random_heads"), ("rlkv", "streaming"), ("rlkv", "h2o"),
           ("rlkv", "rkv")),
)
