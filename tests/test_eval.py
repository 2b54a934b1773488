"""The evaluation harness (`jaxkv.eval`) and the method registry (`jaxkv.policies.registry`)."""
import dataclasses
import importlib
import json
import math
import os
import tempfile

import jax
import numpy as np
import pytest

from jaxkv import eval as ev
from jaxkv import tasks
from jaxkv.generate import Generation
from jaxkv.model import Model, ModelConfig, init_model
from jaxkv.policies import registry

TASK_SETTINGS = {"running_sum": {"n_digits": 4}, "niah_single": {"length": 64}}
REQUIRED_KEYS = {"task", "method", "budget", "measured_budget", "accuracy", "n", "ci_low",
                 "ci_high", "cache_bytes", "full_cache_bytes", "correct"}


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=len(tasks.TOKENS), hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                      max_position_embeddings=256, bos_token_id=tasks.BOS_ID,
                      eos_token_id=(tasks.EOS_ID,), pad_token_id=tasks.PAD_ID)
    # `init_model(cfg)` runs Flax's init op by op (~70 small compiles, over 10 s on a busy 2-core
    # CPU); the harness only needs some weights of the right shapes, so draw them directly.
    shapes = jax.eval_shape(lambda: init_model(cfg, seed=0).params)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: np.ones(s.shape, s.dtype) if len(s.shape) == 1
        else (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    return Model(config=cfg, params=params)


@pytest.fixture
def oracle():
    """A test-only method: full cache (policy None), recording the settings it receives."""
    seen = []

    def factory(budget, model, **settings):
        seen.append((budget, settings))
        return None

    registry.register_method("oracle", factory)
    yield seen
    registry.unregister_method("oracle")


def _config(out_dir, budgets=(0.5,), **kw):
    kw.setdefault("method_settings", {"oracle": {"window": 7}})
    kw.setdefault("methods", ("full", "oracle"))
    return ev.EvalConfig(budgets=budgets,
                         tasks=("running_sum", "niah_single"), n_samples=4, batch_size=2,
                         seed=3, task_settings=TASK_SETTINGS, out_dir=str(out_dir), **kw)


def _generate_module():
    # the package attribute `jaxkv.generate` is the function; the harness calls the module's
    return importlib.import_module("jaxkv.generate")


def _count_generate(monkeypatch):
    """Count the harness's shared prefills and the policies each one served."""
    gen_mod = _generate_module()
    calls = []
    real = gen_mod.generate_shared

    def counting(model, prompts, max_new_tokens, policies, **kwargs):
        calls.append(len(policies))
        return real(model, prompts, max_new_tokens, policies, **kwargs)

    monkeypatch.setattr(gen_mod, "generate_shared", counting)
    return calls


def test_evaluate_records_files_and_resume(model, oracle, tmp_path, monkeypatch, capsys):
    calls = _count_generate(monkeypatch)
    config = _config(tmp_path)
    records = ev.evaluate(model, config, progress=False)

    # full once per task (budget 1.0) + oracle at one budget, per task; 4 examples = 2 batches,
    # each prefilled once for both methods; the oracle's policy is full's (None), so one decoding
    # serves both
    assert [(r["task"], r["method"], r["budget"]) for r in records] == [
        ("running_sum", "full", 1.0), ("running_sum", "oracle", 0.5),
        ("niah_single", "full", 1.0), ("niah_single", "oracle", 0.5)]
    assert calls == [1] * 4
    for r in records:
        assert REQUIRED_KEYS <= set(r)
        assert r["n"] == 4 and len(r["correct"]) == 4 and set(r["correct"]) <= {0, 1}
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["accuracy"] == sum(r["correct"]) / 4
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
        assert r["measured_budget"] == r["cache_bytes"] / r["full_cache_bytes"]
        # the oracle keeps the full cache too, so both measure exactly 1.0
        assert r["measured_budget"] == 1.0
        assert r["model"]["fingerprint"] == model.fingerprint and r["dtype"] == "float32"
        assert r["length"] is None and r["chat"] is False and r["batch_size"] == 2
    assert records[0]["family"] == "reasoning" and records[2]["family"] == "retrieval"
    # max_new_tokens derived from the task: running_sum 4 digits -> 5*4 + 5; niah -> A : 4 v <eos>
    assert records[0]["max_new_tokens"] == 25 and records[2]["max_new_tokens"] == 7
    # the registry passed the budget and the method settings through, once per (task, budget)
    assert oracle == [(0.5, {"window": 7})] * 2

    assert os.path.getsize(tmp_path / "accuracy_vs_budget.png") > 0
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert [ev.record_key(r) for r in saved] == [ev.record_key(r) for r in records]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert not os.path.exists(tmp_path / ev.PARTIAL_FILE)

    # Same config again: everything is reused, nothing generated, and it says so.
    calls.clear()
    again = ev.evaluate(model, config, progress=True)
    assert calls == []
    assert again == saved
    assert capsys.readouterr().out.count("skip ") == 4

    # A new budget: only the oracle at 0.25 runs (2 tasks x 2 batches); the rest is reused.
    more = ev.evaluate(model, _config(tmp_path, budgets=(0.5, 0.25)), progress=False)
    assert calls == [1] * 4
    assert [(r["task"], r["method"], r["budget"]) for r in more] == [
        ("running_sum", "full", 1.0), ("running_sum", "oracle", 0.5),
        ("running_sum", "oracle", 0.25), ("niah_single", "full", 1.0),
        ("niah_single", "oracle", 0.5), ("niah_single", "oracle", 0.25)]
    with open(tmp_path / "results.json") as f:
        assert len(json.load(f)) == 6

    # Different method settings, max_new_tokens or model are different records: recomputed.
    for changes, n_calls in (({"method_settings": {"oracle": {"window": 9}}}, 4),
                             ({"max_new_tokens": 30}, 4)):
        calls.clear()
        ev.evaluate(model, _config(tmp_path, **changes), progress=False)
        assert len(calls) == n_calls, changes
    other = Model(config=model.config, params=jax.tree_util.tree_map(lambda x: x * 1.01,
                                                                     model.params))
    calls.clear()
    ev.evaluate(other, config, progress=False)
    assert len(calls) == 4

    table = ev.format_table(more)
    assert "running_sum" in table and "avg:reasoning" in table and "avg:retrieval" in table
    assert table.splitlines()[0].endswith("needle survival")
    rec = dict(more[0], needle_survival_mean=0.625)
    assert ev.format_table([rec]).splitlines()[2].endswith("0.625")
    assert ev.format_table([dict(rec, needle_survival_mean=None)]).splitlines()[2].endswith("-")


def test_interrupted_run_resumes_from_its_last_batch(model, oracle, tmp_path, monkeypatch):
    """A run stopped after its first batch keeps that batch (partial.json) and computes only the
    rest on the next run, giving the records an uninterrupted run gives."""
    gen_mod = _generate_module()
    real = gen_mod.generate_shared
    config = ev.EvalConfig(methods=("full", "oracle"), budgets=(0.5,), tasks=("niah_single",),
                           n_samples=4, batch_size=2, seed=3,
                           task_settings={"niah_single": TASK_SETTINGS["niah_single"]},
                           out_dir=str(tmp_path / "a"))
    calls = []

    def stop_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gen_mod, "generate_shared", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model, config, progress=False)
    with open(tmp_path / "a" / ev.PARTIAL_FILE) as f:
        assert all(list(done) == ["0"] for done in json.load(f).values())
    monkeypatch.setattr(gen_mod, "generate_shared", real)
    counted = _count_generate(monkeypatch)
    resumed = ev.evaluate(model, config, progress=False)
    assert counted == [1]  # only the second batch (full and the oracle share one policy, None)
    fresh = ev.evaluate(model, dataclasses.replace(config, out_dir=str(tmp_path / "b")),
                        progress=False)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(resumed) == strip(fresh)


def test_evaluate_verifies_paired_examples(model, tmp_path, monkeypatch):
    """A fake generator that answers every prompt with its target (then EOS and junk) scores
    1.0; one that answers nothing scores 0.0; byte counts are summed over batches."""
    examples = {tuple(ex.prompt_ids): ex
                for name, settings in TASK_SETTINGS.items()
                for ex in tasks.sample_examples(tasks.make_task(name, **settings), 4, 3)}
    gen_mod = _generate_module()

    def perfect(model, prompts, max_new_tokens, policies, **kw):
        toks = [examples[tuple(p)].target_ids + [tasks.encode("A")[0]] for p in prompts]
        return [Generation(tokens=toks, texts=None, cache_bytes=10 * len(prompts),
                           full_cache_bytes=40 * len(prompts), seconds=0.5,
                           prompt_lengths=[len(p) for p in prompts]) for _ in policies]

    monkeypatch.setattr(gen_mod, "generate_shared", perfect)
    config = ev.EvalConfig(methods=("full",), budgets=(), tasks=tuple(TASK_SETTINGS),
                           n_samples=4, batch_size=3, seed=3, task_settings=TASK_SETTINGS)
    for r in ev.evaluate(model, config, progress=False):
        assert r["accuracy"] == 1.0 and r["correct"] == [1, 1, 1, 1]
        # batches of 3 and 1 (the short one padded to 3 rows, bytes scaled back to 1 row)
        assert r["cache_bytes"] == 40 and r["full_cache_bytes"] == 160
        assert r["measured_budget"] == 0.25
        assert r["seconds"] == 1.0  # Generation.seconds summed over the two batches

    def silent(model, prompts, max_new_tokens, policies, **kw):
        return [Generation(tokens=[[tasks.EOS_ID]] * len(prompts), texts=None, cache_bytes=1,
                           full_cache_bytes=1, seconds=0.0, prompt_lengths=[len(p) for p in prompts])
                for _ in policies]

    monkeypatch.setattr(gen_mod, "generate_shared", silent)
    for r in ev.evaluate(model, config, progress=False):
        assert r["accuracy"] == 0.0 and r["ci_low"] == 0.0


def test_wilson_interval_hand_checked():
    # k = 8, n = 10, z = 1.959964, z^2 = 3.841459:
    #   denom  = 1 + z^2/n = 1.3841459
    #   center = (0.8 + z^2/(2n)) / denom = (0.8 + 0.1920729) / 1.3841459 = 0.716738
    #   half   = z / denom * sqrt(0.8 * 0.2 / 10 + z^2 / (4 * 100))
    #          = 1.415999 * sqrt(0.016 + 0.0096036) = 1.415999 * 0.1600112 = 0.226576
    #   -> [0.490162, 0.943314]
    lo, hi = ev.wilson_interval(8, 10)
    assert lo == pytest.approx(0.490162, abs=1e-5)
    assert hi == pytest.approx(0.943314, abs=1e-5)
    # k = 0: center = half = (z^2/2n)/denom, so the lower end is exactly 0
    lo, hi = ev.wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.277533, abs=1e-5)
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        ev.wilson_interval(3, 2)
    # the interval holds the estimate exactly: all-correct reaches 1.0, none-correct 0.0
    # (rounding once gave 0.9999999999999999 for 10 of 10)
    for n in range(1, 200):
        for k in (0, n, n // 3, n / 2):
            lo, hi = ev.wilson_interval(k, n)
            assert lo <= k / n <= hi
        assert ev.wilson_interval(n, n)[1] == 1.0 and ev.wilson_interval(0, n)[0] == 0.0


def test_paired_bootstrap():
    a = [1, 0, 1, 1, 0, 1, 0, 0]
    assert ev.paired_bootstrap(a, a, n_boot=500) == (0.0, 0.0, 0.0)
    # differences a - b = [1, 0, 0, 1]: mean 2/4 = 0.5; every resample mean lies in [0, 1]
    mean, lo, hi = ev.paired_bootstrap([1, 1, 1, 1], [0, 1, 1, 0], n_boot=2000, seed=1)
    assert mean == 0.5
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    # a constant difference has a degenerate interval
    assert ev.paired_bootstrap([1, 1, 1], [0, 0, 0], n_boot=100) == (1.0, 1.0, 1.0)
    # deterministic in the seed
    assert ev.paired_bootstrap(a, a[::-1], seed=4) == ev.paired_bootstrap(a, a[::-1], seed=4)
    with pytest.raises(ValueError):
        ev.paired_bootstrap([1, 0], [1, 0, 1])


def test_paired_comparisons_per_task_and_pooled():
    rec = lambda task, method, correct: dict(task=task, method=method, budget=0.1,
                                             correct=correct, accuracy=float(np.mean(correct)))
    records = [rec("t1", "a", [1, 1, 0, 1]), rec("t1", "b", [1, 0, 0, 1]),
               rec("t2", "a", [0, 0, 1, 1]), rec("t2", "b", [0, 0, 1, 1])]
    rows = ev.paired_comparisons(records, [("a", "b")], n_boot=200)
    by_task = {r["task"]: r for r in rows}
    assert by_task["t1"]["diff"] == 0.25 and by_task["t2"]["diff"] == 0.0
    # pooled over the 8 examples of both tasks: one difference of 1 -> 1/8
    assert by_task["all"]["n"] == 8 and by_task["all"]["diff"] == 0.125
    assert by_task["all"]["lo"] <= 0.125 <= by_task["all"]["hi"]
    assert "t1" in ev.format_paired(rows)


def test_registry(model, oracle):
    assert {"full", "oracle"} <= set(registry.available_methods())
    for budget in (1.0, 0.3):
        assert registry.make_policy("full", budget, model) is None
    assert registry.make_policy("oracle", 0.2, model, window=3) is None
    assert oracle[-1] == (0.2, {"window": 3})
    with pytest.raises(ValueError, match="available are .*full"):
        registry.make_policy("nope", 0.5, model)
    with pytest.raises(ValueError, match="budget"):
        registry.make_policy("full", 1.5, model)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method("full", lambda budget, model: None)

    @registry.register_method("decorated")
    def _factory(budget, model):
        return None
    try:
        assert "decorated" in registry.available_methods()
    finally:
        registry.unregister_method("decorated")


@pytest.mark.parametrize("changes, match", [
    ({"methods": ("full", "nope")}, "methods\\[1\\]"),
    ({"budgets": (0.5, 0.0)}, "budgets\\[1\\]"),
    ({"budgets": (1.5,)}, "budgets\\[0\\]"),
    ({"budgets": (math.nan,)}, "budgets\\[0\\]"),
    ({"tasks": ("no_such_task",)}, "no_such_task"),
    ({"lengths": (32,)}, "lengths\\[0\\]"),
    ({"lengths": (512, 512)}, "duplicates"),
    ({"chat": "yes"}, "chat="),
    ({"n_samples": 0}, "n_samples"),
    ({"batch_size": -1}, "batch_size"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"methods_per_prefill": 0}, "methods_per_prefill=0"),
    ({"methods_per_prefill": True}, "methods_per_prefill=True"),
    ({"method_settings": {"snapkv": {}}}, "method_settings"),
    ({"pairs": (("full", "snapkv"),)}, "pairs\\[0\\]"),
    ({"model": ""}, "model=''"),
    ({"model": 3}, "model=3"),
])
def test_config_validation(changes, match):
    kw = dict(methods=("full",), budgets=(0.5,), tasks=("running_sum",))
    kw.update(changes)
    with pytest.raises(ValueError, match=match):
        ev.EvalConfig(**kw)


def test_config_normalises():
    c = ev.EvalConfig(methods=["full"], budgets=[1, 0.5], tasks="running_sum")
    assert c.methods == ("full",) and c.budgets == (1.0, 0.5) and c.tasks == ("running_sum",)
    assert np.isclose(c.budgets[1], 0.5)


def test_config_model_names_a_registered_model_or_a_folder(tmp_path):
    from train.evaluate import load_config_model
    with pytest.raises(ValueError, match="not a registered model"):
        load_config_model("no_such_model_name_or_folder")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a checkpoint folder"):
        load_config_model(str(tmp_path / "file.txt"))
    with pytest.raises(FileNotFoundError):
        load_config_model(str(tmp_path))  # a folder without a model


def test_out_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    from train.evaluate import run_eval
    path = tmp_path / "results.txt"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file"):
        run_eval(None, str(path), model_path="no_such_model")  # refused before loading it
    with pytest.raises(ValueError, match="is a file"):
        ev.EvalConfig(methods=("full",), budgets=(), tasks=("passkey",), out_dir=str(path))


def test_equal_policies_share_one_decoding(model, tmp_path, monkeypatch):
    """KIVI ignores the budget (recorded only, left out of ==): its two budgets decode once per
    batch and their records agree on everything but the requested budget."""
    calls = _count_generate(monkeypatch)
    config = ev.EvalConfig(methods=("full", "kivi2"), budgets=(0.1, 0.25), tasks=("running_sum",),
                           n_samples=2, batch_size=2, seed=3,
                           task_settings={"running_sum": TASK_SETTINGS["running_sum"]})
    full, low, high = ev.evaluate(model, config, progress=False)
    assert calls == [2]  # full and one KIVI-2 decoding for three records
    assert (low["budget"], high["budget"]) == (0.1, 0.25)
    same = lambda r: {k: v for k, v in r.items() if k not in ("budget", "seconds")}
    assert same(low) == same(high)


def test_method_groups_give_the_same_records_with_one_prefill_per_group(model, tmp_path,
                                                                         monkeypatch):
    """methods_per_prefill=2: the three jobs run in groups of two (one prefill per group and
    batch, each group through every batch), the compiled programs are released between groups,
    and every record equals the one-prefill run's; the grouping is not part of the resume key."""
    kw = dict(methods=("full", "snapkv[window=4]"), budgets=(0.5, 0.8),
              tasks=("running_sum",), n_samples=4, batch_size=2, seed=3,
              task_settings={"running_sum": TASK_SETTINGS["running_sum"]})
    calls = _count_generate(monkeypatch)
    one = ev.evaluate(model, ev.EvalConfig(**kw), progress=False)
    assert calls == [3, 3]  # two batches, all three jobs in each
    gen_mod = _generate_module()
    released = []
    monkeypatch.setattr(gen_mod, "release_compiled", lambda: released.append(len(calls)))
    calls.clear()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    saved = 0
    real_save = gen_mod._save_prefill

    def counting_save(*args):
        nonlocal saved
        saved += 1
        real_save(*args)
    monkeypatch.setattr(gen_mod, "_save_prefill", counting_save)
    out = tmp_path / "grouped"
    grouped = ev.evaluate(model, ev.EvalConfig(methods_per_prefill=2, out_dir=str(out), **kw),
                          progress=False)
    assert calls == [2, 2, 1, 1]  # group by group, batch by batch
    assert released == [2, 4]  # after each group (the next task's first group recompiles)
    # ...with one prefill per batch: the first group stores it, the second loads it
    assert saved == 2 and not os.listdir(tmp)  # the stored prefills are removed
    same = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [same(r) for r in grouped] == [same(r) for r in one]
    calls.clear()
    again = ev.evaluate(model, ev.EvalConfig(methods_per_prefill=None, out_dir=str(out), **kw),
                        progress=False)
    assert calls == [] and [same(r) for r in again] == [same(r) for r in one]


def test_release_compiled_recompiles_to_the_same_tokens(model):
    from jaxkv.policies.registry import make_policy
    gen_mod = _generate_module()
    prompts = [[1] + [5 + i % 20 for i in range(40)]] * 2
    policy = make_policy("snapkv", 0.5, model, window=4)
    before = gen_mod.generate_shared(model, prompts, 4, [None, policy])
    assert gen_mod._compiled_greedy_decode.cache_info().currsize > 0
    gen_mod.release_compiled()
    assert gen_mod._compiled_greedy_decode.cache_info().currsize == 0
    assert gen_mod._compiled_compress_one.cache_info().currsize == 0
    after = gen_mod.generate_shared(model, prompts, 4, [None, policy])
    assert [g.tokens for g in after] == [g.tokens for g in before]


def test_method_variants_carry_their_settings(model, oracle, tmp_path):
    """"name[key=value;...]" is a variant of a registered method: its settings go to the factory
    (under method_settings), it gets its own records, and the CLI splits around its brackets."""
    from train.__main__ import _names
    assert ev.split_method("snapkv[span=10]") == ("snapkv", {"span": 10})
    assert ev.split_method("grkv[span=10; lam=1e-3, gates=runs/a/g.json]") == (
        "grkv", {"span": 10, "lam": 1e-3, "gates": "runs/a/g.json"})
    assert ev.split_method("snapkv") == ("snapkv", {})
    assert _names("full,snapkv[span=4,kernel=3],kivi2") == ["full", "snapkv[span=4,kernel=3]",
                                                             "kivi2"]
    with pytest.raises(ValueError, match="key=value"):
        ev.split_method("snapkv[10]")
    with pytest.raises(ValueError, match="methods\\[1\\]"):
        ev.EvalConfig(methods=("full", "nosuch[a=1]"), budgets=(0.5,), tasks=("running_sum",))
    config = _config(tmp_path, methods=("full", "oracle", "oracle[window=3;tag='x']"),
                     method_settings={"oracle": {"window": 7}})
    records = ev.evaluate(model, config, progress=False)
    assert [r["method"] for r in records[:3]] == ["full", "oracle", "oracle[window=3;tag='x']"]
    assert records[2]["method_settings"] == {"window": 3, "tag": "x"}
    assert (0.5, {"window": 3, "tag": "x"}) in oracle and (0.5, {"window": 7}) in oracle


def test_a_changed_policy_is_recomputed(model, tmp_path):
    """A record remembers its policy (repr, defaults included): when a method's defaults change
    the saved record is recomputed, not reused; an unchanged policy is reused."""
    config = ev.EvalConfig(methods=("full", "snapkv"), budgets=(0.5,), tasks=("running_sum",),
                           n_samples=2, batch_size=2, seed=3, out_dir=str(tmp_path),
                           task_settings={"running_sum": TASK_SETTINGS["running_sum"]},
                           method_settings={"snapkv": {"window": 2}})
    first = ev.evaluate(model, config, progress=False)
    assert first[1]["policy"].startswith("SnapKV(budget=0.5, window=2")
    saved = json.loads((tmp_path / "results.json").read_text())
    saved[1]["policy"] = saved[1]["policy"].replace("span=1", "span=3")  # made by other defaults
    (tmp_path / "results.json").write_text(json.dumps(saved))
    calls = []
    from jaxkv.eval import runner
    real = runner._run_batch
    runner_batch = lambda *a, **k: (calls.append(len(a[5])), real(*a, **k))[1]
    import pytest as _pytest
    mp = _pytest.MonkeyPatch()
    mp.setattr(runner, "_run_batch", runner_batch)
    try:
        again = ev.evaluate(model, config, progress=False)
    finally:
        mp.undo()
    assert calls == [1]  # snapkv only; full reused
    assert again[1]["policy"] == first[1]["policy"]

    # a record, or a finished batch, that does not say which policy made it is recomputed
    saved = json.loads((tmp_path / "results.json").read_text())
    del saved[1]["policy"]
    (tmp_path / "results.json").write_text(json.dumps(saved))
    key = json.dumps(runner.record_key(saved[0]))
    part = {"policy": None, "correct": [0, 0], "n_correct": 0}
    (tmp_path / "partial.json").write_text(json.dumps({key: {"0": part}}))
    saved[0]["policy"] = "nonsense"
    (tmp_path / "results.json").write_text(json.dumps(saved))
    calls.clear()
    mp.setattr(runner, "_run_batch", runner_batch)
    try:
        third = ev.evaluate(model, config, progress=False)
    finally:
        mp.undo()
    assert calls == [2]  # both: full's stale batch dropped, snapkv's record without a policy
    assert [r["policy"] for r in third] == [r["policy"] for r in first]
    assert third[0]["correct"] == first[0]["correct"]


def test_markdown_tables_of_records_and_pairs(tmp_path, capsys):
    """README tables from records: a row per (method, budget), a column per task and the mean;
    paired rows bold where the interval is above zero; the results_table script prints both, the
    finished batches of a running sweep marked as partial."""
    rec = lambda task, method, budget, acc, surv: dict(
        task=task, length=4096, method=method, budget=budget, accuracy=acc, ci_low=acc / 2,
        ci_high=1.0, n=4, needle_survival_mean=surv, measured_budget=budget,
        correct=[1.0] * int(4 * acc) + [0.0] * (4 - int(4 * acc)))
    records = [rec("passkey", "full", 1.0, 1.0, 1.0), rec("vt", "full", 1.0, 0.5, None),
               rec("passkey", "grkv", 0.1, 0.75, 0.625), rec("vt", "grkv", 0.1, 0.25, None),
               rec("passkey", "snapkv", 0.1, 0.0, 0.25)]
    grid = ev.markdown_grid(records).splitlines()
    assert grid[0] == "| method | budget | passkey | vt | mean |"
    assert grid[2] == "| full | 1 | 1.000 | 0.500 | 0.750 |"
    assert grid[3] == "| grkv | 0.1 | 0.750 | 0.250 | 0.500 |"
    assert grid[4] == "| snapkv | 0.1 | 0.000 | - | - |"  # no vt record: no mean
    surv = ev.markdown_grid(records, "needle_survival_mean").splitlines()
    assert surv[3] == "| grkv | 0.1 | 0.625 | - | - |"
    assert "[0.38, 1.00]" in ev.markdown_grid(records, interval=True).splitlines()[3]
    with pytest.raises(ValueError, match="value='bytes'"):
        ev.markdown_grid(records, "bytes")
    rows = [dict(task="passkey", length=4096, budget=0.1, a="grkv", b="snapkv", diff=0.75,
                 lo=0.5, hi=1.0), dict(task="all", length=None, budget=0.1, a="grkv",
                                        b="snapkv", diff=0.1, lo=-0.05, hi=0.25)]
    paired = ev.markdown_paired(rows).splitlines()
    assert paired[0] == "| A - B | budget | passkey @ 4096 | all |"
    assert paired[2] == "| grkv - snapkv | 0.1 | **+0.75 [+0.50, +1.00]** | +0.10 [-0.05, +0.25] |"

    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "results_table", os.path.join(root, "benchmarks", "results_table.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "results.json").write_text(json.dumps(records))
    key = json.dumps(["vt", 4096, "snapkv", 0.1, 50])
    (tmp_path / "partial.json").write_text(json.dumps({key: {"0": dict(
        scores=[1, 0], needle_survival=[None, None], cache_bytes=10.0, full_bytes=100.0)}}))
    script.main([str(tmp_path), "--partial", "--values", "accuracy", "--pairs", "grkv:snapkv"])
    out = capsys.readouterr().out
    assert "| snapkv | 0.1 | 0.000 | 0.500* | 0.250 |" in out  # vt's cell from partial.json
    assert "| grkv - snapkv | 0.1 | **+0.75" in out  # recomputed from the records' scores
