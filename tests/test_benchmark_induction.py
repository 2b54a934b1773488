"""benchmarks/induction_plateau.py and per_token.py: the induction rows, the fresh-row report and
the per-token probe (on the committed draft checkpoint benchmarks/checkpoints/tiny_keys)."""
import importlib.util
import os

import numpy as np
import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
CHECKPOINT = os.path.join(BENCH_DIR, "checkpoints", "tiny_keys")


def _bench(name):
    """benchmarks/<name>.py as a module, without putting benchmarks/ on sys.path (its kernels.py
    would shadow the `kernels` package transformers imports)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  os.path.join(BENCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_plateau, _per_token = _bench("induction_plateau"), _bench("per_token")
fresh_rows_report, induction_rows = _plateau.fresh_rows_report, _plateau.induction_rows
parse_task, per_token_accuracy = _per_token.parse_task, _per_token.per_token_accuracy


def _chunk_starts(tokens, mask):
    """Source positions of the copied chunks' first words (the word before each masked run)."""
    out = []
    for row, m in zip(tokens.tolist(), mask):
        first = {}
        for i, w in enumerate(row[1:]):
            first.setdefault(w, i)  # the source comes first and its words are distinct
        runs = np.flatnonzero(np.diff(np.concatenate([[0.0], m])) > 0)  # mask[r] trains r + 1
        out += [first[row[r]] for r in runs]
    return out


def test_induction_rows_random_starts_remove_the_slot_shortcut():
    aligned = induction_rows(np.random.default_rng(0), 16, 48)
    anywhere = induction_rows(np.random.default_rng(0), 16, 48, starts="random")
    assert {s % 4 for s in _chunk_starts(*aligned)} == {0}
    assert {s % 4 for s in _chunk_starts(*anywhere)} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="starts='middle'"):
        induction_rows(np.random.default_rng(0), 2, 48, starts="middle")


def test_fresh_rows_report_counts_every_miss_once():
    from jaxkv.model import ModelConfig, init_params
    from jaxkv.tasks import VOCAB_SIZE
    config = ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    report = fresh_rows_report(config, init_params(config, 0), 48, "random", n_rows=8)
    _, mask = induction_rows(np.random.default_rng(12345), 8, 48, starts="random")
    copied = int(mask[:, :-1].sum())
    misses = round((1 - report["copy_acc"]) * copied)
    assert report["seq_len"] == 48 and sum(report["wrong_offsets"].values()) == misses > 0


@pytest.fixture(scope="module")
def model():
    from jaxkv.hf import load_hf
    return load_hf(CHECKPOINT)


def test_per_token_probe_reads_settings_and_scores_each_target_token(model):
    name, settings = parse_task(["running_sum", "n_digits=8", "random_offset=true"])
    assert (name, settings) == ("running_sum", {"n_digits": 8, "random_offset": True})
    assert parse_task(["niah_multikey", "length=80", "depth=0.5", "depth=none"])[1] == {
        "length": 80, "depth": None}
    with pytest.raises(ValueError, match="key=value"):
        parse_task(["passkey", "length"])
    from jaxkv.tasks import make_task
    acc = per_token_accuracy(model, make_task(name, **settings), n=16, seed=1)
    assert len(acc) == 8 * 5 + 5 and acc[-1][0] == "<eos>"  # (i d t u ;) x 8, A : t u <eos>
    # the digit after each index token: the look-up by the current token the draft has learnt
    assert all(a >= 0.9 for _, a in acc[1:40:5])


@pytest.mark.parametrize("name", ["tiny_keys", "tiny_keys_quote", "tiny_keys_long", "tiny_keys_mk",
                                  "tiny_keys_mk2", "tiny_1k"])
def test_draft_checkpoints_are_their_committed_configs(name):
    import json

    from train.config_loading import load_config
    from train.pretrain import config_fingerprint
    with open(os.path.join(BENCH_DIR, "checkpoints", name, "train_report.json")) as f:
        report = json.load(f)
    cfg = load_config(f"configs.{name}")
    assert report["config_fingerprint"] == config_fingerprint(cfg)
    assert report["steps"] == cfg.total_steps and report["seed"] == cfg.seed
    assert report["accuracy"]["running_sum"] >= 0.95 and report["accuracy"]["var_chain"] >= 0.95
