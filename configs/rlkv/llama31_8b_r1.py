"""RLKV on Llama-3.1-8B-R1 (DeepSeek-R1-Distill-Llama-8B) with the published hyperparameters.

    python -m train rlkv --config configs/rlkv/llama31_8b_r1.py --out runs/rlkv_llama8b

Published (arXiv 2510.08525; docs/methods.md, RLKV): group size 4, 32 prompts per step,
temperature 1.0, eps_clip 0.4, beta 1e-3, tau 0.5, AdamW lr 1e-2 constant, weight decay 0.017,
betas (0.9, 0.999), grad-norm clip 1.0, 185 steps (2 epochs over 3,000 self-distilled problems),
training window sink 128 + recent 256 tokens (the paper counts them in 128-token blocks: 1 + 2
blocks), gates initialised to 1 and clipped into [0, 1].

Ours (not given by the paper): advantages normalised per group (the paper's text; "batch" is the
authors' shipped config), token-mean loss aggregation, at most 4,096 new tokens per rollout, a
pool of 6,000 problems for self-distillation, length stratification in 4 bins with shares
~ count x length; rollouts in chunks of 32 sequences, loss in microbatches of 4 with the attention
recomputed in the backward pass (the dense [B, K, G, T, S] probabilities of 4K-token sequences do
not fit otherwise); all local devices on the "data" axis.

Local files only (nothing is downloaded): `MODEL_DIR` is a Hugging Face folder (config.json,
*.safetensors, tokenizer.json) and `DATA` a GSM8K / MATH-style JSONL file of training problems
(question + answer fields, see jaxkv.tasks.jsonl). The prompt follows the R1 chat format; the
tokenizer's post-processor adds <｜begin▁of▁sentence｜>.
"""
from train.rlkv import JsonlSource, RLKVConfig

MODEL_DIR = "checkpoints/DeepSeek-R1-Distill-Llama-8B"
DATA = "data/rlkv/math_train.jsonl"
R1_TEMPLATE = ("<｜User｜>{question}\nPlease reason step by step, and put your final answer "
               "within \\boxed{{}}.<｜Assistant｜><think>\n")

CONFIG = RLKVConfig(
    data=JsonlSource(path=DATA, template=R1_TEMPLATE),
    model=MODEL_DIR,
    dtype="bfloat16",
    group_size=4,
    prompts_per_step=32,
    temperature=1.0,
    top_p=1.0,
    max_new_tokens=4096,
    rollout_chunk=32,
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
    steps=185,
    microbatch=4,
    remat=True,
    sink=128,
    window=256,
    gate_init=1.0,
    pool_size=6000,
    train_size=3000,
    keep_only_solved=True,
    length_strata=4,
    length_power=1.0,
    distill_batch_size=64,
    data_parallel=0,
    seed=0,
    checkpoint_every=5,
)
