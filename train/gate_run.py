"""What RLKV's and DuoAttention's gate training share: orbax checkpoints of the gates and the
optimiser state (the last 2; a damaged newest step is skipped and moved aside), the JSONL log (a
torn last line dropped, cut back to the checkpoint on resume), the run's config record, and the
loop that steps, logs, checkpoints and writes OUT/gates.json and OUT/report.json."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.jsonio import write_json_atomic, write_text_atomic
from jaxkv.model.gated import gate_stats
from jaxkv.policies.rlkv import plot_gates, save_gates
from jaxkv.sharding import replicate

LOG_FILE = "train_log.jsonl"
GATES_FILE = "gates.json"
REPORT_FILE = "report.json"
HEATMAP_FILE = "gates.png"


def check_gate_init(value, name: str = "gate_init"):
    """A config's `gate_init`: a number in [0, 1] (every gate starts there) or the path of a gate
    file (`save_gates` / a run's gates.json) to start from (a warm start: the optimiser state
    starts fresh). Returns it; ValueError naming it otherwise."""
    if isinstance(value, (str, os.PathLike)):
        if not os.path.isfile(value):
            raise ValueError(f"{name}={os.fspath(value)!r}: no such gate file (give a number in "
                             f"[0, 1] or the path of a gate file)")
        return os.fspath(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r}: a number in [0, 1] or the path of a gate file")
    return value


def initial_gates(model, gate_init) -> jax.Array:
    """[L, K] float32 starting gates: all `gate_init`, or the gates of the file it names (which
    must fit `model`'s shape and have been trained on it, `load_gates`)."""
    from jaxkv.model.gated import init_gates
    from jaxkv.policies.rlkv import load_gates
    if isinstance(gate_init, (str, os.PathLike)):  # the types check_gate_init takes for a file
        return jnp.asarray(load_gates(gate_init, model), jnp.float32)
    return init_gates(model.config, gate_init)


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
    plot_gates([(f"{name}, step {int(state['step'])}", gates)], os.path.join(out_dir, HEATMAP_FILE),
               sparsity=0.5)
    report = {"steps": int(state["step"]), "total_steps": cfg.steps, "seed": cfg.seed,
              **(extra_report or {}), **gate_stats(gates), "last": metrics}
    write_json_atomic(report, os.path.join(out_dir, REPORT_FILE), indent=1)
    return report
