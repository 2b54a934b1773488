"""`python -m train rlkv`: learn which KV heads reasoning needs, by RL on the gates (RLKV).

    python -m train rlkv --config configs/rlkv/tiny.py --out runs/rlkv_tiny [--max-steps N]

The recipe (docs/methods.md, RLKV, arXiv 2510.08525), as implemented here:

Gates. `alpha[l, k]`, one raw scalar per layer and KV head, initialised to 1, clipped into [0, 1]
after every optimiser step. Only the gates train: the model parameters are arguments of the jitted
functions, never differentiated and never in the optimiser state (which holds the gates alone).

Training data (self-distillation). The uncompressed model greedily answers a pool of problems;
only the ones it solves are kept (`keep_only_solved`), and the training set is drawn from them
stratified by the length of the model's own output, long outputs over-represented
(`stratified_by_length`). The embedded tasks have one output length per setting, so the pool
itself spans a range of task sizes (several `n_digits` / `n_vars` values); local GSM8K / Math500
style JSONL files (`JsonlSource`) serve real models.

One step.
  1. `prompts_per_step` problems (epochs over the training set, shuffled per epoch from
     `numpy.random.default_rng([seed, 1, epoch])`), each repeated `group_size` times.
  2. Rollouts: `generate(..., policy=GatedMixing(gates, sink, window), temperature)`: prefill in
     full, every decode step mixed per KV head, sampled with a seed split off the run's RNG key.
  3. Rewards: 1 if the task's exact verifier accepts the completion, else 0.
  4. Advantages (`compute_advantages`): "group" (default, the paper's text):
     (r - group mean) / (group std + 1e-6); "batch" (the authors' shipped config normalises over
     the batch): (r - group mean) / (batch std + 1e-6). Std is the unbiased one (ddof=1), as
     torch.std in the GRPO implementations (verl, TRL).
  5. Loss = policy loss + beta * mean(|alpha|) * s, with the reward-adaptive scale
     s = exp(r_mean) - 1 if r_mean > tau else 0 (`adaptive_scale`; r_mean, the batch's mean
     reward, is a constant: no gradient). Policy loss: PPO-clipped per token,
     -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), ratio = exp(logp - logp_old), where logp
     comes from `Decoder.forward(prompt + completion, attention_fn=mixed_attention_fn(gates, sink,
     window, prompt_lengths))` (the same model that sampled) at temperature `temperature`.
     With one update per batch (the paper), logp_old = stop_gradient(logp), so ratio == 1 and
     the loss is the plain policy gradient; `updates_per_batch > 1` stores logp_old once and the
     clip takes effect. Aggregation `loss_agg`: "token_mean" (default; verl's default and DAPO's:
     sum over every completion token of the batch / number of those tokens) or
     "seq_mean_token_mean" (GRPO paper: token mean per sequence, then mean over sequences).
     So at ratio == 1 the gradient is -(1 / #tokens) * sum_i A_i * grad sum_t log pi(o_i,t):
     each completion's log-prob summed over its tokens, weighted by its advantage, normalised
     by the batch's completion-token count. Completion tokens include the EOS that ended one.
  6. AdamW (lr 1e-2 constant, weight decay 0.017, betas (0.9, 0.999)) after a global grad-norm
     clip of 1.0; then gates = clip(gates, 0, 1).

Memory: `rollout_chunk` sequences per `generate` call, `microbatch` sequences per gradient pass
(gradients summed, the same result), `remat` recomputes attention in the backward pass.

Data parallel: with `data_parallel` = D > 1 devices, a ("data", "model") mesh of D x 1 carries the
rollout batch and the loss batch on "data" (params and gates replicated); jit partitions the rest.

Resumable: orbax checkpoints in OUT/checkpoints hold the gates, the optimiser state, the step and
the RNG key; the distilled training set is saved once (OUT/train_set.json) and reloaded; the
problems of step s depend only on (seed, s). A killed run resumed from its last checkpoint
continues the same trajectory (the JSONL log is cut back to that checkpoint). The last 2
checkpoints are kept: a damaged newest one (truncated files, an emptied step folder) is skipped
with a one-line notice and moved aside to OUT/checkpoints.damaged/, and the run resumes from the
newest step that restores; a torn last log line (a run killed mid-write) is dropped.

Outputs: OUT/train_log.jsonl (per step: reward mean, penalty, scale s, mean gate, sparsity at 0.5,
policy loss, grad norm, completion length, seconds), OUT/gates.json
(`{"layers": L, "kv_heads": K, "model_fingerprint": ..., "gates": [[...]]}`, see
`jaxkv.policies.rlkv.save_gates`), OUT/report.json, OUT/config.json; the JSON files are written
atomically (`jaxkv.jsonio`).

Code: the problems in `train/rlkv_data.py`, the GRPO maths and the gate optimiser in
`train/grpo.py`, checkpoints, logs and the step loop shared with DuoAttention in
`train/gate_run.py`; this module holds the config, the rollouts and the trainer.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.embedded import load_model
from jaxkv.jsonio import write_json_atomic
from jaxkv.model.gated import gate_stats
from jaxkv.sharding import data_mesh as make_data_mesh
from jaxkv.sharding import put_batch, replicate
from train.gate_run import (
    GATES_FILE,
    LOG_FILE,
    REPORT_FILE,
    GateCheckpoints,
    append_log,
    check_gate_init,
    config_record,
    initial_gates,
    read_log,
    run_gate_training,
    trim_log,
    write_config,
)
from train.grpo import (
    ADVANTAGE_MODES,
    LOSS_AGGREGATIONS,
    adaptive_scale,
    build_completion_batch,
    build_loss_batch,
    cached_logprob_fn,
    cached_policy_grad_fn,
    clipped_policy_loss,
    completion_logprobs,
    compute_advantages,
    gate_update_fn,
    l1_penalty,
    logprob_fn,
    make_gate_optimizer,
    policy_grad_fn,
    prompt_prefill_fn,
    group_rollout_fn,
)
from train.rlkv_data import (
    EmbeddedSource,
    Item,
    JsonlSource,
    Source,
    TextSource,
    step_indices,
    stratified_by_length,
)

TRAIN_SET_FILE = "train_set.json"


@dataclasses.dataclass(frozen=True)
class RLKVConfig:
    """Every setting of an RLKV run. Paper values (Llama-3.1-8B-R1 / Qwen-2.5-7B-R1) are the
    defaults where the paper gives them; see configs/rlkv/*.py."""

    data: Source
    model: str = "embedded"  # a local HF-style folder, "embedded" (the default) or an embedded name
    dtype: Optional[str] = None  # None: the checkpoint's
    # -- rollouts
    group_size: int = 4  # completions per prompt (paper 4)
    prompts_per_step: int = 32  # paper 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None  # None: from the data source (embedded tasks only)
    rollout_chunk: int = 0  # sequences per `generate` call (0: the whole batch at once)
    # one dense prefill per distinct prompt and step: the group samples from copies of it and
    # the loss runs over the completions alone against its keys and values (same maths: prompt
    # queries attend in full, so the prompt's cache does not depend on the gates); on one device:
    # with a data mesh (data_parallel > 1 devices) the per-sequence path runs, sharded
    prefill_once: bool = True
    # -- objective
    eps_clip: float = 0.4
    beta: float = 1e-3
    tau: float = 0.5  # paper 0.5 (Llama-3.1-8B-R1), 0.55 (Qwen-2.5-7B-R1)
    advantage_norm: str = "group"  # "group" (paper text, default) or "batch" (authors' config)
    loss_agg: str = "token_mean"  # or "seq_mean_token_mean"
    updates_per_batch: int = 1  # paper 1 (ratio == 1); > 1 makes the clip bite
    # -- optimiser (AdamW, constant lr)
    learning_rate: float = 1e-2
    weight_decay: float = 0.017
    betas: Tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    steps: int = 185  # paper: 185 steps = 2 epochs over 3,000 problems
    microbatch: Optional[int] = None  # sequences per gradient pass (None: the whole batch);
    # the passes' losses and gradients are summed, so the step is the same (as DuoConfig's)
    remat: bool = False  # recompute attention in the backward pass (T^2 memory -> per layer)
    # -- gated attention during training
    sink: int = 128
    window: int = 256
    gate_init: Union[float, str] = 1.0  # every gate's start, or a gate file to start from
    # -- self-distillation data
    pool_size: int = 6000  # problems the full model tries (greedy)
    train_size: int = 3000  # paper 3,000
    keep_only_solved: bool = True
    length_strata: int = 4  # equal-width bins of output length
    length_power: float = 1.0  # stratum share ~ count * (mean length)^power: long ones favoured
    distill_batch_size: int = 64
    # -- run
    data_parallel: int = 1  # devices on the "data" axis (0: all local devices)
    seed: int = 0
    checkpoint_every: int = 10

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: must be a positive integer")
        for name in ("group_size", "prompts_per_step", "updates_per_batch", "steps", "window",
                     "pool_size", "train_size", "length_strata", "distill_batch_size",
                     "checkpoint_every"):
            positive_int(name)
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: GRPO needs >= 2 completions per "
                             f"prompt (the group std)")
        for name in ("sink", "rollout_chunk", "data_parallel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r}: must be an integer >= 0")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int)
                                                or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: a positive integer or None")
        if self.advantage_norm not in ADVANTAGE_MODES:
            raise ValueError(f"advantage_norm={self.advantage_norm!r}: allowed are "
                             f"{', '.join(ADVANTAGE_MODES)}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg={self.loss_agg!r}: allowed are "
                             f"{', '.join(LOSS_AGGREGATIONS)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: rollouts need sampling (> 0)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must lie in (0, 1]")
        for name in ("eps_clip", "learning_rate", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        for name in ("beta", "weight_decay", "length_power"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={self.betas!r}: two numbers in [0, 1)")
        check_gate_init(self.gate_init)
        n = self.batch_sequences
        m = self.microbatch
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1 or n % m):
            raise ValueError(f"microbatch={m!r}: must be a positive divisor of the {n} "
                             f"sequences of a step (prompts_per_step x group_size), or None for "
                             f"one pass over them")
        if self.rollout_chunk and n % self.rollout_chunk:
            raise ValueError(f"rollout_chunk={self.rollout_chunk}: must divide the "
                             f"{n} sequences of a step (prompts_per_step x group_size)")

    @property
    def batch_sequences(self) -> int:
        return self.prompts_per_step * self.group_size

    def replace(self, **kw) -> "RLKVConfig":
        return dataclasses.replace(self, **kw)


def generate_batched(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     batch_size: int, *, policy=None, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, eos_ids=None, mesh=None,
                     progress: bool = False, desc: str = "generate") -> List[List[int]]:
    """`generate` over fixed-size batches (the last one padded by repeating its final prompt, so
    every call has one shape and compiles once). Returns the completions in order."""
    from tqdm.auto import tqdm

    from jaxkv.generate import generate
    out: List[List[int]] = []
    starts = range(0, len(prompts), batch_size)
    for c, start in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress)):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        gen = generate(model, chunk, max_new_tokens, policy=policy, temperature=temperature,
                       top_p=top_p, seed=seed + c, eos_ids=eos_ids, mesh=mesh)
        out.extend(gen.tokens[:real])
    return out


def self_distill(model, cfg: RLKVConfig, verify: Callable[[Item, Sequence[int]], float],
                 max_new_tokens: int, mesh=None, progress: bool = False) -> Tuple[List[Item], dict]:
    """The training set: greedy full-cache answers to `pool_size` problems; keep the solved ones
    (when `keep_only_solved`); draw `train_size` stratified by output length. Each kept item
    records "solved" and "output_length" (tokens of the greedy completion, EOS included)."""
    pool = cfg.data.pool(cfg.pool_size, cfg.seed, model)
    if not pool:
        raise ValueError(f"data: the pool is empty ({cfg.data})")
    completions = generate_batched(model, [it["prompt_ids"] for it in pool], max_new_tokens,
                                   cfg.distill_batch_size, eos_ids=cfg.data.eos_ids, mesh=mesh,
                                   progress=progress, desc="rlkv: self-distillation")
    for it, comp in zip(pool, completions):
        it["solved"] = bool(verify(it, comp) > 0.5)
        it["output_length"] = len(comp)
    kept = [it for it in pool if it["solved"]] if cfg.keep_only_solved else pool
    stats = {"pool": len(pool), "solved": sum(it["solved"] for it in pool)}
    if not kept:
        raise ValueError(
            f"self-distillation: the full model solved none of the {len(pool)} pool problems; "
            f"RLKV needs problems the uncompressed model can solve (check the model and the "
            f"task sizes, or set keep_only_solved=False)")
    rng = np.random.default_rng([cfg.seed, 3])
    idx = stratified_by_length([it["output_length"] for it in kept], cfg.train_size, rng,
                               cfg.length_strata, cfg.length_power)
    chosen = [kept[i] for i in idx]
    stats.update(kept=len(kept), train=len(chosen),
                 by_source={s: sum(it["source"] == s for it in chosen)
                            for s in dict.fromkeys(it["source"] for it in chosen)},
                 mean_output_length=float(np.mean([it["output_length"] for it in chosen])))
    return chosen, stats


class RLKVTrainer:
    """The pieces of a run, for `train_rlkv` and for tests that drive single steps.

    reward_fn(item, completion_ids) -> float overrides the data source's verifier (tests use it
    to get non-trivial rewards from random models).
    """

    def __init__(self, cfg: RLKVConfig, model, mesh=None,
                 reward_fn: Optional[Callable[[Item, Sequence[int]], float]] = None):
        self.cfg = cfg
        self.mesh = mesh
        self.model = model
        if mesh is not None:
            self.model = dataclasses.replace(model, params=replicate(model.params, mesh))
        self.verify = reward_fn or cfg.data.make_verifier(model)
        self.max_new_tokens = cfg.max_new_tokens or cfg.data.default_max_new_tokens()
        self.optimizer = make_gate_optimizer(cfg.learning_rate, cfg.weight_decay, cfg.betas,
                                             cfg.grad_clip)

    def init_state(self) -> dict:
        gates = replicate(initial_gates(self.model, self.cfg.gate_init), self.mesh)
        return {"gates": gates, "opt_state": self.optimizer.init(gates),
                "step": np.array(0, np.int64), "rng": np.asarray(jax.random.PRNGKey(self.cfg.seed))}

    def rollouts(self, gates, items: Sequence[Item], seed: int) -> List[List[int]]:
        from jaxkv.policies.gated import GatedMixing
        cfg = self.cfg
        prompts = [it["prompt_ids"] for it in items for _ in range(cfg.group_size)]
        policy = GatedMixing(gates, sink=cfg.sink, window=cfg.window)
        return generate_batched(self.model, prompts, self.max_new_tokens,
                                cfg.rollout_chunk or len(prompts), policy=policy,
                                temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                                eos_ids=cfg.data.eos_ids, mesh=self.mesh)

    def step(self, state: dict, items: Sequence[Item]) -> Tuple[dict, dict]:
        """One RLKV step on `items` (prompts_per_step problems) -> (new state, metrics)."""
        if self.cfg.prefill_once and self.mesh is None:
            return self._step_prefill_once(state, items)
        cfg = self.cfg
        t0 = time.time()
        rng, sub = jax.random.split(jnp.asarray(state["rng"]))
        seed = int(jax.random.randint(sub, (), 0, 2 ** 31 - 1))
        gates = state["gates"]
        completions = self.rollouts(gates, items, seed)
        prompts = [it["prompt_ids"] for it in items for _ in range(cfg.group_size)]
        adv, r_mean, scale = self._rewards(items, completions)
        t_roll = time.time() - t0
        tokens, plens, weights = build_loss_batch(prompts, completions,
                                                  self.model.config.pad_token_id, cfg.loss_agg)
        statics = (self.model.config, cfg.sink, cfg.window, float(cfg.temperature), cfg.remat)
        chunk = cfg.microbatch or len(prompts)
        chunks = [put_batch((tokens[i:i + chunk], plens[i:i + chunk], weights[i:i + chunk],
                             adv[i:i + chunk]), self.mesh) for i in range(0, len(prompts), chunk)]
        old = self._old_logps(logprob_fn(*statics), gates, chunks, 2)  # (tokens, prompt lengths)
        grad_fn = policy_grad_fn(*statics, float(cfg.eps_clip), cfg.updates_per_batch > 1)
        return self._update(state, rng, gates, chunks, old, grad_fn, scale, r_mean, completions,
                            t0, t_roll)

    def _rewards(self, items: Sequence[Item], completions) -> Tuple[np.ndarray, float, float]:
        """Rewards of the group_size completions of each item (in order) -> (advantages, mean
        reward, the L1 penalty's adaptive scale)."""
        cfg = self.cfg
        per_seq = [it for it in items for _ in range(cfg.group_size)]
        rewards = np.array([self.verify(it, c) for it, c in zip(per_seq, completions)],
                           np.float32)
        r_mean = float(rewards.mean())
        return (compute_advantages(rewards, cfg.group_size, cfg.advantage_norm), r_mean,
                adaptive_scale(r_mean, cfg.tau))

    def _old_logps(self, logp_fn, gates, chunks, n_args: int):
        """The sampling policy's log-probabilities of each loss chunk (its first n_args entries
        are logp_fn's inputs) when the batch takes several updates; None each otherwise
        (ratio == 1: `clipped_policy_loss` stops the gradient itself)."""
        if self.cfg.updates_per_batch == 1:
            return [None] * len(chunks)
        return [logp_fn(self.model.params, gates, *c[:n_args]) for c in chunks]

    def _update(self, state, rng, gates, chunks, old, grad_fn, scale, r_mean, completions, t0,
                t_roll) -> Tuple[dict, dict]:
        """`updates_per_batch` AdamW steps of the gates on the loss chunks -> (state, metrics)."""
        cfg = self.cfg
        apply = gate_update_fn(float(cfg.learning_rate), float(cfg.weight_decay),
                               tuple(float(b) for b in cfg.betas), float(cfg.grad_clip),
                               float(cfg.beta))
        opt_state = state["opt_state"]
        for _ in range(cfg.updates_per_batch):
            grads, loss, clip_frac = None, 0.0, 0.0
            for c, o in zip(chunks, old):
                (l, frac), g = grad_fn(gates, self.model.params, *c, o)
                grads = g if grads is None else grads + g
                loss, clip_frac = loss + l, clip_frac + frac / len(chunks)
            gates, opt_state, penalty, gnorm = apply(gates, opt_state, grads, jnp.float32(scale))
        new_state = {"gates": gates, "opt_state": opt_state,
                     "step": np.array(int(state["step"]) + 1, np.int64), "rng": np.asarray(rng)}
        stats = gate_stats(gates)
        metrics = {"step": int(new_state["step"]), "reward_mean": r_mean,
                   "penalty": float(penalty), "penalty_scale": scale,
                   "mean_gate": stats["mean_gate"], "sparsity": stats["sparsity"],
                   "policy_loss": float(loss), "clip_frac": float(clip_frac),
                   "grad_norm": float(gnorm),
                   "completion_len": float(np.mean([len(c) for c in completions])),
                   "rollout_s": round(t_roll, 3), "step_s": round(time.time() - t0, 3)}
        return new_state, metrics

    def _step_prefill_once(self, state: dict, items: Sequence[Item]) -> Tuple[dict, dict]:
        """`step` with one dense prefill per problem: its `group_size` rollouts decode from
        copies of that prefill's cache (`train.grpo.group_rollout_fn`), and the loss runs over
        the completions alone against its keys and values (`cached_completion_logprobs`). The
        same objective as the per-sequence path (tests/test_grpo_cached.py); the step costs one
        prompt prefill per problem instead of 2 x group_size."""
        from jaxkv.generate import cut_after_eos, pad_batch
        cfg = self.cfg
        mcfg = self.model.config
        t0 = time.time()
        rng, sub = jax.random.split(jnp.asarray(state["rng"]))
        gates = state["gates"]
        g = cfg.group_size
        tokens, lengths = pad_batch([list(it["prompt_ids"]) for it in items], mcfg.pad_token_id)
        lengths = jnp.asarray(lengths)
        first_logits, past = prompt_prefill_fn(mcfg)(self.model.params, jnp.asarray(tokens),
                                                     lengths)
        eos = tuple(int(e) for e in (cfg.data.eos_ids or mcfg.eos_ids))
        roll = group_rollout_fn(mcfg, cfg.sink, cfg.window, self.max_new_tokens, eos, g)
        out, bad = roll(self.model.params, gates, first_logits, past, lengths, sub,
                        jnp.float32(cfg.temperature), jnp.float32(cfg.top_p))
        if bool(bad):
            raise ValueError("rollouts: the gated model's logits are not finite")
        completions = cut_after_eos(out, eos)
        adv, r_mean, scale = self._rewards(items, completions)
        t_roll = time.time() - t0
        ctoks, weights = build_completion_batch(completions, self.max_new_tokens,
                                                mcfg.pad_token_id, cfg.loss_agg)
        idx = np.repeat(np.arange(len(items)), g)
        n = len(completions)
        chunk = cfg.microbatch or n
        chunks = []
        for i in range(0, n, chunk):
            sel = jnp.asarray(idx[i:i + chunk])
            chunks.append((first_logits[sel], tuple((k[sel], v[sel]) for k, v in past),
                           lengths[sel], jnp.asarray(ctoks[i:i + chunk]),
                           jnp.asarray(weights[i:i + chunk]), jnp.asarray(adv[i:i + chunk])))
        statics = (mcfg, cfg.sink, cfg.window, float(cfg.temperature), True)
        # (first logits, past, prompt lengths, completions)
        old = self._old_logps(cached_logprob_fn(*statics), gates, chunks, 4)
        grad_fn = cached_policy_grad_fn(*statics, float(cfg.eps_clip), cfg.updates_per_batch > 1)
        return self._update(state, rng, gates, chunks, old, grad_fn, scale, r_mean, completions,
                            t0, t_roll)


def train_rlkv(cfg: RLKVConfig, out_dir: str, max_steps: Optional[int] = None,
               progress: bool = True, model=None,
               reward_fn: Optional[Callable[[Item, Sequence[int]], float]] = None) -> dict:
    """Run (or resume) RLKV into out_dir; returns the report (also OUT/report.json)."""
    os.makedirs(out_dir, exist_ok=True)
    model = model if model is not None else load_model(cfg.model, cfg.dtype)
    mesh = make_data_mesh(cfg.data_parallel)
    trainer = RLKVTrainer(cfg, model, mesh, reward_fn)
    write_config(out_dir, cfg)

    set_path = os.path.join(out_dir, TRAIN_SET_FILE)
    if os.path.exists(set_path):
        with open(set_path) as f:
            saved = json.load(f)
        items, distill_stats = saved["items"], saved["stats"]
    else:
        items, distill_stats = self_distill(trainer.model, cfg, trainer.verify,
                                            trainer.max_new_tokens, mesh, progress)
        write_json_atomic({"stats": distill_stats, "items": items}, set_path, indent=None)
    if progress:
        print(f"rlkv: training set {distill_stats}")

    def step_fn(state, step):
        batch = [items[i] for i in step_indices(len(items), step, cfg.prompts_per_step, cfg.seed)]
        return trainer.step(state, batch)

    return run_gate_training(
        "rlkv", cfg, out_dir, trainer.init_state(), mesh, step_fn,
        lambda m: dict(reward=f"{m['reward_mean']:.2f}", pen=f"{m['penalty']:.1e}",
                       gate=f"{m['mean_gate']:.3f}", sparsity=f"{m['sparsity']:.2f}"),
        max_steps, progress, extra_report={"distill": distill_stats}, model=model)


__all__ = [
    # this module: the run
    "RLKVConfig", "RLKVTrainer", "train_rlkv", "self_distill", "generate_batched",
    "TRAIN_SET_FILE", "load_model",
    # train.rlkv_data, train.grpo, train.gate_run (re-exported: the API of `train.rlkv`)
    "EmbeddedSource", "JsonlSource", "TextSource", "Item", "Source", "stratified_by_length", "step_indices",
    "adaptive_scale", "l1_penalty", "compute_advantages", "build_loss_batch",
    "completion_logprobs", "clipped_policy_loss", "make_gate_optimizer", "gate_update_fn",
    "ADVANTAGE_MODES", "LOSS_AGGREGATIONS", "GateCheckpoints", "run_gate_training", "read_log",
    "trim_log", "append_log", "write_config", "config_record", "LOG_FILE", "GATES_FILE",
    "REPORT_FILE", "make_data_mesh", "put_batch", "replicate"]
