"""Turning examples into padded integer arrays for training and generation."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxkv.tasks.base import Example
from jaxkv.tasks.vocab import PAD_ID


def make_training_batch(examples: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
    """Teacher-forcing batch.

    Returns ``tokens``: int32[B, seq_len] = prompt_ids + target_ids, right-padded with PAD, and
    ``loss_mask``: float32[B, seq_len], 1.0 at positions t whose NEXT token tokens[t + 1] is a
    target token (target words and the final <eos>), else 0. With logits[t] predicting token
    t + 1, the loss is ``sum(loss_mask[:, :-1] * xent(logits[:, :-1], tokens[:, 1:])) /
    sum(loss_mask)``; ``loss_mask[:, -1]`` is always 0.

    For an example with P prompt and T target ids the ones are at t = P - 1 .. P + T - 2.
    Raises ValueError if an example has more than ``seq_len`` tokens or the batch is empty.
    """
    if len(examples) == 0:
        raise ValueError("make_training_batch: examples is empty")
    if seq_len < 2:
        raise ValueError(f"make_training_batch: seq_len={seq_len} is not allowed; expected >= 2")
    tokens = np.full((len(examples), seq_len), PAD_ID, dtype=np.int32)
    loss_mask = np.zeros((len(examples), seq_len), dtype=np.float32)
    for b, ex in enumerate(examples):
        p, t = ex.prompt_ids, ex.target_ids
        n = len(p) + len(t)
        if n > seq_len:
            raise ValueError(
                f"make_training_batch: example {b} (task {ex.task!r}) has {n} tokens "
                f"({len(p)} prompt + {len(t)} target), more than seq_len={seq_len}"
            )
        tokens[b, :n] = p + t
        loss_mask[b, len(p) - 1 : n - 1] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask}


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_to: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token-id lists with PAD.

    Returns ``(tokens int32[B, T], lengths int32[B])`` with T = max length, or ``pad_to`` when
    given (a fixed width avoids recompiling jitted code for every new maximum). Raises
    ValueError for an empty batch or a prompt longer than ``pad_to``.
    """
    if len(prompts) == 0:
        raise ValueError("pad_prompts: prompts is empty")
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    width = int(lengths.max())
    if pad_to is not None:
        if width > pad_to:
            raise ValueError(f"pad_prompts: a prompt has {width} tokens, more than pad_to={pad_to}")
        width = int(pad_to)
    tokens = np.full((len(prompts), width), PAD_ID, dtype=np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = np.asarray(p, dtype=np.int32)
    return tokens, lengths
