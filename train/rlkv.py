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
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxkv.embedded import load_model
from jaxkv.jsonio import write_json_atomic, write_text_atomic
from jaxkv.model.config import ModelConfig
from jaxkv.model.decoder import Decoder
from jaxkv.model.gated import gate_stats, init_gates, mixed_attention_fn
from jaxkv.policies.rlkv import save_gates
from train.pretrain import TaskMix

ADVANTAGE_MODES = ("group", "batch")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean")
LOG_FILE = "train_log.jsonl"
GATES_FILE = "gates.json"
TRAIN_SET_FILE = "train_set.json"
REPORT_FILE = "report.json"
ADV_EPS = 1e-6

Item = Dict[str, Any]  # one problem: {"source", "prompt_ids", "answer", ...}, JSON-serialisable


# ==== data sources ================================================================================

@dataclasses.dataclass(frozen=True)
class EmbeddedSource:
    """Embedded reasoning tasks (jaxkv.tasks) at a range of sizes: one TaskMix per size; a
    TaskMix weight is its share of the pool. Completions are decoded with the tasks' word
    vocabulary and checked by the task's exact verifier; EOS is the vocabulary's <eos>."""

    tasks: Tuple[TaskMix, ...]

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks: give at least one TaskMix")
        for t in self.tasks:
            t.make()  # validates name and settings

    @property
    def eos_ids(self) -> Tuple[int, ...]:
        from jaxkv.tasks import EOS_ID
        return (EOS_ID,)

    def default_max_new_tokens(self) -> int:
        """Longest target of any task size (+ 8 tokens of slack)."""
        longest = 0
        for mix in self.tasks:
            task = mix.make()
            ex = task.sample(np.random.default_rng(0))
            longest = max(longest, task.max_len - len(ex.prompt_ids))
        return longest + 8

    def pool(self, n: int, seed: int, model) -> List[Item]:
        """`n` problems, split over the task sizes by weight (largest remainder)."""
        weights = np.array([t.weight for t in self.tasks], np.float64)
        counts = _largest_remainder(n * weights / weights.sum())
        items: List[Item] = []
        for i, (mix, count) in enumerate(zip(self.tasks, counts)):
            task = mix.make()
            rng = np.random.default_rng([seed, 2, i])
            for _ in range(count):
                ex = task.sample(rng)
                items.append({"source": mix.label, "task": ex.task, "settings": dict(mix.settings),
                              "prompt": ex.prompt, "target": ex.target, "answer": ex.answer,
                              "prompt_ids": ex.prompt_ids})
        return items

    def make_verifier(self, model) -> Callable[[Item, Sequence[int]], float]:
        from jaxkv.tasks import Example, decode, make_task
        tasks: Dict[str, Any] = {}

        def verify(item: Item, completion: Sequence[int]) -> float:
            key = item["source"]
            if key not in tasks:
                tasks[key] = make_task(item["task"], **item["settings"])
            ex = Example(item["task"], item["prompt"], item["target"], item["answer"])
            return float(tasks[key].verify(ex, decode(list(completion))))
        return verify


@dataclasses.dataclass(frozen=True)
class JsonlSource:
    """GSM8K / Math500-style local JSONL problems (`jaxkv.tasks.jsonl.read_jsonl`) for real
    models: prompt = `template.format(question=...)` encoded with the model's tokenizer (its
    post-processor adds BOS); reward = `answers_match(extract_final_answer(completion), gold)`."""

    path: str
    template: str = "{question}"
    question_key: Optional[str] = None
    answer_key: Optional[str] = None

    def __post_init__(self):
        if "{question}" not in self.template:
            raise ValueError(f"template={self.template!r}: must contain '{{question}}'")

    @property
    def eos_ids(self) -> Optional[Tuple[int, ...]]:
        return None  # the model config's

    def default_max_new_tokens(self) -> int:
        raise ValueError("max_new_tokens: set it in the config for a JsonlSource")

    def pool(self, n: int, seed: int, model) -> List[Item]:
        from jaxkv.tasks.jsonl import read_jsonl
        if model.tokenizer is None:
            raise ValueError(f"model {model.path!r} has no tokenizer.json; a JsonlSource needs "
                             f"one to encode its questions")
        problems = read_jsonl(self.path, self.question_key, self.answer_key)
        order = np.random.default_rng([seed, 2]).permutation(len(problems))[:n]
        items = []
        for i in sorted(order.tolist()):
            p = problems[i]
            text = self.template.format(question=p.question)
            items.append({"source": f"{os.path.basename(p.source)}:{p.line}", "prompt": text,
                          "answer": p.answer, "prompt_ids": model.encode(text)})
        return items

    def make_verifier(self, model) -> Callable[[Item, Sequence[int]], float]:
        from jaxkv.tasks.jsonl import answers_match, extract_final_answer

        def verify(item: Item, completion: Sequence[int]) -> float:
            text = model.decode(list(completion))
            return float(answers_match(extract_final_answer(text), item["answer"]))
        return verify


Source = Union[EmbeddedSource, JsonlSource]


# ==== configuration ===============================================================================

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
    microbatch: int = 0  # sequences per gradient chunk (0: the whole batch); same result
    remat: bool = False  # recompute attention in the backward pass (T^2 memory -> per layer)
    # -- gated attention during training
    sink: int = 128
    window: int = 256
    gate_init: float = 1.0
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
        for name in ("sink", "microbatch", "rollout_chunk", "data_parallel"):
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
        if not 0.0 <= self.gate_init <= 1.0:
            raise ValueError(f"gate_init={self.gate_init}: must lie in [0, 1]")
        n = self.batch_sequences
        if self.microbatch and n % self.microbatch:
            raise ValueError(f"microbatch={self.microbatch}: must divide the "
                             f"{n} sequences of a step (prompts_per_step x group_size)")
        if self.rollout_chunk and n % self.rollout_chunk:
            raise ValueError(f"rollout_chunk={self.rollout_chunk}: must divide the "
                             f"{n} sequences of a step (prompts_per_step x group_size)")

    @property
    def batch_sequences(self) -> int:
        return self.prompts_per_step * self.group_size

    def replace(self, **kw) -> "RLKVConfig":
        return dataclasses.replace(self, **kw)


# ==== pure pieces (hand-checked in tests) =========================================================

def adaptive_scale(r_mean: float, tau: float) -> float:
    """The reward-adaptive L1 scale s = exp(r_mean) - 1 if r_mean > tau else 0 (s = 1 at ln 2)."""
    r_mean = float(r_mean)
    return math.expm1(r_mean) if r_mean > tau else 0.0


def l1_penalty(gates, beta: float, scale) -> jax.Array:
    """beta * mean(|gates|) * s."""
    return beta * jnp.mean(jnp.abs(gates)) * scale


def compute_advantages(rewards, group_size: int, mode: str = "group",
                       eps: float = ADV_EPS) -> np.ndarray:
    """rewards [N] (groups of `group_size` consecutive entries) -> advantages [N] (float32).

    group: (r - group mean) / (group std + eps); batch: (r - group mean) / (batch std + eps).
    std is unbiased (ddof=1). A group whose rewards are all equal gets advantages 0.
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or r.size % group_size:
        raise ValueError(f"rewards: {r.shape} is not a whole number of groups of {group_size}")
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode={mode!r}: allowed are {', '.join(ADVANTAGE_MODES)}")
    g = r.reshape(-1, group_size)
    centred = g - g.mean(axis=1, keepdims=True)
    if mode == "group":
        std = g.std(axis=1, ddof=1, keepdims=True)
    else:
        std = r.std(ddof=1) if r.size > 1 else 0.0
    return (centred / (std + eps)).reshape(-1).astype(np.float32)


def build_loss_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     pad_id: int, loss_agg: str = "token_mean", bucket: int = 64):
    """Sequences prompt + completion for the loss.

    Returns tokens int32 [N, T] (T: longest sequence rounded up to `bucket`, right-padded),
    prompt_lengths int32 [N], and weights float32 [N, T-1]: weights[i, t] > 0 iff
    tokens[i, t + 1] is a completion token (t = P_i - 1 .. P_i + C_i - 2), valued so that
    sum(weights * per_token_loss) is the requested aggregation over the batch:
    token_mean: 1 / (total completion tokens); seq_mean_token_mean: 1 / (N * C_i).
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg={loss_agg!r}: allowed are {', '.join(LOSS_AGGREGATIONS)}")
    n = len(prompts)
    if n == 0 or len(completions) != n:
        raise ValueError(f"prompts ({n}) and completions ({len(completions)}): equal, non-zero")
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    t = max(-(-longest // bucket) * bucket, 2)
    tokens = np.full((n, t), pad_id, np.int32)
    weights = np.zeros((n, t - 1), np.float32)
    lengths = np.zeros(n, np.int32)
    total = sum(len(c) for c in completions)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if len(c) == 0:
            raise ValueError(f"completions[{i}] is empty")
        tokens[i, :len(p) + len(c)] = list(p) + list(c)
        lengths[i] = len(p)
        w = 1.0 / total if loss_agg == "token_mean" else 1.0 / (n * len(c))
        weights[i, len(p) - 1:len(p) + len(c) - 1] = w
    return tokens, lengths, weights


def stratified_by_length(lengths, n: int, rng: np.random.Generator, strata: int = 4,
                         power: float = 1.0) -> np.ndarray:
    """Indices of `n` items drawn without replacement, stratified by output length.

    Items fall into `strata` equal-width bins of length; stratum b gets a share
    ~ count_b * (mean length_b)^power of the n places (power 0: proportional, i.e. a plain random
    sample; power 1: long outputs over-represented in proportion to their length), by largest
    remainder, capped at the stratum's size, the leftover going to the longest strata first.
    All items when n >= len(lengths). Sorted indices.
    """
    lengths = np.asarray(lengths, np.float64)
    m = lengths.size
    if n >= m:
        return np.arange(m)
    lo, hi = float(lengths.min()), float(lengths.max())
    if hi == lo:
        bins = np.zeros(m, np.int64)
    else:
        bins = np.minimum(((lengths - lo) / (hi - lo) * strata).astype(np.int64), strata - 1)
    ids = [np.flatnonzero(bins == b) for b in range(strata)]
    counts = np.array([len(i) for i in ids], np.float64)
    means = np.array([lengths[i].mean() if len(i) else 0.0 for i in ids])
    share = counts * np.maximum(means, 1e-9) ** power
    quota = np.minimum(_largest_remainder(n * share / share.sum()), counts.astype(np.int64))
    for b in range(strata - 1, -1, -1):  # leftover places: longest strata first
        extra = min(n - int(quota.sum()), int(counts[b]) - int(quota[b]))
        quota[b] += max(extra, 0)
    picked = [rng.choice(i, size=int(q), replace=False) for i, q in zip(ids, quota) if q > 0]
    return np.sort(np.concatenate(picked))


def _largest_remainder(x) -> np.ndarray:
    """Round non-negative reals to integers with the same (rounded) total."""
    x = np.asarray(x, np.float64)
    floor = np.floor(x).astype(np.int64)
    short = int(round(x.sum())) - int(floor.sum())
    order = np.argsort(-(x - floor), kind="stable")
    floor[order[:max(short, 0)]] += 1
    return floor


def step_indices(n_items: int, step: int, per_step: int, seed: int) -> np.ndarray:
    """Training-set indices of `step`: consecutive slices of per-epoch permutations
    (`default_rng([seed, 1, epoch])`), so every item is seen once per epoch."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, n_items)
        out.append(int(_epoch_perm(n_items, seed, epoch)[pos]))
    return np.array(out, np.int64)


@functools.lru_cache(maxsize=8)
def _epoch_perm(n_items: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 1, epoch]).permutation(n_items)


# ==== jitted model functions ======================================================================

def completion_logprobs(params, gates, tokens, prompt_lengths, *, config: ModelConfig, sink: int,
                        window: int, temperature: float, remat: bool = False):
    """log pi(tokens[:, t+1] | tokens[:, :t+1]) under the gated model -> float32 [N, T-1]."""
    fn = mixed_attention_fn(gates, sink, window, prompt_lengths, remat=remat)
    logits = Decoder(config).apply({"params": params}, tokens, attention_fn=fn,
                                   method=Decoder.forward)
    logits = logits[:, :-1].astype(jnp.float32) / temperature  # [N, T-1, V]
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def clipped_policy_loss(logp, old_logp, advantages, weights, eps_clip: float):
    """sum over tokens of weights * -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A).

    logp, old_logp, weights: [N, T-1]; advantages: [N]. old_logp=None: stop_gradient(logp)
    (one update per batch: ratio == 1 in value, d ratio = d logp in gradient).
    Returns (loss, fraction of weighted tokens whose ratio was clipped).
    """
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_clip, 1.0 + eps_clip) * adv
    loss = jnp.sum(-jnp.minimum(unclipped, clipped) * weights)
    frac = jnp.sum((clipped < unclipped) * (weights > 0)) / jnp.maximum(jnp.sum(weights > 0), 1)
    return loss, frac


@functools.lru_cache(maxsize=16)
def _policy_grad_fn(config: ModelConfig, sink: int, window: int, temperature: float,
                    remat: bool, eps_clip: float, with_old: bool):
    def loss(gates, params, tokens, prompt_lengths, weights, advantages, old_logp):
        logp = completion_logprobs(params, gates, tokens, prompt_lengths, config=config,
                                   sink=sink, window=window, temperature=temperature,
                                   remat=remat)
        return clipped_policy_loss(logp, old_logp if with_old else None, advantages, weights,
                                   eps_clip)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@functools.lru_cache(maxsize=16)
def _logprob_fn(config: ModelConfig, sink: int, window: int, temperature: float, remat: bool):
    return jax.jit(functools.partial(completion_logprobs, config=config, sink=sink, window=window,
                                     temperature=temperature))


def make_gate_optimizer(learning_rate: float, weight_decay: float, betas=(0.9, 0.999),
                        grad_clip: Optional[float] = 1.0) -> optax.GradientTransformation:
    """AdamW at a constant lr, after a global grad-norm clip (None: no clip)."""
    adamw = optax.adamw(learning_rate, b1=betas[0], b2=betas[1], weight_decay=weight_decay)
    if grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)


@functools.lru_cache(maxsize=16)
def gate_update_fn(learning_rate: float, weight_decay: float, betas: Tuple[float, float],
                   grad_clip: Optional[float], beta: float):
    """jit (gates, opt_state, loss grads, s) -> (gates clipped into [0, 1], opt_state, penalty,
    grad norm). The L1 penalty beta * mean|gates| * s and its gradient are added here, once per
    step; the optimiser is `make_gate_optimizer(learning_rate, weight_decay, betas, grad_clip)`.
    Cached on the settings, so runs in one process share the compilation."""
    optimizer = make_gate_optimizer(learning_rate, weight_decay, betas, grad_clip)

    @jax.jit
    def apply(gates, opt_state, loss_grads, scale):
        penalty, pen_grads = jax.value_and_grad(l1_penalty)(gates, beta, scale)
        grads = loss_grads + pen_grads
        updates, opt_state = optimizer.update(grads, opt_state, gates)
        gates = jnp.clip(optax.apply_updates(gates, updates), 0.0, 1.0)
        return gates, opt_state, penalty, optax.tree.norm(grads)
    return apply


# ==== shared with train/duo.py: model, mesh, state, checkpoints, logs =============================

def make_data_mesh(data_parallel: int):
    """None for 1 device, else a (data=D, model=1) mesh (0: all local devices)."""
    from jaxkv.sharding import make_mesh
    d = data_parallel or len(jax.devices())
    if d == 1:
        return None
    return make_mesh(data=d, model=1)


def replicate(x, mesh):
    if mesh is None:
        return x
    from jax.sharding import NamedSharding, PartitionSpec as P
    return jax.device_put(x, NamedSharding(mesh, P()))


def put_batch(x, mesh):
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, x)
    from jaxkv.sharding import shard_batch
    return shard_batch(jax.tree_util.tree_map(jnp.asarray, x), mesh)


class GateCheckpoints:
    """Orbax checkpoints of {"gates", "opt_state", "step", "rng"} in `directory` (the last 2)."""

    def __init__(self, directory: str):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = self._open()

    def _open(self):
        options = self._ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        return self._ocp.CheckpointManager(self.directory, options=options)

    def _reopen(self) -> None:
        """A fresh manager: one whose restore failed can fail on intact steps too (orbax keeps
        what it inferred from the damaged step's metadata)."""
        self.manager.close()
        self.manager = self._open()

    def restore_or(self, state: dict, mesh=None) -> Tuple[dict, bool]:
        """The newest checkpoint that restores (with `state`'s structure), else `state`.

        A step that fails to restore (truncated files, an emptied step folder, ...) is skipped
        with one line on stderr saying which and why, and the next older one is tried; once one
        restores, the damaged newer ones are moved aside to `<directory>.damaged/` (so the run
        can save those steps again). When steps exist but none restores, a ValueError lists
        them and nothing is moved. Restored gates and optimiser state are placed as a fresh run
        places them (uncommitted on one device, replicated on a mesh), so the jitted functions
        do not recompile after a resume."""
        abstract = jax.tree_util.tree_map(self._ocp.utils.to_shape_dtype_struct, state)
        damaged: List[Tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self._restore_step(step, abstract)
            except Exception as e:  # whatever orbax / tensorstore raise for a damaged step
                damaged.append((step, _one_line(e)))
                self._reopen()
                continue
            self._set_aside(damaged, step)
            place = lambda x: replicate(jnp.asarray(np.asarray(x)), mesh)
            return {**restored, "gates": place(restored["gates"]),
                    "opt_state": jax.tree_util.tree_map(place, restored["opt_state"]),
                    "step": np.asarray(restored["step"], np.int64),
                    "rng": np.asarray(restored["rng"])}, True
        if damaged:
            listing = "; ".join(f"step {s}: {why}" for s, why in damaged)
            raise ValueError(f"checkpoints={self.directory!r}: no checkpoint restores ({listing});"
                             f" move the folder away to start the run over")
        return state, False

    def _restore_step(self, step: int, abstract) -> dict:
        """Checkpoint `step`, checked for consistency (its recorded step, finite gates)."""
        folder = os.path.join(self.directory, str(step))
        if os.path.isdir(folder) and not os.listdir(folder):
            raise ValueError("its folder is empty")
        restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        recorded = int(np.asarray(restored["step"]))
        if recorded != step:
            raise ValueError(f"it records step {recorded}")
        gates = np.asarray(restored["gates"])
        if not np.isfinite(gates).all():
            raise ValueError("its gates are not finite")
        return restored

    def _set_aside(self, damaged: List[Tuple[int, str]], resumed: int) -> None:
        """Move the damaged step folders to `<directory>.damaged/<step>` (numbered when taken),
        saying so on stderr, one line per step."""
        if not damaged:
            return
        aside_root = self.directory + ".damaged"
        for step, why in damaged:
            src = os.path.join(self.directory, str(step))
            dst = os.path.join(aside_root, str(step))
            n = 1
            while os.path.exists(dst):
                dst, n = os.path.join(aside_root, f"{step}.{n}"), n + 1
            os.makedirs(aside_root, exist_ok=True)
            os.replace(src, dst)
            print(f"{self.directory}: checkpoint step {step} does not restore ({why}); moved it "
                  f"to {dst}, resuming from step {resumed}", file=sys.stderr, flush=True)
        self._reopen()

    def save(self, step: int, state: dict) -> None:
        self.manager.save(step, args=self._ocp.args.StandardSave(state))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _one_line(err: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit` characters."""
    first = next(iter(str(err).strip().splitlines()), "")
    text = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_log(path: str) -> Tuple[List[dict], List[str], bool]:
    """The records of the JSONL log at `path`, their source lines (newline-stripped), and whether
    a torn final line (a run killed mid-write: not valid JSON) was left out. Blank lines are
    skipped. A line elsewhere that is not a JSON object raises a ValueError naming the file and
    the line."""
    with open(path, encoding="utf-8") as f:
        numbered = [(i, ln.strip()) for i, ln in enumerate(f, 1) if ln.strip()]
    records, lines, torn = [], [], False
    for k, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if k == len(numbered) - 1:
                torn = True
                break
            raise ValueError(f"{path}, line {lineno}: not valid JSON ({e}); only the last line "
                             f"of a training log may be torn (a run killed mid-write)") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {lineno}: expected a JSON object per line, got "
                             f"{line[:60]!r}")
        records.append(record)
        lines.append(line)
    return records, lines, torn


def trim_log(path: str, step: int) -> None:
    """Keep only log lines of steps <= `step` (a resumed run rewrites the rest); a torn final
    line is dropped (one line on stderr says so). The file is rewritten atomically, every kept
    line newline-terminated, so appends start on a line of their own."""
    if not os.path.exists(path):
        return
    records, lines, torn = read_log(path)
    if torn:
        print(f"{path}: dropped a torn final line (a run killed mid-write)", file=sys.stderr,
              flush=True)
    kept = [ln for rec, ln in zip(records, lines) if rec.get("step", 0) <= step]
    write_text_atomic("".join(ln + "\n" for ln in kept), path)


def append_log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_config(out_dir: str, cfg) -> None:
    """Write OUT/config.json (atomically); warn when a run folder being resumed held a different
    config (steps and checkpoint_every may change freely: a run can be extended)."""
    import warnings
    path = os.path.join(out_dir, "config.json")
    record = config_record(cfg)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        free = ("steps", "checkpoint_every")
        changed = sorted(k for k in set(old) | set(record)
                         if k not in free and old.get(k) != record.get(k))
        if changed:
            warnings.warn(f"{out_dir}: resuming with a different config ({', '.join(changed)} "
                          f"changed); the run mixes both", stacklevel=3)
    write_json_atomic(record, path, indent=1)


def config_record(cfg) -> dict:
    """A JSON-able view of a config dataclass (nested dataclasses and tuples included)."""
    def conv(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {"_type": type(x).__name__,
                    **{f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        if isinstance(x, (tuple, list)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {str(k): conv(v) for k, v in x.items()}
        return x
    return conv(cfg)


# ==== self-distillation ===========================================================================

def generate_batched(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     batch_size: int, *, policy=None, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, eos_ids=None, mesh=None) -> List[List[int]]:
    """`generate` over fixed-size batches (the last one padded by repeating its final prompt, so
    every call has one shape and compiles once). Returns the completions in order."""
    from jaxkv.generate import generate
    out: List[List[int]] = []
    for c, start in enumerate(range(0, len(prompts), batch_size)):
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
                                   cfg.distill_batch_size, eos_ids=cfg.data.eos_ids, mesh=mesh)
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


# ==== training ====================================================================================

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
        gates = replicate(init_gates(self.model.config, self.cfg.gate_init), self.mesh)
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
        cfg = self.cfg
        t0 = time.time()
        rng, sub = jax.random.split(jnp.asarray(state["rng"]))
        seed = int(jax.random.randint(sub, (), 0, 2 ** 31 - 1))
        gates = state["gates"]
        completions = self.rollouts(gates, items, seed)
        prompts = [it["prompt_ids"] for it in items for _ in range(cfg.group_size)]
        rewards = np.array([self.verify(it, c) for it, c in
                            zip([it for it in items for _ in range(cfg.group_size)], completions)],
                           np.float32)
        t_roll = time.time() - t0
        adv = compute_advantages(rewards, cfg.group_size, cfg.advantage_norm)
        r_mean = float(rewards.mean())
        scale = adaptive_scale(r_mean, cfg.tau)
        tokens, plens, weights = build_loss_batch(prompts, completions,
                                                  self.model.config.pad_token_id, cfg.loss_agg)
        statics = (self.model.config, cfg.sink, cfg.window, float(cfg.temperature), cfg.remat)
        chunk = cfg.microbatch or len(prompts)
        chunks = [put_batch((tokens[i:i + chunk], plens[i:i + chunk], weights[i:i + chunk],
                             adv[i:i + chunk]), self.mesh) for i in range(0, len(prompts), chunk)]
        old = [None] * len(chunks)
        if cfg.updates_per_batch > 1:
            logp_fn = _logprob_fn(*statics)
            old = [logp_fn(self.model.params, gates, c[0], c[1]) for c in chunks]
        grad_fn = _policy_grad_fn(*statics, float(cfg.eps_clip), cfg.updates_per_batch > 1)
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


def run_gate_training(name: str, cfg, out_dir: str, state: dict, mesh,
                      step_fn: Callable[[dict, int], Tuple[dict, dict]],
                      postfix: Callable[[dict], dict], max_steps: Optional[int] = None,
                      progress: bool = True, extra_report: Optional[dict] = None,
                      model=None) -> dict:
    """The gate-training loop RLKV and DuoAttention share: resume from out_dir/checkpoints (the
    newest step that restores, see `GateCheckpoints.restore_or`), run
    `state, metrics = step_fn(state, step)` to `cfg.steps` (or `max_steps`) with a progress bar
    (`postfix(metrics)`) and a JSONL log, checkpoint every `cfg.checkpoint_every` steps and at
    the end, then write OUT/gates.json (`jaxkv.policies.rlkv.save_gates`, recording
    `model.fingerprint`: pass the model as loaded, not a copy with re-placed params) and
    OUT/report.json, both atomically. Returns the report."""
    from tqdm import tqdm

    ckpt = GateCheckpoints(os.path.join(out_dir, "checkpoints"))
    state, resumed = ckpt.restore_or(state, mesh)
    start = int(state["step"])
    log_path = os.path.join(out_dir, LOG_FILE)
    trim_log(log_path, start)
    if resumed and progress:
        print(f"{name}: resumed from step {start} ({out_dir}/checkpoints)")
    end = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    bar = tqdm(range(start, end), initial=start, total=end, disable=not progress, desc=name,
               dynamic_ncols=True)
    metrics: dict = {}
    for step in bar:
        state, metrics = step_fn(state, step)
        bar.set_postfix(**postfix(metrics))
        append_log(log_path, metrics)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            ckpt.save(step + 1, state)
    ckpt.close()
    gates = np.asarray(state["gates"])
    save_gates(os.path.join(out_dir, GATES_FILE), gates, model=model)
    report = {"steps": int(state["step"]), "total_steps": cfg.steps, "seed": cfg.seed,
              **(extra_report or {}), **gate_stats(gates), "last": metrics}
    write_json_atomic(report, os.path.join(out_dir, REPORT_FILE), indent=1)
    return report


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
                                            trainer.max_new_tokens, mesh)
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


__all__ = ["RLKVConfig", "EmbeddedSource", "JsonlSource", "RLKVTrainer", "train_rlkv",
           "adaptive_scale", "l1_penalty", "compute_advantages", "build_loss_batch",
           "stratified_by_length", "step_indices", "completion_logprobs", "clipped_policy_loss",
           "self_distill", "make_gate_optimizer", "load_model", "GateCheckpoints",
           "run_gate_training", "read_log", "trim_log"]
