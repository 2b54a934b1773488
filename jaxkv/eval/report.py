"""What an evaluation writes and prints: results.json (atomically), the accuracy-vs-bytes plot,
plain-text tables and the paired comparisons."""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np

from jaxkv.eval.stats import family_averages, paired_bootstrap
from jaxkv.jsonio import write_json_atomic

FULL = "full"
RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy_vs_budget.png"
PAIRED_FILE = "paired.json"


def load_results(out_dir) -> List[dict]:
    """Records in out_dir/results.json ([] if there is none)."""
    path = os.path.join(os.fspath(out_dir), RESULTS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a readable results file ({e}); move it away or give "
                             f"another --out") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def format_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table: task, length, method, budget, measured budget, accuracy [95% CI], n,
    needle survival (the mean share of answer x layer x KV head whose tokens all survived; "-"
    where the task or cache does not say); family averages follow when the records span several tasks."""
    rows = list(records) + family_averages(records)
    header = ("task", "length", "method", "budget", "measured", "accuracy [95% CI]", "n",
              "needle survival")
    lines = [header]
    for r in rows:
        measured = r.get("measured_budget")
        length = r.get("length")
        survival = r.get("needle_survival_mean")
        lines.append((
            str(r["task"]), "-" if length is None else str(length), str(r["method"]),
            f"{float(r['budget']):.3g}",
            "-" if measured is None else f"{float(measured):.4f}",
            f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", str(r["n"]),
            "-" if survival is None else f"{float(survival):.3f}"))
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = []
    for j, line in enumerate(lines):
        text.append("  ".join(cell.ljust(w) if c in (0, 2) else cell.rjust(w)
                              for c, (cell, w) in enumerate(zip(line, widths))).rstrip())
        if j == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return repr(obj)


def write_json(obj, path: str) -> None:
    """`obj` as indented JSON at `path`, atomically (temporary file, then os.replace)."""
    write_json_atomic(obj, path, indent=1, default=_json_default)


def plot_accuracy_vs_budget(records: Sequence[Mapping[str, Any]], path: str) -> None:
    """One subplot per task: accuracy vs measured budget per method with 95% CI error bars;
    the full cache is a dashed horizontal line (its CI a light band)."""
    # a Figure on the Agg canvas, not pyplot: no display needed, and no global backend switch
    # (a notebook's inline pyplot figures keep working after an evaluation)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panel = lambda r: (r["task"], r.get("length"))  # one panel per task and prompt length
    task_names = list(dict.fromkeys(panel(r) for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    ncols = min(3, max(1, len(task_names)))
    nrows = max(1, -(-len(task_names) // ncols))
    fig = Figure(figsize=(4.5 * ncols, 3.4 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel()[len(task_names):]:
        ax.set_visible(False)
    for ax, task_name in zip(axes.ravel(), task_names):
        rs = [r for r in records if panel(r) == task_name]
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
        ax.set_title(task_name[0] if task_name[1] is None else f"{task_name[0]} @ {task_name[1]}")
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
        if os.path.exists(tmp):
            os.remove(tmp)


def paired_comparisons(records: Sequence[Mapping[str, Any]], pairs, n_boot: int = 10000,
                       seed: int = 0) -> List[dict]:
    """Paired bootstrap of method A minus method B on the same examples, for every
    (A, B) in `pairs`, every requested budget and every task (and prompt length), plus "all" (the
    examples of every task and length pooled). Returns dicts {task, length, budget, a, b, n,
    acc_a, acc_b, diff, lo, hi}."""
    by_key = {(r["task"], r.get("length"), r["method"], r["budget"]): r
              for r in records if "task" in r}
    out = []
    for a, b in pairs:
        budgets = sorted({k[3] for k in by_key if k[2] in (a, b)})
        for budget in budgets:
            pooled_a, pooled_b = [], []
            cells = sorted({k[:2] for k in by_key if k[2] == a and k[3] == budget},
                           key=lambda c: (c[0], -1 if c[1] is None else c[1]))
            for task, length in cells:
                ra, rb = by_key.get((task, length, a, budget)), by_key.get((task, length, b, budget))
                if ra is None or rb is None or len(ra["correct"]) != len(rb["correct"]):
                    continue
                diff, lo, hi = paired_bootstrap(ra["correct"], rb["correct"], n_boot, seed)
                out.append(dict(task=task, length=length, budget=budget, a=a, b=b,
                                n=len(ra["correct"]), acc_a=ra["accuracy"], acc_b=rb["accuracy"],
                                diff=diff, lo=lo, hi=hi))
                pooled_a += list(ra["correct"])
                pooled_b += list(rb["correct"])
            if pooled_a:
                diff, lo, hi = paired_bootstrap(pooled_a, pooled_b, n_boot, seed)
                out.append(dict(task="all", length=None, budget=budget, a=a, b=b,
                                n=len(pooled_a), acc_a=float(np.mean(pooled_a)),
                                acc_b=float(np.mean(pooled_b)), diff=diff, lo=lo, hi=hi))
    return out


def format_paired(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"{'A - B':32s} {'task':18s} {'budget':>6} {'n':>5} {'acc A':>6} {'acc B':>6} "
             f"{'diff':>7} {'95% CI':>17}"]
    for r in rows:
        lines.append(f"{r['a'] + ' - ' + r['b']:32s} {r['task']:18s} {r['budget']:>6} {r['n']:>5} "
                     f"{r['acc_a']:>6.3f} {r['acc_b']:>6.3f} {r['diff']:>+7.3f} "
                     f"[{r['lo']:+.3f}, {r['hi']:+.3f}]")
    return "\n".join(lines)


MARKDOWN_VALUES = ("accuracy", "needle_survival_mean", "measured_budget")


def markdown_grid(records: Sequence[Mapping[str, Any]], value: str = "accuracy",
                  interval: bool = False) -> str:
    """A Markdown table of one field of the records: a row per (method, budget) in the records'
    order, a column per task (and length, where there are several), and "mean" (over the row's
    tasks) when there are several. `value`: "accuracy" (with `interval`, its Wilson interval),
    "needle_survival_mean" or "measured_budget"; "-" where a record lacks it; a record with
    `partial` set (a sweep's unfinished record) is marked *."""
    if value not in MARKDOWN_VALUES:
        raise ValueError(f"value={value!r}: allowed are {', '.join(MARKDOWN_VALUES)}")
    recs = [r for r in records if "task" in r]
    lengths = {r.get("length") for r in recs}
    column = (lambda r: r["task"]) if len(lengths) <= 1 else (
        lambda r: f"{r['task']} @ {r.get('length')}")
    cols = list(dict.fromkeys(column(r) for r in recs))
    rows: dict = {}
    for r in recs:
        rows.setdefault((r["method"], r["budget"]), {})[column(r)] = r

    def cell(r) -> str:
        v = None if r is None else r.get(value)
        if v is None:
            return "-"
        text = f"{float(v):.3f}" if value != "measured_budget" else f"{float(v):.4f}"
        if interval and value == "accuracy" and "ci_low" in r:
            text += f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        return text + ("*" if r.get("partial") else "")

    head = ["method", "budget"] + cols + (["mean"] if len(cols) > 1 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, budget), by_col in rows.items():
        cells = [cell(by_col.get(c)) for c in cols]
        if len(cols) > 1:
            vals = [by_col[c].get(value) for c in cols if c in by_col]
            vals = [float(v) for v in vals if v is not None]
            cells.append(f"{np.mean(vals):.3f}" if len(vals) == len(cols) else "-")
        lines.append("| " + " | ".join([method, f"{float(budget):g}"] + cells) + " |")
    return "\n".join(lines)


def markdown_paired(rows: Sequence[Mapping[str, Any]]) -> str:
    """The paired comparisons (`paired_comparisons`) as a Markdown table: a row per (A - B,
    budget), a column per task (and "all"), cells "diff [lo, hi]", in bold where the 95%
    interval lies above zero."""
    column = lambda r: r["task"] if r.get("length") is None or r["task"] == "all" \
        else f"{r['task']} @ {r['length']}"
    tasks = list(dict.fromkeys(column(r) for r in rows))
    table: dict = {}
    for r in rows:
        col = column(r)
        text = f"{r['diff']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]"
        table.setdefault((f"{r['a']} - {r['b']}", r["budget"]), {})[col] = \
            f"**{text}**" if r["lo"] > 0 else text
    head = ["A - B", "budget"] + tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (pair, budget), cells in table.items():
        lines.append("| " + " | ".join([pair, f"{float(budget):g}"]
                                       + [cells.get(t, "-") for t in tasks]) + " |")
    return "\n".join(lines)


def write_results(records: Sequence[Mapping[str, Any]], out_dir,
                  plot_records: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
    """Write out_dir/results.json (atomically: temp file + os.replace) and
    out_dir/accuracy_vs_budget.png (of `plot_records`, default all records)."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    records = list(records)
    write_json(records, os.path.join(out_dir, RESULTS_FILE))
    to_plot = [r for r in (records if plot_records is None else plot_records) if "task" in r]
    if to_plot:
        plot_accuracy_vs_budget(to_plot, os.path.join(out_dir, PLOT_FILE))


__all__ = ["load_results", "write_results", "format_table", "plot_accuracy_vs_budget",
           "paired_comparisons", "format_paired", "markdown_grid", "markdown_paired", "write_json", "RESULTS_FILE", "PLOT_FILE",
           "PAIRED_FILE"]
