"""`python -m train demo`: the main job on the real default model, SmolLM2-135M-Instruct.

Two RULER retrieval tasks at 2K tokens (passkey in repeated noise, a number hidden in English
text), 6 prompts each, the full cache and the project's methods with their baselines at 10% and 25%
of the cache: GRKV (ridge merging after Critical-AdaKV retention) against Critical-AdaKV, SnapKV and
StreamingLLM; RDKV (rate-distortion bit allocation) against KIVI-2. Sized to finish within 10
minutes on two CPU cores (one shared prefill per batch of prompts; compiling the 13 programs is
about two of those minutes). The full tables are `python -m train eval --model
smollm2-135m-instruct` (configs/eval_real.py).
"""
from jaxkv.eval import EvalConfig

CONFIG = EvalConfig(
    methods=("full", "streaming", "snapkv", "critical_adakv", "grkv", "kivi2", "rdkv"),
    budgets=(0.1, 0.25),
    tasks=("passkey", "niah_single_2"),
    lengths=(2048,),
    n_samples=6,
    batch_size=6,
    max_new_tokens=12,
    seed=0,
    model="smollm2-135m-instruct",
    pairs=(("grkv", "critical_adakv"), ("rdkv", "kivi2")),
)
