"""Readers and answer checking for local GSM8K / Math500-style JSONL benchmark files.

Nothing is downloaded: the user points :func:`read_jsonl` at a file on disk. Each line is a JSON
object holding a question (key ``question``/``problem``/...) and an answer (``answer``/
``solution``/...). GSM8K answers are a worked solution ending in ``#### 42``; Math500 rows carry
``problem``, ``solution`` (with a ``\\boxed{...}``) and ``answer`` (the final answer).

* :func:`extract_final_answer` -- the content of the last ``\\boxed{...}`` (balanced braces),
  else what follows the last ``####``, else the last number in the text.
* :func:`normalize_answer` -- canonical string form (``$``, spaces, thousands commas, trailing
  ``.0``, ``\\frac{a}{b}`` -> ``a/b``, ``\\text{..}`` unwrapped, ...).
* :func:`answers_match` -- normalised string equality, or exact numeric equality (``0.5`` ==
  ``1/2`` == ``\\frac{1}{2}``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from fractions import Fraction
from pathlib import Path

#: Keys tried, in order, when no explicit key is given.
QUESTION_KEYS: tuple[str, ...] = ("question", "problem", "prompt", "input", "query", "Question", "Problem")
ANSWER_KEYS: tuple[str, ...] = (
    "answer", "final_answer", "solution", "output", "target", "Answer", "Solution",
)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark problem read from a JSONL file."""

    question: str
    answer: str  # gold final answer (after "####", inside \boxed{}, or the answer field as is)
    solution: str  # the full worked solution when the file has one, else the raw answer text
    source: str  # file path
    line: int  # 1-based line number in `source`


def read_jsonl(
    path: str | os.PathLike,
    question_key: str | None = None,
    answer_key: str | None = None,
) -> list[Problem]:
    """Read a GSM8K / Math500-style JSONL file into :class:`Problem` records.

    Keys are autodetected per line from :data:`QUESTION_KEYS` / :data:`ANSWER_KEYS` unless given.
    Blank lines are skipped. Raises FileNotFoundError (with the path) for a missing file and
    ValueError naming the file and line number for a malformed line (bad JSON, not an object,
    missing or non-text fields).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {str(path)!r}")
    problems: list[Problem] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            qk = _pick_key(record, question_key, QUESTION_KEYS, "question", where)
            ak = _pick_key(record, answer_key, ANSWER_KEYS, "answer", where)
            question = record[qk]
            if not isinstance(question, str):
                raise ValueError(f"{where}: field {qk!r} must be a string, got {type(question).__name__}")
            raw_answer = record[ak]
            if isinstance(raw_answer, bool) or not isinstance(raw_answer, (str, int, float)):
                raise ValueError(
                    f"{where}: field {ak!r} must be a string or a number, got {type(raw_answer).__name__}"
                )
            raw_answer = str(raw_answer)
            solution = record.get("solution")
            if not isinstance(solution, str):
                solution = raw_answer
            problems.append(Problem(question, gold_answer(raw_answer), solution, str(path), lineno))
    return problems


def _pick_key(record: dict, explicit: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    if explicit is not None:
        if explicit not in record:
            raise ValueError(f"{where}: {what} key {explicit!r} missing; keys are {sorted(record)}")
        return explicit
    for k in candidates:
        if k in record:
            return k
    raise ValueError(
        f"{where}: no {what} field found; tried {list(candidates)}, keys are {sorted(record)} "
        f"(pass {what}_key=...)"
    )


def gold_answer(text: str) -> str:
    """The final answer stored in a gold answer field.

    After the last ``####`` if present (GSM8K), else the last ``\\boxed{}`` content if present,
    else the whole text (stripped) -- unlike :func:`extract_final_answer`, no last-number guess,
    since gold answer fields such as ``x^2+1`` are already final.
    """
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    return text.strip()


_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces.

    ``\\boxed 5`` (no braces) gives the following word. None if there is no complete one.
    """
    for m in reversed(list(_BOXED_RE.finditer(text))):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
            continue  # unbalanced: try an earlier one
        word = re.match(r"[^\s$]+", text[i:])
        if word is not None and i > m.end():
            return word.group()
    return None


_NUMBER_RE = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:/\d+)?")


def extract_final_answer(text: str) -> str | None:
    """A model's final answer: the last ``\\boxed{...}`` content (balanced braces), else the text
    after the last ``####``, else the last number (``1,234``, ``-3.5``, ``7/8``); None if none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        if tail:
            return tail.split("\n", 1)[0].strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


_FRAC_RE = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\frac(\d)(\d)")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm|mathbf)\{([^{}]*)\}")
_SIMPLE_RE = re.compile(r"-?[\w.]+")


def _frac(m: re.Match) -> str:
    a, b = m.group(1), m.group(2)
    a = a if _SIMPLE_RE.fullmatch(a) else f"({a})"
    b = b if _SIMPLE_RE.fullmatch(b) else f"({b})"
    return f"{a}/{b}"


def normalize_answer(s: str) -> str:
    """Canonical form of an answer string for comparison.

    Unwraps a whole ``\\boxed{}``, removes ``$``/``\\$``, spaces, ``\\left``/``\\right``, LaTeX
    spacing, degree signs and ``%``; unwraps ``\\text{..}``-like commands; ``\\dfrac``/``\\tfrac``
    -> ``\\frac``; ``\\frac{a}{b}`` / ``\\frac12`` -> ``a/b`` (``(a)/(b)`` for compound parts);
    drops thousands commas (``1,234`` -> ``1234``), a trailing period and trailing zeros of a
    decimal (``42.0`` -> ``42``, ``2.50`` -> ``2.5``).
    """
    s = s.strip()
    whole = re.fullmatch(r"\\boxed\s*\{(.*)\}", s, re.S)
    if whole is not None and last_boxed(s) == whole.group(1):
        s = whole.group(1)
    s = s.replace("\\$", "").replace("$", "")
    for cmd in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle"):
        s = s.replace(cmd, "")
    for deg in ("^{\\circ}", "^\\circ", "\\circ", "°"):
        s = s.replace(deg, "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    prev = None
    while prev != s:
        prev = s
        s = _TEXT_RE.sub(r"\1", s)
    s = re.sub(r"\s+", "", s)
    s = _FRAC_SHORT_RE.sub(r"\1/\2", s)
    prev = None
    while prev != s:  # innermost first, repeat for nesting
        prev = s
        s = _FRAC_RE.sub(_frac, s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    if s.endswith(".") and len(s) > 1:
        s = s[:-1]
    m = re.fullmatch(r"(-?\d+)\.(\d*?)0+", s)
    if m:
        s = m.group(1) + ("." + m.group(2) if m.group(2) else "")
    return s


def _to_fraction(s: str) -> Fraction | None:
    """Exact value of a normalised plain number / ``a/b`` fraction; None otherwise."""
    s = re.sub(r"^\((-?[\d.]+)\)/\((-?[\d.]+)\)$", r"\1/\2", s)
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/-?(?:\d+(?:\.\d*)?|\.\d+))?", s):
        return None
    try:
        if "/" in s:
            a, b = s.split("/")
            return Fraction(a) / Fraction(b)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str | None, gold: str) -> bool:
    """True iff ``pred`` and ``gold`` are the same answer after :func:`normalize_answer`
    (string equality, or equal exact numeric values). ``pred=None`` never matches."""
    if pred is None:
        return False
    a, b = normalize_answer(str(pred)), normalize_answer(str(gold))
    if a == b:
        return True
    fa, fb = _to_fraction(a), _to_fraction(b)
    return fa is not None and fb is not None and fa == fb
