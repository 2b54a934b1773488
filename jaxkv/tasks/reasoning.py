"""Reasoning family: chain-of-thought tasks whose every step must look far back.

Each step of the target chain reads one fact (a digit, a definition) from a position in the
prompt that is far behind the current one, and combines it with the previous step (which is
recent). So a KV cache that keeps only a few sink tokens plus a small recent window cannot solve
them, while full attention can.

* :class:`RunningSum` -- running sum mod 100 of a digit list, one digit per step, looked up by
  its index token.
* :class:`VarChain` -- walk a chain of ``X_j = X_i + d`` definitions listed in shuffled order.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import numpy as np

from jaxkv.tasks.base import Example, Task
from jaxkv.tasks.vocab import VAR_TOKENS


def _two_digits(v: int) -> str:
    """``7 -> "0 7"``, ``42 -> "4 2"`` (v in [0, 100))."""
    return f"{v // 10} {v % 10}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunningSum(Task):
    """Running sum of ``n_digits`` random digits, mod 100.

    Prompt: ``SUM i0 d0 i1 d1 ... i{n-1} d{n-1} ?``
    Target: ``i0 d0 t u ; i1 d1 t u ; ... ; A : t u`` where ``t u`` are the two (zero-padded)
    decimal digits of the running sum mod 100 after that step; the answer is the final ``t u``.

    Step k copies the index (successor of the previous one), finds ``d_k`` in the prompt by its
    index token (2 * n_digits + 1 + 3 k tokens back) and adds it to the previous running sum.
    Length: ``len(prompt_ids) + len(target_ids) = 7 * n_digits + 8`` (232 at the default).

    ``random_offset=True`` labels the digits ``i{o} .. i{o+n-1}`` from a random offset
    ``o`` in ``[0, 64 - n]``, so that short examples (a curriculum's early stages) still train
    every index token; a model trained on short lists labelled from i0 only meets i16+ late and
    fails its lookups there (seen in the first embedded run: every error began at i17).
    """

    name: ClassVar[str] = "running_sum"
    family: ClassVar[str] = "reasoning"

    n_digits: int = 32  # allowed 2..64 (one index token i0..i63 per digit)
    random_offset: bool = False

    def __post_init__(self):
        self._check_int("n_digits", 2, 64)
        self._check_bool("random_offset")

    @property
    def max_len(self) -> int:
        # prompt: <bos> SUM (i d)*n ?  = 2n + 3 ; target: (i d t u ;)*n A : t u <eos> = 5n + 5
        return 7 * self.n_digits + 8

    def sample(self, rng: np.random.Generator) -> Example:
        rng = self._check_rng(rng)
        digits = rng.integers(0, 10, size=self.n_digits).tolist()
        offset = int(rng.integers(0, 64 - self.n_digits + 1)) if self.random_offset else 0
        return self.make_example(digits, offset)

    def make_example(self, digits: Sequence[int], offset: int = 0) -> Example:
        """The example for a given digit list (length ``n_digits``, entries 0..9), with index
        labels starting at ``i{offset}``."""
        digits = [int(d) for d in digits]
        if not 0 <= offset <= 64 - self.n_digits:
            raise ValueError(f"RunningSum.make_example: offset={offset} is not allowed; expected "
                             f"an integer in [0, {64 - self.n_digits}]")
        if len(digits) != self.n_digits or any(not 0 <= d <= 9 for d in digits):
            raise ValueError(
                f"RunningSum.make_example: digits={digits!r} is not allowed; "
                f"expected {self.n_digits} integers in [0, 9]"
            )
        prompt = ["SUM"]
        target = []
        total = 0
        for k, d in enumerate(digits):
            total = (total + d) % 100
            prompt += [f"i{k + offset}", str(d)]
            target += [f"i{k + offset}", str(d), _two_digits(total), ";"]
        prompt.append("?")
        answer = _two_digits(total)
        target += ["A", ":", answer]
        return Example(self.name, " ".join(prompt), " ".join(target), answer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VarChain(Task):
    """Evaluate the last variable of a chain of definitions listed in shuffled order.

    A single chain ``V_0 = r ; V_1 = V_0 + c_1 ; ... ; V_{n-1} = V_{n-2} + c_{n-1}`` over
    ``n_vars`` distinct names from ``X0..X31`` (r, c_j random digits, values mod 10). The
    prompt lists the definitions in random order: ``VC <defs> ? V_{n-1}``.

    ``cot="forward"`` (the default, the form the shipped embedded model was trained on): the
    chain of thought walks from the root, ``V_0 v_0 ; V_1 v_1 ; ... ; A : v_{n-1}``; step j must
    find the definition that mentions ``V_{j-1}`` on its right-hand side and read the name two
    tokens before it. Length: ``9 * n_vars + 6`` (150 at the default).

    ``cot="backward"``: the chain of thought starts at the queried variable and follows its
    definition back to the root, copying each definition and keeping the sum of the increments
    seen so far (mod 10):
    ``V_{n-1} = V_{n-2} + c_{n-1} s ; ... ; V_1 = V_0 + c_1 s ; V_0 = r s ; A : s``, where the
    last ``s`` (increments + root) is the value of ``V_{n-1}``. Step k finds the definition of
    the variable it has just written (the one with that name left of ``=``), somewhere in the
    prompt, and copies its right-hand side. Length: ``13 * n_vars + 4`` (212 at 16 variables).

    The embedded model never got past ~0.45 teacher-forced token accuracy on the forward form in
    2,300 steps (nor at 6 variables after 150 more); fine-tuned on the backward form alone it
    reached 0.93 in 600 steps at 6 variables (configs/tiny.py: run history).
    """

    name: ClassVar[str] = "var_chain"
    family: ClassVar[str] = "reasoning"

    n_vars: int = 16  # allowed 2..32 (distinct names X0..X31)
    cot: str = "forward"  # "forward" or "backward"

    COTS: ClassVar[tuple[str, ...]] = ("forward", "backward")

    def __post_init__(self):
        self._check_int("n_vars", 2, len(VAR_TOKENS))
        if self.cot not in self.COTS:
            raise ValueError(f"VarChain: cot={self.cot!r} is not allowed; expected one of "
                             f"{', '.join(self.COTS)}")

    @property
    def max_len(self) -> int:
        # prompt: <bos> VC (V = r ;) (V = V + c ;)*(n-1) ? V = 6n + 2
        if self.cot == "forward":  # target: (V v ;)*n A : v <eos> = 3n + 4
            return 9 * self.n_vars + 6
        # target: (V = V + c s ;)*(n-1) V = r s ; A : s <eos> = 7(n-1) + 5 + 4 = 7n + 2
        return 13 * self.n_vars + 4

    def sample(self, rng: np.random.Generator) -> Example:
        rng = self._check_rng(rng)
        n = self.n_vars
        names = [VAR_TOKENS[i] for i in rng.choice(len(VAR_TOKENS), size=n, replace=False)]
        root = int(rng.integers(0, 10))
        increments = rng.integers(0, 10, size=n - 1).tolist()
        order = rng.permutation(n).tolist()
        return self.make_example(names, root, increments, order)

    def make_example(
        self,
        names: Sequence[str],
        root: int,
        increments: Sequence[int],
        order: Sequence[int],
    ) -> Example:
        """The example for chain ``names`` (root first), root value, the n-1 increments, and
        ``order`` (a permutation of range(n): the chain positions in prompt order)."""
        n = self.n_vars
        if (
            len(names) != n
            or len(set(names)) != n
            or any(v not in VAR_TOKENS for v in names)
            or len(increments) != n - 1
            or sorted(int(o) for o in order) != list(range(n))
            or not 0 <= int(root) <= 9
            or any(not 0 <= int(c) <= 9 for c in increments)
        ):
            raise ValueError(
                f"VarChain.make_example: expected {n} distinct names from X0..X31, a root "
                f"digit, {n - 1} increment digits (0..9) and a permutation of range({n}); "
                f"got names={names!r}, "
                f"root={root!r}, increments={increments!r}, order={order!r}"
            )
        defs = [f"{names[0]} = {int(root)} ;"]
        values = [int(root)]
        for j in range(1, n):
            c = int(increments[j - 1])
            defs.append(f"{names[j]} = {names[j - 1]} + {c} ;")
            values.append((values[-1] + c) % 10)
        prompt = " ".join(["VC"] + [defs[int(j)] for j in order] + ["?", names[-1]])
        answer = str(values[-1])
        if self.cot == "forward":
            steps = [f"{v} {x} ;" for v, x in zip(names, values)]
        else:
            steps, seen = [], 0
            for j in range(n - 1, 0, -1):
                seen = (seen + int(increments[j - 1])) % 10
                steps.append(f"{names[j]} = {names[j - 1]} + {int(increments[j - 1])} {seen} ;")
            steps.append(f"{names[0]} = {int(root)} {(seen + int(root)) % 10} ;")
        target = " ".join(steps + ["A", ":", answer])
        return Example(self.name, prompt, target, answer)
