"""`python -m train duo` (DuoAttention baseline): the batch and its answer positions, the first
step worked by hand, a 2-step smoke test of the entry point, and resume == uninterrupted."""
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.hf import save_hf
from jaxkv.model.config import ModelConfig
from jaxkv.model.model import Model
from jaxkv.tasks import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from train.__main__ import main
from train.config_loading import load_config
from train.duo import DuoConfig, batch_for_step, duo_step, train_duo
from train.pretrain import TaskMix
from tests.helpers import random_params
from train.rlkv import load_model, make_gate_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=(EOS_ID,),
                      pad_token_id=PAD_ID)
    folder = str(tmp_path_factory.mktemp("duo") / "tiny")
    save_hf(Model(cfg, random_params(cfg, 1)), folder)
    return folder


def _test_config(model_dir: str) -> DuoConfig:
    """configs/duo/tiny.py at test sizes: 64-token needle / passkey prompts, 4 per batch."""
    base = load_config(os.path.join(ROOT, "configs/duo/tiny.py"))
    tasks = (TaskMix("niah_multikey", 1.0, (("length", 64), ("n_keys", 2))),
             TaskMix("passkey", 1.0, (("length", 64),)))
    return base.replace(model=model_dir, tasks=tasks, batch_size=4, sink=2, window=8, steps=4,
                        checkpoint_every=2)


def test_batch_answer_positions(model_dir):
    cfg = _test_config(model_dir)
    assert cfg.length == 64 + 8  # passkey: 64 prompt + "A : d d d d d <eos>"
    tokens, answer = batch_for_step(cfg, 0)
    assert tokens.shape == answer.shape == (4, 72)
    for row, mask in zip(tokens, answer):
        pos = np.flatnonzero(mask)
        assert pos[0] == 64 and row[pos[-1]] == EOS_ID  # prompt ends at 63; target up to <eos>
        assert (np.diff(pos) == 1).all()
    t2, a2 = batch_for_step(cfg, 0)
    assert (t2 == tokens).all() and (a2 == answer).all()  # deterministic per step
    paper = load_config(os.path.join(ROOT, "configs/duo/tiny.py"))
    assert (paper.learning_rate, paper.weight_decay, paper.reg) == (0.02, 0.0, 0.05)
    with pytest.raises(ValueError, match="seq_len=50"):
        DuoConfig(tasks=cfg.tasks, seq_len=50)


def test_first_step_by_hand(model_dir):
    """At gates = 1 the mixed model is the full one: MSE 0 and zero distillation gradient, so
    the first step moves every gate by the regulariser alone. Adam's first update is
    lr * g / (|g| + eps) = lr (up to eps 1e-8 against g = 0.05 / 4), so every gate -> 0.98."""
    cfg = _test_config(model_dir)
    model = load_model(model_dir)
    opt = make_gate_optimizer(cfg.learning_rate, cfg.weight_decay, cfg.betas, cfg.grad_clip)
    gates = jnp.ones((2, 2))
    state = {"gates": gates, "opt_state": opt.init(gates), "step": np.array(0, np.int64)}
    shapes = {tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(state["opt_state"])}
    assert shapes <= {(2, 2), ()}, shapes  # the optimiser state holds the gates alone
    tokens, answer = batch_for_step(cfg, 0)
    state, metrics = duo_step(cfg, model, state, tokens, answer)
    assert metrics["mse"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["penalty"] == pytest.approx(0.05)  # 0.05 * mean|1|
    np.testing.assert_allclose(np.asarray(state["gates"]), 0.98, atol=1e-6)
    state, metrics = duo_step(cfg, model, state, *batch_for_step(cfg, 1))
    assert metrics["mse"] > 0  # now the streaming branch shows


@pytest.mark.parametrize("micro", [1, 2])
def test_microbatches_give_the_batch_step(model_dir, micro):
    """Passes of `microbatch` sequences, summed, are the whole batch's loss and gradient: the
    same metrics and the same gates after two steps (the second with gates below 1, MSE > 0)."""
    cfg = _test_config(model_dir)
    model = load_model(model_dir)
    opt = make_gate_optimizer(cfg.learning_rate, cfg.weight_decay, cfg.betas, cfg.grad_clip)
    runs = []
    for c in (cfg, cfg.replace(microbatch=micro)):
        state = {"gates": jnp.ones((2, 2)), "opt_state": opt.init(jnp.ones((2, 2))),
                 "step": np.array(0, np.int64)}
        for step in range(2):
            state, metrics = duo_step(c, model, state, *batch_for_step(c, step))
        runs.append((np.asarray(state["gates"]), metrics))
    (g_full, m_full), (g_micro, m_micro) = runs
    assert m_full["mse"] > 0
    np.testing.assert_allclose(g_micro, g_full, atol=1e-6)
    assert m_micro["mse"] == pytest.approx(m_full["mse"], rel=1e-5)
    assert m_micro["grad_norm"] == pytest.approx(m_full["grad_norm"], rel=1e-4)


def test_gate_heat_map_panels_and_errors(tmp_path):
    from jaxkv.policies.rlkv import plot_gates
    g = np.linspace(0, 1, 12).reshape(4, 3)
    path = plot_gates([("a", g), ("b", 1 - g)], str(tmp_path / "h.png"), sparsity=0.25)
    assert open(path, "rb").read(4) == b"\x89PNG"
    assert os.listdir(tmp_path) == ["h.png"]  # written atomically: no temporary file left
    plot_gates([("a", g)], str(tmp_path / "n.png"), sparsity=None)
    with pytest.raises(ValueError, match="panel"):
        plot_gates([], str(tmp_path / "e.png"))
    with pytest.raises(ValueError, match="gates"):
        plot_gates([("bad", g + 1)], str(tmp_path / "e.png"))
    with pytest.raises(ValueError, match="path="):
        plot_gates(g, str(tmp_path / "no" / "such" / "dir.png"))
    with pytest.raises(ValueError, match="sparsity"):
        plot_gates(g, str(tmp_path / "s.png"), sparsity=1.5)


@pytest.mark.parametrize("micro", [0, 3, True])
def test_bad_microbatch(model_dir, micro):
    with pytest.raises(ValueError, match="microbatch"):
        _test_config(model_dir).replace(microbatch=micro)


def test_smoke_two_steps_through_main(tmp_path, model_dir):
    cfg_file = tmp_path / "duo_test.py"
    cfg_file.write_text(textwrap.dedent(f"""
        from tests.test_duo_train import _test_config
        CONFIG = _test_config({model_dir!r})
    """))
    out = tmp_path / "run"
    assert main(["duo", "--config", str(cfg_file), "--out", str(out), "--max-steps", "2",
                 "--no-progress"]) == 0
    payload = json.load(open(out / "gates.json"))
    g = np.array(payload["gates"])
    assert (payload["layers"], payload["kv_heads"]) == (2, 2)
    assert (g >= 0).all() and (g <= 1).all() and g.max() < 1.0
    assert open(out / "gates.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"  # the heat map
    log = [json.loads(x) for x in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]
    assert all(np.isfinite(r["mse"]) and 0 <= r["sparsity"] <= 1 for r in log)

    # a warm start: a new run from these gates (fresh optimiser); Adam's first step moves each
    # gate by at most the learning rate (0.02)
    warm = tmp_path / "warm"
    assert main(["duo", "--config", str(cfg_file), "--out", str(warm), "--max-steps", "1",
                 "--init-gates", str(out / "gates.json"), "--no-progress"]) == 0
    g1 = np.array(json.load(open(warm / "gates.json"))["gates"])
    assert np.abs(g1 - g).max() <= 0.02 + 1e-6 and not np.allclose(g1, g)
    assert json.load(open(warm / "config.json"))["gate_init"] == str(out / "gates.json")
    for bad, match in ((str(tmp_path / "none.json"), "no such gate file"), (1.5, "gate_init=1.5"),
                       (True, "gate_init=True")):
        with pytest.raises(ValueError, match=match):
            _test_config(model_dir).replace(gate_init=bad)


def test_resume_continues_the_same_trajectory(tmp_path, model_dir):
    cfg = _test_config(model_dir)
    model = load_model(model_dir)
    train_duo(cfg, str(tmp_path / "a"), progress=False, model=model)
    train_duo(cfg, str(tmp_path / "b"), max_steps=2, progress=False, model=model)
    # a run killed after its step-3 log line but before a checkpoint: the log is cut back
    with open(tmp_path / "b" / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "mse": -1.0}) + "\n")
    report = train_duo(cfg, str(tmp_path / "b"), progress=False, model=model)
    assert report["steps"] == 4
    ga = json.load(open(tmp_path / "a" / "gates.json"))["gates"]
    gb = json.load(open(tmp_path / "b" / "gates.json"))["gates"]
    assert ga == gb
    log_a = [json.loads(x) for x in open(tmp_path / "a" / "train_log.jsonl")]
    log_b = [json.loads(x) for x in open(tmp_path / "b" / "train_log.jsonl")]
    assert [(r["step"], r["mse"]) for r in log_a] == [(r["step"], r["mse"]) for r in log_b]


def test_plots_leave_pyplot_backend_alone(tmp_path):
    """The gate heat map and the harness's accuracy plot draw on their own Agg canvas: a notebook's
    pyplot backend (inline) is the same after them, so its later plt.show() still shows."""
    import matplotlib

    from jaxkv.eval.report import plot_accuracy_vs_budget
    from jaxkv.policies.rlkv import plot_gates
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_gates([("a", np.linspace(0, 1, 12).reshape(4, 3))], str(tmp_path / "h.png"))
        rec = dict(task="passkey", length=256, method="full", budget=1.0, measured_budget=1.0,
                   accuracy=1.0, ci_low=0.5, ci_high=1.0)
        plot_accuracy_vs_budget([rec, dict(rec, method="streaming", budget=0.25,
                                           measured_budget=0.25, accuracy=0.5)],
                                str(tmp_path / "p.png"))
        assert matplotlib.get_backend() == "svg"
        assert open(tmp_path / "p.png", "rb").read(4) == b"\x89PNG"
    finally:
        matplotlib.use(before)
