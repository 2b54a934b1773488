"""Embedded benchmark tasks (generators with exact verifiers) and the word-level tokenizer.

Registry names: reasoning family ``running_sum``, ``var_chain``; retrieval family
``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``variable_tracking``, ``passkey``,
and ``induction_copy`` (dense induction supervision for a curriculum's first stage).

Real-text RULER-style tasks for pretrained models (any tokenizer, any length) are in
:mod:`jaxkv.tasks.text`: :data:`TEXT_TASKS`, :func:`make_text_examples`, :func:`score_text`.

>>> task = make_task("running_sum", n_digits=8)
>>> ex = sample_examples(task, 1, seed=0)[0]
>>> task.verify(ex, ex.target)
True
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxkv.tasks.base import ANSWER_MARKER, Example, Task, extract_answer
from jaxkv.tasks.batching import make_training_batch, pad_prompts
from jaxkv.tasks.reasoning import RunningSum, VarChain
from jaxkv.tasks.retrieval import (
    InductionCopy,
    NiahMultiKey,
    NiahMultiValue,
    NiahSingle,
    Passkey,
    VariableTracking,
)
from jaxkv.tasks.text import (
    TEXT_TASKS,
    TextExample,
    TextTask,
    make_text_examples,
    score_text,
    text_task,
)
from jaxkv.tasks.vocab import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TOKENS,
    UNK_ID,
    VOCAB_SIZE,
    build_tokenizer,
    decode,
    encode,
    save_tokenizer,
)

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        RunningSum,
        VarChain,
        NiahSingle,
        NiahMultiKey,
        NiahMultiValue,
        VariableTracking,
        Passkey,
        InductionCopy,
    )
}
REASONING_TASKS: list[str] = [n for n, c in TASKS.items() if c.family == "reasoning"]
RETRIEVAL_TASKS: list[str] = [n for n, c in TASKS.items() if c.family == "retrieval"]


def make_task(name: str, **overrides) -> Task:
    """Instantiate registry task ``name`` with default settings, except ``overrides``.

    Raises ValueError for an unknown name (listing the allowed ones), an unknown setting
    (listing the task's settings) or a disallowed value.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task name {name!r}; allowed: {sorted(TASKS)}")
    cls = TASKS[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"task {name!r} has no setting(s) {unknown}; allowed: {allowed}")
    return cls(**overrides)


def sample_examples(task: Task | str, n: int, seed: int) -> list[Example]:
    """``n`` examples of ``task`` (a Task or a registry name with default settings), drawn from
    ``numpy.random.default_rng(seed)``; the same arguments always give the same list."""
    if isinstance(task, str):
        task = make_task(task)
    if n < 0:
        raise ValueError(f"sample_examples: n={n} is not allowed; expected n >= 0")
    rng = np.random.default_rng(seed)
    return [task.sample(rng) for _ in range(n)]


__all__ = [
    "ANSWER_MARKER", "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "TOKENS", "VOCAB_SIZE",
    "Example", "Task", "TASKS", "REASONING_TASKS", "RETRIEVAL_TASKS",
    "RunningSum", "VarChain", "NiahSingle", "NiahMultiKey", "NiahMultiValue",
    "VariableTracking", "Passkey", "InductionCopy",
    "build_tokenizer", "save_tokenizer", "encode", "decode", "extract_answer",
    "make_task", "sample_examples", "make_training_batch", "pad_prompts",
    "TEXT_TASKS", "TextExample", "TextTask", "make_text_examples", "score_text", "text_task",
]
