"""Interrupted gate training resumes robustly (train/rlkv.py, shared by train/duo.py): a
`python -m train rlkv` run killed mid-run, its newest checkpoint damaged (truncated files, an
emptied step folder) and its last log line torn, resumes from the newest intact step and
continues the uninterrupted run's trajectory exactly. Also: the log reader's errors, no
restorable step at all, and the permissions of atomically written files.

The model and config are tests/test_rlkv_train.py's (2 layers, 4 prompts x 2 completions per
step), with its parity reward as the data source's verifier so the entry point trains the gates
on a random model; a checkpoint every step, so a run holds 2 after its second step."""
import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.jsonio import plain_write_mode, write_json_atomic, write_text_atomic
from tests.test_rlkv_train import _save_random, _test_config, parity_reward
from train.rlkv import (GateCheckpoints, EmbeddedSource, load_model, make_gate_optimizer,
                        read_log, train_rlkv, trim_log)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
KILL_AFTER = 3  # logged steps before the kill (2 checkpoints exist by then)
# every logged metric but the timings: the trajectory
TRAJECTORY = ("step", "reward_mean", "penalty", "penalty_scale", "mean_gate", "sparsity",
              "policy_loss", "clip_frac", "grad_norm", "completion_len")


@dataclasses.dataclass(frozen=True)
class ParitySource(EmbeddedSource):
    """The embedded pool, rewarded by test_rlkv_train's `parity_reward` (a random model earns it
    half the time), so a config file alone makes the entry point move the gates."""

    def make_verifier(self, model):
        return parity_reward


def resume_config(model_dir: str):
    cfg = _test_config(model_dir)
    return cfg.replace(data=ParitySource(cfg.data.tasks), steps=STEPS, checkpoint_every=1)


def _steps(ckpt_dir: str) -> list:
    """Finalised checkpoint steps (orbax writes to a temporary folder, then renames)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def _logged_steps(log_path: str) -> int:
    """Complete (newline-terminated) lines in a log being written."""
    if not os.path.exists(log_path):
        return 0
    with open(log_path) as f:
        return sum(line.endswith("\n") for line in f)


def _kill_when_logged(proc, out_dir: str, steps: int, timeout: float) -> None:
    """SIGKILL `proc` once its log has `steps` lines and 2 checkpoints are on disk."""
    log_path, ckpt_dir = os.path.join(out_dir, "train_log.jsonl"), os.path.join(out_dir,
                                                                               "checkpoints")
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if _logged_steps(log_path) >= steps and len(_steps(ckpt_dir)) >= 2:
            proc.send_signal(signal.SIGKILL)
            return
        time.sleep(0.01)


def _trajectory(out_dir) -> list:
    with open(os.path.join(out_dir, "train_log.jsonl")) as f:
        return [tuple(json.loads(line)[k] for k in TRAJECTORY) for line in f]


def _gates(out_dir) -> dict:
    with open(os.path.join(out_dir, "gates.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run (here) and, meanwhile, `python -m train rlkv` on the same config in a
    subprocess, killed once it has logged KILL_AFTER steps."""
    tmp = tmp_path_factory.mktemp("resume")
    model_dir = _save_random(tmp / "tiny")
    cfg = resume_config(model_dir)
    cfg_file = tmp / "rlkv_resume.py"
    cfg_file.write_text(textwrap.dedent(f"""
        from tests.test_resume import resume_config
        CONFIG = resume_config({model_dir!r})
    """))
    killed = str(tmp / "killed")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXKV_NO_COMPILATION_CACHE="1")
    with open(tmp / "child.log", "w") as child_log:
        proc = subprocess.Popen([sys.executable, "-m", "train", "rlkv", "--config", str(cfg_file),
                                 "--out", killed, "--no-progress"], cwd=ROOT, env=env,
                                stdout=child_log, stderr=subprocess.STDOUT)
    watcher = threading.Thread(target=_kill_when_logged, args=(proc, killed, KILL_AFTER, 240))
    watcher.start()
    try:
        straight = str(tmp / "straight")
        train_rlkv(cfg, straight, progress=False)
    finally:
        watcher.join()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    child_output = (tmp / "child.log").read_text()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was not killed mid-run (exit {proc.returncode}):\n{child_output[-3000:]}")
    return dict(cfg=cfg, model_dir=model_dir, straight=straight, killed=killed, tmp=tmp)


def test_killed_run_resumes_past_a_truncated_checkpoint_and_a_torn_log_line(runs, capsys):
    cfg, out = runs["cfg"], runs["killed"]
    ckpt_dir = os.path.join(out, "checkpoints")
    steps = _steps(ckpt_dir)
    newest, fallback = steps[-1], steps[-2]
    assert KILL_AFTER - 1 <= newest < STEPS
    data = os.path.join(ckpt_dir, str(newest), "default", "d")
    assert os.listdir(data), os.listdir(os.path.join(ckpt_dir, str(newest)))
    for name in os.listdir(data):  # a torn write of the step's arrays
        path = os.path.join(data, name)
        os.truncate(path, os.path.getsize(path) // 2)
    log_path = os.path.join(out, "train_log.jsonl")
    with open(log_path) as f:
        text = f.read()
    cut = text.rstrip("\n").rfind("\n") + 1 + 12  # the last line cut to 12 characters
    with open(log_path, "w") as f:
        f.write(text[:cut])

    report = train_rlkv(cfg, out, progress=False)
    err = capsys.readouterr().err
    assert f"checkpoint step {newest} does not restore" in err, err
    assert f"resuming from step {fallback}" in err and "dropped a torn final line" in err, err
    assert report["steps"] == STEPS
    assert _trajectory(out) == _trajectory(runs["straight"])  # exactly, step by step
    assert _gates(out) == _gates(runs["straight"])
    assert np.min(_gates(out)["gates"]) < 1.0  # the gates did move
    assert os.listdir(ckpt_dir + ".damaged") == [str(newest)]  # set aside, not deleted
    assert _steps(ckpt_dir) == [STEPS - 1, STEPS]
    # the gate file records the model; every JSON file has a plain file's permissions
    assert _gates(out)["model_fingerprint"] == load_model(runs["model_dir"]).fingerprint
    mode = plain_write_mode(os.path.join(out, "no_such_file"))
    for name in ("gates.json", "config.json", "report.json", "train_set.json", "train_log.jsonl"):
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == mode, name


def test_emptied_newest_step_falls_back_to_the_previous_one(runs, capsys):
    out = str(runs["tmp"] / "emptied")
    cfg = runs["cfg"]
    train_rlkv(cfg, out, max_steps=4, progress=False)
    ckpt_dir = os.path.join(out, "checkpoints")
    assert _steps(ckpt_dir) == [3, 4]
    step_dir = os.path.join(ckpt_dir, "4")
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)
    capsys.readouterr()
    report = train_rlkv(cfg, out, progress=False)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "does not restore" in ln]
    assert len(lines) == 1 and "step 4 does not restore (ValueError: its folder is empty)" in \
        lines[0] and "resuming from step 3" in lines[0], err
    assert report["steps"] == STEPS
    assert _trajectory(out) == _trajectory(runs["straight"])
    assert _gates(out) == _gates(runs["straight"])


def _gate_state(value: float) -> dict:
    gates = jnp.full((2, 2), value)
    return {"gates": gates, "opt_state": make_gate_optimizer(1e-2, 0.0).init(gates),
            "step": np.array(0, np.int64), "rng": np.asarray(jax.random.PRNGKey(0))}


def test_no_restorable_step_is_an_error(tmp_path):
    ckpt = GateCheckpoints(str(tmp_path / "checkpoints"))
    for step in (1, 2):
        ckpt.save(step, {**_gate_state(step / 4), "step": np.array(step, np.int64)})
    ckpt.close()
    for step in (1, 2):
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
        os.mkdir(tmp_path / "checkpoints" / str(step))
    with pytest.raises(ValueError, match=r"checkpoints=.*no checkpoint restores \(step 2: "
                                         r"ValueError: its folder is empty; step 1: "):
        GateCheckpoints(str(tmp_path / "checkpoints")).restore_or(_gate_state(1.0))
    assert _steps(str(tmp_path / "checkpoints")) == [1, 2]  # nothing moved
    assert not os.path.exists(str(tmp_path / "checkpoints.damaged"))


def test_log_reader_drops_only_a_torn_last_line(tmp_path, capsys):
    path = str(tmp_path / "train_log.jsonl")
    good = [json.dumps({"step": s, "loss": s / 3}) for s in (1, 2, 3)]
    with open(path, "w") as f:
        f.write("\n".join(good) + "\n" + '{"step": 4, "lo')
    records, lines, torn = read_log(path)
    assert torn and [r["step"] for r in records] == [1, 2, 3] and lines == good
    trim_log(path, 2)
    assert "dropped a torn final line" in capsys.readouterr().err
    with open(path) as f:
        assert f.read() == good[0] + "\n" + good[1] + "\n"
    # a last line that parses but lost its newline is kept, and appends start on a new line
    with open(path, "a") as f:
        f.write(good[2])
    trim_log(path, 5)
    with open(path) as f:
        assert f.read() == "\n".join(good) + "\n"
    with open(path, "w") as f:
        f.write(good[0] + "\n{not json\n" + good[2] + "\n")
    with pytest.raises(ValueError, match=r"train_log.jsonl, line 2: not valid JSON"):
        trim_log(path, 5)
    with open(path, "w") as f:
        f.write(good[0] + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object per line"):
        read_log(path)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=oct)
def test_atomic_writes_have_a_plain_files_permissions(tmp_path, umask):
    """A new file: 0o666 & ~umask, as `open(path, "w")` (not mkstemp's 0o600); an existing
    one keeps its mode (as `open(path, "w")` leaves it)."""
    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
        write_json_atomic({"a": 1}, tmp_path / "atomic.json")
        write_text_atomic("x\n", tmp_path / "sub" / "atomic.txt")
    finally:
        os.umask(previous)
    plain = stat.S_IMODE(os.stat(tmp_path / "plain.json").st_mode)
    assert plain == 0o666 & ~umask
    for name in ("atomic.json", "sub/atomic.txt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == plain, name
    os.chmod(tmp_path / "atomic.json", 0o604)
    write_json_atomic({"a": 2}, tmp_path / "atomic.json")
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.json").st_mode) == 0o604
    assert json.loads((tmp_path / "atomic.json").read_text()) == {"a": 2}
    assert sorted(os.listdir(tmp_path)) == ["atomic.json", "plain.json", "sub"]  # no temp files
