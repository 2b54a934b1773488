"""Every shipped evaluation config loads, names registered methods with settings their factories
take, and pairs only its own methods: a typo in a sweep's config would otherwise surface hours
into a sweep (or as a method the registry refuses on the first batch)."""
import glob
import inspect
import os

import pytest

from jaxkv.eval import EvalConfig
from jaxkv.eval.config import split_method
from jaxkv.policies.registry import get_factory
from train.config_loading import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "eval_*.py"))
                      + [os.path.join(ROOT, "configs", "demo.py")])


def test_the_eval_configs_are_found():
    names = {os.path.basename(p) for p in EVAL_CONFIGS}
    assert {"eval_real.py", "eval_grkv.py", "eval_rdkv.py", "eval_rdkv_split.py",
            "demo.py"} <= names


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=os.path.basename)
def test_eval_config_names_registered_methods_and_settings(path):
    cfg = load_config(path, expected=EvalConfig)
    assert cfg.methods and cfg.budgets and cfg.tasks
    for label in cfg.methods:
        name, settings = split_method(label)
        params = inspect.signature(get_factory(name)).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        merged = {**settings, **dict(cfg.method_settings.get(label, {}))}
        unknown = [k for k in merged if k not in params and not takes_any]
        assert not unknown, f"{label}: {name}'s factory takes no {unknown}"
    for a, b in cfg.pairs:
        assert a in cfg.methods and b in cfg.methods


def test_rdkv_split_varies_one_setting_against_the_default():
    cfg = load_config(os.path.join(ROOT, "configs", "eval_rdkv_split.py"), expected=EvalConfig)
    base = load_config(os.path.join(ROOT, "configs", "eval_rdkv.py"), expected=EvalConfig)
    # the default's records are the RDKV sweep's: same model, dtype, prompts and answer lengths
    for field in ("model", "dtype", "lengths", "n_samples", "batch_size", "seed"):
        assert getattr(cfg, field) == getattr(base, field), field
    assert set(cfg.tasks) <= set(base.tasks) and set(cfg.budgets) <= set(base.budgets)
    for task in cfg.tasks:
        assert cfg.task_settings.get(task) == base.task_settings.get(task)
    for variant, default in cfg.pairs:
        assert default == "rdkv" and len(split_method(variant)[1]) == 1
