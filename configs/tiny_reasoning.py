"""A reasoning-only variant of the embedded model, for the RLKV evaluation while the all-task
model (configs/tiny_run3.py) does not yet meet its bar: the same architecture (4 layers x 4 KV heads),
trained on the two reasoning tasks alone, short to long.

    python -m train pretrain --config configs/tiny_reasoning.py --out runs/tiny_reasoning

Stages: running_sum 8 -> 16 -> 24 digits (the short stages label from a random index offset so
every index token is trained), var_chain 6 -> 10 -> 16 variables; 600 steps of batch 32.
"""
from configs.tiny_run3 import MODEL
from train.pretrain import PretrainConfig, Stage, TaskMix

EVAL_TASKS = (
    TaskMix("running_sum", 1.0, (("n_digits", 24),)),
    TaskMix("var_chain", 1.0, (("n_vars", 16),)),
)


def _mix(n_digits, n_vars, random_offset):
    rs = (("n_digits", n_digits),) + ((("random_offset", True),) if random_offset else ())
    return (TaskMix("running_sum", 1.0, rs), TaskMix("var_chain", 1.0, (("n_vars", n_vars),)))


CONFIG = PretrainConfig(
    model=MODEL,
    stages=(
        Stage(steps=150, seq_len=112, tasks=_mix(8, 6, True)),
        Stage(steps=150, seq_len=176, tasks=_mix(16, 10, True)),
        Stage(steps=300, seq_len=176, tasks=_mix(24, 16, False)),
    ),
    eval_tasks=EVAL_TASKS,
    batch_size=32,
    learning_rate=3e-3,
    warmup_steps=50,
    final_lr_fraction=0.1,
    weight_decay=0.01,
    grad_clip=1.0,
    seed=0,
    checkpoint_every=50,
    eval_samples=100,
)
