"""The embedded default: a tiny GQA decoder trained from scratch on the generated task families.

4 layers x 4 KV heads = 16 KV heads (G = 2 query heads per KV head), so keeping 20/40/60/80 % of
the heads are distinct settings. Task lengths are set for 2 CPU cores: reasoning chains of up to
~210 tokens, retrieval prompts of 224 tokens (the generators take any length; see jaxkv.tasks).

The recipe is a chain of fine-tunes (`PretrainConfig(base=...)`), each config the next one's base;
`python -m train pretrain --config configs/tiny.py --out runs/tiny` trains the whole chain
(about 3 h on 2 cores, the stage times summed; every link's export is committed, see each file):

1. configs/tiny_keys.py: normal(0.02) initialisation and an induction warm-up (dense copying at 32
   tokens, batch 256: the content look-up every key-matching task needs forms in ~400 steps),
   then every task at short lengths, the key-matching ones in their easier forms (50 min);
2. configs/tiny_keys_quote.py: niah_multikey's quoted form (19 min);
3. configs/tiny_keys_long.py: up to the benchmark lengths, variable tracking in its restated
   one-digit form (53 min);
4. configs/tiny_keys_mk.py: niah_multikey and niah_multivalue (24 min);
5. configs/tiny_keys_mk2.py: niah_multikey needles without `=` (10 min);
6. configs/tiny_keys_mv.py: niah_multivalue (17 min).

The task forms (the benchmark's, EVAL_TASKS) are the ones whose every step is a look-up keyed by
the token just written or the one before it, which this model learns; a key three or more tokens
back it did not learn in any budget tried (README: key matching): var_chain's backward chain of
thought, niah_multikey's quoted answer to needles without `=` (`MK k k k v v v v .`), variable
tracking restating a one-digit value.
"""
from configs.tiny_keys_mv import CONFIG
from train.pretrain import task_labels

MODEL = CONFIG.model  # the architecture (run 3's, configs/tiny_run3.py)

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
HEAD_LEVEL = ("rlkv", "duo", "random_heads", "random_heads_1", "random_heads_2")
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
