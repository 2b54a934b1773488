"""`python -m train duo`: the DuoAttention baseline: the same gates trained by distillation.

    python -m train duo --config configs/duo/tiny.py --out runs/duo_tiny [--max-steps N]

Same gates `alpha [L, K]` (raw, initialised to 1, clipped into [0, 1] after every step) and the
same mixing as RLKV (`jaxkv.model.gated.mixed_attention_fn`), but a different signal:

    loss = MSE(h_mixed, stop_gradient(h_full)) at the answer positions + reg * mean|alpha|

h_full / h_mixed: the final (normed) hidden states of `Decoder.forward(..., return_hidden=True)`
with full attention (the teacher) and with mixed attention (every query mixed, prompt included,
as DuoAttention's streaming heads are during prefill too). MSE: mean over the answer positions of
the mean over the hidden dimension of the squared difference. Answer positions: the positions of
the target tokens (`A : <value> <eos>`) appended to each prompt. reg = 0.05.

Data: synthetic retrieval prompts from jaxkv.tasks (multi-key needles `niah_multikey`, passkeys
`passkey`), at several lengths and key counts (`TaskMix`), or for a real model the real-text
tasks (`TextMix`: passkey, niah_multikey_1, ... made with its tokenizer, target = the expected
answers); the batch of step s is drawn from
`numpy.random.default_rng([seed, step])` (resumable with no data state), padded to one length.
Optimiser: AdamW lr 0.02, no weight decay (DuoAttention), no gradient clipping unless configured.

Checkpoints, resume (falling back past damaged checkpoints, dropping a torn last log line),
logging, data parallelism and OUT/gates.json (recording the model's fingerprint) as in
`train/rlkv.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.checks import check_int
from jaxkv.embedded import load_model
from jaxkv.model.config import ModelConfig
from jaxkv.model.decoder import Decoder
from jaxkv.model.gated import gate_stats, mixed_attention_fn
from jaxkv.sharding import data_mesh as make_data_mesh
from jaxkv.sharding import put_batch, replicate
from train.gate_run import check_gate_init, initial_gates, run_gate_training, write_config
from train.grpo import gate_update_fn, make_gate_optimizer
from train.pretrain import TaskMix


@dataclasses.dataclass(frozen=True)
class TextMix:
    """A real-text retrieval task of the mixture (`jaxkv.tasks.text`, for real models): registry
    name, sampling weight, settings as (key, value) pairs, prompt length in the model's tokens,
    plain prompt or the model's chat template. The target appended to the prompt is the task's
    expected answers, comma-separated, then '.' and the EOS."""

    name: str
    weight: float = 1.0
    settings: Tuple[Tuple[str, object], ...] = ()
    length: int = 1024
    chat: bool = False

    def __post_init__(self):
        from jaxkv.tasks.text import text_task
        text_task(self.name, **dict(self.settings))  # validates name and settings
        check_int("length", self.length, 1)  # prompt tokens

    @property
    def label(self) -> str:
        return f"{self.name}@{self.length}" + "".join(f",{k}={v}" for k, v in self.settings)


TEXT_TARGET_ROOM = 64  # tokens after the longest TextMix prompt: the target and padding


@dataclasses.dataclass(frozen=True)
class DuoConfig:
    # retrieval tasks with their settings; weight = sampling share. TaskMix: the in-house tasks
    # (embedded models); TextMix: real-text tasks made with the model's tokenizer
    tasks: Tuple[Union[TaskMix, TextMix], ...]
    model: str = "embedded"
    dtype: Optional[str] = None
    batch_size: int = 8
    seq_len: Optional[int] = None  # None: the longest prompt + target of any task
    sink: int = 128
    window: int = 256
    reg: float = 0.05  # weight of mean|alpha|
    learning_rate: float = 0.02
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    grad_clip: Optional[float] = None
    steps: int = 2000
    gate_init: Union[float, str] = 1.0  # every gate's start, or a gate file to start from
    remat: bool = False  # jax.checkpoint each layer's attention (no saving on XLA:CPU)
    microbatch: Optional[int] = None  # sequences per gradient pass (None: the whole batch)
    data_parallel: int = 1
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks: give at least one retrieval TaskMix")
        kinds = {type(t) for t in self.tasks}
        if len(kinds) > 1 or not kinds <= {TaskMix, TextMix}:
            raise ValueError(f"tasks: all TaskMix (in-house models) or all TextMix (real "
                             f"models), got {sorted(k.__name__ for k in kinds)}")
        for t in self.tasks:
            if isinstance(t, TextMix):
                if self.seq_len is not None and t.length + TEXT_TARGET_ROOM > self.seq_len:
                    raise ValueError(f"seq_len={self.seq_len}: task {t.label} needs "
                                     f"{t.length} + {TEXT_TARGET_ROOM} tokens")
                continue
            task = t.make()
            if self.seq_len is not None and task.max_len > self.seq_len:
                raise ValueError(f"seq_len={self.seq_len}: task {t.label} needs up to "
                                 f"{task.max_len} tokens")
        for name in ("batch_size", "steps", "window", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: must be a positive integer")
        for name in ("sink", "data_parallel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r}: must be an integer >= 0")
        if self.microbatch is not None:
            m = self.microbatch
            if isinstance(m, bool) or not isinstance(m, int) or m < 1 or self.batch_size % m:
                raise ValueError(f"microbatch={m!r}: a positive divisor of batch_size="
                                 f"{self.batch_size} (or None for one pass over the batch)")
            if self.data_parallel > 1 and m % self.data_parallel:
                raise ValueError(f"microbatch={m}: must be a multiple of data_parallel="
                                 f"{self.data_parallel}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate}: must be > 0")
        if self.reg < 0 or self.weight_decay < 0:
            raise ValueError(f"reg={self.reg}, weight_decay={self.weight_decay}: must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip}: > 0, or None for no clipping")
        check_gate_init(self.gate_init)

    @property
    def text(self) -> bool:
        return isinstance(self.tasks[0], TextMix)

    @property
    def length(self) -> int:
        if self.seq_len:
            return self.seq_len
        if self.text:
            return max(t.length for t in self.tasks) + TEXT_TARGET_ROOM
        return max(t.make().max_len for t in self.tasks)

    def replace(self, **kw) -> "DuoConfig":
        return dataclasses.replace(self, **kw)


def batch_for_step(cfg: DuoConfig, step: int, model=None):
    """tokens int32 [B, seq] (prompt + target, right-padded) and answer_mask float32 [B, seq]
    (1 at the target tokens' positions), from `default_rng([seed, step])`. TextMix tasks need
    the `model` (its tokenizer, pad and EOS ids)."""
    from jaxkv.tasks import make_training_batch
    rng = np.random.default_rng([cfg.seed, step])
    weights = np.array([t.weight for t in cfg.tasks], np.float64)
    picks = rng.choice(len(cfg.tasks), size=cfg.batch_size, p=weights / weights.sum())
    if cfg.text:
        return _text_batch(cfg, step, picks, model)
    tasks = [t.make() for t in cfg.tasks]
    batch = make_training_batch([tasks[i].sample(rng) for i in picks], cfg.length)
    # loss_mask[t] = 1 where tokens[t + 1] is a target token; the target's positions are t + 1
    answer = np.zeros_like(batch["loss_mask"])
    answer[:, 1:] = batch["loss_mask"][:, :-1]
    return batch["tokens"], answer


def _text_batch(cfg: DuoConfig, step: int, picks, model):
    from jaxkv.tasks.text import make_text_examples
    if model is None or getattr(model, "tokenizer", None) is None:
        raise ValueError("DuoConfig with TextMix tasks: give the model (with its tokenizer)")
    mcfg = model.config
    tokens = np.full((len(picks), cfg.length), mcfg.pad_token_id, np.int32)
    answer = np.zeros((len(picks), cfg.length), np.float32)
    eos = int(mcfg.eos_ids[0])
    for row, i in enumerate(picks):
        t = cfg.tasks[int(i)]
        ex = make_text_examples(t.name, model.tokenizer, t.length, 1,
                                seed=cfg.seed * 1_000_003 + step * 1009 + row, chat=t.chat,
                                **dict(t.settings))[0]
        target = list(model.tokenizer.encode(" " + ", ".join(ex.answers) + ".",
                                             add_special_tokens=False)) + [eos]
        seq = list(ex.prompt_ids) + target
        if len(seq) > cfg.length:
            raise ValueError(f"seq_len={cfg.length}: task {t.label} made a {len(seq)}-token "
                             f"prompt + target")
        tokens[row, :len(seq)] = seq
        answer[row, len(ex.prompt_ids):len(seq)] = 1.0
    return tokens, answer


def distill_loss(gates, params, tokens, answer_mask, denom=None, *, config: ModelConfig,
                 sink: int, window: int, remat: bool = False):
    """MSE of the final hidden states (mixed vs stop_gradient(full)) at the answer positions:
    the squared errors summed over them, divided by `denom` (default: their number here; give
    the whole batch's when the batch is summed over several passes)."""
    module = Decoder(config)
    _, h_full = module.apply({"params": params}, tokens, return_hidden=True,
                             method=Decoder.forward)
    h_full = jax.lax.stop_gradient(h_full.astype(jnp.float32))
    _, h_mix = module.apply({"params": params}, tokens,
                            attention_fn=mixed_attention_fn(gates, sink, window, remat=remat),
                            return_hidden=True, method=Decoder.forward)
    err = jnp.mean(jnp.square(h_mix.astype(jnp.float32) - h_full), axis=-1)  # [B, T]
    if denom is None:
        denom = jnp.maximum(jnp.sum(answer_mask), 1.0)
    return jnp.sum(err * answer_mask) / denom


@functools.lru_cache(maxsize=8)
def _distill_grad_fn(config: ModelConfig, sink: int, window: int, remat: bool = False):
    return jax.jit(jax.value_and_grad(functools.partial(distill_loss, config=config, sink=sink,
                                                        window=window, remat=remat)))


def duo_step(cfg: DuoConfig, model, state: dict, tokens, answer_mask, mesh=None):
    """One DuoAttention step -> (new state, metrics)."""
    t0 = time.time()
    grad_fn = _distill_grad_fn(model.config, cfg.sink, cfg.window, cfg.remat)
    apply = gate_update_fn(float(cfg.learning_rate), float(cfg.weight_decay),
                           tuple(float(b) for b in cfg.betas),
                           None if cfg.grad_clip is None else float(cfg.grad_clip),
                           float(cfg.reg))
    # passes of `microbatch` sequences, their losses and gradients summed: the whole batch's
    # (each pass divides by the whole batch's answer positions); one pass holds less memory
    m = cfg.microbatch or len(tokens)
    denom = jnp.float32(max(float(np.sum(answer_mask)), 1.0))
    mse, grads = 0.0, None
    for i in range(0, len(tokens), m):
        chunk = put_batch((tokens[i:i + m], answer_mask[i:i + m]), mesh)
        value, g = grad_fn(state["gates"], model.params, *chunk, denom)
        mse, grads = mse + value, g if grads is None else grads + g
    gates, opt_state, penalty, gnorm = apply(state["gates"], state["opt_state"], grads,
                                             jnp.float32(1.0))
    new_state = {**state, "gates": gates, "opt_state": opt_state,
                 "step": np.array(int(state["step"]) + 1, np.int64)}
    stats = gate_stats(gates)
    metrics = {"step": int(new_state["step"]), "mse": float(mse), "penalty": float(penalty),
               "loss": float(mse) + float(penalty), "mean_gate": stats["mean_gate"],
               "sparsity": stats["sparsity"], "grad_norm": float(gnorm),
               "step_s": round(time.time() - t0, 3)}
    return new_state, metrics


def train_duo(cfg: DuoConfig, out_dir: str, max_steps: Optional[int] = None,
              progress: bool = True, model=None) -> dict:
    """Run (or resume) DuoAttention gate training into out_dir; returns the report."""
    os.makedirs(out_dir, exist_ok=True)
    loaded = model if model is not None else load_model(cfg.model, cfg.dtype)
    mesh = make_data_mesh(cfg.data_parallel)
    model = loaded
    if mesh is not None:
        model = dataclasses.replace(loaded, params=replicate(loaded.params, mesh))
    write_config(out_dir, cfg)
    optimizer = make_gate_optimizer(cfg.learning_rate, cfg.weight_decay, cfg.betas,
                                    cfg.grad_clip)
    gates = replicate(initial_gates(model, cfg.gate_init), mesh)
    state = {"gates": gates, "opt_state": optimizer.init(gates), "step": np.array(0, np.int64),
             "rng": np.asarray(jax.random.PRNGKey(cfg.seed))}  # unused: kept for one format
    return run_gate_training(
        "duo", cfg, out_dir, state, mesh,
        lambda state, step: duo_step(cfg, model, state, *batch_for_step(cfg, step, loaded),
                                     mesh),
        lambda m: dict(mse=f"{m['mse']:.2e}", gate=f"{m['mean_gate']:.3f}",
                       sparsity=f"{m['sparsity']:.2f}"),
        max_steps, progress, model=loaded)


__all__ = ["DuoConfig", "TextMix", "batch_for_step", "distill_loss", "duo_step", "train_duo"]
