"""From task names to prompts and scorers, for any model.

Two families of tasks, and the model says which one a name means (`task_suite`):

* "text": the real-text tasks of `jaxkv.tasks.text` (RULER's definitions), made with the model's
  own tokenizer at each requested prompt length, optionally in its chat template; a completion is
  decoded with that tokenizer and scored with RULER's string match (a fraction in [0, 1]).
* "embedded": the in-house tiny models' tasks (`jaxkv.tasks.TASKS`), written in their 256-word
  vocabulary; a completion is decoded with that vocabulary, cut at its EOS and checked by the
  task's exact verifier (0 or 1).

`prompt_set(...)` returns a `PromptSet`: the token ids of every prompt, the answer length, the
EOS ids that end an answer, and `score(i, tokens) -> (score, completion text)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

EMBEDDED, TEXT = "embedded", "text"
DEFAULT_LENGTH = 4096


def task_suite(model) -> str:
    """"embedded" for a model with the in-house word vocabulary, else "text"."""
    from jaxkv.tasks import vocab
    tok = getattr(model, "tokenizer", None)
    if model.config.vocab_size == vocab.VOCAB_SIZE and (
            tok is None or tok.backend.get_vocab() == vocab.TOKEN_TO_ID):
        return EMBEDDED
    return TEXT


@dataclasses.dataclass
class PromptSet:
    """The prompts of one task at one length, and how to score their completions."""

    task: str
    family: str
    length: Optional[int]  # requested prompt tokens (text tasks); None for in-house tasks
    prompts: List[List[int]]
    answers: List[Any]  # what each prompt expects (shown in records)
    max_new_tokens: int
    eos_ids: Tuple[int, ...]
    chat: bool
    scorer: Callable[[int, Sequence[int]], Tuple[float, str]]
    # text: every batch is padded to this many tokens (one compiled program per length); None:
    # each batch to the next multiple of 64 (the in-house tasks, as `generate` pads)
    pad_to: Optional[int]
    # text tasks: per prompt, the token spans of each answer in it (`answer_token_spans`), from
    # which records get the needle survival; None for the in-house tasks
    needle_spans: Optional[List[Any]] = None

    def score(self, i: int, tokens: Sequence[int]) -> Tuple[float, str]:
        return self.scorer(i, tokens)


def resolve_chat(model, chat: Optional[bool]) -> bool:
    """The config's chat setting for this model: None -> whether it has a chat template."""
    has = bool(getattr(getattr(model, "tokenizer", None), "chat_template", None))
    if chat is None:
        return has
    if chat and not has:
        raise ValueError(f"chat=True: model {getattr(model, 'name', None) or model.path!r} has no "
                         f"chat template; use chat=False")
    return chat


def prompt_set(model, task: str, length: Optional[int], n: int, seed: int,
               settings: Mapping[str, Any], chat: bool, max_new_tokens: Optional[int]) -> PromptSet:
    suite = task_suite(model)
    if suite == EMBEDDED:
        return _embedded_set(model, task, n, seed, settings, max_new_tokens)
    return _text_set(model, task, length or DEFAULT_LENGTH, n, seed, settings, chat,
                     max_new_tokens)


def _text_set(model, task, length, n, seed, settings, chat, max_new_tokens) -> PromptSet:
    from jaxkv.tasks.text import TEXT_TASKS, answer_token_spans, make_text_examples, score_text
    if task not in TEXT_TASKS:
        raise ValueError(f"task={task!r}: not a real-text task; for model "
                         f"{getattr(model, 'name', None) or model.path!r} the tasks are "
                         f"{', '.join(TEXT_TASKS)}")
    if model.tokenizer is None:
        raise ValueError("the real-text tasks need the model's tokenizer; this model has none")
    examples = make_text_examples(task, model.tokenizer, length, n, seed, chat=chat, **settings)
    mnt = max_new_tokens or examples[0].max_new_tokens
    limit = model.config.max_position_embeddings
    if length + mnt > limit:
        raise ValueError(f"length={length}: with {mnt} new tokens it exceeds the model's context "
                         f"of {limit} tokens")
    tokenizer = model.tokenizer

    def scorer(i, tokens):
        text = tokenizer.decode(tokens)
        return float(score_text(examples[i], text)), text

    return PromptSet(task=task, family=examples[0].family, length=length,
                     prompts=[list(ex.prompt_ids) for ex in examples],
                     answers=[list(ex.answers) for ex in examples], max_new_tokens=mnt,
                     eos_ids=tuple(model.config.eos_ids), chat=chat, scorer=scorer,
                     pad_to=max(length, max(len(ex.prompt_ids) for ex in examples)),
                     needle_spans=[answer_token_spans(ex, tokenizer) for ex in examples])


def _embedded_set(model, task, n, seed, settings, max_new_tokens) -> PromptSet:
    from jaxkv import tasks as tasks_api
    from jaxkv.tasks import vocab
    if task not in tasks_api.TASKS:
        raise ValueError(f"task={task!r}: not an in-house task; the in-house model "
                         f"{getattr(model, 'name', None) or model.path!r} knows "
                         f"{', '.join(sorted(tasks_api.TASKS))}")
    t = tasks_api.make_task(task, **settings)
    examples = tasks_api.sample_examples(t, n, seed)
    if max_new_tokens is None:
        # every example satisfies len(prompt_ids) + len(target_ids) <= task.max_len
        bound = t.max_len - min(len(ex.prompt_ids) for ex in examples)
        max_new_tokens = max(bound, max(len(ex.target_ids) for ex in examples))
    eos = vocab.EOS_ID

    def scorer(i, tokens):
        toks = [int(x) for x in tokens]
        if eos in toks:
            toks = toks[:toks.index(eos)]
        # a model whose embedding table is wider than the task vocabulary may emit ids past it:
        # they read as <unk> (and so never match an answer)
        toks = [x if 0 <= x < vocab.VOCAB_SIZE else vocab.UNK_ID for x in toks]
        text = vocab.decode(toks)
        return float(bool(t.verify(examples[i], text))), text

    return PromptSet(task=task, family=t.family, length=None,
                     prompts=[ex.prompt_ids for ex in examples],
                     answers=[ex.answer for ex in examples], max_new_tokens=max_new_tokens,
                     eos_ids=(eos,), chat=False, scorer=scorer, pad_to=None)


def batches(prompts: Sequence[Sequence[int]], batch_size: int) -> List[List[int]]:
    """Prompt indices grouped by length (sorted), so a batch pads little."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


__all__ = ["task_suite", "prompt_set", "PromptSet", "resolve_chat", "batches", "EMBEDDED", "TEXT",
           "DEFAULT_LENGTH"]
