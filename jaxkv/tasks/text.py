"""Real-text long-context tasks with exact verifiers (RULER-style), for pretrained models.

The tasks follow RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?", github.com/NVIDIA/RULER, ``scripts/data/synthetic/`` and
``scripts/synthetic.yaml``), plus the passkey retrieval of Mohtashami & Jaggi (2023, "Landmark
Attention"). Prompts are plain English text generated from a seed for any token length with the
model's own tokenizer; nothing is downloaded (the English haystack is CPython's bundled
documentation, see :mod:`jaxkv.tasks.haystack`).

Registry (:data:`TEXT_TASKS`, RULER names):

===================  ===========  ===============================================  ========
name                 family       settings                                         new tok.
===================  ===========  ===============================================  ========
``passkey``          retrieval    noise haystack, 5-digit pass key                 16
``niah_single_1``    retrieval    noise haystack; words key -> number              128
``niah_single_2``    retrieval    essay haystack; words key -> number              128
``niah_single_3``    retrieval    essay haystack; words key -> UUID                128
``niah_multikey_1``  retrieval    essay haystack; 4 keys (3 distractors)           128
``niah_multikey_2``  retrieval    haystack of distractor needles (words/numbers)   128
``niah_multikey_3``  retrieval    haystack of distractor needles (UUID/UUID)       128
``niah_multivalue``  retrieval    essay haystack; 1 key, 4 values (all expected)   128
``niah_multiquery``  retrieval    essay haystack; 4 keys, all 4 queried            128
``vt``               multi_hop    noise haystack; 1 chain of 4 hops, 1-shot        30
``cwe``              aggregation  numbered word list, 10 common words, 1-shot      120
``fwe``              aggregation  Zipf(alpha=2) coded words; top 3 after "..."     50
``copy_list``        generation   essay haystack; repeat a list of 5 4-digit nums  48
===================  ===========  ===============================================  ========

``copy_list`` is not RULER's: a generation task (every answer token looks back into the prompt)
for RLKV on real models.

Prompt formats (``{context}`` is the haystack with the needles inserted; every prompt ends with
RULER's answer prefix, so the model's first token is the answer):

* NIAH: ``A special magic number is hidden within the following text. Make sure to memorize it.
  I will quiz you about the number afterwards.\\n{context}\\nWhat is the special magic number
  for {key} mentioned in the provided text? The special magic number for {key} mentioned in the
  provided text is`` (plural wording, ``Some ... numbers are ...``, when several values are
  expected). Needle: ``One of the special magic numbers for {key} is: {value}.``; keys are
  ``adjective-noun`` words (or UUIDs), values 7-digit numbers (or UUIDs).
* passkey: ``There is an important info hidden inside a lot of irrelevant text. Find it and
  memorize it. I will quiz you about the important information there.\\n{context}\\nWhat is the
  pass key? The pass key is``; needle ``The pass key is {k}. Remember it. {k} is the pass key.``
* vt: ``{one solved example}\\nMemorize and track the chain(s) of variable assignment hidden in
  the following text.\\n\\n{context}\\nQuestion: Find all variables that are assigned the value
  {v} in the text above. Answer: According to the chain(s) of variable assignment in the text
  above, 5 variables are assigned the value {v}, they are:``; needles ``VAR ABCDE = 12345``,
  ``VAR FGHIJ = VAR ABCDE``, ... (5 uppercase letters, 5-digit value); all variables expected.
* cwe: ``{one solved example}\\nBelow is a numbered list of words. In these words, some appear
  more often than others. Memorize the ones that appear most often.\\n1. word 2. word ...
  \\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words
  that appear most often in the list are:``
* fwe: ``Read the following coded text and track the frequency of each coded word. Find the three
  most frequently appeared coded words. ... abcdef ... ghijkl ...\\nQuestion: Do not provide any
  explanation. Please ignore the dots '....'. What are the three most frequently appeared words
  in the above coded text? Answer: According to the coded text above, the three most frequently
  appeared words are:``

With ``chat=True`` the text before the answer prefix is the user message of the tokenizer's chat
template (rendered with the generation prompt) and the answer prefix, without its leading space,
follows the assistant header (as RULER appends it after the model template).

Haystacks: ``"noise"`` is RULER's repeated "The grass is green. The sky is blue. The sun is
yellow. Here we go. There and back again." (one line per repetition; needles are lines between
them); ``"essay"`` is running English text (sentences of the pydoc topics, from a random sentence
of the corpus, wrapping around; needles are sentences between sentences; its text follows the
Python version's documentation, so examples are reproducible for one Python version);
``"needle"`` is a sequence of distractor needles with other keys and values (one per line, cut
at its beginning to hit the length, so the first line may be a partial needle). Needle depths
are drawn per example as RULER does (distinct depths from its 40-point grid ``round(linspace(0, 100,
40)) / 100``; uniform draws when there are more than 40 needles), as a fraction of the haystack's
tokens; each needle goes to the segment boundary nearest to its depth.

Length: every prompt's token count -- ``len(prompt_ids)``, i.e. ``tokenizer.encode(prompt_text,
add_special_tokens=True)`` without chat or the chat-rendered text encoded with
``add_special_tokens=False`` with chat -- is at most ``length`` and at least 98% of it. (RULER's
``max_seq_length`` also counts the tokens to generate; here ``length`` is the prompt alone.) The
haystack is sized from per-piece token counts (each distinct piece is tokenized once per call),
then the whole prompt is tokenized to check and correct it.

Scoring (:func:`score_text`) is RULER's: metric ``"all"`` (``string_match_all``: the fraction of
the expected strings found in the completion, case-insensitive substring) or ``"part"``
(``string_match_part``: 1.0 if any is found), per example, in [0, 1].
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
import re
import string
import zlib
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import numpy as np

from jaxkv.tasks import haystack as hs

#: RULER's metrics: "all" = string_match_all, "part" = string_match_part.
METRICS: tuple[str, ...] = ("all", "part")
#: Task families (RULER's categories).
FAMILIES: tuple[str, ...] = ("retrieval", "multi_hop", "aggregation", "generation")
#: RULER's needle depths: 40 distinct percentages, as fractions.
DEPTH_GRID: tuple[float, ...] = tuple(
    float(d) / 100 for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)
)
#: The fraction of ``length`` a prompt must at least reach.
LENGTH_TOLERANCE: float = 0.02
#: Largest ``length`` accepted.
MAX_LENGTH: int = 1 << 20

_HAYSTACKS_NIAH: tuple[str, ...] = ("noise", "essay", "needle")
_HAYSTACKS_VT: tuple[str, ...] = ("noise", "essay")
_MAX_ATTEMPTS = 8  # fresh draws of one example before giving up on hitting the length window
_MAX_CORRECTIONS = 12  # exact re-tokenizations per draw


# ---------------------------------------------------------------------------------------------
# Examples and scoring.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextExample:
    """One generated prompt with its expected answers.

    ``prompt_ids`` is what the model is fed; ``prompt_text`` decodes to it (it is the text that was
    tokenized: the chat-rendered text when ``chat``). ``answers`` are the strings
    :func:`score_text` looks for in the completion. ``depths[i]`` is the relative position, in
    [0, 1] as a fraction of the haystack's tokens, of the needle holding ``answers[i]`` (empty for
    the aggregation tasks).
    """

    task: str  # registry name, e.g. "niah_single_2"
    prompt_text: str
    prompt_ids: list[int]
    answers: tuple[str, ...]
    length: int  # the requested token count (len(prompt_ids) is within 2% below it)
    max_new_tokens: int
    metric: str  # "all" or "part"
    family: str = ""
    answer_prefix: str = ""  # the end of prompt_text where the model's answer starts
    depths: tuple[float, ...] = ()
    seed: int = 0
    index: int = 0  # position in the make_text_examples list (its content depends on seed, index)
    chat: bool = False

    @property
    def num_tokens(self) -> int:
        """``len(prompt_ids)``."""
        return len(self.prompt_ids)


_CONTROL_RE = re.compile(r"[\x00-\x1f]")


def score_text(example: TextExample, completion: str) -> float:
    """RULER's score of ``completion`` for ``example``, in [0, 1].

    The completion is stripped and its control characters turned into newlines (RULER's
    ``postprocess_pred``); then metric ``"all"`` is the fraction of ``example.answers`` that occur
    in it as case-insensitive substrings (``string_match_all``: 0 or 1 for a single answer) and
    ``"part"`` is 1.0 if any of them does, else 0.0 (``string_match_part``).
    """
    if not isinstance(example, TextExample):
        raise TypeError(f"score_text: example must be a TextExample, got {type(example).__name__}")
    if not isinstance(completion, str):
        raise TypeError(f"score_text: completion must be a str (decoded text), got "
                        f"{type(completion).__name__}")
    if not example.answers:
        raise ValueError(f"score_text: example of task {example.task!r} has no answers")
    pred = _CONTROL_RE.sub("\n", completion.strip()).strip().lower()
    hits = [1.0 if a.lower() in pred else 0.0 for a in example.answers]
    if example.metric == "all":
        return sum(hits) / len(hits)
    if example.metric == "part":
        return max(hits)
    raise ValueError(f"score_text: example.metric={example.metric!r} is not allowed; "
                     f"expected one of {METRICS}")


# ---------------------------------------------------------------------------------------------
# Per-call tokenizer context, drafts and the length fitter.
# ---------------------------------------------------------------------------------------------


class _Ctx:
    """What one make_text_examples call shares: the tokenizer, a memo of piece token counts,
    the requested length and the essay corpus' sentence-start mask."""

    def __init__(self, tokenizer, length: int):
        self.tokenizer = tokenizer
        self.length = length
        self._memo: dict[str, int] = {}
        self._essay_mask: np.ndarray | None = None

    def tok(self, piece: str) -> int:
        """Token count of ``piece`` (no special tokens), memoized."""
        n = self._memo.get(piece)
        if n is None:
            n = len(self.tokenizer.encode(piece, add_special_tokens=False))
            self._memo[piece] = n
        return n

    def count(self, text: str) -> int:
        """Token count of ``text`` (no special tokens), not memoized (for one-off texts)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def essay(self) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
        """``(words, sentence_start_indices, is_sentence_start mask)`` of the essay corpus."""
        words, starts = hs.essay_corpus()
        if self._essay_mask is None:
            mask = np.zeros(len(words), dtype=bool)
            mask[starts] = True
            self._essay_mask = mask
        return words, starts, self._essay_mask


@dataclasses.dataclass
class _Draft:
    """One example before sizing: the haystack size ``n`` (in units: words, sentences, list
    items...) is chosen by the fitter in ``[n_min, n_max]``. ``cost(n)`` estimates the tokens
    the haystack part adds (non-decreasing in n); ``render(n)`` gives the context text and the
    answers' needle depths."""

    head: str  # user text before the context
    tail: str  # user text after the context (the question)
    answer_prefix: str  # starts with a space; follows the user text (or the chat header)
    answers: tuple[str, ...]
    n_min: int
    n_max: int
    cost: Callable[[int], int]
    render: Callable[[int], tuple[str, tuple[float, ...]]]


class _TooShort(Exception):
    def __init__(self, tokens: int):
        super().__init__(tokens)
        self.tokens = tokens


class _TooLong(Exception):
    def __init__(self, tokens: int):
        super().__init__(tokens)
        self.tokens = tokens


def _largest_fitting(cost: Callable[[int], int], limit: int, lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with cost(n) <= limit (cost non-decreasing); lo if none.

    Galloping search (steps growing by a quarter) then bisection, so cost is evaluated at most
    about 25% past the answer (a haystack stream is generated only that far)."""
    if hi <= lo or cost(lo) > limit:
        return lo
    good = lo
    while True:
        cand = min(good + max(1, (good - lo) // 4), hi)
        if cost(cand) <= limit:
            good = cand
            if cand == hi:
                return hi
        else:
            bad = cand
            break
    while bad - good > 1:
        mid = (good + bad) // 2
        if cost(mid) <= limit:
            good = mid
        else:
            bad = mid
    return good


def _fit(draft: _Draft, build: Callable[[str, str], tuple[str, list[int]]], length: int):
    """Choose the haystack size: returns ``(prompt_text, prompt_ids, depths)`` with
    ``0.98 * length <= len(prompt_ids) <= length``, or None if this draft cannot get there.

    The prompt at ``n_min`` is tokenized exactly; then the size whose estimated cost hits the
    remaining tokens is tried, and each exact count corrects the estimate (a secant through the
    last two measurements, so both a constant offset -- template boundaries, chat wrapping --
    and a proportional error of the per-piece counts are absorbed). Raises _TooShort when even
    ``n_min`` exceeds ``length``, _TooLong when ``n_max`` stays below the window.
    """
    lo = math.ceil((1.0 - LENGTH_TOLERANCE) * length)

    def measure(n: int):
        context, depths = draft.render(n)
        text, ids = build(draft.head + context + draft.tail, draft.answer_prefix)
        return text, ids, depths

    n = draft.n_min
    res = measure(n)
    got = len(res[1])
    if got > length:
        raise _TooShort(got)
    best = res
    tried: dict[int, int] = {n: got}
    points = [(draft.cost(n), got)]
    for _ in range(_MAX_CORRECTIONS):
        if lo <= got <= length:
            return res
        c2, t2 = points[-1]
        slope = 1.0
        if len(points) > 1 and points[-2][0] != c2:
            c1, t1 = points[-2]
            slope = min(max((t2 - t1) / (c2 - c1), 0.05), 20.0)
        target = c2 + (length - t2) / slope
        n_new = _largest_fitting(draft.cost, math.floor(target), draft.n_min, draft.n_max)
        if n_new in tried:  # the estimate points at a measured size: step from it
            n_new = n_new - 1 if tried[n_new] > length else n_new + 1
            if n_new in tried or not draft.n_min <= n_new <= draft.n_max:
                break
        n = n_new
        res = measure(n)
        got = len(res[1])
        tried[n] = got
        points.append((draft.cost(n), got))
        if len(best[1]) < got <= length:
            best = res
    if lo <= len(best[1]) <= length:
        return best
    if tried.get(draft.n_max, length + 1) < lo:
        raise _TooLong(tried[draft.n_max])
    return None


class _LazyCumsum:
    """cum(n) = fn(0) + ... + fn(n - 1), extended on demand."""

    def __init__(self, fn: Callable[[int], int]):
        self.fn = fn
        self.cum = [0]

    def __call__(self, n: int) -> int:
        cum, fn = self.cum, self.fn
        while len(cum) <= n:
            cum.append(cum[-1] + fn(len(cum) - 1))
        return cum[n]


# ---------------------------------------------------------------------------------------------
# Haystack streams: atoms (with their leading separator) + needles at segment boundaries.
# ---------------------------------------------------------------------------------------------


#: n_max of a haystack stream: streams grow on demand, so no practical bound.
_UNBOUNDED = 1 << 40
#: (atom text with its leading separator, starts a segment, token count or None: count it)
_Atom = tuple[str, bool, Optional[int]]


class _Stream:
    """A haystack of ``n`` atoms from a generated atom sequence, grown on demand, with needle
    segments inserted at segment starts.

    ``gen`` yields ``(atom, starts_segment, tokens)`` (tokens None: the memoized count of the
    atom alone). Every atom and needle carries its leading separator (``" "`` or ``"\\n"``);
    the context's first one is dropped. Normally the
    haystack is the first ``n`` atoms; with ``from_end`` the generator runs backwards from the
    end of the haystack (each segment's atoms in reverse reading order), so the haystack is the
    first ``n`` atoms reversed: it is cut at its beginning, and growing it only adds text there.
    A needle with depth ``d`` goes before the segment-start atom (or to the end) whose token
    offset is nearest to ``d`` times the haystack's tokens.
    """

    def __init__(self, ctx: _Ctx, gen: Iterator[_Atom], *, from_end: bool,
                 needles: Sequence[str], depths: Sequence[float]):
        self._ctx = ctx
        self._gen = gen
        self.from_end = from_end
        self.atoms: list[str] = []
        self.starts: list[bool] = []
        self._cum = [0]
        self.needles = list(needles)
        self.depths = [float(d) for d in depths]
        self.n_max = _UNBOUNDED

    def _ensure(self, n: int) -> None:
        atoms, starts, cum, tok, gen = self.atoms, self.starts, self._cum, self._ctx.tok, self._gen
        while len(atoms) < n:
            atom, start, t = next(gen)
            atoms.append(atom)
            starts.append(start)
            cum.append(cum[-1] + (tok(atom) if t is None else t))

    def cost(self, n: int) -> int:
        self._ensure(n)
        return self._cum[n]

    def render(self, n: int) -> tuple[str, tuple[float, ...]]:
        """Context text with ``n`` atoms, and the placed depth of every needle."""
        self._ensure(n)
        cum = np.asarray(self._cum[:n + 1])
        toks = np.diff(cum)
        atoms, starts = self.atoms[:n], np.asarray(self.starts[:n], dtype=bool)
        if self.from_end:
            atoms, starts, toks = atoms[::-1], starts[::-1], toks[::-1]
        cum = np.concatenate([[0], np.cumsum(toks)])
        total = int(cum[-1])
        points = np.append(np.flatnonzero(starts), n)
        offsets = cum[points]
        at: dict[int, list[int]] = {}
        placed: list[float] = []
        for j, d in enumerate(self.depths):
            target = d * total
            k = int(np.searchsorted(offsets, target))
            if k == len(points) or (k > 0 and target - offsets[k - 1] <= offsets[k] - target):
                k -= 1
            p = int(points[k])
            at.setdefault(p, []).append(j)
            placed.append(float(cum[p]) / total if total else 0.0)
        pieces: list[str] = []
        prev = 0
        for p in sorted(at):
            pieces.extend(atoms[prev:p])
            pieces.extend(self.needles[j] for j in at[p])
            prev = p
        pieces.extend(atoms[prev:])
        if pieces:
            pieces[0] = pieces[0].lstrip(" \n")
        return "".join(pieces), tuple(placed)


def _noise_atoms() -> Iterator[_Atom]:
    """RULER's noise paragraph repeated, one paragraph per line; atoms = sentences."""
    atoms = [(("\n" if j == 0 else " ") + s, j == 0, None)
             for j, s in enumerate(hs.NOISE_SENTENCES)]
    while True:
        yield from atoms


def _essay_atoms(ctx: _Ctx, start: int) -> Iterator[_Atom]:
    """Essay words from word ``start`` of the corpus on (wrapping); atoms = words."""
    words, _, mask = ctx.essay()
    i = start
    while True:
        k = i % len(words)
        yield " " + words[k], bool(mask[k]), None
        i += 1


_HYPHEN = re.compile(r"(?=-)")


def _needle_atoms(ctx: _Ctx, rng: np.random.Generator, key_kind: str, value_kind: str,
                  exclude: set) -> Iterator[_Atom]:
    """Distractor needles with other keys and values, one per line, generated backwards from
    the end of the haystack (each needle's atoms in reverse order).

    Atoms are words, except that hyphenated words (UUIDs, adjective-noun keys) are cut at their
    hyphens and pieces over 8 characters in 6-character chunks, so that no atom is many tokens
    (the fitter lands within one atom of the length). A cut word is tokenized once, whole, and
    its count shared out over its pieces by their lengths."""
    while True:
        key = hs.random_item(rng, key_kind)
        value = hs.random_item(rng, value_kind)
        if key in exclude or value in exclude:
            continue
        atoms: list[_Atom] = []
        for j, word in enumerate(_niah_needle(value_kind, key, value).split(" ")):
            atom = ("\n" if j == 0 else " ") + word
            pieces = []
            for p in _HYPHEN.split(atom):
                while len(p) > 8:
                    pieces.append(p[:6])
                    p = p[6:]
                pieces.append(p)
            if len(pieces) == 1:
                atoms.append((atom, j == 0, None))
                continue
            total, chars, done = ctx.tok(atom), len(atom), 0
            for k, p in enumerate(pieces):
                t = total - done if k == len(pieces) - 1 else total * len(p) // chars
                done += t
                atoms.append((p, j == 0 and k == 0, t))
        yield from reversed(atoms)


def _haystack_stream(kind: str, rng: np.random.Generator, ctx: _Ctx, *, needles: Sequence[str],
                     depths: Sequence[float], needle_args: dict | None = None) -> _Stream:
    """A _Stream of haystack ``kind`` holding ``needles`` (texts without separator). Draws from
    ``rng`` a fixed number of times (the essay start, the distractors' own seed)."""
    if kind == "noise":
        gen, sep, from_end = _noise_atoms(), "\n", False
    elif kind == "essay":
        _, starts, _ = ctx.essay()
        start = int(starts[int(rng.integers(len(starts)))])
        gen, sep, from_end = _essay_atoms(ctx, start), " ", False
    elif kind == "needle":
        sub = np.random.default_rng(int(rng.integers(1 << 62)))
        gen, sep, from_end = _needle_atoms(ctx, sub, **(needle_args or {})), "\n", True
    else:  # pragma: no cover - validated by the specs
        raise ValueError(f"unknown haystack {kind!r}")
    return _Stream(ctx, gen, from_end=from_end, needles=[sep + t for t in needles], depths=depths)


def _draw_depths(rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` needle depths: distinct points of RULER's 40-point grid (uniform in [0, 1] if
    ``k > 40``)."""
    if k <= len(DEPTH_GRID):
        return np.asarray(DEPTH_GRID)[rng.choice(len(DEPTH_GRID), size=k, replace=False)]
    return rng.random(k)


def _stream_draft(stream: _Stream, head: str, tail: str, prefix: str, answers: Sequence[str],
                  answer_needles: Sequence[int]) -> _Draft:
    """A _Draft over a _Stream; ``answer_needles[i]`` is the needle holding ``answers[i]``."""

    def render(n: int):
        text, depths = stream.render(n)
        return text, tuple(depths[j] for j in answer_needles)

    return _Draft(head, tail, prefix, tuple(answers), 0, stream.n_max, stream.cost, render)


# ---------------------------------------------------------------------------------------------
# Task specs.
# ---------------------------------------------------------------------------------------------


def _bad(obj, field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{type(obj).__name__}: {field}={value!r} is not allowed; expected {allowed}")


def _check_int(obj, field: str, lo: int, hi: int, optional: bool = False) -> None:
    value = getattr(obj, field)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise _bad(obj, field, value, ("None or " if optional else "")
                   + f"an integer in [{lo}, {hi}]")
    object.__setattr__(obj, field, int(value))


def _check_choice(obj, field: str, allowed: Sequence[str]) -> None:
    value = getattr(obj, field)
    if value not in allowed:
        raise _bad(obj, field, value, f"one of {tuple(allowed)}")


def _check_bool(obj, field: str) -> None:
    if not isinstance(getattr(obj, field), bool):
        raise _bad(obj, field, getattr(obj, field), "True or False")


def _check_float(obj, field: str, lo: float, hi: float, *, optional: bool = False,
                 lo_open: bool = False) -> None:
    value = getattr(obj, field)
    if optional and value is None:
        return
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(float(value)) and (lo < value if lo_open else lo <= value)
          and value <= hi)
    if not ok:
        interval = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise _bad(obj, field, value, ("None or " if optional else "") + f"a number in {interval}")
    object.__setattr__(obj, field, float(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextTask(abc.ABC):
    """A real-text task: its registry ``name``, settings, ``family``, answer length and metric.

    Subclasses are keyword-only frozen dataclasses whose fields are the settings; they are
    validated in ``__post_init__`` (ValueError naming the setting, its value and what is
    allowed). :func:`make_text_examples` draws examples; use :func:`text_task` to get a registry
    task with some settings changed.
    """

    family: ClassVar[str] = ""

    name: str
    max_new_tokens: int  # tokens to generate (RULER's tokens_to_generate)
    metric: str = "all"  # "all" (string_match_all) or "part" (string_match_part)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise _bad(self, "name", self.name, "a non-empty string")
        _check_int(self, "max_new_tokens", 1, 1 << 16)
        _check_choice(self, "metric", METRICS)
        self._check_settings()

    def _check_settings(self) -> None:
        """Validate the subclass's own settings."""

    def _short_hint(self) -> str:
        """What could make the fixed parts shorter (for the length-too-small error)."""
        return ""

    @abc.abstractmethod
    def _draft(self, rng: np.random.Generator, ctx: _Ctx) -> _Draft:
        """Draw one example's content (everything but the haystack size)."""

    def settings(self) -> dict[str, Any]:
        """The task's settings (every field but name, max_new_tokens and metric)."""
        skip = {"name", "max_new_tokens", "metric"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in skip}


_NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."


def _niah_needle(kind: str, key: str, value: str) -> str:
    return _NIAH_NEEDLE.format(kind=kind, key=key, value=value)


def _join_queries(keys: Sequence[str]) -> str:
    """RULER's query list: ``a``; ``a, and b``; ``a, b, and c``."""
    return ", ".join(keys[:-1]) + ", and " + keys[-1] if len(keys) > 1 else keys[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NiahText(TextTask):
    """Needle in a haystack (RULER ``niah``): ``num_keys`` keys, each with ``num_values``
    needles ``One of the special magic {value_type} for {key} is: {value}.``; ``num_queries`` of
    the keys are asked for and all their values are expected (in query order).

    ``haystack``: ``"noise"``, ``"essay"`` or ``"needle"`` (distractor needles); ``key_type`` /
    ``value_type``: ``"words"`` (adjective-noun), ``"numbers"`` (7 digits) or ``"uuids"``.
    ``depth`` in [0, 1] fixes the depth of the needle holding the first answer (None: drawn).
    Keys are distinct, values are distinct and distractors use neither."""

    family: ClassVar[str] = "retrieval"

    haystack: str = "essay"
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    depth: float | None = None

    def _check_settings(self):
        _check_choice(self, "haystack", _HAYSTACKS_NIAH)
        _check_choice(self, "key_type", hs.KINDS)
        _check_choice(self, "value_type", hs.KINDS)
        _check_int(self, "num_keys", 1, 64)
        _check_int(self, "num_values", 1, 64)
        _check_int(self, "num_queries", 1, 64)
        if self.num_queries > self.num_keys:
            raise _bad(self, "num_queries", self.num_queries,
                       f"an integer in [1, num_keys={self.num_keys}]")
        _check_float(self, "depth", 0.0, 1.0, optional=True)

    def _draft(self, rng, ctx):
        vkind = self.value_type
        keys = hs.draw_distinct(rng, self.key_type, self.num_keys)
        values = hs.draw_distinct(rng, vkind, self.num_keys * self.num_values, exclude=keys)
        needles = []  # (key index, value)
        for k in range(self.num_keys):
            for v in values[k * self.num_values:(k + 1) * self.num_values]:
                needles.append((k, v))
        order = rng.permutation(len(needles))
        needles = [needles[i] for i in order]
        texts = [_niah_needle(vkind, keys[k], v) for k, v in needles]
        queried = [int(q) for q in rng.choice(self.num_keys, size=self.num_queries, replace=False)]
        nv = self.num_values
        answers = [v for q in queried for v in values[q * nv:(q + 1) * nv]]
        where = {v: j for j, (_, v) in enumerate(needles)}
        answer_needles = [where[a] for a in answers]
        depths = _draw_depths(rng, len(needles))
        if self.depth is not None:
            depths[answer_needles[0]] = self.depth
        query = _join_queries([keys[q] for q in queried])
        if len(answers) == 1:
            one = vkind[:-1]  # "numbers" -> "number"
            head = (f"A special magic {one} is hidden within the following text. Make sure to "
                    f"memorize it. I will quiz you about the {one} afterwards.\n")
            tail = f"\nWhat is the special magic {one} for {query} mentioned in the provided text?"
            prefix = f" The special magic {one} for {query} mentioned in the provided text is"
        else:
            head = (f"Some special magic {vkind} are hidden within the following text. Make sure "
                    f"to memorize it. I will quiz you about the {vkind} afterwards.\n")
            tail = (f"\nWhat are all the special magic {vkind} for {query} mentioned in the "
                    f"provided text?")
            prefix = f" The special magic {vkind} for {query} mentioned in the provided text are"
        needle_args = dict(key_kind=self.key_type, value_kind=vkind,
                           exclude=set(keys) | set(values))
        stream = _haystack_stream(self.haystack, rng, ctx, needles=texts, depths=depths,
                                  needle_args=needle_args)
        return _stream_draft(stream, head, tail, prefix, answers, answer_needles)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PasskeyText(TextTask):
    """Passkey retrieval (Mohtashami & Jaggi, 2023): ``The pass key is {k}. Remember it. {k} is
    the pass key.`` in the noise haystack; ``k`` has ``digits`` digits. ``depth`` in [0, 1]
    fixes the needle depth (None: drawn)."""

    family: ClassVar[str] = "retrieval"

    digits: int = 5
    depth: float | None = None

    def _check_settings(self):
        _check_int(self, "digits", 1, 32)
        _check_float(self, "depth", 0.0, 1.0, optional=True)

    def _draft(self, rng, ctx):
        key = hs.random_number(rng, self.digits)
        depth = float(_draw_depths(rng, 1)[0]) if self.depth is None else self.depth
        head = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                "memorize it. I will quiz you about the important information there.\n")
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        stream = _haystack_stream("noise", rng, ctx, needles=[needle], depths=[depth])
        return _stream_draft(stream, head, "\nWhat is the pass key?", " The pass key is",
                             [key], [0])


def _random_names(rng: np.random.Generator, n: int, k: int, exclude: set) -> list[str]:
    """``n`` distinct random names of ``k`` uppercase letters, none in ``exclude``."""
    out: list[str] = []
    seen = set(exclude)
    letters = np.array(list(string.ascii_uppercase))
    while len(out) < n:
        name = "".join(letters[rng.integers(0, 26, size=k)])
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


_VT_HEAD = ("Memorize and track the chain(s) of variable assignment hidden in the following "
            "text.\n\n")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VariableTrackingText(TextTask):
    """Variable tracking (RULER ``variable_tracking``): ``num_chains`` chains of
    ``num_hops + 1`` variables, ``VAR ABCDE = 12345`` then ``VAR FGHIJ = VAR ABCDE`` ..., each
    statement a line of the noise haystack (a sentence, with a final ``.``, of the essay one) in
    chain order; the first chain's value is queried and all its variables are expected.

    ``fewshot=True`` (RULER's default) puts one solved example first: the same task with
    3-letter names on a haystack of at most ``min(500, length // 4)`` tokens."""

    family: ClassVar[str] = "multi_hop"

    haystack: str = "noise"
    num_chains: int = 1
    num_hops: int = 4
    fewshot: bool = True

    def _check_settings(self):
        _check_choice(self, "haystack", _HAYSTACKS_VT)
        _check_int(self, "num_chains", 1, 64)
        _check_int(self, "num_hops", 1, 64)
        _check_bool(self, "fewshot")

    def _short_hint(self) -> str:
        return "; fewshot=False drops the solved example" if self.fewshot else ""

    def _chains(self, rng, name_len: int, num_hops: int, used: set, used_values: set):
        names = _random_names(rng, self.num_chains * (num_hops + 1), name_len, used)
        values = []
        while len(values) < self.num_chains:
            v = hs.random_number(rng, 5)
            if v not in values and v not in used_values:
                values.append(v)
        m = num_hops + 1
        chains = [names[c * m:(c + 1) * m] for c in range(self.num_chains)]
        statements, depths = [], []
        all_depths = _draw_depths(rng, self.num_chains * (num_hops + 1))
        for c, chain in enumerate(chains):
            statements.append(f"VAR {chain[0]} = {values[c]}")
            statements.extend(f"VAR {chain[j + 1]} = VAR {chain[j]}" for j in range(num_hops))
            depths.extend(np.sort(all_depths[c * (num_hops + 1):(c + 1) * (num_hops + 1)]))
        if self.haystack == "essay":
            statements = [s + "." for s in statements]
        return chains, values, statements, depths

    def _texts(self, value: str, num_v: int) -> tuple[str, str]:
        tail = (f"\nQuestion: Find all variables that are assigned the value {value} in the text "
                f"above.")
        prefix = (f" Answer: According to the chain(s) of variable assignment in the text above, "
                  f"{num_v} variables are assigned the value {value}, they are:")
        return tail, prefix

    def _draft(self, rng, ctx):
        avoid = set(hs.essay_uppercase_words()) if self.haystack == "essay" else set()
        head = _VT_HEAD
        used_values: set = set()
        if self.fewshot:
            hops = min(10, self.num_hops)
            chains, values, statements, depths = self._chains(rng, 3, hops, avoid, used_values)
            avoid |= {v for c in chains for v in c}
            used_values |= set(values)
            stream = _haystack_stream(self.haystack, rng, ctx, needles=statements, depths=depths)
            tail, prefix = self._texts(values[0], hops + 1)
            solved = prefix + " " + " ".join(chains[0]) + "\n"
            empty, _ = stream.render(0)
            base = ctx.count(_VT_HEAD + empty + tail + solved)
            n = _largest_fitting(lambda m: base + stream.cost(m), min(500, ctx.length // 4), 0,
                                 stream.n_max)
            context, _ = stream.render(n)
            head = _VT_HEAD + context + tail + solved + _VT_HEAD
        chains, values, statements, depths = self._chains(rng, 5, self.num_hops, avoid, used_values)
        stream = _haystack_stream(self.haystack, rng, ctx, needles=statements, depths=depths)
        tail, prefix = self._texts(values[0], self.num_hops + 1)
        return _stream_draft(stream, head, tail, prefix, chains[0], range(self.num_hops + 1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CopyListText(TextTask):
    """List copying (jaxkv's, not RULER's): ``Memorize this list of numbers: a, b, c, d.``
    hidden at one depth of the essay haystack; the model is asked to repeat the list in order,
    and the whole list, in order, is the one expected answer. Each number of the answer is
    generated by looking back at the list, so it is a generation task that needs the prompt's
    middle during decoding, not only at its first token (RLKV's training and evaluation task on
    real models, `configs/rlkv/smollm2.py`).

    ``num_items`` numbers of ``digits`` digits each (distinct); ``depth`` in [0, 1] fixes the
    list's depth (None: drawn from RULER's grid)."""

    family: ClassVar[str] = "generation"

    num_items: int = 5
    digits: int = 4
    depth: float | None = None

    def _check_settings(self):
        _check_int(self, "num_items", 1, 64)
        _check_int(self, "digits", 1, 16)
        _check_float(self, "depth", 0.0, 1.0, optional=True)

    def _draft(self, rng, ctx):
        items: list[str] = []
        while len(items) < self.num_items:
            x = hs.random_number(rng, self.digits)
            if x not in items:
                items.append(x)
        listed = ", ".join(items)
        depth = float(_draw_depths(rng, 1)[0]) if self.depth is None else self.depth
        head = ("A list of numbers is hidden within the following text. Make sure to memorize "
                "it. I will ask you to repeat it afterwards.\n")
        needle = f"Memorize this list of numbers: {listed}."
        stream = _haystack_stream("essay", rng, ctx, needles=[needle], depths=[depth])
        tail = "\nRepeat the list of numbers from the text, in order."
        return _stream_draft(stream, head, tail, " The list of numbers is:", [listed], [0])


_CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than "
             "others. Memorize the ones that appear most often.\n")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommonWordsText(TextTask):
    """Common words extraction (RULER ``common_words_extraction``): a numbered list ``1. word
    2. word ...`` where ``num_cw`` common words appear ``freq_cw`` times each and the others
    ``freq_ucw`` times, shuffled; all the common words are expected.

    ``freq_cw`` / ``freq_ucw`` None take RULER's values: 30 / 3 when ``length +
    max_new_tokens >= 4096`` (RULER's ``max_seq_length`` counts the answer), else 6 / 1.
    ``num_fewshot`` solved examples come first (RULER: one, of 40 words with frequencies 10 / 3,
    or 20 words with 3 / 1 below those 4096 tokens), with words not in the main list. Words
    come from :func:`jaxkv.tasks.haystack.common_words` (about 2,200 distinct words: at the
    30 / 3 frequencies the whole list is about 48K tokens with SmolLM2's tokenizer; a longer
    ``length`` is a ValueError)."""

    family: ClassVar[str] = "aggregation"

    num_cw: int = 10
    freq_cw: int | None = None
    freq_ucw: int | None = None
    num_fewshot: int = 1

    def _check_settings(self):
        _check_int(self, "num_cw", 1, 100)
        _check_int(self, "freq_cw", 2, 10_000, optional=True)
        _check_int(self, "freq_ucw", 1, 10_000, optional=True)
        if self.freq_cw is not None and self.freq_ucw is not None and self.freq_ucw >= self.freq_cw:
            raise _bad(self, "freq_ucw", self.freq_ucw,
                       f"an integer below freq_cw={self.freq_cw}")
        _check_int(self, "num_fewshot", 0, 8)

    def _short_hint(self) -> str:
        return "; num_fewshot=0 drops the solved example" if self.num_fewshot else ""

    def _frequencies(self, length: int) -> tuple[int, int, tuple[int, int, int]]:
        long = length + self.max_new_tokens >= 4096
        fc = self.freq_cw if self.freq_cw is not None else (30 if long else 6)
        fu = self.freq_ucw if self.freq_ucw is not None else (3 if long else 1)
        if fu >= fc:
            raise _bad(self, "freq_ucw" if self.freq_ucw is not None else "freq_cw",
                       self.freq_ucw if self.freq_ucw is not None else self.freq_cw,
                       f"a value keeping freq_ucw < freq_cw (now {fu} >= {fc} at length {length})")
        shots = (40, 10, 3) if long else (20, 3, 1)
        return fc, fu, shots

    def _texts(self) -> tuple[str, str]:
        tail = f"\nQuestion: What are the {self.num_cw} most common words in the above list?"
        prefix = f" Answer: The top {self.num_cw} words that appear most often in the list are:"
        return tail, prefix

    @staticmethod
    def _listing(items: Sequence[str]) -> str:
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    def _draft(self, rng, ctx):
        vocab = hs.common_words()
        fc, fu, (fs_words, fs_fc, fs_fu) = self._frequencies(ctx.length)
        if fs_words <= self.num_cw and self.num_fewshot:
            fs_words = self.num_cw + 10
        perm = rng.permutation(len(vocab))
        words = [vocab[i] for i in perm]
        tail, prefix = self._texts()
        shots = []
        for f in range(self.num_fewshot):
            chosen = words[len(words) - (f + 1) * fs_words:len(words) - f * fs_words]
            common = chosen[:self.num_cw]
            items = common * fs_fc + chosen[self.num_cw:] * fs_fu
            items = [items[i] for i in rng.permutation(len(items))]
            shots.append(_CWE_HEAD + self._listing(items) + tail + prefix + " "
                         + self._listing(common))
        head = "\n".join(shots + [_CWE_HEAD]) if shots else _CWE_HEAD
        n_max = len(words) - self.num_fewshot * fs_words
        shuffle_seed = int(rng.integers(1 << 62))
        num_cw = self.num_cw
        number_toks = _LazyCumsum(lambda i: ctx.tok(f" {i + 1}."))
        word_toks = _LazyCumsum(lambda i: ctx.tok(" " + words[i]))

        def n_items(n: int) -> int:
            return num_cw * fc + (n - num_cw) * fu

        def cost(n: int) -> int:
            return (number_toks(n_items(n)) + fc * word_toks(num_cw)
                    + fu * (word_toks(n) - word_toks(num_cw)))

        def render(n: int):
            items = words[:num_cw] * fc + words[num_cw:n] * fu
            order = np.random.default_rng(shuffle_seed).permutation(len(items))
            return self._listing([items[i] for i in order]), ()

        return _Draft(head, tail, prefix, tuple(words[:num_cw]), num_cw + 1, n_max, cost, render)


def _zeta(alpha: float) -> float:
    """Riemann zeta(alpha) for alpha > 1 (Euler-Maclaurin, relative error < 1e-12)."""
    n = 1000
    k = np.arange(1, n, dtype=np.float64)
    head = float(np.sum(k ** -alpha))
    return (head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n ** -alpha
            + alpha * n ** (-alpha - 1) / 12 - alpha * (alpha + 1) * (alpha + 2)
            * n ** (-alpha - 3) / 720)


_FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. Find the "
             "three most frequently appeared coded words. ")
_FWE_TAIL = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are "
             "the three most frequently appeared words in the above coded text?")
_FWE_PREFIX = (" Answer: According to the coded text above, the three most frequently appeared "
               "words are:")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FreqWordsText(TextTask):
    """Frequent words extraction (RULER ``freq_words_extraction``): ``vocab_size`` random coded
    words of ``coded_wordlen`` lowercase letters; with ``N`` words in all, the word of rank k
    appears ``floor(N * k**-alpha / zeta(alpha))`` times (Zipf), shuffled. Rank 1 is the noise
    word ``...``; the ranks 2-4 words are expected. ``vocab_size`` None is RULER's
    ``length // 50`` (at least 5). ``N`` is at least ``max_k 1 / (w_k - w_k+1)`` over ranks 1-5
    (74 for alpha=2; ``w_k`` the Zipf weight), so that their counts strictly decrease and the
    answer is unambiguous."""

    family: ClassVar[str] = "aggregation"

    alpha: float = 2.0
    coded_wordlen: int = 6
    vocab_size: int | None = None

    def _check_settings(self):
        _check_float(self, "alpha", 1.0, 8.0, lo_open=True)
        _check_int(self, "coded_wordlen", 3, 32)
        _check_int(self, "vocab_size", 5, 1 << 20, optional=True)

    def _draft(self, rng, ctx):
        size = self.vocab_size if self.vocab_size is not None else max(5, ctx.length // 50)
        letters = np.array(list(string.ascii_lowercase))
        vocab: list[str] = []
        seen: set = set()
        while len(vocab) < size:
            w = "".join(letters[rng.integers(0, 26, size=self.coded_wordlen)])
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        vocab[0] = "..."
        weights = np.arange(1, size + 1, dtype=np.float64) ** -self.alpha / _zeta(self.alpha)
        toks = np.array([ctx.tok(" " + w) for w in vocab], dtype=np.int64)

        def counts(n: int) -> np.ndarray:
            return (n * weights).astype(np.int64)

        # From N >= 1 / (w_k - w_k+1) on, floor(N w_k) > floor(N w_k+1): ranks 1-5 strictly
        # decreasing, so the ranks 2-4 words are the unique top three after "...".
        n_min = math.ceil(max(1.0 / (weights[k] - weights[k + 1]) for k in range(4)))
        shuffle_seed = int(rng.integers(1 << 62))

        def cost(n: int) -> int:
            return int(counts(n) @ toks)

        def render(n: int):
            seq = np.repeat(np.arange(size), counts(n))
            seq = seq[np.random.default_rng(shuffle_seed).permutation(len(seq))]
            return " ".join(vocab[i] for i in seq), ()

        n_max = n_min + 4 * ctx.length + 100
        return _Draft(_FWE_HEAD, _FWE_TAIL, _FWE_PREFIX, tuple(vocab[1:4]), n_min, n_max, cost,
                      render)


#: The registry: RULER's task names (synthetic.yaml) plus passkey, with RULER's settings and
#: tokens to generate.
TEXT_TASKS: dict[str, TextTask] = {
    t.name: t
    for t in (
        PasskeyText(name="passkey", max_new_tokens=16),
        NiahText(name="niah_single_1", max_new_tokens=128, haystack="noise"),
        NiahText(name="niah_single_2", max_new_tokens=128, haystack="essay"),
        NiahText(name="niah_single_3", max_new_tokens=128, haystack="essay", value_type="uuids"),
        NiahText(name="niah_multikey_1", max_new_tokens=128, haystack="essay", num_keys=4),
        NiahText(name="niah_multikey_2", max_new_tokens=128, haystack="needle"),
        NiahText(name="niah_multikey_3", max_new_tokens=128, haystack="needle", key_type="uuids",
                 value_type="uuids"),
        NiahText(name="niah_multivalue", max_new_tokens=128, haystack="essay", num_values=4),
        NiahText(name="niah_multiquery", max_new_tokens=128, haystack="essay", num_keys=4,
                 num_queries=4),
        VariableTrackingText(name="vt", max_new_tokens=30),
        CommonWordsText(name="cwe", max_new_tokens=120),
        FreqWordsText(name="fwe", max_new_tokens=50),
        CopyListText(name="copy_list", max_new_tokens=48),
    )
}


def text_task(name: str, **settings) -> TextTask:
    """Registry task ``name`` with some settings (or ``max_new_tokens`` / ``metric``) changed.

    Raises ValueError for an unknown name (listing the registry), an unknown setting (listing the
    task's settings) or a disallowed value.
    """
    if not isinstance(name, str) or name not in TEXT_TASKS:
        raise ValueError(f"unknown text task name={name!r}; allowed: {sorted(TEXT_TASKS)}")
    spec = TEXT_TASKS[name]
    allowed = [f.name for f in dataclasses.fields(spec) if f.name != "name"]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"text task {name!r} has no setting(s) {unknown}; allowed: {allowed}")
    return dataclasses.replace(spec, **settings) if settings else spec


def _check_tokenizer(tokenizer, chat: bool) -> None:
    for attr in ("encode", "decode") + (("apply_chat_template",) if chat else ()):
        if not callable(getattr(tokenizer, attr, None)):
            why = (" (chat=True wraps the prompt in the chat template)"
                   if attr == "apply_chat_template" else "")
            raise ValueError(f"make_text_examples: tokenizer={type(tokenizer).__name__} has no "
                             f"{attr}() method{why}; expected an object with encode(text, "
                             f"add_special_tokens=...), decode(ids, skip_special_tokens=...)"
                             + (" and apply_chat_template(messages, add_generation_prompt=True)"
                                if chat else ""))


def make_text_examples(
    name: str,
    tokenizer,
    length: int,
    n: int,
    seed: int,
    chat: bool = False,
    **settings,
) -> list[TextExample]:
    """``n`` examples of text task ``name`` whose prompts are ``length`` tokens (at most, and at
    least 98% of it) for ``tokenizer``.

    ``tokenizer`` has ``encode(text, add_special_tokens=...) -> list[int]``, ``decode(ids,
    skip_special_tokens=True) -> str`` and, for ``chat=True``,
    ``apply_chat_template(messages, add_generation_prompt=True) -> str``. Without chat the
    prompt text is encoded with ``add_special_tokens=True``; with chat the rendered template (the
    task as the user message, then the answer prefix) with ``add_special_tokens=False``.
    ``settings`` change the registry task's settings (see :func:`text_task`).

    Example ``i``'s content depends only on ``(seed, i)``, the task name and settings,
    ``length`` and the tokenizer (it is drawn from ``numpy.random.default_rng([seed, i,
    crc32(name)])``, so different tasks draw different needles), so the same arguments
    always give the same examples and the first k examples of a call with ``n >= k`` are the
    same. Raises ValueError for a bad argument, a ``length`` too small for the task's fixed parts
    (template, needles, question) or too large for its word list (cwe).
    """
    spec = text_task(name, **settings)
    if (isinstance(length, bool) or not isinstance(length, numbers.Integral)
            or not 1 <= length <= MAX_LENGTH):
        raise ValueError(f"make_text_examples: length={length!r} is not allowed; expected an "
                         f"integer in [1, {MAX_LENGTH}] (prompt tokens)")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"make_text_examples: n={n!r} is not allowed; expected an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"make_text_examples: seed={seed!r} is not allowed; expected an integer "
                         f">= 0")
    if not isinstance(chat, bool):
        raise ValueError(f"make_text_examples: chat={chat!r} is not allowed; expected True or "
                         f"False")
    _check_tokenizer(tokenizer, chat)
    length, n, seed = int(length), int(n), int(seed)
    ctx = _Ctx(tokenizer, length)

    def build(user: str, prefix: str) -> tuple[str, list[int]]:
        if chat:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                     add_generation_prompt=True)
            if not isinstance(rendered, str):
                raise ValueError(f"make_text_examples: tokenizer.apply_chat_template returned "
                                 f"{type(rendered).__name__}; expected the rendered prompt str")
            text = rendered + prefix.lstrip(" ")
            return text, list(tokenizer.encode(text, add_special_tokens=False))
        text = user + prefix
        return text, list(tokenizer.encode(text, add_special_tokens=True))

    task_key = zlib.crc32(name.encode("utf-8"))  # decorrelates tasks drawn with one seed
    desc = f"task {name!r} ({', '.join(f'{k}={v!r}' for k, v in spec.settings().items())})"
    out: list[TextExample] = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, task_key])
        res = None
        for _ in range(_MAX_ATTEMPTS):
            try:
                draft = spec._draft(rng, ctx)
                res = _fit(draft, build, length)
            except _TooShort as e:
                raise ValueError(
                    f"make_text_examples: length={length} is too small for {desc}: with this "
                    f"tokenizer{' and chat template' if chat else ''} its template, needles and "
                    f"question alone take {e.tokens} tokens{spec._short_hint()}") from None
            except _TooLong as e:
                raise ValueError(
                    f"make_text_examples: length={length} is too large for {desc}: its whole "
                    f"word list makes only {e.tokens} tokens") from None
            if res is not None:
                break
        if res is None:
            raise RuntimeError(f"make_text_examples: could not size example {i} of {desc} to "
                               f"within {LENGTH_TOLERANCE:.0%} below length={length} in "
                               f"{_MAX_ATTEMPTS} draws")
        text, ids, depths = res
        out.append(TextExample(
            task=name, prompt_text=text, prompt_ids=ids, answers=draft.answers, length=length,
            max_new_tokens=spec.max_new_tokens, metric=spec.metric, family=spec.family,
            answer_prefix=draft.answer_prefix.lstrip(" ") if chat else draft.answer_prefix,
            depths=depths, seed=seed, index=i, chat=chat))
    return out


def answer_token_spans(example: TextExample, tokenizer) -> list[list[tuple[int, int]]]:
    """Where each answer sits in the prompt, in tokens: for ``example.answers[i]``, the token
    ranges ``[start, end)`` of ``example.prompt_ids`` covering each of its occurrences in
    ``example.prompt_text`` (every occurrence: the passkey is written twice, a variable of the
    chain on both sides of an assignment). Empty lists for the aggregation tasks, whose answers
    are words spread over the whole prompt rather than a needle. Needs ``tokenizer.decode``
    to give back ``prompt_text`` from ``prompt_ids``, special tokens kept (a chat prompt's
    ``<|im_start|>`` ...; true of the tokenizers jaxkv loads)."""
    if example.family == "aggregation":
        return [[] for _ in example.answers]
    ids, text = list(example.prompt_ids), example.prompt_text

    def decode(part):  # special tokens written out: the chat template's markers are text
        return tokenizer.decode(part, skip_special_tokens=False)

    if decode(ids) != text:
        raise ValueError("answer_token_spans: tokenizer.decode(prompt_ids) differs from "
                         "prompt_text; character offsets cannot be mapped to tokens")
    cache: dict[int, int] = {0: 0, len(ids): len(text)}

    def chars(i: int) -> int:  # characters decoded from the first i tokens (nondecreasing in i)
        if i not in cache:
            cache[i] = len(decode(ids[:i]))
        return cache[i]

    def first_token_reaching(c: int) -> int:  # smallest i with chars(i) >= c
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if chars(mid) >= c:
                hi = mid
            else:
                lo = mid + 1
        return lo

    spans = []
    for answer in example.answers:
        found, at = [], text.find(answer)
        while at >= 0:
            start = max(first_token_reaching(at + 1) - 1, 0)  # the token holding char `at`
            end = first_token_reaching(at + len(answer))
            found.append((start, end))
            at = text.find(answer, at + 1)
        spans.append(found)
    return spans


def needle_survival(kept, spans: Sequence[Sequence[tuple[int, int]]]) -> Optional[float]:
    """The share of (answer, layer, KV head) triples in which some occurrence of the answer has
    every one of its tokens held by the cache. kept: bool [L, K, T] (one prompt's
    `Generation.kept_positions[:, b]`); spans: `answer_token_spans` of that prompt. None when
    no answer has a span (aggregation tasks)."""
    kept = np.asarray(kept, bool)
    shares = []
    for occurrences in spans:
        if not occurrences:
            continue
        whole = np.zeros(kept.shape[:2], bool)
        for start, end in occurrences:
            whole |= kept[:, :, start:end].all(axis=-1)
        shares.append(whole.mean())
    return float(np.mean(shares)) if shares else None


__all__ = [
    "DEPTH_GRID", "FAMILIES", "METRICS", "TEXT_TASKS", "TextExample", "TextTask", "NiahText",
    "PasskeyText", "VariableTrackingText", "CommonWordsText", "FreqWordsText",
    "make_text_examples", "score_text", "text_task", "answer_token_spans", "needle_survival",
]
