"""One evaluation harness for every method: methods x budgets x tasks on the same examples.

    config = EvalConfig(methods=("full", "snapkv"), budgets=(0.1, 0.2), tasks=("running_sum",),
                        out_dir="runs/eval")
    records = evaluate(model, config)       # resumes from out_dir/results.json if it exists
    print(format_table(records))

Each task's `n_samples` examples are drawn once (`jaxkv.tasks.sample_examples(task, n, seed)`)
and every method and budget answers the same ones, so comparisons are paired: each record keeps
the per-example 0/1 list under "correct" and `paired_bootstrap` gives a confidence interval for
the difference of two methods. Decoding is greedy; the completion is cut at the first EOS,
decoded with the tasks' word vocabulary and checked by the task's exact verifier.

A record (one per task, method and requested budget; "full" once per task at budget 1.0):

    task, family, method, budget (requested), measured_budget (= cache_bytes / full_cache_bytes),
    accuracy, n, ci_low, ci_high (Wilson 95%), cache_bytes, full_cache_bytes (summed over
    batches, read off the arrays), correct (0/1 per example, in sampling order), seed,
    max_new_tokens, task_settings, method_settings, seconds, examples (a few completions)

Resumption: a record already in out_dir/results.json with the same task, method, budget, n, seed,
task settings and method settings is reused instead of recomputed. Use one out_dir per model: the
model is not part of that key.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from jaxkv.jsonio import write_json_atomic
from jaxkv.policies.base import check_budget
from jaxkv.policies.registry import check_method, make_policy

FULL = "full"
RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy_vs_budget.png"
_Z95 = 1.959963984540054  # two-sided 95% standard normal quantile
_N_SHOWN = 3  # completions kept per record under "examples", for inspection


# ---- configuration ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. `method_settings[name]` goes to that method's factory as keywords;
    `task_settings[name]` overrides that task's defaults (`jaxkv.tasks.make_task(name, **s)`).
    `max_new_tokens=None` uses, per task, the longest target any of its sampled prompts allows
    (`task.max_len - shortest prompt`). `out_dir=None` writes nothing (and resumes nothing)."""

    methods: Tuple[str, ...]
    budgets: Tuple[float, ...]
    tasks: Tuple[str, ...]
    n_samples: int = 200
    batch_size: int = 32
    seed: int = 0
    max_new_tokens: Optional[int] = None
    method_settings: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    task_settings: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    out_dir: Optional[str] = None
    #: (method A, method B) pairs whose paired bootstrap difference A - B `paired_comparisons`
    #: reports per task and budget and pooled over tasks (written to out_dir/paired.json).
    pairs: Tuple[Tuple[str, str], ...] = ()
    #: The model `python -m train eval` runs this config on unless --model says otherwise: an
    #: embedded model's name (`jaxkv.embedded.EMBEDDED_CONFIGS`, e.g. the one a config's published
    #: figures were measured on) or a model folder; None: the embedded default.
    model: Optional[str] = None

    def __post_init__(self):
        methods = _as_str_tuple(self.methods, "methods")
        for i, m in enumerate(methods):
            check_method(m, f"methods[{i}]")
        tasks = _as_str_tuple(self.tasks, "tasks")
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
        for name in ("n_samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed={self.seed!r}: must be an integer")
        mnt = self.max_new_tokens
        if mnt is not None and (isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1):
            raise ValueError(f"max_new_tokens={mnt!r}: must be None (derive from the task) or a "
                             f"positive integer")
        method_settings = _settings_map(self.method_settings, "method_settings", methods)
        task_settings = _settings_map(self.task_settings, "task_settings", tasks)
        from jaxkv import tasks as tasks_api
        for name in tasks:  # unknown task or setting -> ValueError from make_task
            tasks_api.make_task(name, **task_settings.get(name, {}))
        out_dir = None if self.out_dir is None else os.fspath(self.out_dir)
        pairs = tuple(tuple(p) for p in self.pairs)
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or any(m not in methods for m in pair):
                raise ValueError(f"pairs[{i}]={pair!r}: must be two of the configured methods "
                                 f"{', '.join(methods)}")
        object.__setattr__(self, "pairs", pairs)
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"model={self.model!r}: give an embedded model's name or a model "
                             f"folder, or None for the embedded default")
        for name, value in (("methods", methods), ("tasks", tasks), ("budgets", budgets),
                            ("seed", int(self.seed)), ("method_settings", method_settings),
                            ("task_settings", task_settings), ("out_dir", out_dir)):
            object.__setattr__(self, name, value)


def _as_str_tuple(value, name: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
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


# ---- statistics ---------------------------------------------------------------------------------

def wilson_interval(k: float, n: int, z: float = _Z95) -> Tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default); (0, 1) when n = 0.
    k may be fractional (an averaged count)."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def paired_bootstrap(correct_a: Sequence[float], correct_b: Sequence[float], n_boot: int = 10000,
                     seed: int = 0, level: float = 0.95) -> Tuple[float, float, float]:
    """Mean of (a - b) over the same examples and its percentile bootstrap interval.

    Resamples examples with replacement (keeping each a/b pair together) `n_boot` times.
    Returns (mean_diff, lo, hi) for method A minus method B.
    """
    a = np.asarray(correct_a, np.float64).ravel()
    b = np.asarray(correct_b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: correct_a has {a.size} examples, correct_b has "
                         f"{b.size}; a paired comparison needs the same examples")
    if a.size == 0:
        raise ValueError("paired_bootstrap: no examples")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r}: must be a positive integer")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: must lie in (0, 1)")
    diff = a - b
    rng = np.random.default_rng(seed)
    n = diff.size
    means = np.empty(n_boot, np.float64)
    chunk = max(1, 4_000_000 // n)  # bound the index array to ~32 MB
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(diff.mean()), float(lo), float(hi)


# ---- evaluation ---------------------------------------------------------------------------------

def _canon(settings: Mapping[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=repr)


def record_key(record: Mapping[str, Any]) -> tuple:
    """What identifies a record for resumption."""
    return (record["task"], record["method"], float(record["budget"]), int(record["n"]),
            int(record["seed"]), _canon(record.get("task_settings") or {}),
            _canon(record.get("method_settings") or {}))


def load_results(out_dir) -> List[dict]:
    """Records in out_dir/results.json ([] if there is none)."""
    path = os.path.join(os.fspath(out_dir), RESULTS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _budgets_for(method: str, config: EvalConfig) -> Tuple[float, ...]:
    return (1.0,) if method == FULL else config.budgets


def _max_new_tokens(task, examples, config: EvalConfig) -> int:
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    # Every example satisfies len(prompt_ids) + len(target_ids) <= task.max_len.
    bound = task.max_len - min(len(ex.prompt_ids) for ex in examples)
    return max(bound, max(len(ex.target_ids) for ex in examples))


def _batches(examples, batch_size: int) -> List[List[int]]:
    """Example indices grouped by prompt length (sorted), so a batch pads little."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].prompt_ids), i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _run_batches(model, task, examples, policy, batches, batch_size, max_new_tokens, pbar):
    """Generate greedily for every batch; returns (correct, cache_bytes, full_bytes, completions).

    A short last batch is padded to `batch_size` with copies of its last prompt so that it reuses
    the compiled program; the byte counts of such a batch are scaled to its real rows (cache bytes
    are linear in the batch: every row holds the same arrays)."""
    from jaxkv.tasks import vocab

    # `jaxkv.generate` is also a lazy attribute (the function) of the package: import the module.
    generate_mod = importlib.import_module("jaxkv.generate")

    correct = [0] * len(examples)
    completions: List[Optional[str]] = [None] * len(examples)
    cache_bytes = 0.0
    full_bytes = 0.0
    eos = vocab.EOS_ID
    for idx in batches:
        rows = list(idx)
        if len(batches) > 1 and len(rows) < batch_size:
            rows += [rows[-1]] * (batch_size - len(rows))
        gen = generate_mod.generate(model, [examples[i].prompt_ids for i in rows],
                                    max_new_tokens=max_new_tokens, policy=policy,
                                    temperature=0.0, eos_ids=[eos])
        share = len(idx) / len(rows)
        cache_bytes += gen.cache_bytes * share
        full_bytes += gen.full_cache_bytes * share
        for i, toks in zip(idx, gen.tokens):
            toks = [int(t) for t in toks]
            if eos in toks:
                toks = toks[:toks.index(eos)]
            # a model whose embedding table is wider than the task vocabulary may emit ids
            # past it: they read as <unk> (and so never match an answer)
            toks = [t if 0 <= t < vocab.VOCAB_SIZE else vocab.UNK_ID for t in toks]
            text = vocab.decode(toks)
            completions[i] = text
            correct[i] = int(bool(task.verify(examples[i], text)))
        if pbar is not None:
            pbar.update(1)
    return correct, int(round(cache_bytes)), int(round(full_bytes)), completions


def _make_record(task_name, task, method, budget, examples, correct, cache_bytes, full_bytes,
                 completions, config, max_new_tokens, seconds) -> dict:
    n = len(correct)
    k = int(sum(correct))
    lo, hi = wilson_interval(k, n)
    return {
        "task": task_name,
        "family": task.family,
        "method": method,
        "budget": float(budget),
        "measured_budget": cache_bytes / full_bytes if full_bytes else float("nan"),
        "accuracy": k / n,
        "n": n,
        "ci_low": lo,
        "ci_high": hi,
        "cache_bytes": cache_bytes,
        "full_cache_bytes": full_bytes,
        "correct": [int(c) for c in correct],
        "seed": config.seed,
        "max_new_tokens": max_new_tokens,
        "task_settings": dict(config.task_settings.get(task_name, {})),
        "method_settings": dict(config.method_settings.get(method, {})),
        "seconds": round(seconds, 3),
        "examples": [{"answer": ex.answer, "completion": c}
                     for ex, c in zip(examples[:_N_SHOWN], completions[:_N_SHOWN])],
    }


def evaluate(model, config: EvalConfig, progress: bool = True) -> List[dict]:
    """Run every (task, method, budget) of `config`; returns their records (see module doc).

    With `config.out_dir`, records already in out_dir/results.json for the same key are reused
    (and said so), and results.json is rewritten after every new record, so an interrupted run
    continues where it stopped; the plot is written at the end. Records in the file for other
    keys are kept in the file but not returned.
    """
    from tqdm.auto import tqdm

    from jaxkv import tasks as tasks_api

    if not isinstance(config, EvalConfig):
        raise ValueError(f"config: expected an EvalConfig, got {type(config).__name__}")

    def say(msg: str) -> None:
        if progress:
            tqdm.write(msg)

    previous: Dict[tuple, dict] = {}
    foreign: List[Any] = []  # entries of results.json that are not records: kept as they are
    for rec in load_results(config.out_dir) if config.out_dir is not None else []:
        if _has_key(rec):
            previous[record_key(rec)] = rec
        else:
            foreign.append(rec)

    # Plan: which (task, method, budget) still need running; sample each task's examples once.
    plan = []  # (task_name, task, examples, max_new_tokens, batches, jobs)
    results: Dict[tuple, dict] = {}
    total_batches = 0
    for task_name in config.tasks:
        task = tasks_api.make_task(task_name, **config.task_settings.get(task_name, {}))
        jobs = []
        for method in config.methods:
            for budget in _budgets_for(method, config):
                key = record_key({"task": task_name, "method": method, "budget": budget,
                                  "n": config.n_samples, "seed": config.seed,
                                  "task_settings": config.task_settings.get(task_name, {}),
                                  "method_settings": config.method_settings.get(method, {})})
                if key in previous:
                    results[key] = previous[key]
                    say(f"skip {task_name} / {method} @ {budget:g}: already in "
                        f"{os.path.join(config.out_dir, RESULTS_FILE)}")
                else:
                    jobs.append((method, budget, key))
        if not jobs:
            continue
        examples = tasks_api.sample_examples(task, config.n_samples, config.seed)
        batches = _batches(examples, config.batch_size)
        plan.append((task_name, task, examples, _max_new_tokens(task, examples, config), batches,
                     jobs))
        total_batches += len(batches) * len(jobs)

    def ordered() -> List[dict]:
        out = []
        for task_name in config.tasks:
            for method in config.methods:
                for budget in _budgets_for(method, config):
                    for key, rec in results.items():
                        if key[:3] == (task_name, method, float(budget)):
                            out.append(rec)
        return out

    def save(final: bool) -> None:
        if config.out_dir is None:
            return
        mine = ordered()
        keys = {record_key(r) for r in mine}
        kept = foreign + [r for k, r in previous.items() if k not in keys]
        if final:
            write_results(kept + mine, config.out_dir, plot_records=mine)
        else:
            _write_json_atomic(kept + mine, os.path.join(config.out_dir, RESULTS_FILE))

    pbar = tqdm(total=total_batches, disable=not progress or total_batches == 0, desc="eval",
                unit="batch")
    try:
        for task_name, task, examples, mnt, batches, jobs in plan:
            for method, budget, key in jobs:
                pbar.set_description(f"{task_name} {method}@{budget:g}")
                settings = config.method_settings.get(method, {})
                policy = make_policy(method, budget, model, **settings)
                start = time.perf_counter()
                correct, cache_b, full_b, completions = _run_batches(
                    model, task, examples, policy, batches, config.batch_size, mnt, pbar)
                results[key] = _make_record(task_name, task, method, budget, examples, correct,
                                            cache_b, full_b, completions, config, mnt,
                                            time.perf_counter() - start)
                save(final=False)
    finally:
        pbar.close()
    files = [os.path.join(config.out_dir, f) for f in (RESULTS_FILE, PLOT_FILE)] \
        if config.out_dir is not None else []
    if total_batches or not all(os.path.exists(f) for f in files):
        save(final=True)  # (nothing new and both files there: leave them as they are)
    return ordered()


def _has_key(record) -> bool:
    try:
        record_key(record)
        return True
    except (KeyError, TypeError, ValueError):
        return False


# ---- summaries ----------------------------------------------------------------------------------

def family_averages(records: Sequence[Mapping[str, Any]]) -> List[dict]:
    """Unweighted mean accuracy over the tasks of each family, per method and budget.

    Returns [] unless the records span several tasks. `n` is the total number of examples and
    the interval is Wilson's for accuracy * n successes out of n (exact pooling when every task
    has the same n); measured_budget is bytes-weighted over the tasks.
    """
    if len({r["task"] for r in records}) < 2:
        return []
    groups: Dict[tuple, List[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r.get("family", "?"), r["method"], float(r["budget"])), []).append(r)
    out = []
    for (family, method, budget), rs in groups.items():
        acc = float(np.mean([r["accuracy"] for r in rs]))
        total = int(sum(r["n"] for r in rs))
        lo, hi = wilson_interval(acc * total, total)
        cache = sum(r.get("cache_bytes", 0) for r in rs)
        full = sum(r.get("full_cache_bytes", 0) for r in rs)
        out.append({"task": f"avg:{family}", "family": family, "method": method,
                    "budget": budget, "measured_budget": cache / full if full else float("nan"),
                    "accuracy": acc, "n": total, "ci_low": lo, "ci_high": hi,
                    "tasks": [r["task"] for r in rs]})
    return out


def format_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table: task, method, budget, measured budget, accuracy [95% CI], n; family
    averages follow when the records span several tasks."""
    rows = list(records) + family_averages(records)
    header = ("task", "method", "budget", "measured", "accuracy [95% CI]", "n")
    lines = [header]
    for r in rows:
        measured = r.get("measured_budget")
        lines.append((
            str(r["task"]), str(r["method"]), f"{float(r['budget']):.3g}",
            "-" if measured is None else f"{float(measured):.4f}",
            f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", str(r["n"])))
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = []
    for j, line in enumerate(lines):
        text.append("  ".join(cell.ljust(w) if c < 2 else cell.rjust(w)
                              for c, (cell, w) in enumerate(zip(line, widths))).rstrip())
        if j == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


# ---- output -------------------------------------------------------------------------------------

def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return repr(obj)


def _write_json_atomic(obj, path: str) -> None:
    write_json_atomic(obj, path, indent=1, default=_json_default)


def plot_accuracy_vs_budget(records: Sequence[Mapping[str, Any]], path: str) -> None:
    """One subplot per task: accuracy vs measured budget per method with 95% CI error bars;
    the full cache is a dashed horizontal line (its CI a light band)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed; a no-op when Agg is already in use
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(r["task"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    ncols = min(3, max(1, len(task_names)))
    nrows = max(1, -(-len(task_names) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.ravel()[len(task_names):]:
        ax.set_visible(False)
    for ax, task_name in zip(axes.ravel(), task_names):
        rs = [r for r in records if r["task"] == task_name]
        for method in methods:
            mr = sorted((r for r in rs if r["method"] == method),
                        key=lambda r: r.get("measured_budget", r["budget"]))
            if not mr:
                continue
            if method == FULL:
                for r in mr:
                    ax.axhline(r["accuracy"], color=colors[method], linestyle="--",
                               label=f"{method} ({r['accuracy']:.2f})")
                    ax.axhspan(r["ci_low"], r["ci_high"], color=colors[method], alpha=0.08)
                continue
            x = [r.get("measured_budget", r["budget"]) for r in mr]
            y = np.array([r["accuracy"] for r in mr])
            err = np.array([[a - r["ci_low"] for a, r in zip(y, mr)],
                            [r["ci_high"] - a for a, r in zip(y, mr)]])
            ax.errorbar(x, y, yerr=np.clip(err, 0, None), marker="o", capsize=3,
                        color=colors[method], label=method)
        xs = [r.get("measured_budget", r["budget"]) for r in rs if r["method"] != FULL]
        xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
        if xs and max(xs) / min(xs) > 20:  # e.g. 1% .. 50%: spread the small budgets out
            ax.set_xscale("log")
        ax.set_title(task_name)
        ax.set_xlabel("measured cache budget (fraction of full)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".plot-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


PAIRED_FILE = "paired.json"


def paired_comparisons(records: Sequence[Mapping[str, Any]], pairs, n_boot: int = 10000,
                       seed: int = 0) -> List[dict]:
    """Paired bootstrap of method A minus method B on the same examples, for every
    (A, B) in `pairs`, every requested budget and every task, plus "all" (the examples of every
    task pooled). Returns dicts {task, budget, a, b, n, acc_a, acc_b, diff, lo, hi}."""
    by_key = {(r["task"], r["method"], r["budget"]): r for r in records if "task" in r}
    out = []
    for a, b in pairs:
        budgets = sorted({k[2] for k in by_key if k[1] in (a, b)})
        for budget in budgets:
            pooled_a, pooled_b = [], []
            tasks = sorted({k[0] for k in by_key if k[1] == a and k[2] == budget})
            for task in tasks:
                ra, rb = by_key.get((task, a, budget)), by_key.get((task, b, budget))
                if ra is None or rb is None or len(ra["correct"]) != len(rb["correct"]):
                    continue
                diff, lo, hi = paired_bootstrap(ra["correct"], rb["correct"], n_boot, seed)
                out.append(dict(task=task, budget=budget, a=a, b=b, n=len(ra["correct"]),
                                acc_a=ra["accuracy"], acc_b=rb["accuracy"], diff=diff, lo=lo, hi=hi))
                pooled_a += list(ra["correct"])
                pooled_b += list(rb["correct"])
            if pooled_a:
                diff, lo, hi = paired_bootstrap(pooled_a, pooled_b, n_boot, seed)
                out.append(dict(task="all", budget=budget, a=a, b=b, n=len(pooled_a),
                                acc_a=float(np.mean(pooled_a)), acc_b=float(np.mean(pooled_b)),
                                diff=diff, lo=lo, hi=hi))
    return out


def format_paired(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"{'A - B':32s} {'task':18s} {'budget':>6} {'n':>5} {'acc A':>6} {'acc B':>6} "
             f"{'diff':>7} {'95% CI':>17}"]
    for r in rows:
        lines.append(f"{r['a'] + ' - ' + r['b']:32s} {r['task']:18s} {r['budget']:>6} {r['n']:>5} "
                     f"{r['acc_a']:>6.3f} {r['acc_b']:>6.3f} {r['diff']:>+7.3f} "
                     f"[{r['lo']:+.3f}, {r['hi']:+.3f}]")
    return "\n".join(lines)


def write_results(records: Sequence[Mapping[str, Any]], out_dir,
                  plot_records: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
    """Write out_dir/results.json (atomically: temp file + os.replace) and
    out_dir/accuracy_vs_budget.png (of `plot_records`, default all records)."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    records = list(records)
    _write_json_atomic(records, os.path.join(out_dir, RESULTS_FILE))
    to_plot = [r for r in (records if plot_records is None else plot_records) if "task" in r]
    if to_plot:
        plot_accuracy_vs_budget(to_plot, os.path.join(out_dir, PLOT_FILE))


__all__ = ["EvalConfig", "evaluate", "paired_bootstrap", "wilson_interval", "write_results",
           "load_results", "format_table", "family_averages", "plot_accuracy_vs_budget",
           "record_key", "paired_comparisons", "format_paired"]
