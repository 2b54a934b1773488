"""RLKV's training problems: where they come from (the in-house tasks, real-text tasks made with a
real model's tokenizer, or local JSONL files of GSM8K / Math500-style problems) and which of them each step takes (stratified by the length of the
model's own answers; epochs shuffled from (seed, epoch))."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from jaxkv.checks import check_int
from train.pretrain import TaskMix

Item = Dict[str, Any]  # one problem: {"source", "prompt_ids", "answer", ...}, JSON-serialisable


@dataclasses.dataclass(frozen=True)
class EmbeddedSource:
    """Embedded reasoning tasks (jaxkv.tasks) at a range of sizes: one TaskMix per size; a
    TaskMix weight is its share of the pool. Completions are decoded with the tasks' word
    vocabulary and checked by the task's exact verifier; EOS is the vocabulary's <eos>."""

    tasks: Tuple[TaskMix, ...]

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks: give at least one TaskMix")
        for t in self.tasks:
            t.make()  # validates name and settings

    @property
    def eos_ids(self) -> Tuple[int, ...]:
        from jaxkv.tasks import EOS_ID
        return (EOS_ID,)

    def default_max_new_tokens(self) -> int:
        """Longest target of any task size (+ 8 tokens of slack)."""
        longest = 0
        for mix in self.tasks:
            task = mix.make()
            ex = task.sample(np.random.default_rng(0))
            longest = max(longest, task.max_len - len(ex.prompt_ids))
        return longest + 8

    def pool(self, n: int, seed: int, model) -> List[Item]:
        """`n` problems, split over the task sizes by weight (largest remainder)."""
        weights = np.array([t.weight for t in self.tasks], np.float64)
        counts = _largest_remainder(n * weights / weights.sum())
        items: List[Item] = []
        for i, (mix, count) in enumerate(zip(self.tasks, counts)):
            task = mix.make()
            rng = np.random.default_rng([seed, 2, i])
            for _ in range(count):
                ex = task.sample(rng)
                items.append({"source": mix.label, "task": ex.task, "settings": dict(mix.settings),
                              "prompt": ex.prompt, "target": ex.target, "answer": ex.answer,
                              "prompt_ids": ex.prompt_ids})
        return items

    def make_verifier(self, model) -> Callable[[Item, Sequence[int]], float]:
        from jaxkv.tasks import Example, decode, make_task
        tasks: Dict[str, Any] = {}

        def verify(item: Item, completion: Sequence[int]) -> float:
            key = item["source"]
            if key not in tasks:
                tasks[key] = make_task(item["task"], **item["settings"])
            ex = Example(item["task"], item["prompt"], item["target"], item["answer"])
            return float(tasks[key].verify(ex, decode(list(completion))))
        return verify


@dataclasses.dataclass(frozen=True)
class JsonlSource:
    """GSM8K / Math500-style local JSONL problems (`jaxkv.tasks.jsonl.read_jsonl`) for real
    models: prompt = `template.format(question=...)` encoded with the model's tokenizer (its
    post-processor adds BOS); reward = `answers_match(extract_final_answer(completion), gold)`."""

    path: str
    template: str = "{question}"
    question_key: Optional[str] = None
    answer_key: Optional[str] = None

    def __post_init__(self):
        if "{question}" not in self.template:
            raise ValueError(f"template={self.template!r}: must contain '{{question}}'")

    @property
    def eos_ids(self) -> Optional[Tuple[int, ...]]:
        return None  # the model config's

    def default_max_new_tokens(self) -> int:
        raise ValueError("max_new_tokens: set it in the config for a JsonlSource")

    def pool(self, n: int, seed: int, model) -> List[Item]:
        from jaxkv.tasks.jsonl import read_jsonl
        if model.tokenizer is None:
            raise ValueError(f"model {model.path!r} has no tokenizer.json; a JsonlSource needs "
                             f"one to encode its questions")
        problems = read_jsonl(self.path, self.question_key, self.answer_key)
        order = np.random.default_rng([seed, 2]).permutation(len(problems))[:n]
        items = []
        for i in sorted(order.tolist()):
            p = problems[i]
            text = self.template.format(question=p.question)
            items.append({"source": f"{os.path.basename(p.source)}:{p.line}", "prompt": text,
                          "answer": p.answer, "prompt_ids": model.encode(text)})
        return items

    def make_verifier(self, model) -> Callable[[Item, Sequence[int]], float]:
        from jaxkv.tasks.jsonl import answers_match, extract_final_answer

        def verify(item: Item, completion: Sequence[int]) -> float:
            text = model.decode(list(completion))
            return float(answers_match(extract_final_answer(text), item["answer"]))
        return verify


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Real-text tasks (`jaxkv.tasks.text`, e.g. "copy_list") for real models: prompts of each
    of `lengths` tokens made with the model's tokenizer (wrapped in its chat template when
    `chat`); reward = RULER's score of the decoded completion (`score_text`: 1.0 when every
    expected string is found). `tasks`: (name, settings) pairs, settings a tuple of (key, value)
    pairs; the pool is split evenly over tasks x lengths."""

    tasks: Tuple[Tuple[str, Tuple[Tuple[str, Any], ...]], ...]
    lengths: Tuple[int, ...] = (1024,)
    chat: bool = True

    def __post_init__(self):
        from jaxkv.tasks.text import text_task
        if not self.tasks:
            raise ValueError("tasks: give at least one (name, settings) pair")
        for name, settings in self.tasks:
            text_task(name, **dict(settings))  # validates name and settings
        if not self.lengths:
            raise ValueError(f"lengths={self.lengths!r}: give at least one prompt length")
        for i, n in enumerate(self.lengths):
            check_int(f"lengths[{i}]", n, 1)  # prompt tokens

    @property
    def eos_ids(self) -> Optional[Tuple[int, ...]]:
        return None  # the model config's

    def default_max_new_tokens(self) -> int:
        from jaxkv.tasks.text import text_task
        return max(text_task(name, **dict(st)).max_new_tokens for name, st in self.tasks)

    def pool(self, n: int, seed: int, model) -> List[Item]:
        from jaxkv.tasks.text import make_text_examples
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("TextSource: the model has no tokenizer; the real-text tasks need one")
        combos = [(name, dict(st), length) for name, st in self.tasks for length in self.lengths]
        counts = _largest_remainder(np.full(len(combos), n / len(combos)))
        items: List[Item] = []
        for i, ((name, settings, length), count) in enumerate(zip(combos, counts)):
            if count == 0:
                continue
            for ex in make_text_examples(name, model.tokenizer, length, int(count), seed + i,
                                         chat=self.chat, **settings):
                items.append({"source": f"{name}@{length}", "task": name, "settings": settings,
                              "length": length, "answers": list(ex.answers),
                              "metric": ex.metric, "max_new_tokens": ex.max_new_tokens,
                              "prompt_ids": list(ex.prompt_ids)})
        return items

    def make_verifier(self, model) -> Callable[[Item, Sequence[int]], float]:
        from jaxkv.tasks.text import TextExample, score_text

        def verify(item: Item, completion: Sequence[int]) -> float:
            ex = TextExample(task=item["task"], prompt_text="", prompt_ids=[],
                             answers=tuple(item["answers"]), length=item["length"],
                             max_new_tokens=item["max_new_tokens"], metric=item["metric"])
            return float(score_text(ex, model.decode(list(completion))))
        return verify


Source = Union[EmbeddedSource, JsonlSource, TextSource]


def stratified_by_length(lengths, n: int, rng: np.random.Generator, strata: int = 4,
                         power: float = 1.0) -> np.ndarray:
    """Indices of `n` items drawn without replacement, stratified by output length.

    Items fall into `strata` equal-width bins of length; stratum b gets a share
    ~ count_b * (mean length_b)^power of the n places (power 0: proportional, i.e. a plain random
    sample; power 1: long outputs over-represented in proportion to their length), by largest
    remainder, capped at the stratum's size, the leftover going to the longest strata first.
    All items when n >= len(lengths). Sorted indices.
    """
    lengths = np.asarray(lengths, np.float64)
    m = lengths.size
    if n >= m:
        return np.arange(m)
    lo, hi = float(lengths.min()), float(lengths.max())
    if hi == lo:
        bins = np.zeros(m, np.int64)
    else:
        bins = np.minimum(((lengths - lo) / (hi - lo) * strata).astype(np.int64), strata - 1)
    ids = [np.flatnonzero(bins == b) for b in range(strata)]
    counts = np.array([len(i) for i in ids], np.float64)
    means = np.array([lengths[i].mean() if len(i) else 0.0 for i in ids])
    share = counts * np.maximum(means, 1e-9) ** power
    quota = np.minimum(_largest_remainder(n * share / share.sum()), counts.astype(np.int64))
    for b in range(strata - 1, -1, -1):  # leftover places: longest strata first
        extra = min(n - int(quota.sum()), int(counts[b]) - int(quota[b]))
        quota[b] += max(extra, 0)
    picked = [rng.choice(i, size=int(q), replace=False) for i, q in zip(ids, quota) if q > 0]
    return np.sort(np.concatenate(picked))


def _largest_remainder(x) -> np.ndarray:
    """Round non-negative reals to integers with the same (rounded) total."""
    x = np.asarray(x, np.float64)
    floor = np.floor(x).astype(np.int64)
    short = int(round(x.sum())) - int(floor.sum())
    order = np.argsort(-(x - floor), kind="stable")
    floor[order[:max(short, 0)]] += 1
    return floor


def step_indices(n_items: int, step: int, per_step: int, seed: int) -> np.ndarray:
    """Training-set indices of `step`: consecutive slices of per-epoch permutations
    (`default_rng([seed, 1, epoch])`), so every item is seen once per epoch."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, n_items)
        out.append(int(epoch_perm(n_items, seed, epoch)[pos]))
    return np.array(out, np.int64)


@functools.lru_cache(maxsize=8)
def epoch_perm(n_items: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 1, epoch]).permutation(n_items)
