"""The shipped embedded model (jaxkv/assets/tiny): it is the one its committed config trains, every
task is reported, and it solves its benchmark tasks (the config's BENCHMARK)."""
import importlib

import pytest

from jaxkv.embedded import EMBEDDED_CONFIGS, embedded_model_path, embedded_report, load_embedded
from train.config_loading import load_config
from train.pretrain import config_fingerprint, evaluate_tasks, task_labels

N_FRESH = {"tiny": 40}  # fresh examples per task, seeds unlike the report's

# jaxkv/assets/<name> is committed; `python -m train pretrain --config configs/<name>.py` reproduces
# it (tiny: about 3 h on 2 cores). Skipped only in a checkout without the asset.
NAMES = [pytest.param(name, marks=pytest.mark.skipif(
    embedded_model_path(name=name) is None, reason=f"jaxkv/assets/{name} is missing"))
    for name in EMBEDDED_CONFIGS]


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, name):
    if name not in models:
        models[name] = load_embedded(name=name)
    return models[name]


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_matches_the_committed_config(name):
    cfg = load_config(EMBEDDED_CONFIGS[name])
    report = embedded_report(name=name)
    assert report["config_fingerprint"] == config_fingerprint(cfg)
    assert report["steps"] == cfg.total_steps and report["seed"] == cfg.seed


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_has_enough_kv_heads(models, name):
    c = _model(models, name).config
    assert c.num_layers * c.num_kv_heads >= 16 and c.num_heads > c.num_kv_heads  # GQA


@pytest.mark.parametrize("name", NAMES)
def test_report_accuracy_at_least_95_percent(name):
    config = importlib.import_module(EMBEDDED_CONFIGS[name])
    report = embedded_report(name=name)
    assert report["eval_samples"] >= 100
    labels = task_labels(config.EVAL_TASKS)  # the task's name, with settings where it repeats
    assert set(report["accuracy"]) == set(labels)  # every task is reported
    assert report["eval_tasks"] == {k: dict(t.settings) for k, t in zip(labels, config.EVAL_TASKS)}
    bench = getattr(config, "BENCHMARK_LABELS", config.BENCHMARK)
    for label in bench:  # the benchmark is the tasks the model solves
        assert report["accuracy"][label] >= 0.95, f"{label}: {report['accuracy'][label]}"
    by_label = dict(zip(labels, config.EVAL_TASKS))
    assert [by_label[k] for k in bench] == list(config.BENCHMARK_TASKS)
    assert {"running_sum", "niah_single", "passkey"} <= {t.name for t in config.BENCHMARK_TASKS}


def test_1k_recipe_is_evaluated_at_1k_tokens():
    """configs/tiny_1k.py (not shipped) fine-tunes the shipped model for 1K-token retrieval."""
    from configs.tiny import CONFIG as SHIPPED
    from configs.tiny_1k import CONFIG, EVAL_TASKS
    lengths = {dict(t.settings).get("length") for t in EVAL_TASKS} - {None}
    assert lengths == {1024} and CONFIG.model.max_position_embeddings >= 1024 + 16
    assert CONFIG.base == SHIPPED


@pytest.mark.parametrize("name", NAMES)
def test_fresh_examples_are_solved(models, name):
    config = importlib.import_module(EMBEDDED_CONFIGS[name])
    tasks = config.BENCHMARK_TASKS
    n = N_FRESH[name]
    acc = evaluate_tasks(_model(models, name), tasks, n, seed=777, batch_size=n)
    # fresh samples: >= 0.9 leaves room for sampling noise around a >= 0.95 model
    assert all(a >= 0.9 for a in acc.values()), acc
