"""Draft (issue 2): configs/tiny_keys_mk.py's export fine-tuned on
niah_multikey needles without `=` and on niah_multivalue, every other task replayed.

Teacher-forced, the quoted niah_multikey of the default misses only the second value digit
(0.70 with 8 keys, 0.89 with 4 keys): it follows `= v1`, a bigram other needles share whenever
their values start with the same digit. Without `=` (`equals=False`: `MK k v1 v2 v3 v4 .`) it
follows `k v1`, which is unique per needle. 4 keys is RULER's niah_multikey_1; 8 keys stays in the
mix. niah_multivalue repeats the value just written instead of the next one; 3-value prompts
beside the 4-value ones ask for "all needles written" rather than "four written" before `<eos>`.

    python -m train pretrain --config configs/tiny_keys_mk2.py --out runs/tiny_keys_mk2
    (with benchmarks/checkpoints/tiny_keys_mk copied to runs/tiny_keys_mk2/base/model)

Measured (10 min on two cores, 500 steps; export in benchmarks/checkpoints/tiny_keys_mk2; greedy
exact match, full cache, 100 prompts of 224 tokens): niah_multikey without `=` 1.00 / 0.99 (4 keys
of 1 / 3 letters), 0.97 / 0.96 (8 keys); with `=` and 4 keys 0.86 (the teacher-forced second
digit had been 0.89 before this fine-tune, and 0.70 with 8 keys). niah_multivalue 0.81 (0.72
before): it now skips the third value and repeats the fourth (teacher-forced, the first digit of
the third value 0.89), and 3-value prompts end after three values only 0.62 of the time. Every
other task: running_sum, var_chain, variable_tracking, niah_single 1.00, passkey 0.99.
"""
from configs.tiny_keys_long import _t
from configs.tiny_keys_mk import CONFIG as BASE
from configs.tiny_keys_mk import REPLAY
from train.pretrain import Stage

MK = dict(length=224, quote=True, equals=False)
TASKS = (
    _t("niah_multikey", 1.0, n_keys=4, key_len=1, **MK),
    _t("niah_multikey", 1.0, n_keys=4, **MK),
    _t("niah_multikey", 1.0, n_keys=8, key_len=1, **MK),
    _t("niah_multikey", 1.0, n_keys=8, **MK),
    _t("niah_multikey", 0.3, length=224, n_keys=4, quote=True),
    _t("niah_multivalue", 1.5, length=224, n_values=4),
    _t("niah_multivalue", 0.7, length=224, n_values=3),
    _t("niah_multivalue", 0.7, length=128, n_values=4),
) + REPLAY

EVAL = tuple(t for t in BASE.eval_tasks if t.name != "niah_multikey") + (
    _t("niah_multikey", 1.0, n_keys=4, key_len=1, **MK),
    _t("niah_multikey", 1.0, n_keys=4, **MK),
    _t("niah_multikey", 1.0, n_keys=8, key_len=1, **MK),
    _t("niah_multikey", 1.0, n_keys=8, **MK),
    _t("niah_multikey", 1.0, length=224, n_keys=4, quote=True),
)

CONFIG = BASE.replace(
    base=BASE, stages=(Stage(steps=500, seq_len=256, batch_size=32, tasks=TASKS),),
    eval_tasks=EVAL, learning_rate=1e-3, warmup_steps=30)
