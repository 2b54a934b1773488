"""The shipped embedded model: it is the one configs/tiny.py trains, and it solves every task."""
import pytest

from jaxkv.embedded import embedded_model_path, embedded_report, load_embedded
from train.config_loading import load_config
from train.pretrain import config_fingerprint, evaluate_tasks

N_FRESH = 40  # fresh examples per task, seeds unlike the report's

# Until a model that meets the bar is trained and committed (issue 2), there is nothing to check;
# `python -m train pretrain --config configs/tiny.py --out runs/tiny` produces it.
pytestmark = pytest.mark.skipif(
    embedded_model_path() is None,
    reason="jaxkv/assets/tiny not committed yet: the embedded model is still being trained")


@pytest.fixture(scope="module")
def model():
    return load_embedded()


def test_shipped_model_matches_the_committed_config():
    path = embedded_model_path()
    cfg = load_config("configs.tiny")
    report = embedded_report(path)
    assert report["config_fingerprint"] == config_fingerprint(cfg)
    assert report["steps"] == cfg.total_steps and report["seed"] == cfg.seed


def test_shipped_model_has_enough_kv_heads(model):
    c = model.config
    assert c.num_layers * c.num_kv_heads >= 16 and c.num_heads > c.num_kv_heads  # GQA


def test_report_accuracy_at_least_95_percent():
    report = embedded_report()
    assert report["eval_samples"] >= 100
    for task, acc in report["accuracy"].items():
        assert acc >= 0.95, f"{task}: {acc}"


def test_fresh_examples_are_solved(model):
    cfg = load_config("configs.tiny")
    acc = evaluate_tasks(model, cfg.eval_tasks, N_FRESH, seed=777, batch_size=N_FRESH)
    # 40 fresh samples per task: >= 0.9 leaves room for sampling noise around a >= 0.95 model
    assert all(a >= 0.9 for a in acc.values()), acc
