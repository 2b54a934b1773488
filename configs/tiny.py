"""The in-house tiny model (`jaxkv.load("tiny")`, shipped in jaxkv/assets/tiny): the fast fixture
of the unit tests and the model of the in-house task benchmark. A 4-layer GQA decoder (4 KV heads,
G = 2, head dim 32, a 256-word vocabulary) trained from scratch on the generated task families
(jaxkv.tasks), reasoning chains of up to ~210 tokens and retrieval prompts of 224 tokens.

The recipe is six stages, each a fine-tune of the one before (`PretrainConfig(base=...)`):

    python -m train pretrain --config configs/tiny.py --out runs/tiny    # about 3 h on two cores

  1. KEYS    normal(0.02) initialisation, an induction warm-up (dense copying at 32 tokens, batch
             256), then every task at short lengths (50 min)
  2. QUOTE   niah_multikey's quoted form (19 min)
  3. LONG    up to the benchmark lengths; variable tracking restating a one-digit value (53 min)
  4. MK      niah_multikey and niah_multivalue (24 min)
  5. MK2     niah_multikey needles without `=` (10 min)
  6. CONFIG  niah_multivalue with 2-5 values (17 min)

A stage whose base export is already in <out>/base/model (or deeper, base/base/...) starts from
it instead of retraining it. The task forms are those whose every step is a look-up keyed by the
token just written or the one before it, which a model this small learns.
"""
from jaxkv.model import ModelConfig
from jaxkv.tasks import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from train.pretrain import PretrainConfig, Stage, TaskMix, task_labels

# 4 layers x 4 KV heads = 16 KV heads (G = 2 query heads per KV head), so keeping 20/40/60/80 % of
# the heads are distinct settings.
MODEL = ModelConfig(
    vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=8,
    num_kv_heads=4, head_dim=32, max_position_embeddings=1024, rope_theta=10000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, architecture="LlamaForCausalLM",
    dtype="float32", bos_token_id=BOS_ID, eos_token_id=(EOS_ID,), pad_token_id=PAD_ID)


# ---- 1. KEYS: induction warm-up, then every task at short lengths

def copy_task(length, n_recall, weight=1.0):
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
    copy_task(64, 8, 0.5),
)

WARMUP = PretrainConfig(
    model=MODEL,
    stages=(
        # the induction head forms on short dense copies (a large batch: the plateau ends after a
        # number of sequences), then stretches to longer distances
        Stage(steps=400, seq_len=56, tasks=(copy_task(32, 4),), batch_size=256),
        Stage(steps=300, seq_len=128, tasks=(copy_task(48, 6), copy_task(64, 8), copy_task(96, 6)),
              batch_size=64),
        Stage(steps=600, seq_len=112, tasks=SHORT),
    ),
    eval_tasks=tuple(t for t in SHORT if t.name != "induction_copy") + (copy_task(64, 8),),
    init_std=0.02,  # the optimiser settings are PretrainConfig's defaults
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
    copy_task(64, 8, 0.3),
)),), learning_rate=2e-3, warmup_steps=30, eval_samples=50)

# The tasks a fine-tune replays beside the ones it is about (small weights).
SHORT_REPLAY = (
    TaskMix("running_sum", 0.5, (("n_digits", 8), ("random_offset", True))),
    TaskMix("niah_multivalue", 0.5, (("length", 80), ("n_values", 4))),
    TaskMix("niah_single", 0.3, (("length", 80),)),
    TaskMix("passkey", 0.3, (("length", 80),)),
    copy_task(64, 8, 0.3),
)

# Fine-tune 2 (600 steps, batch 64, 16 min): niah_multikey's quoted form (the answer restates the
# needle, so the value is read after `k =`: a match two tokens back, as in var_chain's backward
# form) beside the plain one.
KEYS = DENSE.replace(base=DENSE, stages=(Stage(steps=600, seq_len=144, batch_size=64, tasks=(
    TaskMix("niah_multikey", 1.5, (("length", 80), ("n_keys", 4), ("key_len", 1), ("n_queries", 3),
                                   ("quote", True))),
    TaskMix("niah_multikey", 1.5, (("length", 80), ("n_keys", 4))),
    TaskMix("niah_multikey", 0.5, (("length", 80), ("n_keys", 4), ("key_len", 1))),
    TaskMix("variable_tracking", 1.5, (("length", 80), ("n_hops", 2))),
    TaskMix("var_chain", 1.0, (("n_vars", 6), ("cot", "backward"))),
) + SHORT_REPLAY),))


# ---- 2. QUOTE: niah_multikey quoted ------------------------------------------------------------

def quoted(length, n_keys, weight, **kw):
    return TaskMix("niah_multikey", weight, (("length", length), ("n_keys", n_keys))
                   + tuple(kw.items()) + (("quote", True),))


QUOTED = (
    quoted(80, 4, 1.5),
    quoted(144, 8, 1.5),
    quoted(80, 4, 0.5, key_len=1, n_queries=3),
)
QUOTE = KEYS.replace(base=KEYS, stages=(Stage(steps=400, seq_len=168, batch_size=64, tasks=QUOTED + (
    TaskMix("var_chain", 1.0, (("n_vars", 6), ("cot", "backward"))),
    TaskMix("var_chain", 0.5, (("n_vars", 10), ("cot", "backward"))),
    TaskMix("variable_tracking", 1.0, (("length", 80), ("n_hops", 2))),
) + SHORT_REPLAY),), eval_tasks=(QUOTED[1],) + tuple(
    t for t in KEYS.eval_tasks if t.name != "niah_multikey"))


# ---- 3. LONG: the benchmark lengths ------------------------------------------------------------

def task(name, weight, **kw):
    return TaskMix(name, weight, tuple(kw.items()))


def retrieval(length, weight=1.0):
    """The retrieval tasks at `length` tokens, in their benchmark forms."""
    return (
        task("niah_multikey", weight, length=length, n_keys=8, key_len=1, quote=True),
        task("niah_multikey", weight, length=length, n_keys=8, quote=True),
        task("niah_multivalue", weight, length=length, n_values=4),
        task("variable_tracking", 1.5 * weight, length=length, value_len=1, restate=True),
        task("niah_single", 0.5 * weight, length=length),
        task("passkey", 0.5 * weight, length=length),
    )


MID = (
    task("running_sum", 1.5, n_digits=16, random_offset=True),
    task("running_sum", 0.3, n_digits=8, random_offset=True),
    task("var_chain", 1.5, n_vars=10, cot="backward"),
    task("var_chain", 0.3, n_vars=6, cot="backward"),
    task("variable_tracking", 1.0, length=80, n_hops=2, value_len=1, restate=True),
    task("niah_multikey", 0.3, length=80, n_keys=4, key_len=1, n_queries=3, quote=True),
    task("induction_copy", 0.3, length=64, n_recall=8),
) + retrieval(144)

LONG = (
    task("running_sum", 1.5, n_digits=24),
    task("running_sum", 0.3, n_digits=16, random_offset=True),
    task("var_chain", 1.5, n_vars=16, cot="backward"),
    task("var_chain", 0.3, n_vars=10, cot="backward"),
    task("induction_copy", 0.2, length=64, n_recall=8),
) + retrieval(224)

# The benchmark forms at their default lengths (what the report scores).
LONG_EVAL = tuple(t for t in LONG if t.weight >= 0.5)

LONG_CONFIG = QUOTE.replace(
    base=QUOTE,
    stages=(Stage(steps=500, seq_len=176, batch_size=32, tasks=MID),
            Stage(steps=800, seq_len=256, batch_size=32, tasks=LONG)),
    eval_tasks=LONG_EVAL, learning_rate=1.5e-3, warmup_steps=50, eval_samples=100)


# ---- 4. MK: niah_multikey and niah_multivalue --------------------------------------------------

MK_TASKS = (
    task("niah_multikey", 1.5, length=224, n_keys=8, key_len=1, quote=True),
    task("niah_multikey", 1.5, length=224, n_keys=8, quote=True),
    task("niah_multikey", 1.5, length=200, n_keys=8, key_len=2, n_queries=3, quote=True),
    task("niah_multivalue", 1.5, length=224, n_values=4),
    task("niah_multivalue", 1.0, length=224, n_values=6),
)

# Every task the fine-tunes from here on do not focus on, replayed at the benchmark's sizes (in every
# later stage).
REPLAY = (
    task("running_sum", 0.7, n_digits=24),
    task("var_chain", 0.7, n_vars=16, cot="backward"),
    task("variable_tracking", 0.5, length=224, value_len=1, restate=True),
    task("passkey", 0.5, length=224),
    task("niah_single", 0.3, length=224),
    task("induction_copy", 0.2, length=64, n_recall=8),
)

MK_CONFIG = LONG_CONFIG.replace(
    base=LONG_CONFIG, stages=(Stage(steps=500, seq_len=256, batch_size=32, tasks=MK_TASKS + REPLAY),),
    learning_rate=1e-3, warmup_steps=30)


# ---- 5. MK2: needles without `=` --------------------------------------------------------------

MK = dict(length=224, quote=True, equals=False)
MK2_TASKS = (
    task("niah_multikey", 1.0, n_keys=4, key_len=1, **MK),
    task("niah_multikey", 1.0, n_keys=4, **MK),
    task("niah_multikey", 1.0, n_keys=8, key_len=1, **MK),
    task("niah_multikey", 1.0, n_keys=8, **MK),
    task("niah_multikey", 0.3, length=224, n_keys=4, quote=True),
    task("niah_multivalue", 1.5, length=224, n_values=4),
    task("niah_multivalue", 0.7, length=224, n_values=3),
    task("niah_multivalue", 0.7, length=128, n_values=4),
) + REPLAY

MK2_EVAL = tuple(t for t in MK_CONFIG.eval_tasks if t.name != "niah_multikey") + (
    task("niah_multikey", 1.0, n_keys=4, key_len=1, **MK),
    task("niah_multikey", 1.0, n_keys=4, **MK),
    task("niah_multikey", 1.0, n_keys=8, key_len=1, **MK),
    task("niah_multikey", 1.0, n_keys=8, **MK),
    task("niah_multikey", 1.0, length=224, n_keys=4, quote=True),
)

MK2_CONFIG = MK_CONFIG.replace(
    base=MK_CONFIG, stages=(Stage(steps=500, seq_len=256, batch_size=32, tasks=MK2_TASKS),),
    eval_tasks=MK2_EVAL, learning_rate=1e-3, warmup_steps=30)


# ---- 6. CONFIG: niah_multivalue ---------------------------------------------------------------

MV_TASKS = (
    task("niah_multivalue", 2.5, length=224, n_values=4),
    task("niah_multivalue", 0.7, length=128, n_values=4),
    task("niah_multivalue", 0.7, length=224, n_values=3),
    task("niah_multivalue", 0.5, length=224, n_values=5),
    task("niah_multivalue", 0.3, length=128, n_values=2),
    task("niah_multikey", 0.5, n_keys=4, **MK),
    task("niah_multikey", 0.5, n_keys=8, key_len=1, **MK),
    task("niah_multikey", 0.5, n_keys=8, **MK),
) + REPLAY

MV_EVAL = MK2_CONFIG.eval_tasks + (task("niah_multivalue", 1.0, length=224, n_values=3),)

CONFIG = MK2_CONFIG.replace(
    base=MK2_CONFIG, stages=(Stage(steps=800, seq_len=256, batch_size=32, tasks=MV_TASKS),),
    eval_tasks=MV_EVAL, learning_rate=1e-3, warmup_steps=30)

# The default (evaluation) settings of each task: what the training report scores.
EVAL_TASKS = CONFIG.eval_tasks
LABELS = dict(zip(task_labels(EVAL_TASKS), EVAL_TASKS))

# The embedded benchmark: one form per task (the eval configs key tasks by name), each solved by
# the shipped model with the full cache at >= 95% exact match (its train_report.json:
# running_sum 1.00, var_chain 1.00, variable_tracking 1.00, niah_single 1.00, passkey 0.97,
# niah_multikey 0.98 (4 keys of 3 letters, as RULER's niah_multikey_1), niah_multivalue 0.97).
BENCHMARK_LABELS = ("running_sum", "var_chain", "variable_tracking", "niah_single", "passkey",
                    "niah_multikey[n_keys=4,length=224,quote=True,equals=False]",
                    "niah_multivalue[length=224,n_values=4]")
BENCHMARK_TASKS = tuple(LABELS[k] for k in BENCHMARK_LABELS)
BENCHMARK = tuple(t.name for t in BENCHMARK_TASKS)


# Method settings scaled to this model's sequences (prompts of 51-224 tokens, chains of thought up
# to ~125 tokens; the papers' settings are for 4K-128K tokens). Every method that takes one of
# these keywords gets it (configs/eval_tiny.py); the papers' values are in each method's defaults.
#   window 8:        observation window of the prompt-eviction family (SnapKV ... GRKV): the
#                    papers' 32 would exceed a 10-20% budget of a 224-token prompt
#   sink 4, window 16 for head-level methods (RLKV, DuoAttention, random heads, StreamingLLM),
#                    the streaming heads the gates are trained with (configs/rlkv/tiny.py)
#   window 8, buffer 8: recent tokens H2O / R-KV always keep, and R-KV's decoding buffer (the
#                    papers' 128-token buffer and large windows do not fit a 25% budget of ~190 slots)
HEAD_LEVEL = ("rlkv", "duo", "random_heads")
DECODE_EVICTION = ("h2o", "rkv")


def method_settings(method: str, factory) -> dict:
    """The keywords of `factory` (a registered method) that this model's scale sets."""
    import inspect
    params = inspect.signature(factory).parameters
    if method in HEAD_LEVEL or method == "streaming":
        wanted = {"sink": 4, "window": 16}
    elif method in DECODE_EVICTION:
        wanted = {"window": 8, "buffer": 8}
    else:
        wanted = {"window": 8}
    return {k: v for k, v in wanted.items() if k in params}
