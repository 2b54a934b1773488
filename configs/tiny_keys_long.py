"""Draft (issue 2): configs/tiny_keys_quote.py's export fine-tuned up to the benchmark's lengths
(running_sum 24 digits, var_chain 16 variables, 224-token retrieval prompts), with the
key-matching tasks in forms whose every look-up is keyed by the token just written (or the one
before it):

* niah_multikey quoted (`quote=True`), 1-letter keys (and 3-letter keys beside them);
* variable_tracking with one-digit values, restated first (`value_len=1, restate=True`:
  `Q 7 ? -> 7 X3 X7 ... ; A : X3 X7 ...`, every hop finds the needle whose right-hand side is the
  token just written);
* var_chain's backward chain of thought (`cot="backward"`).

    python -m train pretrain --config configs/tiny_keys_long.py --out runs/tiny_keys_long
    (with benchmarks/checkpoints/tiny_keys_quote copied to runs/tiny_keys_long/base/model, else
    it trains configs/tiny_keys_quote.py and its bases first, ~70 min)

Measured (53 min on two cores, 500 steps at 176 tokens then 800 at 256; export in
benchmarks/checkpoints/tiny_keys_long; greedy exact match, full cache, 100 prompts at the
benchmark lengths): running_sum 1.00, var_chain 1.00, variable_tracking 1.00, niah_single 1.00,
passkey 0.96, niah_multikey quoted 0.71 (1-letter keys) / 0.63 (3-letter keys), niah_multivalue
0.64. After the first stage (300 steps) variable tracking's restated form was already at 1.00 at
80 and 144 tokens (the 5-digit form had stayed at chance). Teacher-forced, the quoted
niah_multikey misses the second value digit (0.72 / 0.73; the first 1.00 / 0.93): see
configs/tiny_keys_mk.py.
"""
from configs.tiny_keys_quote import CONFIG as BASE
from train.pretrain import Stage, TaskMix


def _t(name, weight, **kw):
    return TaskMix(name, weight, tuple(kw.items()))


def _retrieval(length, weight=1.0):
    """The retrieval tasks at `length` tokens, in their benchmark forms."""
    return (
        _t("niah_multikey", weight, length=length, n_keys=8, key_len=1, quote=True),
        _t("niah_multikey", weight, length=length, n_keys=8, quote=True),
        _t("niah_multivalue", weight, length=length, n_values=4),
        _t("variable_tracking", 1.5 * weight, length=length, value_len=1, restate=True),
        _t("niah_single", 0.5 * weight, length=length),
        _t("passkey", 0.5 * weight, length=length),
    )


MID = (
    _t("running_sum", 1.5, n_digits=16, random_offset=True),
    _t("running_sum", 0.3, n_digits=8, random_offset=True),
    _t("var_chain", 1.5, n_vars=10, cot="backward"),
    _t("var_chain", 0.3, n_vars=6, cot="backward"),
    _t("variable_tracking", 1.0, length=80, n_hops=2, value_len=1, restate=True),
    _t("niah_multikey", 0.3, length=80, n_keys=4, key_len=1, n_queries=3, quote=True),
    _t("induction_copy", 0.3, length=64, n_recall=8),
) + _retrieval(144)

LONG = (
    _t("running_sum", 1.5, n_digits=24),
    _t("running_sum", 0.3, n_digits=16, random_offset=True),
    _t("var_chain", 1.5, n_vars=16, cot="backward"),
    _t("var_chain", 0.3, n_vars=10, cot="backward"),
    _t("induction_copy", 0.2, length=64, n_recall=8),
) + _retrieval(224)

# The benchmark forms at their default lengths (what the report scores).
EVAL = tuple(t for t in LONG if t.weight >= 0.5)

CONFIG = BASE.replace(
    base=BASE,
    stages=(Stage(steps=500, seq_len=176, batch_size=32, tasks=MID),
            Stage(steps=800, seq_len=256, batch_size=32, tasks=LONG)),
    eval_tasks=EVAL, learning_rate=1.5e-3, warmup_steps=50, eval_samples=100)
