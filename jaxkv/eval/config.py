"""What an evaluation runs: `EvalConfig`, a frozen, self-validating dataclass."""
from __future__ import annotations

import ast
import dataclasses
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from jaxkv.model.config import normalize_dtype
from jaxkv.policies.base import check_budget
from jaxkv.policies.registry import check_method

FULL = "full"
_VARIANT = re.compile(r"^([A-Za-z0-9_]+)\[(.*)\]$")


def split_method(label: str) -> Tuple[str, Dict[str, Any]]:
    """A method label -> (registered name, settings): "snapkv" -> ("snapkv", {});
    "snapkv[span=10]" -> ("snapkv", {"span": 10}); "random_heads[seed=1]"; several settings
    separated by ';' or ',' ("grkv[span=10;lam=0.001]"; so no value holds either). Values are Python literals (numbers, True,
    'text'), anything else a plain string (a path). A variant is its own method in a sweep: its
    own records and resume key, the same prompts."""
    m = _VARIANT.match(label) if isinstance(label, str) else None
    if m is None:
        return label, {}
    name, body = m.group(1), m.group(2)
    settings: Dict[str, Any] = {}
    for part in (p.strip() for p in re.split(r"[;,]", body)):
        if not part:
            continue
        key, eq, text = part.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"method {label!r}: settings in [...] are key=value pairs separated "
                             f"by ';' or ',', got {part!r}")
        try:
            settings[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            settings[key] = text.strip()
    return name, settings


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Methods x budgets x tasks x prompt lengths, on the same examples.

    tasks: real-text task names (`jaxkv.tasks.TEXT_TASKS`: passkey, niah_single_2, vt, ...) for a
        real model, or the in-house tasks (`jaxkv.tasks.TASKS`) for the in-house tiny models; the
        model decides which family a name means (`jaxkv.eval.prompts.task_suite`).
    lengths: prompt lengths in tokens for the real-text tasks (each task at each length); ignored
        by the in-house tasks, whose prompts have their own sizes. () means (4096,) for text.
    A method may carry settings in its label, "name[key=value;...]" (`split_method`: e.g.
    "snapkv[span=10]", "random_heads[seed=1]"), a variant with its own records.
    `method_settings[name]` goes to that method's factory as keywords (over the label's); `task_settings[name]`
    overrides that task's defaults. `max_new_tokens=None`: the task's own answer length (RULER's
    per-task lengths for text; the longest target for in-house tasks). `chat`: wrap text prompts
    in the model's chat template (None: when it has one); off by default, as RULER prompts
    continue the text after an answer prefix (SmolLM2-135M-Instruct answers passkey 4/4 at 2K
    plainly, 0/4 in its chat template). `out_dir=None` writes nothing and
    resumes nothing; a path that is a file is refused.
    """

    methods: Tuple[str, ...]
    budgets: Tuple[float, ...]
    tasks: Tuple[str, ...]
    lengths: Tuple[int, ...] = ()
    n_samples: int = 200
    batch_size: int = 32
    seed: int = 0
    max_new_tokens: Optional[int] = None
    chat: Optional[bool] = False
    method_settings: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    task_settings: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    out_dir: Optional[str] = None
    #: (method A, method B) pairs whose paired bootstrap difference A - B `paired_comparisons`
    #: reports per task and budget and pooled over tasks (written to out_dir/paired.json).
    pairs: Tuple[Tuple[str, str], ...] = ()
    #: The model `python -m train eval` runs this config on unless --model says otherwise: a
    #: registered name (`jaxkv.available_models()`), a checkpoint folder or a .gguf file; None:
    #: the in-house default ("tiny").
    model: Optional[str] = None
    #: the dtype the model is loaded in by `python -m train eval`
    dtype: str = "float32"
    #: None: every method of a batch shares one prefill. k: the methods run in groups of k, each
    #: group through all batches before the next, still one prefill per batch (the first group
    #: to run a batch stores its prefill in a temporary folder, the later ones load it), and the
    #: compiled programs of a group are released before the next (`jaxkv.generate.
    #: release_compiled`). Bounds memory: on XLA:CPU each method whose cache has its own layout
    #: keeps about 0.6 GB of compiled programs alive (SmolLM2, 4K tokens), so the 39 methods x
    #: budgets of configs/eval_real.py in one group outgrew 24 GB. Results are the same either way
    #: (not part of the resume key).
    methods_per_prefill: Optional[int] = None

    def __post_init__(self):
        methods = _as_str_tuple(self.methods, "methods")
        for i, m in enumerate(methods):
            check_method(split_method(m)[0], f"methods[{i}]")
        tasks = _as_str_tuple(self.tasks, "tasks")
        from jaxkv.tasks import TASKS, TEXT_TASKS
        for i, t in enumerate(tasks):
            if t not in TASKS and t not in TEXT_TASKS:
                raise ValueError(f"tasks[{i}]={t!r}: unknown task; real-text tasks are "
                                 f"{', '.join(TEXT_TASKS)}; in-house tasks are "
                                 f"{', '.join(sorted(TASKS))}")
        budgets = self.budgets
        if isinstance(budgets, (int, float)):
            budgets = (budgets,)
        if not isinstance(budgets, Sequence):
            raise ValueError(f"budgets={budgets!r}: give a tuple of fractions in (0, 1]")
        budgets = tuple(check_budget(b, f"budgets[{i}]") for i, b in enumerate(budgets))
        if len(set(budgets)) != len(budgets):
            raise ValueError(f"budgets={budgets!r}: contains duplicates")
        if not budgets and any(m != FULL for m in methods):
            raise ValueError("budgets=(): methods other than 'full' need at least one budget")
        lengths = self.lengths
        if isinstance(lengths, (int, np.integer)) and not isinstance(lengths, bool):
            lengths = (lengths,)
        if not isinstance(lengths, Sequence) or isinstance(lengths, str):
            raise ValueError(f"lengths={lengths!r}: give a tuple of prompt lengths in tokens")
        for i, n in enumerate(lengths):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 64:
                raise ValueError(f"lengths[{i}]={n!r}: must be an integer >= 64 (tokens)")
        lengths = tuple(int(n) for n in lengths)
        if len(set(lengths)) != len(lengths):
            raise ValueError(f"lengths={lengths!r}: contains duplicates")
        for name in ("n_samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        mpp = self.methods_per_prefill
        if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, int) or mpp < 1):
            raise ValueError(f"methods_per_prefill={mpp!r}: must be None (all methods share one "
                             f"prefill) or a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed={self.seed!r}: must be an integer")
        mnt = self.max_new_tokens
        if mnt is not None and (isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1):
            raise ValueError(f"max_new_tokens={mnt!r}: must be None (derive from the task) or a "
                             f"positive integer")
        if self.chat is not None and not isinstance(self.chat, bool):
            raise ValueError(f"chat={self.chat!r}: must be None (the model decides), True or "
                             f"False")
        method_settings = _settings_map(self.method_settings, "method_settings", methods)
        task_settings = _settings_map(self.task_settings, "task_settings", tasks)
        out_dir = None if self.out_dir is None else os.fspath(self.out_dir)
        if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ValueError(f"out_dir={out_dir!r} is a file; give a folder for results.json "
                             f"and the plot")
        pairs = tuple(tuple(p) for p in self.pairs)
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or any(m not in methods for m in pair):
                raise ValueError(f"pairs[{i}]={pair!r}: must be two of the configured methods "
                                 f"{', '.join(methods)}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"model={self.model!r}: give a registered model name, a checkpoint "
                             f"folder or a .gguf file, or None for the in-house default")
        for name, value in (("methods", methods), ("tasks", tasks), ("budgets", budgets),
                            ("lengths", lengths), ("seed", int(self.seed)),
                            ("method_settings", method_settings),
                            ("task_settings", task_settings), ("out_dir", out_dir),
                            ("pairs", pairs), ("dtype", normalize_dtype(self.dtype))):
            object.__setattr__(self, name, value)

    def budgets_for(self, method: str) -> Tuple[float, ...]:
        return (1.0,) if method == FULL else self.budgets


def _as_str_tuple(value, name: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = tuple(v for v in value.split(",") if v) if "," in value else (value,)
    if not isinstance(value, Sequence) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name}={value!r}: give a non-empty tuple of names")
    value = tuple(value)
    if len(set(value)) != len(value):
        raise ValueError(f"{name}={value!r}: contains duplicates")
    return value


def _settings_map(value, name: str, allowed: Tuple[str, ...]) -> Dict[str, Dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}={value!r}: give a mapping name -> dict of settings")
    out = {}
    for key, settings in value.items():
        if key not in allowed:
            raise ValueError(f"{name}: key {key!r} is not among the configured names "
                             f"{', '.join(allowed)}")
        if not isinstance(settings, Mapping):
            raise ValueError(f"{name}[{key!r}]={settings!r}: must be a dict of settings")
        out[key] = dict(settings)
    return out


__all__ = ["EvalConfig", "FULL", "split_method"]
