"""DuoAttention on SmolLM2-135M-Instruct (30 layers x 3 KV heads = 90 gates), on CPU: the
baseline RLKV is compared with (configs/rlkv/smollm2.py trains RLKV's gates on the same model).

    python -m train duo --model smollm2-135m-instruct --config configs/duo/smollm2.py --out results/duo_smollm2

From DuoAttention (docs/methods.md): gates initialised to 1 and clipped into [0, 1], loss = MSE
of the final hidden states at the answer positions (mixed model against the full one, every query
mixed, prompt included) + 0.05 * mean|alpha|, AdamW lr 0.02, no weight decay, synthetic
retrieval data: here RULER's passkey, multi-key needle (niah_multikey_1: 4 keys, one asked) and
multi-query needle (niah_multiquery: 4 keys, all asked: several passkeys in one answer) in
Python's documentation, made with the model's tokenizer at the 1K tokens RLKV trains at, plain
prompts (the model finds passkeys at 1K-2K with its full cache).

Scaled for two CPU cores: sink 16 + window 64 (RLKV's here), batches of 4 sequences, 120 steps,
gradients in passes of one sequence (`microbatch=1`, summed: the batch's gradient). XLA:CPU's
compiled gradient holds every layer's T x T attention at once, remat or not (memory_analysis of
one 1,088-token sequence: 7.4 GB of temporaries, against 0.28 GB for the forward alone), so a pass
of all 4 sequences asked for a 29.8 GB buffer and failed on a 24 GB machine.
"""
from train.duo import DuoConfig, TextMix

TASKS = (
    TextMix("passkey", 1.0, (), 1024),
    TextMix("niah_multikey_1", 1.0, (), 1024),
    TextMix("niah_multiquery", 1.0, (), 1024),
)

CONFIG = DuoConfig(
    tasks=TASKS,
    model="smollm2-135m-instruct",
    batch_size=4,
    seq_len=None,  # the longest prompt + 64 tokens for the target
    sink=16,
    window=64,
    reg=0.05,
    learning_rate=0.02,
    weight_decay=0.0,
    betas=(0.9, 0.999),
    grad_clip=None,
    steps=120,
    gate_init=1.0,
    remat=True,
    microbatch=1,  # 7.4 GB a pass at 1,088 tokens
    data_parallel=1,
    seed=0,
    checkpoint_every=4,
)
