"""Shared task interface: :class:`Example`, :class:`Task`, answer extraction and verification.

Conventions for every task:

* ``prompt`` is the text fed to the model; it ends exactly where the model must start writing.
* ``target`` is the full expected completion (chain of thought, if any, then ``A : <answer>``),
  without ``<eos>``. The model is trained on ``target_ids`` = target tokens + ``<eos>``.
* ``answer`` is the final-answer string; :func:`extract_answer` pulls it out of a completion
  (the words after the LAST ``A :`` marker, up to ``<eos>`` or the end) and verification is an
  exact match with ``example.answer``.
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
from typing import ClassVar, Sequence

import numpy as np

from jaxkv.tasks.vocab import EOS_ID, decode, encode

#: Words that start the final answer in every target.
ANSWER_MARKER: tuple[str, str] = ("A", ":")


@dataclasses.dataclass(frozen=True)
class Example:
    """One task instance (all fields are space-separated vocabulary words)."""

    task: str  # registry name of the task that made it, e.g. "running_sum"
    prompt: str  # model input; ends where the model must start writing
    target: str  # full expected completion (chain of thought + "A : answer"), no <eos>
    answer: str  # final answer that `verify` compares against

    @property
    def prompt_ids(self) -> list[int]:
        """``[<bos>] + encode(prompt)``."""
        return encode(self.prompt, add_bos=True)

    @property
    def target_ids(self) -> list[int]:
        """``encode(target) + [<eos>]``."""
        return encode(self.target) + [EOS_ID]

    @property
    def num_tokens(self) -> int:
        """``len(prompt_ids) + len(target_ids)``."""
        return len(self.prompt_ids) + len(self.target_ids)


def extract_answer(completion: str | Sequence[int]) -> str:
    """The final answer in a model completion.

    The completion is cut at the first ``<eos>``; the answer is the words after the LAST
    ``A :`` marker, joined by single spaces (``""`` if there is no marker). A sequence of token
    ids is decoded first (keeping ``<eos>`` so that the cut still applies).
    """
    if not isinstance(completion, str):
        completion = decode(completion, skip_special_tokens=False)
    words = completion.split()
    if "<eos>" in words:
        words = words[: words.index("<eos>")]
    words = [w for w in words if w not in ("<pad>", "<bos>")]
    last = -1
    for k in range(len(words) - 1):
        if words[k] == ANSWER_MARKER[0] and words[k + 1] == ANSWER_MARKER[1]:
            last = k
    if last < 0:
        return ""
    return " ".join(words[last + 2 :])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task(abc.ABC):
    """Base class of a task family member: a frozen set of settings plus a sampler.

    Subclasses are keyword-only frozen dataclasses whose fields are the settings; they validate
    them in ``__post_init__`` (ValueError naming the argument, its value and what is allowed).
    """

    name: ClassVar[str] = ""  # registry name
    family: ClassVar[str] = ""  # "reasoning" or "retrieval"

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator) -> Example:
        """Draw one example; deterministic given the generator's state."""

    @property
    @abc.abstractmethod
    def max_len(self) -> int:
        """Upper bound on ``len(ex.prompt_ids) + len(ex.target_ids)`` over all samples."""

    def verify(self, example: Example, completion: str | Sequence[int]) -> bool:
        """True iff the answer extracted from ``completion`` equals ``example.answer``."""
        return extract_answer(completion) == example.answer

    # -- helpers for subclasses ---------------------------------------------------------------

    def _check_int(self, field: str, lo: int, hi: int) -> int:
        """Validate (and normalise numpy ints of) integer setting ``field`` in ``[lo, hi]``."""
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
            raise ValueError(
                f"{type(self).__name__}: {field}={value!r} is not allowed; "
                f"expected an integer in [{lo}, {hi}]"
            )
        object.__setattr__(self, field, int(value))
        return int(value)

    def _check_bool(self, field: str) -> None:
        """Validate boolean setting ``field`` (True or False, nothing else)."""
        value = getattr(self, field)
        if not isinstance(value, bool):
            raise ValueError(f"{type(self).__name__}: {field}={value!r} is not allowed; "
                             f"expected True or False")

    def _check_optional_unit_float(self, field: str) -> None:
        """Validate optional float setting ``field`` (None, or a number in [0, 1])."""
        value = getattr(self, field)
        if value is None:
            return
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not 0.0 <= float(value) <= 1.0
        ):
            raise ValueError(
                f"{type(self).__name__}: {field}={value!r} is not allowed; "
                f"expected None (random) or a number in [0, 1]"
            )
        object.__setattr__(self, field, float(value))

    def _check_rng(self, rng) -> np.random.Generator:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"{type(self).__name__}.sample: rng must be a numpy.random.Generator "
                f"(e.g. numpy.random.default_rng(seed)), got {type(rng).__name__}"
            )
        return rng
