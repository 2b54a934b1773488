"""Draft (issue 2): configs/tiny_keys.py's export fine-tuned on niah_multikey in its quoted form
only (`quote=True`: the answer first restates the queried needle, `MK k k k = v v v v . A : v v v v`,
so the value is read two tokens after the matched key), with 3-letter keys and up to 8 keys at
144-token prompts; every other task replayed. Does the look-up two tokens back carry to the
benchmark's keys?

    python -m train pretrain --config configs/tiny_keys_quote.py --out runs/tiny_keys_quote
    (with benchmarks/checkpoints/tiny_keys copied to runs/tiny_keys_quote/base/model, else it
    trains configs/tiny_keys.py first, ~50 min)

Measured (19 min on two cores; export in benchmarks/checkpoints/tiny_keys_quote; greedy exact
match, 50 prompts): quoted niah_multikey, 8 keys of 3 letters, 144 tokens 0.58; running_sum 0.98,
var_chain 1.00, niah_single 1.00, niah_multivalue 0.82, variable_tracking 0.56, passkey 0.86,
induction_copy 0.94. Teacher-forced (benchmarks/per_token.py): the value digits after the quoted
`k k k =` 0.81 / 0.80 / 1.00 / 0.94 (0.88 / 0.75 / 0.88 / 0.86 at 224 tokens), the key and the
answer's copy of the quote 1.00; variable tracking's first hop 0.48.
"""
from configs.tiny_keys import CONFIG as BASE
from configs.tiny_keys import REPLAY
from train.pretrain import Stage, TaskMix


def _quoted(length, n_keys, weight, **kw):
    return TaskMix("niah_multikey", weight, (("length", length), ("n_keys", n_keys))
                   + tuple(kw.items()) + (("quote", True),))


QUOTED = (
    _quoted(80, 4, 1.5),
    _quoted(144, 8, 1.5),
    _quoted(80, 4, 0.5, key_len=1, n_queries=3),
)
CONFIG = BASE.replace(base=BASE, stages=(Stage(steps=400, seq_len=168, batch_size=64, tasks=QUOTED + (
    TaskMix("var_chain", 1.0, (("n_vars", 6), ("cot", "backward"))),
    TaskMix("var_chain", 0.5, (("n_vars", 10), ("cot", "backward"))),
    TaskMix("variable_tracking", 1.0, (("length", 80), ("n_hops", 2))),
) + REPLAY),), eval_tasks=(QUOTED[1],) + tuple(
    t for t in BASE.eval_tasks if t.name != "niah_multikey"))
