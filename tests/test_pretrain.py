"""Pretraining: deterministic resume, interrupted checkpoints ignored, 2-step CLI smoke test."""
import dataclasses
import json
import os

import chex
import jax
import numpy as np
import pytest

from jaxkv.model import ModelConfig
from jaxkv.tasks import EOS_ID, PAD_ID, VOCAB_SIZE
from train.pretrain import (PretrainConfig, Stage, TaskMix, batch_for_step, config_fingerprint,
                            pretrain)

TINY_MODEL = ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=(EOS_ID,), pad_token_id=PAD_ID)
MIX = (TaskMix("running_sum", 1.0, (("n_digits", 3),)), TaskMix("passkey", 1.0, (("length", 64),)))


def tiny_config(steps=4, **kw):
    return PretrainConfig(model=TINY_MODEL, stages=(Stage(2, 40, MIX[:1]), Stage(steps - 2, 80, MIX)),
                          eval_tasks=MIX[:1], batch_size=4, checkpoint_every=2, eval_samples=4,
                          warmup_steps=1, **kw)


def _params(out_dir):
    from jaxkv.hf import load_hf
    return load_hf(os.path.join(out_dir, "model")).params


def test_batches_are_deterministic_per_step():
    cfg = tiny_config()
    a, b = batch_for_step(cfg, 3), batch_for_step(cfg, 3)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(batch_for_step(cfg, 2)["tokens"], a["tokens"])
    assert batch_for_step(cfg, 0)["tokens"].shape == (4, 40)  # stage 1
    assert a["tokens"].shape == (4, 80)  # stage 2


def test_resume_continues_the_same_trajectory(tmp_path):
    cfg = tiny_config()
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    pretrain(cfg, straight, progress=False)
    pretrain(cfg, split, max_steps=2, progress=False)  # "killed" after step 2
    assert not os.path.exists(os.path.join(split, "model"))
    report = pretrain(cfg, split, progress=False)  # resumes at step 2
    assert report["steps"] == 4
    chex.assert_trees_all_close(_params(straight), _params(split), rtol=1e-6, atol=1e-7)


def test_interrupted_checkpoint_is_never_restored(tmp_path, capsys):
    cfg = tiny_config()
    out = str(tmp_path / "run")
    pretrain(cfg, out, max_steps=2, progress=False)
    # A save killed mid-way leaves orbax's temporary folder; it must not count as step 4.
    tmp_dir = os.path.join(out, "checkpoints", "4.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(tmp_dir, "default"))
    with open(os.path.join(tmp_dir, "default", "garbage"), "w") as f:
        f.write("half-written")
    pretrain(cfg, out, max_steps=3, progress=False)
    assert "resumed from step 2" in capsys.readouterr().out


def test_cli_smoke_two_steps(tmp_path):
    from train.__main__ import main
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("from tests.test_pretrain import tiny_config\nCONFIG = tiny_config(steps=3)\n")
    out = tmp_path / "cli"
    assert main(["pretrain", "--config", str(cfg_file), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "model" / "train_report.json").read_text())
    assert report["steps"] == 3 and set(report["accuracy"]) == {"running_sum"}
    assert 0.0 <= report["accuracy"]["running_sum"] <= 1.0
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3]


def test_bad_stage_settings():
    with pytest.raises(ValueError, match="seq_len=16"):
        Stage(2, 16, MIX[:1])
    with pytest.raises(ValueError, match="steps=0"):
        Stage(0, 40, MIX[:1])


def test_appended_stage_keeps_earlier_steps_and_restarts_the_schedule():
    from train.pretrain import make_optimizer
    base = tiny_config(steps=4)
    extended = base.replace(stages=base.stages + (Stage(4, 80, MIX),), schedule_steps=4,
                            restart_learning_rate=1e-3, restart_warmup_steps=2)
    params = {"w": np.zeros(3, np.float32)}

    def lrs(cfg):  # the learning rate of each step, read from the optimiser's own schedule
        opt = make_optimizer(cfg)
        state = opt.init(params)
        out = []
        for _ in range(cfg.total_steps):
            grads = {"w": np.ones(3, np.float32)}
            updates, state = opt.update(grads, state, params)
            out.append(-float(updates["w"][0]))  # adam on a constant gradient: step ~ lr
        return np.array(out)

    a, b = lrs(base), lrs(extended)
    np.testing.assert_allclose(b[:4], a, rtol=1e-5)  # earlier steps unchanged
    assert b[4] < b[5] and b[5] > 0.5e-3 and b[-1] < b[5]  # warm-up to the new peak, then decay
    np.testing.assert_array_equal(batch_for_step(extended, 3)["tokens"], batch_for_step(base, 3)["tokens"])
    with pytest.raises(ValueError, match="restart_learning_rate"):
        base.replace(restart_learning_rate=1e-3)
    with pytest.raises(ValueError, match="schedule_steps=9"):
        base.replace(schedule_steps=9)


def test_fine_tune_trains_its_base_first_and_starts_from_it(tmp_path):
    import optax
    from train.pretrain import config_fingerprint, loss_fn
    base = tiny_config(steps=4)
    tune = tiny_config(steps=3, base=base, seed=1)
    out = str(tmp_path / "tune")
    report = pretrain(tune, out, progress=False)
    assert report["steps"] == 3 and report["config_fingerprint"] == config_fingerprint(tune)
    base_report = json.loads(open(os.path.join(out, "base", "model", "train_report.json")).read())
    assert base_report["config_fingerprint"] == config_fingerprint(base)
    # the fine-tune's first step starts from the base weights: replay it by hand
    # (the base folder is written by pretrain(base, out/base), the same call as a base run alone)
    alone = os.path.join(out, "base")
    batch = batch_for_step(tune, 0)
    from train.pretrain import make_optimizer
    opt = make_optimizer(tune)
    p0 = _params(alone)
    grads = jax.grad(lambda p: loss_fn(p, batch["tokens"], batch["loss_mask"], tune.model)[0])(p0)
    updates, _ = opt.update(grads, opt.init(p0), p0)
    p1 = optax.apply_updates(p0, updates)
    split = str(tmp_path / "split")
    import shutil
    shutil.copytree(alone, os.path.join(split, "base"))  # an exported base is reused, not retrained
    pretrain(tune, split, max_steps=1, progress=False)
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(split, "checkpoints")))
    restored = manager.restore(1)["params"]
    for x, y in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    # resumed after 1 step, it ends where the straight run ended
    pretrain(tune, split, progress=False)
    for x, y in zip(jax.tree_util.tree_leaves(_params(out)), jax.tree_util.tree_leaves(_params(split))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_fine_tune_refuses_a_base_folder_of_another_config(tmp_path):
    base = tiny_config(steps=4)
    other = tiny_config(steps=3)
    out = str(tmp_path / "tune")
    pretrain(other, os.path.join(out, "base"), progress=False)
    with pytest.raises(ValueError, match="config_fingerprint"):
        pretrain(tiny_config(steps=3, base=base), out, progress=False)
    with pytest.raises(ValueError, match="base"):
        tiny_config(steps=3, base=base.replace(model=TINY_MODEL.replace(hidden_size=64)))


def test_position_span_gives_each_sequence_one_skip_and_keeps_the_tokens():
    plain = tiny_config()
    spans = plain.replace(stages=tuple(dataclasses.replace(s, position_span=300)
                                       for s in plain.stages))
    a, b = batch_for_step(plain, 3), batch_for_step(spans, 3)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])  # drawn after the examples
    np.testing.assert_array_equal(a["positions"], np.broadcast_to(np.arange(80), (4, 80)))
    lengths = (a["tokens"] != PAD_ID).sum(1)
    gaps = np.diff(b["positions"], axis=1)
    assert (gaps >= 1).all() and ((gaps > 1).sum(1) <= 1).all()  # increasing, one skip at most
    assert (b["positions"][:, 0] == 0).all()  # <bos> stays at 0
    assert (b["positions"][np.arange(4), lengths - 1] < 300).all()
    assert (gaps > 1).any()
    assert config_fingerprint(spans) != config_fingerprint(plain)
    with pytest.raises(ValueError, match="position_span=80"):
        Stage(2, 80, MIX, position_span=80)


def test_fine_tune_may_change_the_context_bound_and_nothing_else():
    base = tiny_config()
    longer = TINY_MODEL.replace(max_position_embeddings=512)
    assert tiny_config(base=base).replace(model=longer).model.max_position_embeddings == 512
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny_config(base=base).replace(model=TINY_MODEL.replace(num_layers=3))


def test_init_std_draws_normal_kernels_and_is_fingerprinted_only_when_set():
    from jaxkv.model import init_params
    lecun = init_params(TINY_MODEL, 0)
    normal = init_params(TINY_MODEL, 0, kernel_std=0.02)
    flat_l = dict(jax.tree_util.tree_flatten_with_path(lecun)[0])
    for path, x in jax.tree_util.tree_flatten_with_path(normal)[0]:
        if "kernel" in jax.tree_util.keystr(path):  # fan_in 32: lecun std 1/sqrt(32) = 0.18
            assert abs(float(np.std(np.asarray(x))) - 0.02) < 0.004, jax.tree_util.keystr(path)
        else:  # embeddings and norms are the default init's
            np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_l[path]))
    plain = tiny_config()
    assert config_fingerprint(plain.replace(init_std=None)) == config_fingerprint(plain)
    assert config_fingerprint(plain.replace(init_std=0.02)) != config_fingerprint(plain)
    # a base's init is part of its fine-tune's fingerprint, and unset it leaves the repr as it was
    assert "init_std" not in repr(plain) and "init_std=0.02" in repr(plain.replace(init_std=0.02))
    for bad in (0.0, -0.02, "0.02"):
        with pytest.raises(ValueError, match="init_std"):
            tiny_config(init_std=bad)
        with pytest.raises(ValueError, match="kernel_std"):
            init_params(TINY_MODEL, 0, kernel_std=bad)


def test_stage_batch_size_overrides_the_config_and_is_fingerprinted_only_when_set():
    plain = tiny_config()
    wide = plain.replace(stages=(dataclasses.replace(plain.stages[0], batch_size=6),
                                 plain.stages[1]))
    assert batch_for_step(wide, 0)["tokens"].shape == (6, 40)  # the stage's own batch
    assert batch_for_step(wide, 3)["tokens"].shape == (4, 80)  # the config's
    assert "batch_size" not in repr(plain.stages[0])
    assert config_fingerprint(wide) != config_fingerprint(plain)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            Stage(2, 80, MIX, batch_size=bad)


def test_task_labels_keep_repeated_task_names_apart():
    from train.pretrain import task_labels
    mixes = (TaskMix("passkey", 1.0, (("length", 64),)),
             TaskMix("niah_multikey", 1.0, (("length", 96), ("key_len", 1))),
             TaskMix("niah_multikey", 1.0, (("length", 96),)))
    assert task_labels(mixes) == ["passkey", "niah_multikey[length=96,key_len=1]",
                                  "niah_multikey[length=96]"]
    with pytest.raises(ValueError, match="not distinct"):
        task_labels(mixes + mixes[1:2])
