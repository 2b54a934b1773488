"""Draft recipe (issue 2, key matching; not shipped): the embedded architecture from scratch with
normal(0.02) kernels and an induction warm-up, then every task at short lengths with the
key-matching tasks in their easier forms from the start. A chain of three configs (each a
fine-tune of the one before, `PretrainConfig(base=...)`); CONFIG, the last, trains them all:

    python -m train pretrain --config configs/tiny_keys.py --out runs/tiny_keys   # ~50 min

Its export is committed in benchmarks/checkpoints/tiny_keys (fingerprint 2fb75e352915d1c7), so a
next stage can start from it (copy it to <out>/base/model of a config with base=CONFIG).

Measured (greedy exact match, full cache, 100 / 50 / 50 prompts; the settings of SHORT, 80-token
retrieval prompts; niah_multikey is the 1-letter-key row, the last one the report keeps):

| after | running_sum (8) | var_chain (6, backward) | niah_multikey | variable_tracking (2 hops) | niah_multivalue | niah_single | passkey | induction_copy |
|---|---|---|---|---|---|---|---|---|
| WARMUP (1,300 steps, 24 min) | 0.14 | 0.06 | 0.21 | 0.50 | 0.71 | 1.00 | 0.91 | 0.94 |
| DENSE (+400) | 1.00 | 0.66 | 0.00 | 0.58 | 0.80 | 1.00 | 0.90 | 0.96 |
| CONFIG (+600) | 1.00 | 0.98 | 0.00 | 0.56 | 0.76 | 1.00 | 0.86 | 0.98 |

(niah_multikey 0.00 after DENSE and CONFIG: the 1-letter plain prompt is also the prompt of the
multi-query and quoted forms, so the model ends it with `;` or starts a quote.) Teacher-forced,
after CONFIG: the look-up two tokens back (`X =` -> the next name in var_chain, `k =` -> the value
in the quoted niah_multikey) is at 1.00 (0.88 for 3-letter keys, never trained quoted); the first
value digit of plain niah_multikey (`Q k k k ? A :`, the key three or more tokens before the
answer) stays at 0.39 (chance 0.25) and variable tracking's first hop (a 5-digit key) at 0.50
(chance, 2 chains), while its later hops (the current token is the key) are at 1.00.
"""
from configs.tiny_run3 import MODEL
from train.pretrain import PretrainConfig, Stage, TaskMix


def _copy(length, n_recall, weight=1.0):
    return TaskMix("induction_copy", weight, (("length", length), ("n_recall", n_recall)))


SHORT = (
    TaskMix("running_sum", 1.5, (("n_digits", 8), ("random_offset", True))),
    TaskMix("var_chain", 1.5, (("n_vars", 6), ("cot", "backward"))),
    TaskMix("niah_single", 0.5, (("length", 80),)),
    TaskMix("niah_multikey", 1.0, (("length", 80), ("n_keys", 4))),
    TaskMix("niah_multikey", 0.5, (("length", 80), ("n_keys", 4), ("key_len", 1))),
    TaskMix("niah_multivalue", 1.0, (("length", 80), ("n_values", 4))),
    TaskMix("variable_tracking", 1.0, (("length", 80), ("n_hops", 2))),
    TaskMix("passkey", 0.5, (("length", 80),)),
    _copy(64, 8, 0.5),
)

WARMUP = PretrainConfig(
    model=MODEL,
    stages=(
        # the induction head forms on short dense copies (a large batch: the plateau ends after a
        # number of sequences), then stretches to longer distances
        Stage(steps=400, seq_len=56, tasks=(_copy(32, 4),), batch_size=256),
        Stage(steps=300, seq_len=128, tasks=(_copy(48, 6), _copy(64, 8), _copy(96, 6)),
              batch_size=64),
        Stage(steps=600, seq_len=112, tasks=SHORT),
    ),
    eval_tasks=tuple(t for t in SHORT if t.name != "induction_copy") + (_copy(64, 8),),
    init_std=0.02,  # the optimiser settings are PretrainConfig's defaults (configs/tiny_run3.py's)
)

# Fine-tune 1 (400 steps, batch 64, 7.5 min): the key-matching look-ups densely supervised (several
# queries per prompt), everything else replayed.
DENSE = WARMUP.replace(base=WARMUP, stages=(Stage(steps=400, seq_len=128, batch_size=64, tasks=(
    TaskMix("niah_multikey", 1.5, (("length", 80), ("n_keys", 4), ("key_len", 1), ("n_queries", 4))),
    TaskMix("niah_multikey", 1.0, (("length", 80), ("n_keys", 4), ("n_queries", 3))),
    TaskMix("niah_multikey", 0.5, (("length", 80), ("n_keys", 4))),
    TaskMix("var_chain", 1.5, (("n_vars", 6), ("cot", "backward"))),
    TaskMix("variable_tracking", 1.0, (("length", 80), ("n_hops", 2))),
    TaskMix("running_sum", 1.0, (("n_digits", 8), ("random_offset", True))),
    TaskMix("niah_multivalue", 0.5, (("length", 80), ("n_values", 4))),
    TaskMix("niah_single", 0.3, (("length", 80),)),
    TaskMix("passkey", 0.3, (("length", 80),)),
    _copy(64, 8, 0.3),
)),), learning_rate=2e-3, warmup_steps=30, eval_samples=50)

# The tasks a fine-tune replays beside the ones it is about (small weights).
REPLAY = (
    TaskMix("running_sum", 0.5, (("n_digits", 8), ("random_offset", True))),
    TaskMix("niah_multivalue", 0.5, (("length", 80), ("n_values", 4))),
    TaskMix("niah_single", 0.3, (("length", 80),)),
    TaskMix("passkey", 0.3, (("length", 80),)),
    _copy(64, 8, 0.3),
)

# Fine-tune 2 (600 steps, batch 64, 16 min): niah_multikey's quoted form (the answer restates the
# needle, so the value is read after `k =`: a match two tokens back, as in var_chain's backward
# form) beside the plain one.
CONFIG = DENSE.replace(base=DENSE, stages=(Stage(steps=600, seq_len=144, batch_size=64, tasks=(
    TaskMix("niah_multikey", 1.5, (("length", 80), ("n_keys", 4), ("key_len", 1), ("n_queries", 3),
                                   ("quote", True))),
    TaskMix("niah_multikey", 1.5, (("length", 80), ("n_keys", 4))),
    TaskMix("niah_multikey", 0.5, (("length", 80), ("n_keys", 4), ("key_len", 1))),
    TaskMix("variable_tracking", 1.5, (("length", 80), ("n_hops", 2))),
    TaskMix("var_chain", 1.0, (("n_vars", 6), ("cot", "backward"))),
) + REPLAY),))
