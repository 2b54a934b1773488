"""Run 3, the embedded default until the key-matching recipe (configs/tiny.py) replaced it: a tiny
GQA decoder trained from scratch on the generated task families (jaxkv/assets/tiny_run3; the
RLKV / DuoAttention gates and the RDKV eps table beside it, and the published figures of the
RLKV, GRKV and RDKV issues, were measured on it).

4 layers x 4 KV heads = 16 KV heads (G = 2 query heads per KV head), so keeping 20/40/60/80 % of
the heads are distinct settings. Task lengths are set for 2 CPU cores: reasoning chains of ~180
tokens, retrieval prompts of 224 tokens (the generators take any length; see jaxkv.tasks).
A curriculum goes from short to long contexts, which gets the model off the retrieval plateau.
"""
from jaxkv.model import ModelConfig
from jaxkv.tasks import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from train.pretrain import PretrainConfig, Stage, TaskMix

MODEL = ModelConfig(
    vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=8,
    num_kv_heads=4, head_dim=32, max_position_embeddings=1024, rope_theta=10000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, architecture="LlamaForCausalLM",
    dtype="float32", bos_token_id=BOS_ID, eos_token_id=(EOS_ID,), pad_token_id=PAD_ID)

# The default (evaluation) settings of each task in the embedded benchmark.
EVAL_TASKS = (
    TaskMix("running_sum", 1.0, (("n_digits", 24),)),
    TaskMix("var_chain", 1.0, (("n_vars", 16),)),
    TaskMix("niah_single", 1.0, (("length", 224),)),
    TaskMix("niah_multikey", 1.0, (("length", 224), ("n_keys", 8))),
    TaskMix("niah_multivalue", 1.0, (("length", 224), ("n_values", 4))),
    TaskMix("variable_tracking", 1.0, (("length", 224),)),
    TaskMix("passkey", 1.0, (("length", 224),)),
)


# The embedded benchmark: the tasks the shipped model (run 3) solves with the full cache at >= 95%
# exact match (its train_report.json: running_sum 1.00, niah_single 1.00, passkey 0.99). The eval
# configs, the demo and the gate-training recipes use these. The other four are generated and
# reported, but this 4-layer model has not learnt them in 2,300 steps (niah_multivalue 0.78,
# var_chain 0.09, niah_multikey 0.07, variable_tracking 0.00), so a compressed cache has nothing
# to keep on them; they stay in EVAL_TASKS (and the report) for larger models and longer runs.
BENCHMARK = ("running_sum", "niah_single", "passkey")
BENCHMARK_TASKS = tuple(t for t in EVAL_TASKS if t.name in BENCHMARK)

# Run history (greedy exact match, full cache, 100 per task, seed 0):
#   run 1 (stages 1-3 below, 1500 steps, 91 min on 2 cores): niah_single 1.00, passkey 0.93,
#     niah_multivalue 0.52, var_chain 0.13, niah_multikey 0.07, running_sum 0.06,
#     variable_tracking 0.00 (running_sum errors all began at index i17)
#   run 2, running_sum random_offset, weights moved to the key-matching tasks and steps
#     500/400/700 from scratch: worse everywhere (running_sum 0.19, var_chain 0.16, every
#     retrieval task <= 0.02): the key-matching tasks only pay off once the easy ones are learnt.
#   run 3 = run 1 + stage 4 (jaxkv/assets/tiny_run3): run 1's schedule is pinned
#     (schedule_steps=1500) so its 1500 steps are unchanged, and stage 4 continues at 256 tokens
#     on a second warmup-cosine (peak 1e-3), with weight moved to the tasks run 1 had not solved
#     plus easier variants of the two hardest retrieval tasks (fewer keys, fewer hops). Stage 4
#     took 46 min on 2 cores (about 2 h 20 min from scratch): running_sum 1.00, niah_single 1.00,
#     passkey 0.99, niah_multivalue 0.78, var_chain 0.09, niah_multikey 0.07,
#     variable_tracking 0.00. Teacher-forced token accuracy on var_chain stayed at ~0.45 (the
#     step that finds the definition naming the previous variable on its right-hand side was
#     never learnt), on variable_tracking at ~0.4-0.5.
#   attempted run 4 (not shipped): run 3 + a fine-tune (PretrainConfig(base=...)) on var_chain in
#     its backward form (cot="backward", alone it reached 0.93 token accuracy at 6 variables in
#     600 steps) with every other task replayed, fresh AdamW at peak 1e-3: after 1150 of 2000
#     steps (in the 16-digit / 10-variable stage) var_chain was at 0.81 teacher-forced token
#     accuracy (0 sequences all right) and running_sum at 24 digits had fallen from 1.00 to 0.82:
#     the two look-ups compete for the same heads. Stopped there (whether the 24-digit stage
#     would have recovered both was not tested); a next try should train var_chain's backward
#     form from the first stage. (Run 3 itself solves running_sum only at its 24-digit default:
#     0.76 teacher-forced at 16 digits.)
def _mix(n_digits, n_vars, length, n_keys):
    return (
        TaskMix("running_sum", 2.0, (("n_digits", n_digits),)),
        TaskMix("var_chain", 1.5, (("n_vars", n_vars),)),
        TaskMix("niah_single", 1.0, (("length", length),)),
        TaskMix("niah_multikey", 1.0, (("length", length), ("n_keys", n_keys))),
        TaskMix("niah_multivalue", 1.0, (("length", length), ("n_values", 4))),
        TaskMix("variable_tracking", 1.0, (("length", length),)),
        TaskMix("passkey", 0.5, (("length", length),)),
    )


STAGE4 = (
    TaskMix("running_sum", 2.0, (("n_digits", 24),)),
    TaskMix("var_chain", 2.0, (("n_vars", 16),)),
    TaskMix("niah_single", 0.5, (("length", 224),)),
    TaskMix("niah_multikey", 1.5, (("length", 224), ("n_keys", 8))),
    TaskMix("niah_multikey", 0.5, (("length", 224), ("n_keys", 4))),
    TaskMix("niah_multivalue", 1.0, (("length", 224), ("n_values", 4))),
    TaskMix("variable_tracking", 1.5, (("length", 224),)),
    TaskMix("variable_tracking", 0.5, (("length", 224), ("n_hops", 2))),
    TaskMix("passkey", 0.5, (("length", 224),)),
)


CONFIG = PretrainConfig(
    model=MODEL,
    stages=(
        Stage(steps=300, seq_len=112, tasks=_mix(n_digits=8, n_vars=6, length=80, n_keys=3)),
        Stage(steps=300, seq_len=176, tasks=_mix(n_digits=16, n_vars=10, length=144, n_keys=6)),
        Stage(steps=900, seq_len=256, tasks=_mix(n_digits=24, n_vars=16, length=224, n_keys=8)),
        Stage(steps=800, seq_len=256, tasks=STAGE4),
    ),
    eval_tasks=EVAL_TASKS,
    batch_size=32,
    learning_rate=3e-3,
    warmup_steps=100,
    final_lr_fraction=0.1,
    weight_decay=0.01,
    grad_clip=1.0,
    seed=0,
    checkpoint_every=50,
    eval_samples=100,
    schedule_steps=1500,
    restart_learning_rate=1e-3,
    restart_warmup_steps=50,
)
