"""The evaluation loop: every (task, length) x (method, budget) on the same examples, one prefill
per prompt batch shared by every method, resumable batch by batch.

    config = EvalConfig(methods=("full", "snapkv"), budgets=(0.1, 0.25), tasks=("passkey",),
                        lengths=(2048,), n_samples=32, out_dir="runs/eval")
    records = evaluate(model, config)      # resumes from out_dir if it holds earlier work

For each task and length the prompts are drawn once (`jaxkv.eval.prompts.prompt_set`), so every
method and budget answers the same ones and comparisons are paired. Each batch of prompts is
prefilled once (`jaxkv.generate.generate_shared`): the dense prompt cache and the queries each
policy observes are kept, then every method compresses them and decodes greedily. Every method's
prefill in jaxkv is the plain dense one (compression happens after each layer's attention), so
this gives the tokens a separate `generate` per method gives. With `methods_per_prefill` the
methods run in groups whose compiled programs are freed before the next group; the groups still
share one prefill per batch (the first stores it in a temporary folder, the last removes it).

A record (one per task, length, method and requested budget; "full" once at budget 1.0):

    task, family, length (requested prompt tokens; None for in-house tasks), prompt_tokens (mean),
    method, budget (requested), measured_budget (= cache_bytes / full_cache_bytes), accuracy
    (mean score), n, ci_low, ci_high (Wilson 95%), cache_bytes, full_cache_bytes (summed over
    batches, read off the arrays), correct (the score of each example in sampling order: 0/1,
    or RULER's fraction of expected strings found), model {name, fingerprint}, dtype, chat,
    seed, batch_size, max_new_tokens, task_settings, method_settings, seconds (this method's
    compress + decode time, compilation included, plus an equal share of the shared prefills:
    `Generation.seconds`), needle_survival (per example:
    the share of (answer, layer, KV head) triples where some occurrence of the answer kept all
    its tokens right after compression, `jaxkv.tasks.text.needle_survival`; None for the
    aggregation tasks, the in-house tasks and caches that do not report kept positions) and
    needle_survival_mean, examples (a few completions)

Resumption: a record in out_dir/results.json with the same key (`record_key`: task, length,
method, budget, n, seed, model fingerprint, dtype, chat, batch size, max_new_tokens and both
settings) is reused only if the same policy made it (`policy`: the built policy's repr, defaults
included), so a method whose defaults changed is recomputed; a record or a finished batch without
the field cannot show what made it and is recomputed too; any other difference recomputes. Finished batches of unfinished records are
kept in out_dir/partial.json after every batch, so an interrupted run loses at most one batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from jaxkv.eval.config import EvalConfig, split_method
from jaxkv.eval.prompts import PromptSet, batches, prompt_set, resolve_chat, task_suite
from jaxkv.eval.report import (PLOT_FILE, RESULTS_FILE, load_results, write_json,
                               write_results)
from jaxkv.eval.stats import wilson_interval
from jaxkv.tasks.text import needle_survival
from jaxkv.policies.registry import make_policy

PARTIAL_FILE = "partial.json"
_N_SHOWN = 3  # completions kept per record under "examples", for inspection


def _canon(settings: Mapping[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=repr)


def record_key(record: Mapping[str, Any]) -> tuple:
    """What identifies a record for resumption (KeyError for records without these fields)."""
    model = record["model"]
    return (record["task"], record["length"], record["method"], float(record["budget"]),
            int(record["n"]), int(record["seed"]), model["fingerprint"], record["dtype"],
            bool(record["chat"]), int(record["batch_size"]), int(record["max_new_tokens"]),
            _canon(record.get("task_settings") or {}), _canon(record.get("method_settings") or {}))


def model_identity(model) -> Dict[str, str]:
    return {"name": getattr(model, "name", None) or getattr(model, "path", None) or "?",
            "fingerprint": model.fingerprint}


def policy_identity(policy) -> str:
    """What a record remembers of the policy that made it: its repr (every setting, defaults
    included; arrays as their values), so a rerun after a method's defaults changed recomputes
    instead of reusing the record. Fields left out of a dataclass policy's == (KIVI's recorded
    budget) are left out here too."""
    if dataclasses.is_dataclass(policy) and not isinstance(policy, type):
        fields = [f for f in dataclasses.fields(policy) if f.compare]
        return f"{type(policy).__name__}(" + ", ".join(
            f"{f.name}={getattr(policy, f.name)!r}" for f in fields) + ")"
    return repr(policy)


def _has_key(record) -> bool:
    try:
        record_key(record)
        return True
    except (KeyError, TypeError, ValueError):
        return False


class _Job:
    """One record being computed: a method at a budget on one prompt set."""

    def __init__(self, method: str, budget: float, policy, key: tuple, settings: dict):
        self.method, self.budget, self.policy, self.key = method, budget, policy, key
        self.settings = settings

    @property
    def id(self) -> str:
        return json.dumps(self.key)


def evaluate(model, config: EvalConfig, progress: bool = True) -> List[dict]:
    """Run every (task, length, method, budget) of `config` on `model`; returns their records
    (module doc). With `config.out_dir`, earlier records and finished batches are reused, and
    results.json / partial.json are rewritten after every batch; the plot at the end."""
    from tqdm.auto import tqdm

    if not isinstance(config, EvalConfig):
        raise ValueError(f"config: expected an EvalConfig, got {type(config).__name__}")

    def say(msg: str) -> None:
        if progress:
            tqdm.write(msg)

    suite = task_suite(model)
    chat = resolve_chat(model, config.chat) if suite == "text" else False
    ident = model_identity(model)
    dtype = model.config.dtype
    lengths = (config.lengths or (None if suite == "embedded" else 4096,))
    if suite == "embedded":
        lengths = (None,)
    out_dir = config.out_dir
    previous: Dict[tuple, dict] = {}
    foreign: List[Any] = []  # entries of results.json that are not records of this kind: kept
    for rec in load_results(out_dir) if out_dir is not None else []:
        if _has_key(rec):
            previous[record_key(rec)] = rec
        else:
            foreign.append(rec)
    partial = _load_partial(out_dir)

    # Plan: prompts of every (task, length) once; policies built before any work (a method that
    # cannot run on this model fails here, not an hour in).
    plan = []  # (PromptSet, batches, jobs)
    results: Dict[tuple, dict] = {}
    total = 0
    for task in config.tasks:
        settings = config.task_settings.get(task, {})
        for length in lengths:
            pset: Optional[PromptSet] = None
            jobs = []
            for method in config.methods:
                base, inline = split_method(method)
                msettings = {**inline, **config.method_settings.get(method, {})}
                for budget in config.budgets_for(method):
                    if pset is None:
                        pset = prompt_set(model, task, length, config.n_samples, config.seed,
                                          settings, chat, config.max_new_tokens)
                    key = record_key(dict(
                        task=task, length=length, method=method, budget=budget,
                        n=config.n_samples, seed=config.seed, model=ident, dtype=dtype,
                        chat=chat, batch_size=config.batch_size,
                        max_new_tokens=pset.max_new_tokens, task_settings=settings,
                        method_settings=msettings))
                    policy = make_policy(base, budget, model, **msettings)
                    made_by = policy_identity(policy)
                    # a record built by another policy (a method's defaults changed since), or one
                    # that does not say which policy built it, is recomputed
                    if key in previous and previous[key].get("policy") == made_by:
                        results[key] = previous[key]
                        say(f"skip {task}{'' if length is None else f' @ {length}'} / {method} "
                            f"@ {budget:g}: already in {os.path.join(out_dir, RESULTS_FILE)}")
                        continue
                    if key in previous:
                        say(f"redo {task}{'' if length is None else f' @ {length}'} / {method} "
                            f"@ {budget:g}: its policy changed since the saved record")
                    done = partial.get(json.dumps(key), {})
                    for b in [b for b, part in done.items()
                              if part.get("policy") != made_by]:
                        del done[b]  # batches another (or an unrecorded) policy made
                    jobs.append(_Job(method, budget, policy, key, msettings))
            if jobs:
                groups = batches(pset.prompts, config.batch_size)
                k = config.methods_per_prefill or len(jobs)
                chunks = [jobs[i:i + k] for i in range(0, len(jobs), k)]
                plan.append((pset, groups, jobs, chunks))
                total += len(groups) * len(chunks)

    def ordered() -> List[dict]:
        rank = {k: i for i, k in enumerate(results)}
        order = {(t, m): (i, j) for i, t in enumerate(config.tasks)
                 for j, m in enumerate(config.methods)}
        budget_rank = lambda k: list(config.budgets_for(k[2])).index(k[3]) \
            if k[3] in config.budgets_for(k[2]) else k[3]
        return [results[k] for k in sorted(results, key=lambda k: (
            order[(k[0], k[2])][0], -1 if k[1] is None else k[1], order[(k[0], k[2])][1],
            budget_rank(k), rank[k]))]

    def save(final: bool) -> None:
        if out_dir is None:
            return
        mine = ordered()
        keys = {record_key(r) for r in mine}
        kept = foreign + [r for k, r in previous.items() if k not in keys]
        if final:
            write_results(kept + mine, out_dir, plot_records=mine)
        else:
            os.makedirs(out_dir, exist_ok=True)
            write_json(kept + mine, os.path.join(out_dir, RESULTS_FILE))
        write_json(partial, os.path.join(out_dir, PARTIAL_FILE))

    gen_mod = importlib.import_module("jaxkv.generate")  # the module (jaxkv.generate is the fn)
    pbar = tqdm(total=total, disable=not progress or total == 0, desc="eval", unit="batch")
    try:
        for pset, groups, jobs, chunks in plan:
            where = pset.task if pset.length is None else f"{pset.task}@{pset.length}"
            # methods in groups: one prefill per batch all the same, collecting every group's
            # observations, kept on disk from the first group that runs the batch to the last
            observe = _distinct([j.policy for j in jobs]) if len(chunks) > 1 else None
            with (contextlib.nullcontext() if observe is None
                  else tempfile.TemporaryDirectory(prefix="jaxkv_prefill_")) as folder:
                for ci, chunk in enumerate(chunks):
                    group = "" if len(chunks) == 1 else f", group {ci + 1}/{len(chunks)}"
                    ran = False
                    for bi, idx in enumerate(groups):
                        todo = [j for j in chunk if str(bi) not in partial.get(j.id, {})]
                        pbar.set_description(f"{where} ({len(todo)} methods{group})")
                        stored = None if folder is None else os.path.join(folder, f"{bi}.pkl")
                        last = ci == len(chunks) - 1
                        if last and stored is not None and not os.path.exists(stored):
                            stored = None  # no later group needs it
                        if todo:
                            _run_batch(gen_mod, model, pset, idx, bi, todo, partial,
                                       config.batch_size, len(groups), observe, stored)
                            save(final=False)
                            ran = True
                        if last and stored is not None:
                            os.remove(stored)
                        pbar.update(1)
                    if ran and len(chunks) > 1:
                        gen_mod.release_compiled()  # this group's programs; the next compiles its own
            for job in jobs:
                results[job.key] = _make_record(pset, job, partial.pop(job.id), config, ident,
                                                dtype, chat, len(groups))
            save(final=False)
    finally:
        pbar.close()
    if out_dir is not None:
        files = [os.path.join(out_dir, f) for f in (RESULTS_FILE, PLOT_FILE)]
        if total or not all(os.path.exists(f) for f in files):
            save(final=True)
        if not partial and os.path.exists(os.path.join(out_dir, PARTIAL_FILE)):
            os.remove(os.path.join(out_dir, PARTIAL_FILE))
    return ordered()


def _distinct(policies) -> List[Any]:
    """Each policy once (equal policies, e.g. KIVI at any budget, count once), in order."""
    out: List[Any] = []
    for p in policies:
        if not any(p == q for q in out):
            out.append(p)
    return out


def _run_batch(gen_mod, model, pset: PromptSet, idx, bi: int, jobs, partial, batch_size: int,
               n_batches: int, observe=None, prefill_file: Optional[str] = None) -> None:
    """Generate one batch for every job in `jobs` with one shared prefill (jobs whose policies
    are equal share one decoding; such a record's seconds count that decoding each); store per-batch
    scores, completions, bytes and seconds in `partial`. A short last batch is padded with
    copies of its last prompt to `batch_size` rows (reusing the compiled program); its byte
    counts are scaled to its real rows (cache bytes are linear in the batch). observe and
    prefill_file: `generate_shared`'s (the prefill shared with the other groups of methods)."""
    rows = list(idx)
    if n_batches > 1 and len(rows) < batch_size:
        rows += [rows[-1]] * (batch_size - len(rows))
    distinct = _distinct([j.policy for j in jobs])  # decode each distinct policy once
    slot = [next(i for i, p in enumerate(distinct) if p == j.policy) for j in jobs]
    gens = gen_mod.generate_shared(model, [pset.prompts[i] for i in rows], pset.max_new_tokens,
                                   distinct, eos_ids=pset.eos_ids, pad_to=pset.pad_to,
                                   observe=observe, prefill_file=prefill_file)
    gens = [gens[i] for i in slot]
    share = len(idx) / len(rows)
    for job, gen in zip(jobs, gens):
        scores, texts, survival = [], [], []
        for r, (i, toks) in enumerate(zip(idx, gen.tokens)):
            s, text = pset.score(i, toks)
            scores.append(s)
            texts.append(text)
            survival.append(None if gen.kept_positions is None or pset.needle_spans is None
                            else needle_survival(gen.kept_positions[:, r], pset.needle_spans[i]))
        partial.setdefault(job.id, {})[str(bi)] = dict(
            index=list(idx), scores=scores, completions=texts, needle_survival=survival,
            cache_bytes=gen.cache_bytes * share, full_bytes=gen.full_cache_bytes * share,
            seconds=gen.seconds, prompt_tokens=sum(gen.prompt_lengths[:len(idx)]),
            policy=policy_identity(job.policy))


def _make_record(pset: PromptSet, job: _Job, done: Mapping[str, Any], config: EvalConfig,
                 ident, dtype, chat, n_batches: int) -> dict:
    n = config.n_samples
    scores: List[Optional[float]] = [None] * n
    completions: List[Optional[str]] = [None] * n
    survival: List[Optional[float]] = [None] * n
    cache = full = seconds = tokens = 0.0
    for b in range(n_batches):
        part = done[str(b)]
        for i, s, c in zip(part["index"], part["scores"], part["completions"]):
            scores[i], completions[i] = s, c
        for i, sv in zip(part["index"], part.get("needle_survival") or []):
            survival[i] = sv  # batches from before the field was recorded stay None
        cache += part["cache_bytes"]
        full += part["full_bytes"]
        seconds += part["seconds"]
        tokens += part["prompt_tokens"]
    k = float(sum(scores))
    known = [s for s in survival if s is not None]
    lo, hi = wilson_interval(k, n)
    binary = all(s in (0.0, 1.0) for s in scores)
    return {
        "task": pset.task,
        "family": pset.family,
        "length": pset.length,
        "prompt_tokens": round(tokens / n, 1),
        "method": job.method,
        "budget": float(job.budget),
        "measured_budget": cache / full if full else float("nan"),
        "accuracy": k / n,
        "n": n,
        "ci_low": lo,
        "ci_high": hi,
        "cache_bytes": int(round(cache)),
        "full_cache_bytes": int(round(full)),
        "correct": [int(s) if binary else round(s, 4) for s in scores],
        "model": dict(ident),
        "dtype": dtype,
        "chat": chat,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "max_new_tokens": pset.max_new_tokens,
        "task_settings": dict(config.task_settings.get(pset.task, {})),
        "method_settings": dict(job.settings),
        "policy": policy_identity(job.policy),
        "seconds": round(seconds, 3),
        "needle_survival": [None if s is None else round(s, 4) for s in survival],
        "needle_survival_mean": (None if not known else round(float(np.mean(known)), 4)),
        "examples": [{"answer": a, "completion": c}
                     for a, c in zip(pset.answers[:_N_SHOWN], completions[:_N_SHOWN])],
    }


def _load_partial(out_dir) -> Dict[str, Dict[str, Any]]:
    if out_dir is None:
        return {}
    path = os.path.join(out_dir, PARTIAL_FILE)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError:
            return {}  # a torn file from an older writer: recompute those batches
    return data if isinstance(data, dict) else {}


__all__ = ["evaluate", "record_key", "model_identity", "policy_identity", "PARTIAL_FILE"]
