"""`python -m train pretrain`: train the embedded default model on the generated tasks.

Resumable: orbax checkpoints of params, optimiser state and step; the batch of step s is drawn
from `numpy.random.default_rng([seed, s])`, so a resumed run continues the same trajectory with no
data-loader state to save. Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a checkpoint interrupted mid-save is never restored. At the end the model is exported
as a Hugging Face-style folder (config.json, model.safetensors, tokenizer.json) with a JSON report
of its accuracy on every task, which `jaxkv.load_hf` reads back.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkv.model import Decoder, Model, ModelConfig, init_params


def _repr_unless_none(obj, *later: str) -> str:
    """The dataclass repr of `obj` without the fields `later` while they are None: a field added
    after the shipped model's fingerprint was taken (that repr had none) leaves it unchanged."""
    fields = [f for f in dataclasses.fields(obj)
              if not (f.name in later and getattr(obj, f.name) is None)]
    return (f"{type(obj).__qualname__}("
            + ", ".join(f"{f.name}={getattr(obj, f.name)!r}" for f in fields) + ")")


@dataclasses.dataclass(frozen=True)
class TaskMix:
    """A task of the mixture: registry name, sampling weight, settings as (key, value) pairs."""

    name: str
    weight: float = 1.0
    settings: Tuple[Tuple[str, object], ...] = ()

    def make(self):
        from jaxkv.tasks import make_task
        return make_task(self.name, **dict(self.settings))

    @property
    def label(self) -> str:
        return self.name + "".join(f",{k}={v}" for k, v in self.settings)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One curriculum stage: `steps` optimiser steps on sequences of `seq_len` tokens.

    position_span: when set, every sequence's RoPE positions get one random skip (positional
    skip-wise training, PoSE: Zhu et al., 2024): positions 0..c-1, then c+u.. for a random split
    c and gap u, the last position below `position_span`. The model computes `seq_len` tokens but
    sees relative distances (to the first tokens, the needle, ...) up to `position_span`, which a
    model trained on short sequences otherwise never sees and fails on."""

    steps: int
    seq_len: int
    tasks: Tuple[TaskMix, ...]
    position_span: Optional[int] = None
    # Sequences per step in this stage (None: the config's batch_size). Short, dense stages (the
    # induction warm-up) leave their plateau after a number of sequences, not of steps, and a
    # large batch of short sequences costs little per sequence.
    batch_size: Optional[int] = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: a stage needs at least 1 step")
        if self.batch_size is not None and not (isinstance(self.batch_size, int)
                                                and self.batch_size >= 1):
            raise ValueError(f"batch_size={self.batch_size!r} is not allowed; expected None or an "
                             f"integer >= 1")
        if not self.tasks:
            raise ValueError("tasks: a stage needs at least one task")
        for t in self.tasks:
            if t.make().max_len > self.seq_len:
                raise ValueError(f"task {t.label} needs up to {t.make().max_len} tokens, more than "
                                 f"the stage's seq_len={self.seq_len}")
        if self.position_span is not None and not (isinstance(self.position_span, int)
                                                   and self.position_span > self.seq_len):
            raise ValueError(f"position_span={self.position_span!r} is not allowed; expected None "
                             f"or an integer > seq_len={self.seq_len}")

    def __repr__(self):  # part of config_fingerprint
        return _repr_unless_none(self, "position_span", "batch_size")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig
    stages: Tuple[Stage, ...]
    eval_tasks: Tuple[TaskMix, ...]
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    eval_samples: int = 100
    # Steps over which the cosine decays (None: all steps). Pinning it lets a stage be appended
    # later without changing any earlier step: the appended steps run at the final learning rate,
    # or, with `restart_learning_rate`, on a second warmup-cosine (warm-up `restart_warmup_steps`
    # to that peak, decaying to restart_learning_rate * final_lr_fraction at the last step).
    schedule_steps: Optional[int] = None
    restart_learning_rate: Optional[float] = None
    restart_warmup_steps: int = 50
    # Start from the model another config trains (a fine-tune): `pretrain` first trains (or
    # resumes, or reuses) `base` into out_dir/base, then starts this config's stages from its
    # exported weights with a fresh optimiser and this config's own schedule. The fingerprint
    # covers the base (it is part of the repr), so the whole chain is reproducible from here.
    base: Optional["PretrainConfig"] = None
    # The projection kernels' init: None keeps Flax's lecun_normal (the shipped models); a float
    # draws them from normal(init_std) (Hugging Face's initializer_range, 0.02). With
    # lecun_normal the embedded architecture stays on the induction plateau that normal(0.02)
    # leaves (README: key matching). Ignored by a fine-tune (its weights come from `base`).
    init_std: Optional[float] = None

    def __post_init__(self):
        if self.init_std is not None and not (isinstance(self.init_std, (int, float))
                                              and self.init_std > 0):
            raise ValueError(f"init_std={self.init_std!r} is not allowed; expected None or a "
                             f"positive float")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if not self.stages:
            raise ValueError("stages: give at least one curriculum stage")
        if self.schedule_steps is not None and not 1 <= self.schedule_steps <= self.total_steps:
            raise ValueError(f"schedule_steps={self.schedule_steps} is not allowed; expected None "
                             f"or an integer in [1, total_steps={self.total_steps}]")
        if self.restart_learning_rate is not None:
            if self.schedule_steps is None or self.schedule_steps == self.total_steps:
                raise ValueError(f"restart_learning_rate={self.restart_learning_rate} needs "
                                 f"schedule_steps < total_steps={self.total_steps} (the restart "
                                 f"covers the steps after schedule_steps); got "
                                 f"schedule_steps={self.schedule_steps}")
            if not self.restart_learning_rate > 0:
                raise ValueError(f"restart_learning_rate={self.restart_learning_rate} is not "
                                 f"allowed; expected a positive float")
        if self.base is not None:
            if not isinstance(self.base, PretrainConfig):
                raise ValueError(f"base={self.base!r} is not allowed; expected None or a "
                                 f"PretrainConfig")
            # the context bound may grow (it holds no weights: RoPE has no position table)
            if (dataclasses.replace(self.base.model, max_position_embeddings=1)
                    != dataclasses.replace(self.model, max_position_embeddings=1)):
                raise ValueError("base: the base config trains another model shape "
                                 f"({self.base.model}); a fine-tune keeps the model of its base "
                                 f"({self.model}), except max_position_embeddings")

    def __repr__(self):  # a base's repr is part of its fine-tune's config_fingerprint
        return _repr_unless_none(self, "init_std")

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> Stage:
        for s in self.stages:
            if step < s.steps:
                return s
            step -= s.steps
        return self.stages[-1]

    def replace(self, **kw) -> "PretrainConfig":
        return dataclasses.replace(self, **kw)


def config_fingerprint(cfg: PretrainConfig) -> str:
    """sha256 of the config's repr: the shipped model's report records it, and a test checks it
    against configs/tiny.py, so a config changed without retraining is caught. `base` is left
    out while it is None, as are `init_std` and a Stage's `position_span` (all came after the
    shipped model)."""
    import hashlib
    return hashlib.sha256(_repr_unless_none(cfg, "base", "init_std").encode()).hexdigest()[:16]


def make_optimizer(cfg: PretrainConfig) -> optax.GradientTransformation:
    horizon = cfg.schedule_steps or cfg.total_steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, min(cfg.warmup_steps, max(horizon - 1, 1)),
        max(horizon, 2), end_value=cfg.learning_rate * cfg.final_lr_fraction)
    if cfg.restart_learning_rate is not None:
        rest = cfg.total_steps - horizon
        restart = optax.warmup_cosine_decay_schedule(
            cfg.learning_rate * cfg.final_lr_fraction, cfg.restart_learning_rate,
            min(cfg.restart_warmup_steps, max(rest - 1, 1)), max(rest, 2),
            end_value=cfg.restart_learning_rate * cfg.final_lr_fraction)
        schedule = optax.join_schedules([schedule, restart], [horizon])
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay))


def batch_for_step(cfg: PretrainConfig, step: int):
    """The (deterministic) training batch of `step`: tokens, loss_mask, positions
    int32/float32/int32 [B, seq] (positions with one skip each under `Stage.position_span`)."""
    from jaxkv.tasks import make_training_batch
    stage = cfg.stage_at(step)
    rng = np.random.default_rng([cfg.seed, step])
    weights = np.array([t.weight for t in stage.tasks], np.float64)
    picks = rng.choice(len(stage.tasks), size=stage.batch_size or cfg.batch_size,
                       p=weights / weights.sum())
    tasks = [t.make() for t in stage.tasks]
    examples = [tasks[i].sample(rng) for i in picks]
    batch = make_training_batch(examples, stage.seq_len)
    positions = np.broadcast_to(np.arange(stage.seq_len, dtype=np.int32),
                                batch["tokens"].shape).copy()
    if stage.position_span is not None:  # drawn after the examples: other stages' batches unchanged
        for b, ex in enumerate(examples):
            n = len(ex.prompt_ids) + len(ex.target_ids)
            split = int(rng.integers(1, n))  # the skip goes before token `split` (never <bos>)
            positions[b, split:] += int(rng.integers(0, stage.position_span - stage.seq_len + 1))
    batch["positions"] = positions
    return batch


def loss_fn(params, tokens, loss_mask, config: ModelConfig, positions=None):
    """Next-token cross-entropy on target positions. tokens, loss_mask, positions: [B, T]."""
    logits = Decoder(config).apply({"params": params}, tokens[:, :-1], method=Decoder.forward,
                                   positions=None if positions is None else positions[:, :-1])
    xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           tokens[:, 1:])
    mask = loss_mask[:, :-1]
    loss = (xent * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    token_acc = ((logits.argmax(-1) == tokens[:, 1:]) * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    return loss, token_acc


def make_train_step(cfg: PretrainConfig, optimizer):
    @jax.jit
    def train_step(params, opt_state, tokens, loss_mask, positions):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, tokens, loss_mask, cfg.model, positions)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc
    return train_step


@functools.lru_cache(maxsize=8)
def _optimizer_and_step(cfg: PretrainConfig):
    """(make_optimizer(cfg), its make_train_step), kept per config: a resumed or repeated run in
    the same process (a fine-tune's base, then the fine-tune; tests) reuses the compiled step, and
    the optimiser that initialises the state is the one the step updates with."""
    optimizer = make_optimizer(cfg)
    return optimizer, make_train_step(cfg, optimizer)


def _checkpoint_manager(directory: str):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def evaluate_tasks(model: Model, tasks: Sequence[TaskMix], n: int, seed: int = 1234,
                   batch_size: int = 50) -> dict:
    """Greedy exact-match accuracy of `model` (full cache) on n examples of each task, keyed by
    `task_labels` (the task's name, with its settings where a name comes more than once)."""
    from jaxkv.generate import generate
    from jaxkv.tasks import decode, sample_examples
    out = {}
    for label, mix in zip(task_labels(tasks), tasks):
        task = mix.make()
        examples = sample_examples(task, n, seed)
        max_new = max(len(e.target_ids) for e in examples) + 4
        correct = 0
        for i in range(0, n, batch_size):
            chunk = examples[i:i + batch_size]
            gen = generate(model, [e.prompt_ids for e in chunk], max_new)
            correct += sum(task.verify(e, decode(t)) for e, t in zip(chunk, gen.tokens))
        out[label] = correct / n
    return out


def task_labels(tasks: Sequence[TaskMix]) -> list:
    """One distinct label per task mix: its name, or `name[k=v,...]` (its settings) where two
    mixes share a name (a report keyed by name alone kept only the last of them)."""
    names = [m.name for m in tasks]
    labels = [m.name if names.count(m.name) == 1 else
              f"{m.name}[{','.join(f'{k}={v}' for k, v in m.settings)}]" for m in tasks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"eval tasks {labels} are not distinct; remove the repeated ones")
    return labels


def base_params(cfg: PretrainConfig, out_dir: str, progress: bool = True):
    """The exported weights of `cfg.base`, trained into out_dir/base first if they are not there
    (resumably). A base folder exported by another config is refused, not silently used."""
    from jaxkv.hf import load_hf
    base_dir = os.path.join(out_dir, "base")
    report_path = os.path.join(base_dir, "model", "train_report.json")
    if not os.path.exists(report_path):
        print(f"training the base model first ({base_dir})")
        pretrain(cfg.base, base_dir, progress=progress)
    with open(report_path) as f:
        found = json.load(f).get("config_fingerprint")
    want = config_fingerprint(cfg.base)
    if found != want:
        raise ValueError(f"{report_path}: config_fingerprint={found!r} is not the base config's "
                         f"{want!r}; remove {base_dir} to retrain the base")
    return load_hf(os.path.join(base_dir, "model"), dtype=cfg.model.dtype).params


def pretrain(cfg: PretrainConfig, out_dir: str, max_steps: Optional[int] = None,
             progress: bool = True, export: bool = True) -> dict:
    """Train (or resume) into out_dir/checkpoints; export to out_dir/model. Returns a report.
    With `cfg.base`, the base is trained first into out_dir/base and this run starts from it."""
    from tqdm import tqdm

    from jaxkv.hf import save_hf
    from jaxkv.tasks import build_tokenizer

    os.makedirs(out_dir, exist_ok=True)
    optimizer, train_step = _optimizer_and_step(cfg)
    params = (init_params(cfg.model, cfg.seed, kernel_std=cfg.init_std) if cfg.base is None
              else base_params(cfg, out_dir, progress))
    opt_state = optimizer.init(params)
    state = {"params": params, "opt_state": opt_state, "step": np.array(0, np.int64)}  # 0-d array: orbax restores it
    manager = _checkpoint_manager(os.path.join(out_dir, "checkpoints"))
    latest = manager.latest_step()
    if latest is not None:
        import orbax.checkpoint as ocp
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        print(f"resumed from step {int(state['step'])} ({out_dir}/checkpoints)")
    start = int(state["step"])
    end = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    params, opt_state = state["params"], state["opt_state"]
    log_path = os.path.join(out_dir, "train_log.jsonl")
    bar = tqdm(range(start, end), initial=start, total=end, disable=not progress,
               desc="pretrain", dynamic_ncols=True)
    t0 = time.time()
    import orbax.checkpoint as ocp
    for step in bar:
        batch = batch_for_step(cfg, step)
        params, opt_state, loss, acc = train_step(params, opt_state, jnp.asarray(batch["tokens"]),
                                                  jnp.asarray(batch["loss_mask"]),
                                                  jnp.asarray(batch["positions"]))
        loss, acc = float(loss), float(acc)
        bar.set_postfix(loss=f"{loss:.3f}", tok_acc=f"{acc:.3f}",
                        seq=cfg.stage_at(step).seq_len)
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step + 1, "loss": loss, "token_acc": acc,
                                "seq_len": cfg.stage_at(step).seq_len,
                                "elapsed_s": round(time.time() - t0, 2)}) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            manager.save(step + 1, args=ocp.args.StandardSave(
                {"params": params, "opt_state": opt_state, "step": np.array(step + 1, np.int64)}))
    manager.wait_until_finished()
    manager.close()
    report = {"steps": end, "total_steps": cfg.total_steps, "seed": cfg.seed,
              "config_fingerprint": config_fingerprint(cfg)}
    if export and end == cfg.total_steps:
        model = Model(config=cfg.model, params=params, tokenizer=build_tokenizer())
        report["accuracy"] = evaluate_tasks(model, cfg.eval_tasks, cfg.eval_samples)
        report["eval_tasks"] = {label: dict(m.settings)
                                for label, m in zip(task_labels(cfg.eval_tasks), cfg.eval_tasks)}
        report["eval_samples"] = cfg.eval_samples
        export_dir = os.path.join(out_dir, "model")
        save_hf(model, export_dir)
        with open(os.path.join(export_dir, "train_report.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps(report, indent=2))
    return report
