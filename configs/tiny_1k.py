"""The embedded default with its retrieval tasks at 1K tokens: a fine-tune of configs/tiny.py.

configs/tiny.py trains on sequences of at most 256 tokens, and its model fails retrieval beyond
them (greedy exact match on 50 prompts: niah_single 0.78 and passkey 0.58 at 384 tokens, 0.00 and
0.00 at 1,000): the relative distances to <bos> and the first tokens, which every attention
pattern leans on, were never seen. Training at 1K tokens costs ~17x a 256-token step on 2 CPU
cores, so stage 1 keeps 256-token sequences with one random skip in their RoPE positions
(positional skip-wise training, `Stage.position_span=2048`): the model sees every relative
distance up to 2048 at the cost of a 256-token step; every task replayed in its benchmark form,
the retrieval ones at 224 tokens. Stage 2 adds real 1,056-token sequences.
The report scores the retrieval tasks at 1,024 tokens.

    python -m train pretrain --config configs/tiny_1k.py --out runs/tiny_1k
    (with a copy of jaxkv/assets/tiny in runs/tiny_1k/base/model, else it trains configs/tiny.py)

Measured (greedy exact match, full cache, 100 prompts,
retrieval at 1,024 tokens). Stage 1 (800 PoSE steps, 25 min on two cores): running_sum 1.00,
var_chain 1.00, niah_single 0.99, passkey 0.99, variable_tracking 0.75, niah_multikey 0.71 (4 keys
of 3 letters; 0.45 with 1-letter keys: the answer often skips the quote), niah_multivalue 0.00
(it stops after one to three values). Stage 2 (300 steps of batch 8 at 1,056 tokens, 29 min):
running_sum 0.99, var_chain 0.99, variable_tracking 1.00, niah_single 1.00, passkey 1.00,
niah_multikey 0.95 (4 keys of 3 letters; 0.98 with 1-letter keys, 0.95 / 0.91 with 8 keys),
niah_multivalue 0.75 (0.70 with 3 values).
"""
import dataclasses

from configs.tiny import CONFIG as BASE
from configs.tiny import EVAL_TASKS as SHORT_TASKS
from configs.tiny import MK
from configs.tiny import task as _t
from train.pretrain import Stage, TaskMix

LENGTH = 1024  # the retrieval tasks' prompt length here
MODEL = dataclasses.replace(BASE.model, max_position_embeddings=2048)


def at_length(tasks, length):
    """The task mixes with every `length` setting (the retrieval tasks') set to `length`."""
    return tuple(
        TaskMix(t.name, t.weight, tuple((k, length if k == "length" else v) for k, v in t.settings))
        for t in tasks)


# The benchmark forms at 1K; niah_multikey only in its forms without `=`.
EVAL_TASKS = at_length(
    (t for t in SHORT_TASKS
     if not (t.name == "niah_multikey" and dict(t.settings).get("equals", True))), LENGTH)

TASKS = (
    _t("running_sum", 1.0, n_digits=24),
    _t("var_chain", 1.0, n_vars=16, cot="backward"),
    _t("niah_single", 1.0, length=224),
    _t("passkey", 1.0, length=224),
    _t("variable_tracking", 1.0, length=224, value_len=1, restate=True),
    _t("niah_multikey", 1.0, n_keys=4, **MK),
    _t("niah_multikey", 0.5, n_keys=8, **MK),
    _t("niah_multikey", 0.3, n_keys=8, key_len=1, **MK),
    _t("niah_multivalue", 1.5, length=224, n_values=4),
    _t("niah_multivalue", 0.5, length=224, n_values=3),
    _t("niah_multivalue", 0.3, length=224, n_values=5),
    _t("induction_copy", 0.2, length=64, n_recall=8),
)

# Stage 2 (appended after stage 1 was measured; schedule_steps pins stage 1's schedule): real
# 1,024-token prompts, which PoSE's 256 tokens never show (as many filler tokens as at 1K).
RETRIEVAL_1K = (
    _t("niah_single", 0.5, length=LENGTH),
    _t("passkey", 0.5, length=LENGTH),
    _t("variable_tracking", 1.0, length=LENGTH, value_len=1, restate=True),
    _t("niah_multikey", 1.0, n_keys=4, **dict(MK, length=LENGTH)),
    _t("niah_multikey", 0.5, n_keys=4, key_len=1, **dict(MK, length=LENGTH)),
    _t("niah_multikey", 0.5, n_keys=8, **dict(MK, length=LENGTH)),
    _t("niah_multivalue", 1.5, length=LENGTH, n_values=4),
    _t("niah_multivalue", 0.5, length=LENGTH, n_values=3),
    _t("running_sum", 0.2, n_digits=24),
    _t("var_chain", 0.2, n_vars=16, cot="backward"),
)

CONFIG = BASE.replace(
    model=MODEL, base=BASE,
    stages=(Stage(steps=800, seq_len=256, batch_size=32, tasks=TASKS, position_span=2048),
            Stage(steps=300, seq_len=1056, batch_size=8, tasks=RETRIEVAL_1K)),
    eval_tasks=EVAL_TASKS, learning_rate=5e-4, warmup_steps=30,
    schedule_steps=800, restart_learning_rate=3e-4, restart_warmup_steps=20)
