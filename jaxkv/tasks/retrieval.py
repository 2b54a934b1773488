"""Retrieval family: RULER-style synthetic long-context tasks.

The haystack is uniformly random filler words ``w0..w95``; "needles" (facts) are inserted
between filler words at random depths, and the prompt ends with a query. Keys are 3 letter
tokens (``q f k``), values 4 digit tokens (5 for passkeys and variable-tracking values).

Every task has a ``length`` setting: the exact number of prompt tokens, ``len(prompt_ids)``
(``<bos>`` included); the filler count is whatever remains after the needles and the query.
Targets carry no chain of thought: ``A : <answer>``.

* :class:`NiahSingle`      -- ``NIAH k k k = v v v v .``; query ``Q k k k ?``.
* :class:`NiahMultiKey`    -- ``n_keys`` ``MK`` needles with distinct keys; one is queried.
* :class:`NiahMultiValue`  -- ``n_values`` ``MV`` needles, same key, distinct values; answer all
  values in order of appearance, separated by ``,``.
* :class:`VariableTracking`-- chains ``VT X3 = d d d d d .``, ``VT X7 = X3 .`` ...; query a value,
  answer the chain's variables in order of assignment.
* :class:`Passkey`         -- ``PASS = d d d d d .``; query ``Q PASS ?``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import numpy as np

from jaxkv.tasks.base import Example, Task
from jaxkv.tasks.vocab import (DIGIT_TOKENS, FILLER_TOKENS, INDEX_TOKENS, LETTER_TOKENS,
                               VAR_TOKENS)

KEY_LEN = 3  # letter tokens per key
VALUE_LEN = 4  # digit tokens per NIAH value
PASSKEY_LEN = 5  # digit tokens per passkey / variable-tracking value


def _distinct_words(rng: np.random.Generator, k: int, alphabet: Sequence[str], n: int) -> list[str]:
    """``n`` distinct strings, each ``k`` random tokens of ``alphabet`` joined by spaces."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        word = " ".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=k))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class _HaystackTask(Task):
    """Shared machinery: filler haystack of exact length with needles at given positions."""

    family: ClassVar[str] = "retrieval"

    length: int = 384  # exact len(prompt_ids); allowed 64..8192

    def __post_init__(self):
        self._check_int("length", 64, 8192)
        self._check_settings()
        if self._n_filler < 0:
            need = self._fixed_tokens + 1
            raise ValueError(
                f"{type(self).__name__}: length={self.length} is not allowed for "
                f"{self._settings_str()}; needles, query and <bos> alone take {need} tokens, "
                f"so length must be in [{max(64, need)}, 8192]"
            )

    # -- to be provided by subclasses ---------------------------------------------------------

    def _check_settings(self) -> None:
        """Validate the subclass's own settings."""

    @property
    def _fixed_tokens(self) -> int:
        """Prompt tokens that are not filler and not <bos> (needles + query)."""
        raise NotImplementedError

    @property
    def _target_len(self) -> int:
        """len(target_ids) (the same for every sample; <eos> included)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------

    def _settings_str(self) -> str:
        return ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name != "length"
        ) or "these settings"

    @property
    def _n_filler(self) -> int:
        return self.length - 1 - self._fixed_tokens

    @property
    def max_len(self) -> int:
        return self.length + self._target_len

    def _depth_position(self, rng: np.random.Generator, depth: float | None) -> int:
        """Insertion point in [0, n_filler] for a needle at ``depth`` (random if None)."""
        if depth is None:
            depth = float(rng.random())
        return int(round(depth * self._n_filler))

    def _random_positions(self, rng: np.random.Generator, n: int) -> list[int]:
        """``n`` sorted random insertion points in [0, n_filler]."""
        return np.sort(rng.integers(0, self._n_filler + 1, size=n)).tolist()

    def _assemble(
        self,
        rng: np.random.Generator,
        needles: Sequence[tuple[int, str]],
        query: str,
        target: str,
        answer: str,
    ) -> Example:
        """Draw the filler and insert ``(position, needle_text)`` pairs.

        A needle at position p goes right before filler word p (p == n_filler: after the last
        one); needles at equal positions keep their order in ``needles``.
        """
        filler = [FILLER_TOKENS[i] for i in rng.integers(0, len(FILLER_TOKENS), size=self._n_filler)]
        placed = sorted(needles, key=lambda pn: pn[0])  # stable
        words: list[str] = []
        prev = 0
        for pos, text in placed:
            words.extend(filler[prev:pos])
            words.append(text)
            prev = pos
        words.extend(filler[prev:])
        words.append(query)
        return Example(self.name, " ".join(words), target, answer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NiahSingle(_HaystackTask):
    """One needle ``NIAH k1 k2 k3 = v1 v2 v3 v4 .``; prompt ends ``Q k1 k2 k3 ?``;
    target ``A : v1 v2 v3 v4``. ``depth`` in [0, 1] fixes the needle depth (None: random)."""

    name: ClassVar[str] = "niah_single"

    depth: float | None = None

    def _check_settings(self):
        self._check_optional_unit_float("depth")

    @property
    def _fixed_tokens(self) -> int:
        return (3 + KEY_LEN + VALUE_LEN) + (KEY_LEN + 2)

    @property
    def _target_len(self) -> int:
        return 2 + VALUE_LEN + 1

    def sample(self, rng: np.random.Generator) -> Example:
        rng = self._check_rng(rng)
        (key,) = _distinct_words(rng, KEY_LEN, LETTER_TOKENS, 1)
        (value,) = _distinct_words(rng, VALUE_LEN, DIGIT_TOKENS, 1)
        pos = self._depth_position(rng, self.depth)
        return self._assemble(
            rng, [(pos, f"NIAH {key} = {value} .")], f"Q {key} ?", f"A : {value}", value
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class NiahMultiKey(_HaystackTask):
    """``n_keys`` needles ``MK k k k = v v v v .`` with distinct keys (and values); one is
    queried. ``depth`` fixes the depth of the queried needle (None: random); the others are
    at random depths.

    Two settings make curriculum variants (the defaults are the benchmark task):
    ``key_len`` letters per key (1..8; ``n_keys <= 26 ** key_len``), and ``n_queries``
    distinct needles queried (1..n_keys): the prompt ends with the first query and the target
    asks and answers the others, ``A : v.. ; Q k.. ? A : v.. ; ...`` (the answer checked is the
    last one). Several queries per sequence give the key-matching step more supervision per
    training example (as in multi-query associative recall, Arora et al., 2024). ``quote=True``
    makes each answer a short chain of thought that first quotes the queried needle,
    ``MK k.. = v.. . A : v..``: the value is then read by matching the tokens just written (the
    induction pattern running_sum's lookups use) instead of a key three tokens back.
    ``equals=False`` drops the ``=`` of the needles (``MK k.. v.. .``), so the value's first
    token directly follows the key (and a quote). ``key_alphabet="index"`` draws the key tokens
    from the index words ``i0..i63`` instead of the letters: the tokens whose content look-up
    (the digit after its index) running_sum trains."""

    name: ClassVar[str] = "niah_multikey"
    KEY_ALPHABETS: ClassVar[dict] = {"letters": LETTER_TOKENS, "index": INDEX_TOKENS}

    n_keys: int = 8  # allowed 1..64 (and needles must fit in `length`)
    depth: float | None = None
    key_len: int = KEY_LEN
    n_queries: int = 1
    quote: bool = False
    equals: bool = True
    key_alphabet: str = "letters"

    def _check_settings(self):
        self._check_int("n_keys", 1, 64)
        self._check_optional_unit_float("depth")
        self._check_int("key_len", 1, 8)
        if self.key_alphabet not in self.KEY_ALPHABETS:
            raise ValueError(f"NiahMultiKey: key_alphabet={self.key_alphabet!r} is not allowed; "
                             f"expected one of {', '.join(self.KEY_ALPHABETS)}")
        n_distinct = len(self.KEY_ALPHABETS[self.key_alphabet]) ** self.key_len
        if self.n_keys > n_distinct:
            raise ValueError(
                f"NiahMultiKey: n_keys={self.n_keys} is not allowed with key_len={self.key_len} "
                f"and key_alphabet={self.key_alphabet!r}; expected n_keys <= {n_distinct} "
                f"distinct keys")
        self._check_int("n_queries", 1, self.n_keys)
        self._check_bool("quote")
        self._check_bool("equals")

    @property
    def _needle_len(self) -> int:
        """Tokens of one needle ``MK k.. (=) v.. .`` (also of its quote)."""
        return 2 + self.equals + self.key_len + VALUE_LEN

    @property
    def _fixed_tokens(self) -> int:
        return self.n_keys * self._needle_len + (self.key_len + 2)

    @property
    def _target_len(self) -> int:
        # A : v v v v (; Q k.. ? A : v v v v)* <eos>
        quoted = self._needle_len * self.n_queries if self.quote else 0
        return 2 + VALUE_LEN + (self.n_queries - 1) * (self.key_len + 5 + VALUE_LEN) + 1 + quoted

    def sample(self, rng: np.random.Generator) -> Example:
        rng = self._check_rng(rng)
        keys = _distinct_words(rng, self.key_len, self.KEY_ALPHABETS[self.key_alphabet],
                               self.n_keys)
        values = _distinct_words(rng, VALUE_LEN, DIGIT_TOKENS, self.n_keys)
        q = int(rng.integers(0, self.n_keys))
        positions = rng.integers(0, self._n_filler + 1, size=self.n_keys).tolist()
        positions[q] = self._depth_position(rng, self.depth)
        eq = " =" if self.equals else ""
        needles = [(p, f"MK {k}{eq} {v} .") for p, k, v in zip(positions, keys, values)]
        answer_of = (lambda i: f"MK {keys[i]}{eq} {values[i]} . A : {values[i]}") if self.quote \
            else (lambda i: f"A : {values[i]}")
        target = answer_of(q)
        answer = values[q]
        if self.n_queries > 1:  # drawn last: the one-query stream is unchanged
            others = [i for i in rng.permutation(self.n_keys).tolist() if i != q]
            for i in others[: self.n_queries - 1]:
                target += f" ; Q {keys[i]} ? {answer_of(i)}"
                answer = values[i]
        return self._assemble(rng, needles, f"Q {keys[q]} ?", target, answer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NiahMultiValue(_HaystackTask):
    """``n_values`` needles ``MV k k k = v v v v .`` with the same key and distinct values;
    query ``Q k k k ?``; target ``A : v.. , v.. , ...`` in order of appearance."""

    name: ClassVar[str] = "niah_multivalue"

    n_values: int = 4  # allowed 1..32

    def _check_settings(self):
        self._check_int("n_values", 1, 32)

    @property
    def _fixed_tokens(self) -> int:
        return self.n_values * (3 + KEY_LEN + VALUE_LEN) + (KEY_LEN + 2)

    @property
    def _target_len(self) -> int:
        # A : v v v v (, v v v v)* <eos>
        return 2 + self.n_values * VALUE_LEN + (self.n_values - 1) + 1

    def sample(self, rng: np.random.Generator) -> Example:
        rng = self._check_rng(rng)
        (key,) = _distinct_words(rng, KEY_LEN, LETTER_TOKENS, 1)
        values = _distinct_words(rng, VALUE_LEN, DIGIT_TOKENS, self.n_values)
        positions = self._random_positions(rng, self.n_values)  # sorted: order kept
        needles = [(p, f"MV {key} = {v} .") for p, v in zip(positions, values)]
        answer = " , ".join(values)
        return self._assemble(rng, needles, f"Q {key} ?", f"A : {answer}", answer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VariableTracking(_HaystackTask):
    """RULER variable tracking: ``n_chains`` chains of ``n_hops + 1`` variables each,
    ``VT X3 = d d d d d .`` then ``VT X7 = X3 .``, ``VT X1 = X7 .`` ... (chains interleaved,
    each in assignment order, distinct 5-digit values, distinct names), scattered in filler.
    Query ``Q d d d d d ?`` (one chain's value); target ``A : X3 X7 X1 ...`` (that chain's
    variables in order of assignment). The other chains are distractors.

    ``value_len`` digits per value (1..5; ``n_chains <= 10 ** value_len`` distinct values).
    ``restate=True`` makes the target a chain of thought that first restates the queried value,
    then walks the chain, then answers: ``d.. X3 X7 X1 ... ; A : X3 X7 X1 ...``. Each name is
    then found by the token just written (the needle whose right-hand side it is), so with
    one-digit values every hop is the same look-up; a small model learns the later hops
    (key = the current token) long before the first one (key = a 5-digit value three or more
    tokens back, at chance after 2,000 steps in the first stage of configs/tiny.py)."""

    name: ClassVar[str] = "variable_tracking"

    n_chains: int = 2  # allowed 1..16
    n_hops: int = 4  # allowed 1..31; n_chains * (n_hops + 1) <= 32 names
    value_len: int = PASSKEY_LEN  # allowed 1..5; n_chains <= 10 ** value_len
    restate: bool = False

    def _check_settings(self):
        self._check_int("n_chains", 1, 16)
        self._check_int("n_hops", 1, 31)
        self._check_int("value_len", 1, PASSKEY_LEN)
        self._check_bool("restate")
        if self.n_chains > 10 ** self.value_len:
            raise ValueError(
                f"VariableTracking: n_chains={self.n_chains} is not allowed with value_len="
                f"{self.value_len}; expected n_chains <= {10 ** self.value_len} distinct values")
        n_names = self.n_chains * (self.n_hops + 1)
        if n_names > len(VAR_TOKENS):
            raise ValueError(
                f"VariableTracking: n_chains={self.n_chains}, n_hops={self.n_hops} need "
                f"{n_names} distinct variables; allowed is n_chains * (n_hops + 1) <= "
                f"{len(VAR_TOKENS)}"
            )

    @property
    def _fixed_tokens(self) -> int:
        # per chain: VT X = d.. .  +  n_hops * (VT X = X .) ; query: Q d.. ?
        return self.n_chains * ((4 + self.value_len) + 5 * self.n_hops) + (self.value_len + 2)

    @property
    def _target_len(self) -> int:
        # (d.. X.. ;)? A : X.. <eos>
        restated = self.value_len + self.n_hops + 2 if self.restate else 0
        return restated + 2 + (self.n_hops + 1) + 1

    def sample(self, rng: np.random.Generator) -> Example:
        rng = self._check_rng(rng)
        n_c, n_v = self.n_chains, self.n_hops + 1
        ids = rng.choice(len(VAR_TOKENS), size=n_c * n_v, replace=False).reshape(n_c, n_v)
        names = [[VAR_TOKENS[i] for i in row] for row in ids]  # [n_chains][n_hops + 1]
        values = _distinct_words(rng, self.value_len, DIGIT_TOKENS, n_c)
        q = int(rng.integers(0, n_c))
        # Interleave the chains: a random sequence holding each chain id n_v times; the j-th
        # occurrence of chain c is its j-th assignment.
        chain_seq = rng.permutation(np.repeat(np.arange(n_c), n_v)).tolist()
        positions = self._random_positions(rng, n_c * n_v)
        step = [0] * n_c
        needles = []
        for pos, c in zip(positions, chain_seq):
            j = step[c]
            step[c] += 1
            rhs = values[c] if j == 0 else names[c][j - 1]
            needles.append((pos, f"VT {names[c][j]} = {rhs} ."))
        answer = " ".join(names[q])
        target = f"{values[q]} {answer} ; A : {answer}" if self.restate else f"A : {answer}"
        return self._assemble(rng, needles, f"Q {values[q]} ?", target, answer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Passkey(_HaystackTask):
    """``PASS = d d d d d .`` in filler; prompt ends ``Q PASS ?``; target ``A : d d d d d``.
    ``depth`` in [0, 1] fixes the passkey depth (None: random)."""

    name: ClassVar[str] = "passkey"

    depth: float | None = None

    def _check_settings(self):
        self._check_optional_unit_float("depth")

    @property
    def _fixed_tokens(self) -> int:
        return (3 + PASSKEY_LEN) + 3

    @property
    def _target_len(self) -> int:
        return 2 + PASSKEY_LEN + 1

    def sample(self, rng: np.random.Generator) -> Example:
        rng = self._check_rng(rng)
        (key,) = _distinct_words(rng, PASSKEY_LEN, DIGIT_TOKENS, 1)
        pos = self._depth_position(rng, self.depth)
        return self._assemble(rng, [(pos, f"PASS = {key} .")], "Q PASS ?", f"A : {key}", key)


#: Words `InductionCopy` draws its distinct source words from (228 words, no marker or
#: punctuation word, so a source never contains `A :` or `?`).
COPY_WORDS: tuple[str, ...] = (DIGIT_TOKENS + LETTER_TOKENS + INDEX_TOKENS + FILLER_TOKENS
                               + VAR_TOKENS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InductionCopy(Task):
    """Dense content look-up (an induction head's job) for a curriculum's first stage.

    Prompt: ``length - n_recall - 2`` distinct random words of :data:`COPY_WORDS`, then ``?``
    and ``n_recall`` cue words: the first words of chunks of ``chunk`` consecutive source words
    (distinct chunks in random order). ``starts="random"`` (the default) starts them anywhere
    in the source (they may overlap); ``"aligned"`` only at multiples of ``chunk``, which leaves
    a shortcut: a word's slot in its chunk is its source position mod ``chunk``, and a model
    trained on aligned chunks learnt to pick a word of the right slot from some chunk instead of
    matching content (accuracy stuck near 0.3; README, key matching).
    Target: ``A : c w w w ; c w w w ; ...``, each cue followed by the rest of its chunk.

    Every word after a cue follows from the word just written by content only (find it in the
    source, copy the word after it; the chunk order is random, so no fixed offset finds it),
    and so does each next cue (the word after the last cue in the cue list). Every key-matching
    task needs this look-up, where it is supervised once per example; here it is most target
    tokens. A small model trained on the task mixture sits on a long plateau before it forms."""

    name: ClassVar[str] = "induction_copy"
    family: ClassVar[str] = "retrieval"

    length: int = 96  # exact len(prompt_ids); allowed 16..232 (the source must fit COPY_WORDS)
    chunk: int = 4  # allowed 2..8
    n_recall: int = 6  # allowed 1..32; n_recall * chunk <= source words
    starts: str = "random"  # "random" or "aligned"

    STARTS: ClassVar[tuple[str, ...]] = ("random", "aligned")

    def __post_init__(self):
        if self.starts not in self.STARTS:
            raise ValueError(f"InductionCopy: starts={self.starts!r} is not allowed; expected one "
                             f"of {', '.join(self.STARTS)}")
        self._check_int("length", 16, len(COPY_WORDS) + 4)
        self._check_int("chunk", 2, 8)
        self._check_int("n_recall", 1, 32)
        n_src = self._n_source
        if not self.n_recall * self.chunk <= n_src <= len(COPY_WORDS):
            raise ValueError(
                f"InductionCopy: length={self.length}, chunk={self.chunk}, "
                f"n_recall={self.n_recall} are not allowed together; the source "
                f"(length - n_recall - 2 = {n_src} words) must hold n_recall * chunk = "
                f"{self.n_recall * self.chunk} words and at most {len(COPY_WORDS)}")

    @property
    def _n_source(self) -> int:
        """Source words: the prompt less <bos>, `?` and the cues."""
        return self.length - 2 - self.n_recall

    @property
    def max_len(self) -> int:
        # A : (c w.. ;)* <eos>: 2 + n_recall * chunk + (n_recall - 1) + 1
        return self.length + 2 + self.n_recall * (self.chunk + 1)

    def sample(self, rng: np.random.Generator) -> Example:
        rng = self._check_rng(rng)
        n_src = self._n_source
        source = [COPY_WORDS[i] for i in rng.choice(len(COPY_WORDS), size=n_src, replace=False)]
        if self.starts == "aligned":
            picks = (self.chunk * rng.choice(n_src // self.chunk, size=self.n_recall,
                                             replace=False)).tolist()
        else:
            picks = rng.choice(n_src - self.chunk + 1, size=self.n_recall, replace=False).tolist()
        chunks = [source[c:c + self.chunk] for c in picks]
        answer = " ; ".join(" ".join(c) for c in chunks)
        prompt = " ".join(source + ["?"] + [c[0] for c in chunks])
        return Example(self.name, prompt, f"A : {answer}", answer)
