"""`python -m train eval`: methods x budgets x tasks -> DIR/results.json and a plot."""
from __future__ import annotations

import dataclasses
from typing import Optional


def load_config_model(spec: Optional[str]):
    """An eval config's model: None (the embedded default), an embedded model's name, or a
    model folder."""
    from jaxkv.embedded import EMBEDDED_CONFIGS, load_model
    import os
    if spec is not None and spec not in EMBEDDED_CONFIGS and not os.path.isdir(spec):
        raise ValueError(f"model={spec!r} is not an embedded model ({', '.join(EMBEDDED_CONFIGS)}) "
                         f"nor a local folder")
    return load_model(spec, dtype="float32")


def run_eval(config_spec: str, out_dir: str, model_path: Optional[str] = None,
             n: Optional[int] = None, progress: bool = True):
    from jaxkv.eval import evaluate, format_table
    from train.config_loading import load_config

    config = load_config(config_spec)
    changes = {"out_dir": out_dir}
    if n is not None:
        changes["n_samples"] = n
    config = dataclasses.replace(config, **changes)
    model = load_config_model(model_path or config.model)
    records = evaluate(model, config, progress=progress)
    print(format_table(records))
    if config.pairs:
        import os
        from jaxkv.eval import PAIRED_FILE, _write_json_atomic, format_paired, paired_comparisons
        rows = paired_comparisons(records, config.pairs)
        print(format_paired(rows))
        _write_json_atomic(rows, os.path.join(out_dir, PAIRED_FILE))
        print(f"wrote {out_dir}/{PAIRED_FILE}")
    print(f"wrote {out_dir}/results.json and {out_dir}/accuracy_vs_budget.png")
    return records
