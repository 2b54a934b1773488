"""RLKV on the embedded tiny model (configs/tiny.py: 4 layers x 4 KV heads = 16 gates), on CPU.

    python -m train rlkv --config configs/rlkv/tiny.py --out runs/rlkv_tiny

var_chain is in the backward chain-of-thought form the default model is trained on. The shipped
gates (jaxkv/assets/tiny/gates_rlkv.json) are this recipe's output.

Kept from the paper: group size 4, temperature 1.0, eps_clip 0.4, beta 1e-3, tau 0.5, AdamW lr 1e-2
constant, weight decay 0.017, betas (0.9, 0.999), grad clip 1.0, gates initialised to 1 and
clipped into [0, 1], group advantage normalisation (the paper's text; "batch" is the authors'
shipped config), token-mean loss aggregation, one update per batch.

Scaled for the tiny model and 2 CPU cores (the paper: 32 prompts/step, 185 steps = 2 epochs over
3,000 problems, sink 128 + window 256):

* sink 4 + window 16 tokens. The paper's 384-token training window is ~5-10% of its 4-8K-token
  chains of thought. Our longest chains (running_sum at n_digits=24: 51 prompt + 125 completion
  tokens) are ~176 tokens, so 20 tokens is ~11%. A window of 16 holds the last 3 reasoning steps
  (5 tokens each) but never the digit a step must look up (2 * n_digits + 1 + 3k >= 17 tokens
  back), so a streaming head cannot do a running_sum step by itself: the gates have to find the
  heads that do the look-up, as in the paper. The sink keeps <bos>, the task marker and the first
  index/digit pair, the tokens attention sinks onto (paper ratio sink : window = 1 : 2; ours
  1 : 4, as the paper's inference setting 16 : 64).
* 16 prompts per step (64 rollouts), 192 steps (the shipped model solves 343 of the pool's 512
  problems, of which 256 are drawn: 12 epochs; 20 min on two cores, sparsity 0.31 at the 0.5
  threshold). On an earlier model 64 steps left every gate above 0.55 (sparsity 0 at the 0.5
  threshold): the reward-adaptive penalty only acts once the sampled reward passes tau, so the
  gates need the longer run to separate.
* Self-distillation: a pool of 512 problems over a range of task sizes (the embedded tasks have
  one output length per size, so the sizes make the length spread): running_sum n_digits
  8..24 (completions of 45..125 tokens) and var_chain n_vars 6..16 (44..114 tokens), at the
  pretraining curriculum's sizes and between them. The full model's greedy answers are checked;
  only the solved ones are kept, and 256 are drawn stratified by output length with shares
  ~ count x length (length_power 1), so long chains are over-represented.
"""
from jaxkv.tasks import REASONING_TASKS
from train.pretrain import TaskMix
from train.rlkv import EmbeddedSource, RLKVConfig

assert set(REASONING_TASKS) == {"running_sum", "var_chain"}, REASONING_TASKS



# The self-distillation pool's tasks: running_sum and var_chain over a range of sizes.
DATA = EmbeddedSource(tasks=(
    *(TaskMix("running_sum", 1.0, (("n_digits", n),)) for n in (8, 12, 16, 20, 24)),
    *(TaskMix("var_chain", 1.0, (("n_vars", n), ("cot", "backward")))
      for n in (6, 8, 10, 12, 14, 16)),
))

CONFIG = RLKVConfig(
    data=DATA,
    model="embedded",
    group_size=4,
    prompts_per_step=16,
    temperature=1.0,
    max_new_tokens=None,  # longest target over the task sizes + 8 = 133
    eps_clip=0.4,
    beta=1e-3,
    tau=0.5,
    advantage_norm="group",
    loss_agg="token_mean",
    updates_per_batch=1,
    learning_rate=1e-2,
    weight_decay=0.017,
    betas=(0.9, 0.999),
    grad_clip=1.0,
    steps=192,
    sink=4,
    window=16,
    gate_init=1.0,
    pool_size=512,
    train_size=256,
    keep_only_solved=True,
    length_strata=4,
    length_power=1.0,
    distill_batch_size=64,
    data_parallel=1,
    seed=0,
    checkpoint_every=8,
)
