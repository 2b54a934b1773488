"""RLKV deployment: reasoning-critical KV heads (learned gates) keep the full cache, the others a
constant-size streaming cache (sink + recent window). See docs/methods.md, RLKV.

Gates: `alpha[l, h]` in [0, 1], shape [layers, kv_heads] (the G query heads of a group share it).

Head selection at sparsity s (global over all N = L * Hkv gates, NOT per layer):
    n_stream = round(s * N)   (round half up: floor(s * N + 0.5))
    Sort the heads by gate, ascending, with a *stable* sort over the row-major (layer, head)
    order; the first n_stream heads stream, the rest keep the full cache.
With distinct gates this is exactly "heads with alpha >= quantile(alpha, s) keep the full cache",
the quantile taken as the (n_stream)-th smallest gate (nearest-rank). With ties at the threshold
the rule still streams exactly n_stream heads: among equal gates the head earlier in (layer, head)
order streams first. Example: gates [[0.5, 0.5], [0.5, 0.9]], s = 0.5 -> n_stream = 2 -> the two
0.5 heads first in order, (0, 0) and (0, 1), stream; (1, 0) and (1, 1) keep the full cache.

Budget -> sparsity (what the "rlkv" / "duo" / "random_heads" factories do): with T cache slots per
sequence and head in the full cache (prompt + generated tokens) and sink + window slots per
streaming head, the cache holds (1 - s) * T + s * (sink + window) slots per head on average, so
bytes = budget * full bytes gives

    s = (1 - budget) / (1 - (sink + window) / T),   clipped to [0, 1)

(when sink + window >= T streaming saves nothing and s = 0). The achieved budget differs from the
requested one by the rounding of n_stream to whole heads. Without `prompt_len`, `RLKV(gates,
budget=b)` evaluates this at compression time with T = the real capacity of the cache.

Gate files (`save_gates` / `load_gates`: the one gate-file API; `python -m train rlkv|duo` and
`jaxkv.model.gated` use it), human-readable, written atomically:
    JSON (.json): {"layers": L, "kv_heads": K, "model_fingerprint": "...",
                   "gates": [[g00, g01, ...], ...]}
    TSV (.tsv or .txt): one row per layer, K tab-separated gates; an optional first line
    `# model_fingerprint: ...`; other lines starting with '#' and blank lines are ignored on load.
Values are written with Python's shortest round-trip repr, so a round trip is exact.
"model_fingerprint" (`jaxkv.Model.fingerprint`: architecture, shape and a hash of the weights) is
the model the gates were trained on, recorded by `save_gates(path, gates, model=...)`. The "rlkv"
and "duo" factories refuse a gate file of another model (ValueError naming the file and both
fingerprints) unless given `allow_other_model=True`; a file without one (older files,
hand-written TSV) is accepted with a warning.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from typing import Any, Optional, Tuple

import numpy as np

from jaxkv.cache.headsplit import HeadSplitCache
from jaxkv.jsonio import write_text_atomic
from jaxkv.policies.base import Policy, check_budget
from jaxkv.policies.registry import register_method

GateTuple = Tuple[Tuple[float, ...], ...]
_JSON_EXT = (".json",)
_TSV_EXT = (".tsv", ".txt")
_TSV_FINGERPRINT = "# model_fingerprint:"


# ---- gates --------------------------------------------------------------------------------------

def check_gates(gates, name: str = "gates") -> np.ndarray:
    """float64 [L, K] array of gates in [0, 1]; raises ValueError naming `name` otherwise."""
    try:
        arr = np.asarray(gates, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a [layers, kv_heads] array of numbers in [0, 1] "
                         f"({e})") from None
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [layers, kv_heads] array, got shape "
                         f"{arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        l, h = np.argwhere(bad)[0]
        raise ValueError(f"{name}[{l}][{h}]={arr[l, h]}: gates must be finite numbers in [0, 1] "
                         f"({int(bad.sum())} are NaN or infinite)")
    out = (arr < 0) | (arr > 1)
    if out.any():
        l, h = np.argwhere(out)[0]
        raise ValueError(f"{name}[{l}][{h}]={arr[l, h]}: gates must lie in [0, 1] "
                         f"({int(out.sum())} values outside)")
    return arr


def _gate_format(path, argname: str = "path") -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in _JSON_EXT:
        return "json"
    if ext in _TSV_EXT:
        return "tsv"
    raise ValueError(f"{argname}={os.fspath(path)!r}: unknown gate file extension {ext!r}; use "
                     f"{', '.join(_JSON_EXT + _TSV_EXT)}")


def save_gates(path, gates, model=None) -> str:
    """Write gates [L, K] to `path` as JSON (.json) or TSV (.tsv, .txt), atomically; returns the
    path. With `model` (a `jaxkv.Model`), the file records `model.fingerprint`, the model the
    gates were trained on (JSON: "model_fingerprint"; TSV: a `# model_fingerprint: ...` line),
    and the gates must have its [layers, kv_heads] shape."""
    arr = check_gates(gates)
    fmt = _gate_format(path)
    fingerprint = None
    if model is not None:
        _check_shape_for(arr, model, "gates")
        fingerprint = model.fingerprint
    rows = [[float(x) for x in row] for row in arr]
    path = os.fspath(path)
    if fmt == "json":
        body = ",\n".join("    [" + ", ".join(repr(x) for x in row) + "]" for row in rows)
        stamp = ("" if fingerprint is None
                 else f'  "model_fingerprint": {json.dumps(fingerprint)},\n')
        text = (f'{{\n  "layers": {arr.shape[0]},\n  "kv_heads": {arr.shape[1]},\n{stamp}'
                f'  "gates": [\n{body}\n  ]\n}}\n')
    else:
        stamp = "" if fingerprint is None else f"{_TSV_FINGERPRINT} {fingerprint}\n"
        text = stamp + "".join("\t".join(repr(x) for x in row) + "\n" for row in rows)
    try:
        write_text_atomic(text, path)
    except OSError as e:
        raise ValueError(f"path={path!r}: cannot write the gate file "
                         f"({e.strerror or e})") from None
    return path


def read_gate_file(path) -> Tuple[np.ndarray, Optional[str]]:
    """(gates float64 [L, K] in [0, 1], the recorded model fingerprint or None) of a gate file
    written by `save_gates` (or by hand). No check against a model: see `load_gates`."""
    path = os.fspath(path)
    fmt = _gate_format(path)
    if not os.path.isfile(path):
        raise ValueError(f"path={path!r}: gate file not found")
    with open(path) as f:
        text = f.read()
    if fmt == "json":
        return _parse_json_gates(text, path)
    return _parse_tsv_gates(text, path)


def _parse_json_gates(text: str, path: str) -> Tuple[np.ndarray, Optional[str]]:
    """(gates, fingerprint or None) of a JSON gate file's `text`; ValueError naming `path`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"path={path!r}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "gates" not in data:
        raise ValueError(f"path={path!r}: expected a JSON object "
                         f'{{"layers": L, "kv_heads": K, "gates": [[...], ...]}}')
    rows = data["gates"]
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows) or \
            len({len(r) for r in rows}) > 1:
        raise ValueError(f"path={path!r}: \"gates\" must be a list of equal-length rows")
    arr = check_gates(rows, name=f"gates in {path!r}")
    for key, n in (("layers", arr.shape[0]), ("kv_heads", arr.shape[1])):
        if key in data and data[key] != n:
            raise ValueError(f"path={path!r}: \"{key}\"={data[key]!r} but \"gates\" has {n}")
    fingerprint = data.get("model_fingerprint")
    if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
        raise ValueError(f"path={path!r}: \"model_fingerprint\"={fingerprint!r}: must be a "
                         f"non-empty string (jaxkv.Model.fingerprint)")
    return arr, fingerprint


def _parse_tsv_gates(text: str, path: str) -> Tuple[np.ndarray, Optional[str]]:
    """(gates, fingerprint or None) of a TSV gate file's `text`; ValueError naming `path`."""
    rows, fingerprint = [], None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line.startswith(_TSV_FINGERPRINT):
            fingerprint = line[len(_TSV_FINGERPRINT):].strip() or None
            continue
        if not line or line.startswith("#"):
            continue
        try:
            rows.append([float(x) for x in line.split("\t")])
        except ValueError:
            raise ValueError(f"path={path!r}, line {lineno}: expected tab-separated numbers, "
                             f"got {line[:60]!r}") from None
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"path={path!r}: rows have different numbers of gates "
                         f"{sorted({len(r) for r in rows})}; expected one row of kv_heads gates "
                         f"per layer")
    return check_gates(rows, name=f"gates in {path!r}"), fingerprint


def load_gates(path, model=None, *, allow_other_model: bool = False) -> np.ndarray:
    """Read a gate file written by `save_gates` (or by hand) -> float64 [L, K] in [0, 1].

    With `model` (a `jaxkv.Model`) the gates must have its [layers, kv_heads] shape and must
    have been trained on it: a file recording another `model_fingerprint` raises a ValueError
    naming the file and both fingerprints, unless `allow_other_model=True`; a file recording
    none (older files, hand-written TSV) is accepted with a warning."""
    arr, recorded = read_gate_file(path)
    if model is not None:
        path = os.fspath(path)
        _check_shape_for(arr, model, f"gates in {path!r}")
        check_gate_fingerprint(path, recorded, model, allow_other_model)
    return arr


def check_gate_fingerprint(path, recorded: Optional[str], model,
                           allow_other_model: bool = False) -> None:
    """The model check of `load_gates`: `recorded` (the file's fingerprint, or None) against
    `model.fingerprint`."""
    current = model.fingerprint
    if recorded is None:
        warnings.warn(f"gates={os.fspath(path)!r}: the gate file records no model_fingerprint "
                      f"(an older or hand-written file), so it cannot be checked against this "
                      f"model ({current}); write it with save_gates(path, gates, model=...) to "
                      f"record one", stacklevel=3)
        return
    if recorded != current and not allow_other_model:
        raise ValueError(f"gates={os.fspath(path)!r}: the gates were trained on the model with "
                         f"model_fingerprint={recorded!r}, not on this one "
                         f"(model_fingerprint={current!r}); pass allow_other_model=True to use "
                         f"them anyway")


def _check_shape_for(arr: np.ndarray, model, name: str) -> None:
    """Gates `arr` must be [layers, kv_heads] of `model`; ValueError starting with `name`."""
    want = (model.config.num_layers, model.config.num_kv_heads)
    if tuple(arr.shape) != want:
        raise ValueError(f"{name}: shape {list(arr.shape)} does not match the model's "
                         f"[layers, kv_heads] = {list(want)}")


def random_gates(layers: int, kv_heads: int, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) gates [layers, kv_heads] from `seed`: the random-head baseline."""
    for name, value in (("layers", layers), ("kv_heads", kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r}: must be an integer")
    return np.random.default_rng(int(seed)).random((layers, kv_heads))


def plot_gates(gates, path, title: Optional[str] = None, sparsity: Optional[float] = None) -> str:
    """Heat maps of gate arrays [layers, kv_heads] (layers across, KV heads down) on one colour
    scale [0, 1], written atomically to `path` (PNG, PDF, ... by extension). `gates` is one array
    (titled `title`) or a sequence of (title, gates) panels stacked on one figure, e.g. RLKV's and
    DuoAttention's gates of one model. With `sparsity`, the heads that stream at it (the global
    rank selection, `select_heads`) are boxed in red. Small arrays (<= 256 gates a panel)
    print each gate's value. Draws on its own Agg canvas, not pyplot: a notebook's backend is left
    alone. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if isinstance(gates, (list, tuple)) and gates and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) for p in gates):
        panels = [(t, check_gates(g)) for t, g in gates]
    elif isinstance(gates, (list, tuple)) and not gates:
        raise ValueError("gates=[]: give a gate array or at least one (title, gates) panel")
    else:
        arr = check_gates(gates)
        panels = [(title or f"gates ({arr.shape[0]} layers x {arr.shape[1]} KV heads)", arr)]
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    layers = max(a.shape[0] for _, a in panels)
    heads = sum(a.shape[1] for _, a in panels)
    fig = Figure(figsize=(2.5 + 0.3 * max(layers, 4), 1.2 * len(panels) + 0.3 * max(heads, 3)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    im = None
    for ax, (name, g) in zip(axes, panels):
        im = ax.imshow(g.T, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                       interpolation="nearest")
        if g.size <= 256:
            for (l, h), v in np.ndenumerate(g):
                ax.text(l, h, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.5 else "black")
        if sparsity is not None:
            _, stream = select_heads(_as_tuple(g), sparsity)
            for l, hs in enumerate(stream):
                for h in hs:
                    ax.add_patch(Rectangle((l - 0.5, h - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("KV head")
        ax.set_yticks(range(g.shape[1]))
        ax.set_xticks(range(0, g.shape[0], 5 if g.shape[0] > 10 else 1))
    axes[-1].set_xlabel("layer")
    fig.colorbar(im, ax=list(axes), shrink=0.9, label="gate")
    if sparsity is not None:
        fig.suptitle(f"red boxes: heads streaming at sparsity {sparsity:g}", fontsize=8)
    path = os.fspath(path)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ValueError(f"path={path!r}: cannot write the plot ({e})") from None
    return path


# ---- head selection -----------------------------------------------------------------------------

def check_sparsity(sparsity, name: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating)) \
            or math.isnan(sparsity) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{name}={sparsity!r}: must be a fraction of streaming heads in [0, 1)")
    return float(sparsity)


def num_streaming(sparsity: float, total_heads: int) -> int:
    """round(sparsity * total_heads), halves rounded up."""
    return int(math.floor(sparsity * total_heads + 0.5))


def select_heads(gates, sparsity: float) -> Tuple[GateTuple, GateTuple]:
    """(full_heads, stream_heads): per layer, sorted tuples of KV-head indices (see module doc:
    global, rank-based, stable; exactly round(sparsity * L * K) heads stream).
    gates: [L, K] array-like in [0, 1]; sparsity in [0, 1)."""
    if not (isinstance(gates, tuple) and all(isinstance(r, tuple) for r in gates)):
        gates = _as_tuple(check_gates(gates))
    return _select_heads(gates, check_sparsity(sparsity))


@functools.lru_cache(maxsize=256)
def _select_heads(gates: GateTuple, sparsity: float) -> Tuple[GateTuple, GateTuple]:
    arr = np.asarray(gates, np.float64)
    layers, heads = arr.shape
    n = num_streaming(sparsity, arr.size)
    order = np.argsort(arr.ravel(), kind="stable")  # ascending, ties in (layer, head) order
    streaming = np.zeros(arr.size, bool)
    streaming[order[:n]] = True
    streaming = streaming.reshape(layers, heads)
    full = tuple(tuple(int(h) for h in np.flatnonzero(~row)) for row in streaming)
    stream = tuple(tuple(int(h) for h in np.flatnonzero(row)) for row in streaming)
    return full, stream


def sparsity_for_budget(budget: float, sink: int, window: int, prompt_len: int) -> float:
    """s = (1 - budget) / (1 - (sink + window) / prompt_len), clipped to [0, 1); 0 for budget 1.
    A budget below what sink + window of every head costs (a cache where every head streams) is
    a ValueError: no head split meets it."""
    budget = check_budget(budget)
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 1:
        raise ValueError(f"prompt_len={prompt_len!r}: must be a positive integer")
    frac = (sink + window) / prompt_len
    if budget < min(frac, 1.0) and budget < 1.0:
        raise ValueError(f"budget={budget}: even with every head streaming, sink={sink} + "
                         f"window={window} of {prompt_len} cache slots is {min(frac, 1.0):.4g} of "
                         f"the full cache; use budget >= {min(frac, 1.0):.4g}, or a smaller sink "
                         f"and window")
    if frac >= 1.0:
        return 0.0
    s = (1.0 - budget) / (1.0 - frac)
    return float(min(max(s, 0.0), np.nextafter(1.0, 0.0)))


def _as_tuple(arr: np.ndarray) -> GateTuple:
    return tuple(tuple(float(x) for x in row) for row in arr)


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: must be an integer >= 0")
    return value


# ---- policy -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RLKV(Policy):
    """Head-split deployment of learned gates.

    gates:    [layers, kv_heads] array-like in [0, 1], or the path of a gate file (JSON / TSV);
              stored as a tuple of tuples of floats, so the policy is hashable (a static jit key)
    sparsity: fraction of all L * Hkv KV heads that stream, in [0, 1)
    sink, window: tokens each streaming head keeps (paper inference: 16 + 64)
    budget:   instead of sparsity: fraction of the full cache in (0, 1]; the sparsity is then
              derived at compression time from the real cache capacity (see module doc)

    `full_heads[l]` / `stream_heads[l]` (sparsity mode) are the per-layer splits.
    """

    gates: Any
    sparsity: Optional[float] = None
    sink: int = 16
    window: int = 64
    budget: Optional[float] = None
    full_heads: Optional[GateTuple] = dataclasses.field(default=None, init=False, repr=False,
                                                        compare=False)
    stream_heads: Optional[GateTuple] = dataclasses.field(default=None, init=False, repr=False,
                                                          compare=False)

    name = "rlkv"

    def __post_init__(self):
        gates = self.gates
        if isinstance(gates, (str, os.PathLike)):
            try:
                gates = load_gates(gates)
            except ValueError as e:
                raise ValueError(f"gates: {e}") from None
        object.__setattr__(self, "gates", _as_tuple(check_gates(gates)))
        _check_size("sink", self.sink)
        _check_size("window", self.window)
        if (self.sparsity is None) == (self.budget is None):
            raise ValueError(f"sparsity={self.sparsity!r}, budget={self.budget!r}: give exactly "
                             f"one (sparsity in [0, 1) or budget in (0, 1])")
        if self.sparsity is not None:
            object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
            full, stream = select_heads(self.gates, self.sparsity)
            object.__setattr__(self, "full_heads", full)
            object.__setattr__(self, "stream_heads", stream)
        else:
            object.__setattr__(self, "budget", check_budget(self.budget))

    @property
    def num_layers(self) -> int:
        return len(self.gates)

    @property
    def num_kv_heads(self) -> int:
        return len(self.gates[0])

    def gates_array(self) -> np.ndarray:
        """float64 [layers, kv_heads]."""
        return np.asarray(self.gates, np.float64)

    def sparsity_for_capacity(self, capacity: int) -> float:
        """The sparsity used for a cache of `capacity` slots per sequence (prompt + decoding). In
        budget mode the number of streaming heads is rounded up, so the cache meets the budget."""
        if self.sparsity is not None:
            return self.sparsity
        s = sparsity_for_budget(self.budget, self.sink, self.window, capacity)
        total = self.num_layers * self.num_kv_heads
        n = min(math.ceil(s * total - 1e-9), total)
        return n / total if n < total else float(np.nextafter(1.0, 0.0))

    def head_split(self, capacity: Optional[int] = None) -> Tuple[GateTuple, GateTuple]:
        """(full_heads, stream_heads) per layer; `capacity` is needed only in budget mode."""
        if self.sparsity is not None:
            return self.full_heads, self.stream_heads
        if capacity is None:
            raise ValueError("capacity=None: a budget-mode RLKV needs the cache capacity to "
                             "choose its heads")
        return select_heads(self.gates, self.sparsity_for_capacity(capacity))

    def check_model(self, config) -> None:
        """Gates must be [config.num_layers, config.num_kv_heads]; sink and window must fit the
        context (max_position_embeddings)."""
        want = (config.num_layers, config.num_kv_heads)
        got = (self.num_layers, self.num_kv_heads)
        if got != want:
            raise ValueError(f"gates: shape {list(got)} does not match the model's "
                             f"[layers, kv_heads] = {list(want)}")
        limit = config.max_position_embeddings
        for name in ("sink", "window"):
            if getattr(self, name) > limit:
                raise ValueError(f"{name}={getattr(self, name)}: larger than the model's context "
                                 f"max_position_embeddings={limit}")

    def compress_layer(self, layer, cache, obs):
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"gates: have {self.num_layers} layers, but layer {layer} was "
                             f"compressed; the gates do not match this model")
        kv = cache.k.shape[1]
        if kv != self.num_kv_heads:
            raise ValueError(f"gates: have {self.num_kv_heads} KV heads per layer, but the "
                             f"model's layer {layer} has {kv}")
        full, stream = self.head_split(cache.capacity + obs.extra_capacity)
        return HeadSplitCache.from_dense(cache, full[layer], stream[layer], self.sink, self.window,
                                         obs.extra_capacity)


def shipped_gate_file(method: str, model) -> Optional[str]:
    """The gate file of `method` ("rlkv" or "duo") shipped in the package for `model` (the
    file in a folder of jaxkv/assets/ or jaxkv/assets/gates/ whose recorded fingerprint is the
    model's), or None."""
    import glob

    from jaxkv.embedded import ASSETS as assets
    fp = getattr(model, "fingerprint", None)
    if fp is None:
        return None
    for folder in sorted(glob.glob(os.path.join(assets, "*", ""))) + sorted(
            glob.glob(os.path.join(assets, "gates", "*", ""))):
        path = os.path.join(folder, f"gates_{method}.json")
        if os.path.isfile(path) and read_gate_file(path)[1] == fp:
            return path
    return None


def policy_for_budget(cls, budget: float, model, gates, sink: int, window: int,
                      prompt_len: Optional[int], method: str, allow_other_model: bool = False):
    """Shared by the registered factories: `cls(gates, sparsity)` with the sparsity that matches
    `budget` for `prompt_len` cache slots (or budget mode when prompt_len is None). A gate file
    path is read with `load_gates(gates, model, allow_other_model=...)`: it must belong to
    `model` (see the module doc)."""
    if gates is None:
        gates = shipped_gate_file(method, model)
    if gates is None:
        raise ValueError(f"gates=None: method {method!r} needs gates, a gate file path (JSON or "
                         f"TSV, see jaxkv.policies.rlkv.save_gates) or a [layers, kv_heads] "
                         f"array; none ships for this model (fingerprint "
                         f"{getattr(model, 'fingerprint', '?')}): train them with "
                         f"`python -m train {method} --model ... --out DIR` (DIR/gates.json)")
    if not isinstance(allow_other_model, bool):
        raise ValueError(f"allow_other_model={allow_other_model!r}: must be True or False")
    if isinstance(gates, (str, os.PathLike)):
        try:
            gates = load_gates(gates, model, allow_other_model=allow_other_model)
        except ValueError as e:
            raise ValueError(f"gates: {e}") from None
    budget = check_budget(budget)
    if prompt_len is None:
        policy = cls(gates, budget=budget, sink=sink, window=window)
    else:
        _check_size("sink", sink)
        _check_size("window", window)
        policy = cls(gates, sparsity_for_budget(budget, sink, window, prompt_len), sink=sink,
                     window=window)
    policy.check_model(model.config)
    return policy


@register_method("rlkv")
def _rlkv(budget: float, model, gates=None, sink: int = 16, window: int = 64,
          prompt_len: Optional[int] = None, allow_other_model: bool = False):
    """RLKV with trained gates (path or array). Budget -> sparsity as in the module doc;
    prompt_len = full-cache slots per sequence (prompt + generated), default: the real capacity.
    A gate file recording another model's fingerprint is refused unless allow_other_model."""
    return policy_for_budget(RLKV, budget, model, gates, sink, window, prompt_len, "rlkv",
                             allow_other_model)


@register_method("random_heads")
def _random_heads(budget: float, model, seed: int = 0, sink: int = 16, window: int = 64,
                  prompt_len: Optional[int] = None):
    """Baseline: the same deployment with uniform random gates (`random_gates(L, K, seed)`); a
    mean and spread over seeds is one run per `seed` setting."""
    c = model.config
    return policy_for_budget(RLKV, budget, model, random_gates(c.num_layers, c.num_kv_heads, seed),
                             sink, window, prompt_len, "random_heads")


__all__ = ["RLKV", "shipped_gate_file", "check_gates", "save_gates", "load_gates", "read_gate_file",
           "check_gate_fingerprint", "plot_gates", "random_gates",
           "select_heads", "sparsity_for_budget", "num_streaming", "check_sparsity",
           "policy_for_budget"]
