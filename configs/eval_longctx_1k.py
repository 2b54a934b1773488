"""Prompt compression on 1K-token retrieval prompts, with the long-context embedded model.

    python -m train eval --config configs/eval_longctx_1k.py --model jaxkv/assets/tiny_long \
        --out runs/eval_longctx_1k

Eight of configs/eval_longctx_tiny.py's methods with its settings (observation window 8, the
recipes' other values unscaled) on niah_single and passkey at 1,024 prompt tokens, the length
`tiny_long` solves (configs/tiny_long.py); 10% of the prompt is ~102 tokens here against 22 of a
224-token prompt. 100 prompts per point (2 CPU cores).
"""
import dataclasses

from configs.eval_longctx_tiny import CONFIG as SHORT
from configs.tiny_long import EVAL_TASKS

# eight of eval_longctx_tiny's twelve (one 1K point takes ~1 min on 2 cores): the full cache, the
# streaming and SnapKV-family baselines, GRKV's retention without merging, the merging baselines
METHODS = ("full", "streaming", "snapkv", "chunkkv", "critical_adakv", "cam", "kvmerger", "grkv")
LONG_CONTEXT = tuple(t for t in EVAL_TASKS if t.name in ("niah_single", "passkey"))

CONFIG = dataclasses.replace(
    SHORT,
    methods=METHODS,
    tasks=tuple(t.name for t in LONG_CONTEXT),
    task_settings={t.name: dict(t.settings) for t in LONG_CONTEXT},
    method_settings={m: s for m, s in SHORT.method_settings.items() if m in METHODS},
    n_samples=100,
    pairs=tuple(p for p in SHORT.pairs if set(p) <= set(METHODS)),
)
