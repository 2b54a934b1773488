"""Draft (issue 2): configs/tiny_keys_long.py's export fine-tuned on the two retrieval tasks it
left below 95% (niah_multikey quoted 0.63, niah_multivalue 0.64 at 224 tokens), every other task
replayed.

Teacher-forced (benchmarks/per_token.py), the quoted niah_multikey fails on the second value digit
(0.72 with 1-letter keys, 0.73 with 3-letter keys; the others >= 0.93): it follows `= v1`, a
bigram that other needles share whenever their values start with the same digit (8 needles, 10
digits), so the look-up needs the key three tokens back. Here it gets dense supervision in a form
the benchmark prompts cannot be mistaken for: 2-letter keys, three quoted queries per prompt. Its
niah_multivalue misses the first digit of the next value (0.82-0.90): more values per prompt
(6) give that look-up more supervision.

    python -m train pretrain --config configs/tiny_keys_mk.py --out runs/tiny_keys_mk
    (with benchmarks/checkpoints/tiny_keys_long copied to runs/tiny_keys_mk/base/model)

Measured (24 min on two cores; export in benchmarks/checkpoints/tiny_keys_mk; greedy
exact match, 100 prompts): running_sum 1.00, var_chain 1.00, variable_tracking 1.00,
niah_single 1.00, passkey 0.98, niah_multikey quoted 0.76 (1-letter keys; 0.71 before) / 0.58
(3-letter keys; 0.63 before), niah_multivalue 0.72 (0.64 before). Teacher-forced after 250 steps
the second value digit was still at 0.77 / 0.74: dense supervision in another key length does not
teach the three-token match in this budget. Next: a needle form without `=` (`equals=False`:
the second digit then follows the bigram `k v1`, unique per needle) or 4 keys (RULER's
multikey_1 has 4 needles).
"""
from configs.tiny_keys_long import CONFIG as BASE
from configs.tiny_keys_long import _t
from train.pretrain import Stage

TASKS = (
    _t("niah_multikey", 1.5, length=224, n_keys=8, key_len=1, quote=True),
    _t("niah_multikey", 1.5, length=224, n_keys=8, quote=True),
    _t("niah_multikey", 1.5, length=200, n_keys=8, key_len=2, n_queries=3, quote=True),
    _t("niah_multivalue", 1.5, length=224, n_values=4),
    _t("niah_multivalue", 1.0, length=224, n_values=6),
)

# Every task the fine-tunes from here on do not focus on, replayed at the benchmark's sizes (also
# in configs/tiny_keys_mk2.py and configs/tiny_keys_mv.py).
REPLAY = (
    _t("running_sum", 0.7, n_digits=24),
    _t("var_chain", 0.7, n_vars=16, cot="backward"),
    _t("variable_tracking", 0.5, length=224, value_len=1, restate=True),
    _t("passkey", 0.5, length=224),
    _t("niah_single", 0.3, length=224),
    _t("induction_copy", 0.2, length=64, n_recall=8),
)

CONFIG = BASE.replace(
    base=BASE, stages=(Stage(steps=500, seq_len=256, batch_size=32, tasks=TASKS + REPLAY),),
    learning_rate=1e-3, warmup_steps=30)
