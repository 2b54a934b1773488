"""DuoAttention baseline on the embedded tiny model (configs/tiny.py), on CPU.

    python -m train duo --config configs/duo/tiny.py --out runs/duo_tiny

From DuoAttention (docs/methods.md): gates initialised to 1 and clipped into [0, 1], loss =
MSE of the final hidden states at the answer positions + 0.05 * mean|alpha|, AdamW lr 0.02, no
weight decay, synthetic multi-key needle / passkey retrieval data.

Scaled for the tiny model: the same sink 4 + window 16 tokens as configs/rlkv/tiny.py (so the two
methods train the same mixed model and their gates are comparable; see the reasoning there),
retrieval prompts of 96..224 tokens (the embedded model's evaluation length is 224) with 3..8
keys, batches of 8 sequences, 200 steps. niah_multikey is in the form the default model
answers (`quote=True, equals=False`: quoted answers, needles without `=`). The shipped gates
(jaxkv/assets/tiny/gates_duo.json) are this recipe's output.
"""
from jaxkv.tasks import RETRIEVAL_TASKS
from train.duo import DuoConfig
from train.pretrain import TaskMix

assert {"niah_multikey", "passkey"} <= set(RETRIEVAL_TASKS), RETRIEVAL_TASKS



MULTIKEY = (("quote", True), ("equals", False))
TASKS = (
    TaskMix("niah_multikey", 1.0, (("length", 96), ("n_keys", 3)) + MULTIKEY),
    TaskMix("niah_multikey", 1.0, (("length", 160), ("n_keys", 6)) + MULTIKEY),
    TaskMix("niah_multikey", 2.0, (("length", 224), ("n_keys", 8)) + MULTIKEY),
    TaskMix("passkey", 0.5, (("length", 160),)),
    TaskMix("passkey", 0.5, (("length", 224),)),
)

CONFIG = DuoConfig(
    tasks=TASKS,
    model="embedded",
    batch_size=8,
    seq_len=None,  # longest prompt + target: 224 + 7 = 231
    sink=4,
    window=16,
    reg=0.05,
    learning_rate=0.02,
    weight_decay=0.0,
    betas=(0.9, 0.999),
    grad_clip=None,
    steps=200,
    gate_init=1.0,
    data_parallel=1,
    seed=0,
    checkpoint_every=25,
)
