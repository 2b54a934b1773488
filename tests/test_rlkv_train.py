"""`python -m train rlkv`: the pieces of the objective worked by hand, a 2-step smoke test of the
entry point, resume == uninterrupted, data parallel == single device, and the paper configs'
code path on tiny random models of their architectures."""
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.hf import save_hf
from jaxkv.model.config import ModelConfig
from jaxkv.model.model import Model
from jaxkv.tasks import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from tests.helpers import random_params
from train.__main__ import main
from train.config_loading import load_config
from train.pretrain import TaskMix
from train.rlkv import (EmbeddedSource, JsonlSource, RLKVConfig, RLKVTrainer, adaptive_scale,
                        build_loss_batch, clipped_policy_loss, compute_advantages, l1_penalty,
                        load_model, step_indices, stratified_by_length, train_rlkv)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256,
            tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=(EOS_ID,),
            pad_token_id=PAD_ID)


def _save_random(folder, tokenizer=None, **changes) -> str:
    cfg = ModelConfig(**{**TINY, **changes})
    params = random_params(cfg, 0)
    save_hf(Model(config=cfg, params=params, tokenizer=tokenizer), str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_random(tmp_path_factory.mktemp("rlkv") / "tiny")


def _test_config(model_dir: str) -> RLKVConfig:
    """configs/rlkv/tiny.py at test sizes: running_sum with 2..4 digits (prompts of 7..11 tokens,
    targets of 15..25), 4 prompts x 2 completions per step. A random model solves nothing, so
    every pool problem is kept (keep_only_solved=False)."""
    base = load_config(os.path.join(ROOT, "configs/rlkv/tiny.py"))
    data = EmbeddedSource(tasks=tuple(TaskMix("running_sum", 1.0, (("n_digits", n),))
                                      for n in (2, 3, 4)))
    return base.replace(model=model_dir, data=data, group_size=2, prompts_per_step=4,
                        pool_size=9, train_size=6, distill_batch_size=8, keep_only_solved=False,
                        sink=2, window=4, steps=4, checkpoint_every=2, tau=0.3)


def parity_reward(item, completion):
    """A reward a random model earns half the time: the first sampled token is even."""
    return float(completion[0] % 2 == 0)


# ---- the objective by hand --------------------------------------------------------------------

def test_adaptive_penalty_by_hand():
    assert adaptive_scale(math.log(2), tau=0.5) == pytest.approx(1.0)  # e^{ln 2} - 1 = 1
    assert adaptive_scale(0.5, tau=0.5) == 0.0  # r_mean <= tau: penalty off
    assert adaptive_scale(0.2, tau=0.5) == 0.0
    assert adaptive_scale(0.6, tau=0.55) == pytest.approx(math.e ** 0.6 - 1)  # 0.8221
    gates = jnp.array([[1.0, 0.5], [0.25, 0.25]])
    # beta * mean|alpha| * s = 1e-3 * (2 / 4) * 1
    assert float(l1_penalty(gates, 1e-3, 1.0)) == pytest.approx(5e-4)
    assert float(l1_penalty(gates, 1e-3, adaptive_scale(0.4, 0.5))) == 0.0
    # d/d alpha = beta * s / (L * K) = 1e-3 / 4 for positive gates
    grad = jax.grad(l1_penalty)(gates, 1e-3, 1.0)
    np.testing.assert_allclose(np.asarray(grad), np.full((2, 2), 2.5e-4), rtol=1e-6)


def test_advantages_by_hand():
    rewards = [1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1]
    adv = compute_advantages(rewards, 4, "group")
    # group 1: mean 1/4, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    np.testing.assert_allclose(adv[:4], [1.5, -0.5, -0.5, -0.5], rtol=1e-5)
    # group 2: mean 1/2, std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.86603
    np.testing.assert_allclose(adv[4:8], [0.86603, 0.86603, -0.86603, -0.86603], rtol=1e-4)
    np.testing.assert_array_equal(adv[8:], 0.0)  # all solved: no signal
    batch = compute_advantages(rewards, 4, "batch")
    # batch std of 7 ones and 5 zeros: sqrt((7 * (5/12)^2 + 5 * (7/12)^2) / 11) = 0.514929
    np.testing.assert_allclose(batch[:4], np.array([0.75, -0.25, -0.25, -0.25]) / 0.514929,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="groups of 4"):
        compute_advantages([1, 0, 1], 4)


def test_loss_batch_and_clipped_loss_by_hand():
    tokens, plens, w = build_loss_batch([[1, 2, 3], [4, 5]], [[7, 8], [9, 10, 2]], pad_id=0,
                                        bucket=8)
    assert tokens.tolist() == [[1, 2, 3, 7, 8, 0, 0, 0], [4, 5, 9, 10, 2, 0, 0, 0]]
    assert plens.tolist() == [3, 2]
    # token mean over 5 completion tokens; w[i, t] marks tokens[i, t + 1] in the completion
    assert np.flatnonzero(w[0]).tolist() == [2, 3] and np.flatnonzero(w[1]).tolist() == [1, 2, 3]
    np.testing.assert_allclose(w.sum(), 1.0)
    np.testing.assert_allclose(w[w > 0], 0.2)
    _, _, w2 = build_loss_batch([[1, 2, 3], [4, 5]], [[7, 8], [9, 10, 2]], 0,
                                "seq_mean_token_mean", bucket=8)
    np.testing.assert_allclose(w2[0, 2:4], 1 / (2 * 2))
    np.testing.assert_allclose(w2[1, 1:4], 1 / (2 * 3))
    # clipped form: ratio 1.5 with A = +1 counts as 1.4; ratio 0.5 with A = -1 counts as 0.6
    logp = jnp.log(jnp.array([[1.5], [0.5]]))
    old = jnp.zeros((2, 1))
    loss, frac = clipped_policy_loss(logp, old, jnp.array([1.0, -1.0]), jnp.full((2, 1), 0.5),
                                     eps_clip=0.4)
    assert float(loss) == pytest.approx(0.5 * -1.4 + 0.5 * 0.6)
    assert float(frac) == 1.0
    # one update per batch: ratio == 1, gradient -A * w * dlogp
    g = jax.grad(lambda lp: clipped_policy_loss(lp, None, jnp.array([2.0, -1.0]),
                                                jnp.full((2, 1), 0.5), 0.4)[0])(logp)
    np.testing.assert_allclose(np.asarray(g), [[-1.0], [0.5]])


def test_length_stratification_and_epochs():
    lengths = [10] * 50 + [100] * 50
    rng = np.random.default_rng(0)
    idx = stratified_by_length(lengths, 20, rng, strata=4, power=1.0)
    # shares 50 * 10 : 50 * 100 -> 20 * 1/11 = 1.8 -> 2 short, 18.2 -> 18 long
    assert len(set(idx.tolist())) == 20
    assert sum(i < 50 for i in idx) == 2 and sum(i >= 50 for i in idx) == 18
    idx0 = stratified_by_length(lengths, 20, rng, strata=4, power=0.0)
    assert sum(i < 50 for i in idx0) == 10  # power 0: proportional
    assert stratified_by_length([5, 6], 10, rng).tolist() == [0, 1]
    seen = np.concatenate([step_indices(6, s, 4, seed=0) for s in range(3)])  # 12 = 2 epochs
    assert sorted(seen[:6].tolist()) == list(range(6))  # each epoch a permutation
    assert sorted(seen[6:].tolist()) == list(range(6))
    assert (step_indices(6, 1, 4, 0) == step_indices(6, 1, 4, 0)).all()


def test_config_validation():
    data = EmbeddedSource(tasks=(TaskMix("running_sum", 1.0, (("n_digits", 2),)),))
    with pytest.raises(ValueError, match="advantage_norm='whiten'"):
        RLKVConfig(data=data, advantage_norm="whiten")
    with pytest.raises(ValueError, match="group_size=1"):
        RLKVConfig(data=data, group_size=1)
    for bad in (5, 0, -4, True, 2.0):
        with pytest.raises(ValueError, match=f"microbatch={bad!r}: must be a positive divisor "
                                             f"of the 128 sequences"):
            RLKVConfig(data=data, microbatch=bad)
    assert RLKVConfig(data=data).microbatch is None  # one pass over the batch, as DuoConfig
    with pytest.raises(ValueError, match="gate_init='nowhere.json': no such gate file"):
        RLKVConfig(data=data, gate_init="nowhere.json")
    with pytest.raises(ValueError, match="gate_init=-0.5"):
        RLKVConfig(data=data, gate_init=-0.5)
    tiny = load_config(os.path.join(ROOT, "configs/rlkv/tiny.py"))
    assert (tiny.group_size, tiny.beta, tiny.tau, tiny.learning_rate) == (4, 1e-3, 0.5, 1e-2)
    assert tiny.advantage_norm == "group" and (tiny.sink, tiny.window) == (4, 16)
    assert tiny.data.default_max_new_tokens() == 125 + 8  # running_sum at 24 digits: 5n + 5
    for name, tau in (("llama31_8b_r1", 0.5), ("qwen25_7b_r1", 0.55)):
        paper = load_config(os.path.join(ROOT, f"configs/rlkv/{name}.py"))
        assert (paper.group_size, paper.prompts_per_step, paper.temperature, paper.eps_clip,
                paper.beta, paper.tau, paper.learning_rate, paper.weight_decay, paper.betas,
                paper.grad_clip, paper.steps, paper.sink, paper.window, paper.train_size) == (
            4, 32, 1.0, 0.4, 1e-3, tau, 1e-2, 0.017, (0.9, 0.999), 1.0, 185, 128, 256, 3000)


# ---- the entry point --------------------------------------------------------------------------

def test_smoke_two_steps_through_main(tmp_path, model_dir):
    cfg_file = tmp_path / "rlkv_test.py"
    cfg_file.write_text(textwrap.dedent(f"""
        from tests.test_rlkv_train import _test_config
        CONFIG = _test_config({model_dir!r})
    """))
    out = tmp_path / "run"
    assert main(["rlkv", "--config", str(cfg_file), "--out", str(out), "--max-steps", "2",
                 "--no-progress"]) == 0
    with open(out / "gates.json") as f:
        payload = json.load(f)
    assert payload["layers"] == 2 and payload["kv_heads"] == 2
    g = np.array(payload["gates"])
    assert g.shape == (2, 2) and (g >= 0).all() and (g <= 1).all()
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]
    for key in ("reward_mean", "penalty", "mean_gate", "sparsity", "policy_loss", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in log), key
    train_set = json.load(open(out / "train_set.json"))
    assert train_set["stats"]["pool"] == 9 and len(train_set["items"]) == 6
    assert os.path.isdir(out / "checkpoints" / "2")


def test_steps_flag_extends_a_finished_run(tmp_path, model_dir):
    cfg_file = tmp_path / "rlkv_test.py"
    cfg_file.write_text(textwrap.dedent(f"""
        from tests.test_rlkv_train import _test_config
        CONFIG = _test_config({model_dir!r})
    """))
    out = tmp_path / "run"
    base = ["rlkv", "--config", str(cfg_file), "--out", str(out), "--no-progress"]
    assert main(base + ["--steps", "1"]) == 0
    assert json.load(open(out / "report.json"))["steps"] == 1
    assert main(base + ["--steps", "3"]) == 0  # resumes at step 1, goes on to 3
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]
    report = json.load(open(out / "report.json"))
    assert report["steps"] == 3 and report["total_steps"] == 3
    with pytest.raises(ValueError, match="steps=0"):
        main(base + ["--steps", "0"])


def test_resume_continues_the_same_trajectory(tmp_path, model_dir):
    cfg = _test_config(model_dir)
    model = load_model(model_dir)
    straight = train_rlkv(cfg, str(tmp_path / "a"), progress=False, model=model,
                          reward_fn=parity_reward)
    train_rlkv(cfg, str(tmp_path / "b"), max_steps=2, progress=False, model=model,
               reward_fn=parity_reward)
    resumed = train_rlkv(cfg, str(tmp_path / "b"), progress=False, model=model,
                         reward_fn=parity_reward)
    assert straight["steps"] == resumed["steps"] == 4
    ga = json.load(open(tmp_path / "a" / "gates.json"))["gates"]
    gb = json.load(open(tmp_path / "b" / "gates.json"))["gates"]
    assert ga == gb  # identical, not merely close
    assert np.array(ga).min() < 1.0  # the gates did move
    log_a = [json.loads(x) for x in open(tmp_path / "a" / "train_log.jsonl")]
    log_b = [json.loads(x) for x in open(tmp_path / "b" / "train_log.jsonl")]
    key = lambda log: [(r["step"], r["reward_mean"], r["mean_gate"]) for r in log]
    assert key(log_a) == key(log_b) and len(log_b) == 4
    assert any(r["penalty"] > 0 for r in log_a)  # some r_mean > tau = 0.3


def test_step_trains_only_the_gates(model_dir):
    cfg = _test_config(model_dir)
    model = load_model(model_dir)
    trainer = RLKVTrainer(cfg, model, reward_fn=parity_reward)
    state = trainer.init_state()
    # the optimiser state holds the gates alone: every array leaf is [L, K] (Adam's moments)
    # or a scalar (the step count); no model parameter is in it
    shapes = {tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(state["opt_state"])}
    assert shapes <= {(2, 2), ()}, shapes
    np.testing.assert_array_equal(np.asarray(state["gates"]), 1.0)
    # a warm start from a gate file of this model: the gates are the file's, the optimiser fresh
    from jaxkv.policies.rlkv import save_gates
    warm_file = save_gates(os.path.join(os.path.dirname(model_dir), "warm.json"),
                           np.array([[0.25, 1.0], [0.5, 0.75]]), model)
    warm = RLKVTrainer(cfg.replace(gate_init=warm_file), model, reward_fn=parity_reward)
    np.testing.assert_array_equal(np.asarray(warm.init_state()["gates"]),
                                  [[0.25, 1.0], [0.5, 0.75]])
    before = jax.tree_util.tree_map(np.asarray, model.params)
    items = cfg.data.pool(4, seed=0, model=model)
    state, metrics = trainer.step(state, items)
    g = np.asarray(state["gates"])
    assert (g >= 0).all() and (g <= 1).all()
    assert metrics["step"] == 1 and 0.0 <= metrics["sparsity"] <= 1.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, trainer.model.params)


CHILD = textwrap.dedent("""
    import json
    import jax, numpy as np
    from tests.test_rlkv_train import _test_config, parity_reward
    from train.rlkv import RLKVTrainer, load_model, make_data_mesh

    assert len(jax.devices()) == 4, jax.devices()
    cfg = _test_config({model_dir!r})
    model = load_model({model_dir!r})
    trainer = RLKVTrainer(cfg, model, make_data_mesh(4), reward_fn=parity_reward)
    state, metrics = trainer.step(trainer.init_state(), cfg.data.pool(4, seed=0, model=model))
    print(json.dumps(dict(gates=np.asarray(state["gates"]).tolist(),
                          reward=metrics["reward_mean"], loss=metrics["policy_loss"],
                          ndev=len(state["gates"].sharding.device_set))))
""")


def test_data_parallel_step_equals_single_device(model_dir):
    """One step with rollouts and loss batch on a 4-device "data" axis (in a subprocess with 4
    host devices) == the same step here on one device (the per-sequence path: a data mesh runs
    it, so the single-device step is asked for it with prefill_once=False)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(model_dir=model_dir)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cfg = _test_config(model_dir).replace(prefill_once=False)  # meanwhile, one device
    model = load_model(model_dir)
    trainer = RLKVTrainer(cfg, model, reward_fn=parity_reward)
    state, metrics = trainer.step(trainer.init_state(), cfg.data.pool(4, seed=0, model=model))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["ndev"] == 4
    assert out["reward"] == metrics["reward_mean"]  # the same rollouts
    np.testing.assert_allclose(out["loss"], metrics["policy_loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["gates"], np.asarray(state["gates"]), rtol=0, atol=1e-6)
    assert np.asarray(state["gates"]).min() < 1.0


# ---- the paper configs on tiny random models of their architectures ----------------------------

ARCHS = {
    "llama31_8b_r1": dict(architecture="LlamaForCausalLM", tie_word_embeddings=False,
                          rope_theta=500000.0,
                          rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0),
                                        ("low_freq_factor", 1.0),
                                        ("original_max_position_embeddings", 64),
                                        ("rope_type", "llama3"))),
    "qwen25_7b_r1": dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=False,
                         attention_bias=True, rope_theta=1000000.0),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_paper_config_code_path(tmp_path, name):
    """The paper config, hyperparameters kept (32 prompts x 4, bf16, sink 128 + window 256,
    rollout chunks of 32, microbatches of 4 with remat), with the model swapped for a tiny random
    one of the same architecture (1 layer, to compile fast), a small local JSONL pool and 8 new
    tokens."""
    from jaxkv.tasks import build_tokenizer
    folder = _save_random(tmp_path / name, tokenizer=build_tokenizer(), num_layers=1,
                          **ARCHS[name])
    data = tmp_path / "pool.jsonl"
    with open(data, "w") as f:
        for a in range(12):
            f.write(json.dumps({"question": f"SUM i0 {a % 10} i1 1 ?",
                                "answer": f"#### {a % 10 + 1}"}) + "\n")
    paper = load_config(os.path.join(ROOT, f"configs/rlkv/{name}.py"))
    cfg = paper.replace(model=folder, data=JsonlSource(str(data), paper.data.template),
                        max_new_tokens=8, pool_size=12, train_size=12, keep_only_solved=False,
                        data_parallel=1)
    report = train_rlkv(cfg, str(tmp_path / "run"), max_steps=2, progress=False)
    assert report["steps"] == 2 and report["distill"]["pool"] == 12
    g = np.array(json.load(open(tmp_path / "run" / "gates.json"))["gates"])
    assert g.shape == (1, 2) and (g >= 0).all() and (g <= 1).all()
    log = [json.loads(x) for x in open(tmp_path / "run" / "train_log.jsonl")]
    assert len(log) == 2 and all(np.isfinite(r["policy_loss"]) for r in log)


def test_load_model_takes_embedded_names():
    """"embedded" is the default model, as is its name "tiny" (the gate recipes train on
    "embedded"); anything else is a registered name, a folder or a .gguf file."""
    from jaxkv.embedded import EMBEDDED_CONFIGS, embedded_model_path
    assert embedded_model_path(name="tiny") is not None, "jaxkv/assets/tiny is shipped"
    assert list(EMBEDDED_CONFIGS) == ["tiny"]
    default, by_name = load_model("embedded"), load_model("tiny")
    assert default.path.endswith("tiny") and by_name.path == default.path
    assert default.fingerprint == by_name.fingerprint
    import configs.duo.tiny as duo
    import configs.rlkv.tiny as rlkv
    assert rlkv.CONFIG.model == duo.CONFIG.model == "embedded"
    with pytest.raises(ValueError, match="not a registered model"):
        load_model("no_such_folder")
