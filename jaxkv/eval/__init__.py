"""One evaluation harness for every method and model: methods x budgets x tasks x lengths on
the same examples, one prefill per prompt batch, resumable.

    from jaxkv.eval import EvalConfig, evaluate, format_table
    config = EvalConfig(methods=("full", "snapkv"), budgets=(0.1, 0.25),
                        tasks=("passkey", "niah_single_2"), lengths=(2048,), n_samples=32,
                        out_dir="runs/eval")
    records = evaluate(jaxkv.load("smollm2-135m-instruct"), config)
    print(format_table(records))

Modules: `config` (EvalConfig), `prompts` (task names -> prompts and scorers, for real-text and
in-house tasks), `runner` (the loop, records, resumption), `stats` (Wilson intervals, paired
bootstrap, family averages), `report` (results.json, the plot, tables, paired comparisons).
"""
from jaxkv.eval.config import FULL, EvalConfig, split_method
from jaxkv.eval.prompts import PromptSet, prompt_set, task_suite
from jaxkv.eval.report import (PAIRED_FILE, PLOT_FILE, RESULTS_FILE, format_paired, format_table,
                               load_results, markdown_grid, markdown_paired,
                               paired_comparisons, plot_accuracy_vs_budget,
                               write_json, write_results)
from jaxkv.eval.runner import PARTIAL_FILE, evaluate, model_identity, record_key
from jaxkv.eval.stats import family_averages, paired_bootstrap, wilson_interval

__all__ = ["EvalConfig", "split_method", "evaluate", "paired_bootstrap", "wilson_interval", "write_results",
           "load_results", "format_table", "family_averages", "plot_accuracy_vs_budget",
           "record_key", "paired_comparisons", "format_paired", "markdown_grid", "markdown_paired", "write_json", "prompt_set",
           "task_suite", "PromptSet", "model_identity", "FULL", "RESULTS_FILE", "PLOT_FILE",
           "PAIRED_FILE", "PARTIAL_FILE"]
