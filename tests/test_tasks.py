"""Tests for jaxkv.tasks: vocabulary/tokenizer, task generators and verifiers, JSONL, batching."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxkv.tasks import (
    InductionCopy,
    REASONING_TASKS,
    RETRIEVAL_TASKS,
    TASKS,
    Example,
    NiahMultiKey,
    NiahMultiValue,
    NiahSingle,
    Passkey,
    RunningSum,
    VarChain,
    VariableTracking,
    extract_answer,
    make_task,
    make_training_batch,
    pad_prompts,
    sample_examples,
)
from jaxkv.tasks import vocab
from jaxkv.tasks.jsonl import (
    answers_match,
    extract_final_answer,
    normalize_answer,
    read_jsonl,
)

# ----------------------------------------------------------------------------------------------
# Independent reference solvers: parse the prompt text and compute the answer from scratch.
# ----------------------------------------------------------------------------------------------


def _needles(words, marker):
    """Spans ``marker ... .`` in a word list -> list of word lists (without marker and '.')."""
    out, k = [], 0
    while k < len(words):
        if words[k] == marker:
            end = words.index(".", k)
            out.append(words[k + 1 : end])
            k = end
        k += 1
    return out


def solve(example: Example, task=None) -> str:
    w = example.prompt.split()
    if example.task == "induction_copy":  # the chunk length is a setting, not in the prompt
        q = w.index("?")
        source, cues = w[:q], w[q + 1:]
        assert len(set(source)) == len(source) and len(set(cues)) == len(cues)
        starts = [source.index(c) for c in cues]
        assert task.starts == "random" or all(s % task.chunk == 0 for s in starts)
        return " ; ".join(" ".join(source[s:s + task.chunk]) for s in starts)
    if example.task == "running_sum":
        assert w[0] == "SUM" and w[-1] == "?"
        body = w[1:-1]
        pairs = dict(zip(body[0::2], body[1::2]))
        total = sum(int(pairs[f"i{k}"]) for k in range(len(pairs))) % 100
        return f"{total // 10} {total % 10}"
    if example.task == "var_chain":
        assert w[0] == "VC" and w[-2] == "?"
        defs = {}
        for stmt in " ".join(w[1:-2]).split(" ;"):
            s = stmt.split()
            if s:
                defs[s[0]] = s[2:]
        def value(v):
            rhs = defs[v]
            return int(rhs[0]) if len(rhs) == 1 else (value(rhs[0]) + int(rhs[2])) % 10
        return str(value(w[-1]))
    if example.task == "niah_single":
        key = w[-4:-1]
        hits = [n[4:] for n in _needles(w, "NIAH") if n[:3] == key]
        assert len(hits) == 1
        return " ".join(hits[0])
    if example.task == "niah_multikey":  # any key length; the target may ask further queries
        key_len = w.index("?", w.index("Q")) - w.index("Q") - 1
        table = {}
        for n in _needles(w, "MK"):  # k.. = v.. (equals=False: k.. v..)
            rest = n[key_len:]
            table[tuple(n[:key_len])] = " ".join(rest[1:] if rest[0] == "=" else rest)
        queries = " ".join(w[w.index("Q"):] + example.target.split()).split(" ; ")
        answers = []
        for q in queries:
            q = q.split()
            key, said = tuple(q[1:q.index("?")]), " ".join(q[q.index(":") + 1:])
            assert table[key] == said
            if q[q.index("?") + 1] == "MK":  # quote=True: the needle is quoted before the answer
                quoted = q[q.index("?") + 1:q.index("A")]
                assert [w for w in quoted if w != "="] == ["MK", *key, *said.split(), "."]
            answers.append(table[key])
        assert len(set(answers)) == len(answers)  # distinct needles queried
        return answers[-1]
    if example.task == "niah_multivalue":
        key = w[-4:-1]
        return " , ".join(" ".join(n[4:]) for n in _needles(w, "MV") if n[:3] == key)
    if example.task == "variable_tracking":
        value = w[w.index("Q") + 1:-1]
        if example.target.split()[0] != "A":  # restate=True: `d.. X.. ; A : X..`
            cot = example.target.split(" ; ")[0].split()
            assert cot[:len(value)] == value and " ".join(cot[len(value):]) == example.answer
        stmts = _needles(w, "VT")  # [X, =, rhs...]
        chain = [s[0] for s in stmts if s[2:] == value]
        assert len(chain) == 1
        while True:
            nxt = [s[0] for s in stmts if s[2:] == [chain[-1]]]
            if not nxt:
                return " ".join(chain)
            chain.append(nxt[0])
    if example.task == "passkey":
        (n,) = _needles(w[:-3], "PASS")  # the query `Q PASS ?` is not a needle
        return " ".join(n[1:])
    raise AssertionError(example.task)


# Non-default settings exercised besides the defaults.
EXTRA_TASKS = [
    RunningSum(n_digits=2),
    RunningSum(n_digits=64),
    VarChain(n_vars=2),
    VarChain(n_vars=32),
    NiahSingle(length=64, depth=0.0),
    NiahSingle(length=1000, depth=1.0),
    NiahMultiKey(n_keys=1, length=64),
    NiahMultiKey(n_keys=32, length=2048, depth=0.5),
    NiahMultiKey(n_keys=4, length=64, key_len=1, n_queries=4),
    NiahMultiKey(n_keys=8, length=256, key_len=2, n_queries=3, depth=0.1),
    NiahMultiKey(n_keys=8, length=128, quote=True),
    NiahMultiKey(n_keys=6, length=96, key_len=1, n_queries=2, quote=True),
    NiahMultiKey(n_keys=4, length=64, key_len=2, quote=True, equals=False),
    NiahMultiKey(n_keys=8, length=96, key_len=1, quote=True, equals=False, key_alphabet="index"),
    NiahMultiKey(n_keys=64, length=1024, key_len=1, n_queries=2, key_alphabet="index"),
    NiahMultiValue(n_values=1, length=64),
    NiahMultiValue(n_values=8, length=512),
    VariableTracking(n_chains=1, n_hops=1, length=64),
    VariableTracking(n_chains=4, n_hops=7, length=1024),
    VariableTracking(n_hops=2, length=64, value_len=1, restate=True),
    VariableTracking(n_chains=10, n_hops=2, length=512, value_len=1),
    VariableTracking(n_chains=3, length=224, value_len=2, restate=True),
    Passkey(length=8192),
    InductionCopy(length=16, chunk=2, n_recall=1),
    InductionCopy(length=232, chunk=8, n_recall=4),
    InductionCopy(length=200, chunk=3, n_recall=32),
    InductionCopy(length=96, chunk=4, n_recall=6, starts="aligned"),
]
ALL_TASKS = [make_task(n) for n in TASKS] + EXTRA_TASKS
IDS = [f"{t.name}:{i}" for i, t in enumerate(ALL_TASKS)]


def _corrupt(example: Example) -> str:
    """The target with the final answer's last word changed to another valid word."""
    words = example.answer.split()
    last = words[-1]
    if last.isdigit():
        words[-1] = str((int(last) + 1) % 10)
    else:  # a variable name, or any copy word of induction_copy
        words[-1] = "w0" if last != "w0" else "w1"
    assert example.target.endswith(example.answer)
    return example.target[: len(example.target) - len(example.answer)] + " ".join(words)


# ----------------------------------------------------------------------------------------------
# Vocabulary and tokenizer.
# ----------------------------------------------------------------------------------------------


def test_vocab_layout_is_pinned():
    # The id layout is part of the checkpoint format; this must never change.
    assert vocab.VOCAB_SIZE == 256 == len(set(vocab.TOKENS))
    assert (vocab.PAD_ID, vocab.BOS_ID, vocab.EOS_ID, vocab.UNK_ID) == (0, 1, 2, 3)
    t2i = vocab.TOKEN_TO_ID
    assert [t2i[t] for t in ("0", "9", "a", "z", "=", ".", "SUM", "A")] == [4, 13, 14, 39, 40, 48, 49, 57]
    tail = ("i0", "i63", "w0", "w95", "X0", "X31", "<r0>")
    assert [t2i[t] for t in tail] == [58, 121, 122, 217, 218, 249, 250]
    assert vocab.vocab_fingerprint() == "692856466b709ac9581697a149f76e294b76c9648aeff7d46b1bf90915036606"


@pytest.fixture(scope="module")
def tok():
    return vocab.build_tokenizer()


def test_tokenizer_round_trip_and_fast_equality_on_task_text(tok):
    for task in ALL_TASKS[:7]:
        for ex in sample_examples(task, 2, seed=5):
            for text in (ex.prompt, ex.target):
                ids = vocab.encode(text)
                assert vocab.UNK_ID not in ids
                assert tok.encode(text, add_special_tokens=False).ids == ids
                assert tok.encode(text).ids == vocab.encode(text, add_bos=True) == [vocab.BOS_ID] + ids
                assert vocab.decode(ids) == tok.decode(ids) == " ".join(text.split())
            full = ex.prompt_ids + ex.target_ids
            assert tok.decode(full) == vocab.decode(full) == ex.prompt + " " + ex.target
            raw = vocab.decode(full, skip_special_tokens=False)
            assert tok.decode(full, skip_special_tokens=False) == raw
            assert raw.startswith("<bos> ")


_TOK = vocab.build_tokenizer()
_PIECES = list(vocab.TOKENS) + ["foo", "<bos>x", "x<eos>", ".<pad>", "^<bos>", "<", ">", "é", "_", "²", "A:"]
_SEPS = [" ", " ", "  ", "", "\n", "\t", "\x1c", "\xa0", "\u200b", "\u3000"]


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.lists(st.tuples(st.sampled_from(_PIECES), st.sampled_from(_SEPS)), max_size=12).map(
            lambda ps: "".join(p + s for p, s in ps)
        ),
        st.text(max_size=20),
    )
)
def test_fast_encode_equals_tokenizers(text):
    assert vocab.encode(text) == _TOK.encode(text, add_special_tokens=False).ids
    assert vocab.encode(text, add_bos=True) == _TOK.encode(text).ids


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, vocab.VOCAB_SIZE - 1), max_size=30), st.booleans())
def test_fast_decode_equals_tokenizers(ids, skip):
    assert vocab.decode(ids, skip_special_tokens=skip) == _TOK.decode(ids, skip_special_tokens=skip)
    words = [t for t in vocab.decode(ids, skip_special_tokens=False).split()]
    assert vocab.encode(" ".join(words)) == ids  # decode -> encode round trip


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="256"):
        vocab.decode([4, 256])


def test_tokenizer_json_save_load(tmp_path):
    from tokenizers import Tokenizer

    path = vocab.save_tokenizer(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    assert json.loads(path.read_text())["model"]["type"] == "WordLevel"
    loaded = Tokenizer.from_file(str(path))
    assert loaded.get_vocab() == vocab.TOKEN_TO_ID
    text = "SUM i0 3 i1 4 ? zzz"
    assert loaded.encode(text).ids == vocab.encode(text, add_bos=True)
    assert loaded.decode(loaded.encode(text).ids) == "SUM i0 3 i1 4 ? <unk>"
    assert vocab.save_tokenizer(tmp_path / "sub" / "tok.json").is_file()


# ----------------------------------------------------------------------------------------------
# Tasks.
# ----------------------------------------------------------------------------------------------


def test_registry():
    assert sorted(TASKS) == sorted(
        ["running_sum", "var_chain", "niah_single", "niah_multikey", "niah_multivalue",
         "variable_tracking", "passkey", "induction_copy"]
    )
    assert REASONING_TASKS == ["running_sum", "var_chain"]
    assert sorted(REASONING_TASKS + RETRIEVAL_TASKS) == sorted(TASKS)
    for name, cls in TASKS.items():
        assert cls.name == name and cls.family in ("reasoning", "retrieval")
    assert make_task("running_sum", n_digits=5) == RunningSum(n_digits=5)
    with pytest.raises(ValueError, match="allowed: .*passkey"):
        make_task("nope")
    with pytest.raises(ValueError, match="n_keys"):
        make_task("passkey", n_keys=3)


@pytest.mark.parametrize("task", ALL_TASKS, ids=IDS)
def test_determinism(task):
    a = sample_examples(task, 4, seed=123)
    assert a == sample_examples(task, 4, seed=123)
    assert a != sample_examples(task, 4, seed=124)
    assert task.sample(np.random.default_rng(7)) == task.sample(np.random.default_rng(7))


@pytest.mark.parametrize("task", ALL_TASKS, ids=IDS)
def test_targets_verify_and_corruptions_fail(task):
    for ex in sample_examples(task, 20, seed=1):
        assert ex.task == task.name
        assert solve(ex, task) == ex.answer  # independent solver agrees
        assert ex.target.endswith("A : " + ex.answer)
        assert "A :" not in ex.prompt
        assert task.verify(ex, ex.target)
        assert task.verify(ex, ex.target_ids)  # token ids, <eos> included
        assert task.verify(ex, ex.target + " <eos> A : 1 2 ; junk")  # cut at <eos>
        assert not task.verify(ex, _corrupt(ex))
        assert not task.verify(ex, ex.target + " 7")
        assert not task.verify(ex, ex.target.replace("A :", "Q :"))
        assert not task.verify(ex, "")


@pytest.mark.parametrize("task", ALL_TASKS, ids=IDS)
def test_max_len_bounds_and_token_validity(task):
    for ex in sample_examples(task, 30, seed=2):
        p, t = ex.prompt_ids, ex.target_ids
        assert p[0] == vocab.BOS_ID and t[-1] == vocab.EOS_ID
        assert vocab.BOS_ID not in p[1:] and vocab.EOS_ID not in t[:-1]
        assert vocab.UNK_ID not in p + t and vocab.PAD_ID not in p + t
        assert len(p) + len(t) == ex.num_tokens <= task.max_len
        if task.family == "retrieval":
            assert len(p) == task.length  # `length` is exact


def test_running_sum_hand_worked():
    # digits 7, 5, 9, 3 -> running sums 7, 7+5=12, 12+9=21, 21+3=24 (all mod 100),
    # written as two zero-padded digits: "0 7", "1 2", "2 1", "2 4"; final answer "2 4".
    ex = RunningSum(n_digits=4).make_example([7, 5, 9, 3])
    assert ex.prompt == "SUM i0 7 i1 5 i2 9 i3 3 ?"
    assert ex.target == "i0 7 0 7 ; i1 5 1 2 ; i2 9 2 1 ; i3 3 2 4 ; A : 2 4"
    assert ex.answer == "2 4"
    # wrap-around: 9 * 12 = 108 -> 08
    ex = RunningSum(n_digits=12).make_example([9] * 12)
    assert ex.answer == "0 8" and "i11 9 0 8 ; A : 0 8" in ex.target
    assert len(ex.prompt_ids) + len(ex.target_ids) == RunningSum(n_digits=12).max_len == 7 * 12 + 8
    with pytest.raises(ValueError):
        RunningSum(n_digits=4).make_example([1, 2, 3])


def test_var_chain_hand_worked():
    # chain X5 = 3 ; X9 = X5 + 4 (=7) ; X2 = X9 + 7 (=14 -> 4); listed in order [2, 0, 1]
    ex = VarChain(n_vars=3).make_example(["X5", "X9", "X2"], 3, [4, 7], [2, 0, 1])  # forward
    assert ex.prompt == "VC X2 = X9 + 7 ; X5 = 3 ; X9 = X5 + 4 ; ? X2"
    assert ex.target == "X5 3 ; X9 7 ; X2 4 ; A : 4"
    assert ex.answer == "4"
    # backward: from X2 to the root, increments summed on the way:
    # 7 -> 7, + 4 -> 11 -> 1, + root 3 -> 4 = the value of X2
    ex = VarChain(n_vars=3, cot="backward").make_example(["X5", "X9", "X2"], 3, [4, 7], [2, 0, 1])
    assert ex.prompt == "VC X2 = X9 + 7 ; X5 = 3 ; X9 = X5 + 4 ; ? X2"
    assert ex.target == "X2 = X9 + 7 7 ; X9 = X5 + 4 1 ; X5 = 3 4 ; A : 4"
    assert ex.answer == "4"


@pytest.mark.parametrize("cot", VarChain.COTS)
@pytest.mark.parametrize("n_vars", [2, 7, 16, 32])
def test_var_chain_length_is_max_len(cot, n_vars):
    task = VarChain(n_vars=n_vars, cot=cot)
    assert {ex.num_tokens for ex in sample_examples(task, 10, seed=n_vars)} == {task.max_len}


def test_running_sum_lookups_are_far_back():
    task = RunningSum(n_digits=32)
    for ex in sample_examples(task, 5, seed=3):
        seq = [vocab.ID_TO_TOKEN[i] for i in ex.prompt_ids + ex.target_ids]
        start = len(ex.prompt_ids)
        distances = []
        for k in range(32):
            pos_target = start + 5 * k + 1  # the digit d_k written in step k
            assert seq[pos_target - 1] == f"i{k}"
            pos_prompt = seq.index(f"i{k}") + 1  # where d_k sits in the prompt
            assert seq[pos_prompt] == seq[pos_target]
            distances.append(pos_target - pos_prompt)
        assert np.mean(np.array(distances) > 40) >= 0.9
        assert min(distances) == 2 * 32 + 1  # exactly 2n + 1 + 3k


def test_var_chain_backward_lookups_are_far_back():
    task = VarChain(cot="backward")
    distances = []
    for ex in sample_examples(task, 10, seed=4):
        seq = [vocab.ID_TO_TOKEN[i] for i in ex.prompt_ids + ex.target_ids]
        start = len(ex.prompt_ids)
        for k in range(task.n_vars - 1):
            pos_target = start + 7 * k  # step k writes `V = V' + c s ;` for the k-th name back
            name = seq[pos_target]
            # the definition it copies: `name = V' + c ;` in the prompt (name left of `=`)
            pos_def = next(j for j in range(start) if seq[j: j + 2] == [name, "="])
            assert seq[pos_def: pos_def + 5] == seq[pos_target: pos_target + 5]
            distances.append(pos_target - pos_def)
    distances = np.array(distances)
    # beyond a sink + window cache (tiny configs: 4 + 16): all but the few definitions listed last
    assert np.mean(distances > 20) >= 0.9 and np.median(distances) > 80


def test_var_chain_lookups_are_far_back():
    task = VarChain()
    distances = []
    for ex in sample_examples(task, 10, seed=4):
        seq = [vocab.ID_TO_TOKEN[i] for i in ex.prompt_ids + ex.target_ids]
        start = len(ex.prompt_ids)
        chain = ex.target.split()[0 : 3 * task.n_vars : 3]
        for j in range(1, task.n_vars):
            pos_target = start + 3 * j  # step j writes chain[j]
            assert seq[pos_target] == chain[j]
            # its definition `chain[j] = chain[j-1] + c ;` in the prompt
            pos_def = next(k for k in range(start) if seq[k : k + 2] == [chain[j], "="])
            assert seq[pos_def + 1] == "=" and seq[pos_def + 2] == chain[j - 1]
            distances.append(pos_target - pos_def)
    assert np.median(distances) > 40


def test_retrieval_depth_setting():
    for depth, lo, hi in ((0.0, 0, 3), (1.0, 366, 372)):
        ex = NiahSingle(depth=depth).sample(np.random.default_rng(0))
        pos = ex.prompt.split().index("NIAH")
        assert lo <= pos <= hi, pos
    ex = Passkey(depth=0.5, length=1000).sample(np.random.default_rng(0))
    # 1000 prompt tokens = <bos> + 988 filler + 8 needle + 3 query; middle of the filler
    assert ex.prompt.split().index("PASS") == 494


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: RunningSum(n_digits=1), r"n_digits=1 .*\[2, 64\]"),
        (lambda: RunningSum(n_digits=65), r"n_digits=65"),
        (lambda: RunningSum(n_digits=2.5), r"n_digits=2.5"),
        (lambda: RunningSum(n_digits=True), r"n_digits=True"),
        (lambda: VarChain(n_vars=33), r"n_vars=33 .*\[2, 32\]"),
        (lambda: VarChain(cot="sideways"), r"cot='sideways' .*forward, backward"),
        (lambda: NiahSingle(length=63), r"length=63 .*\[64, 8192\]"),
        (lambda: Passkey(length=8193), r"length=8193"),
        (lambda: NiahSingle(depth=1.5), r"depth=1.5"),
        (lambda: NiahMultiKey(n_keys=8, length=64), r"length=64 .*n_keys=8"),
        (lambda: NiahMultiKey(key_len=0), r"key_len=0 .*\[1, 8\]"),
        (lambda: NiahMultiKey(n_keys=27, key_len=1), r"n_keys=27 .*key_len=1.*<= 26"),
        (lambda: NiahMultiKey(n_keys=8, n_queries=9), r"n_queries=9 .*\[1, 8\]"),
        (lambda: NiahMultiKey(quote=1), r"quote=1 .*True or False"),
        (lambda: NiahMultiKey(equals="no"), r"equals='no' .*True or False"),
        (lambda: NiahMultiKey(key_alphabet="greek"), r"key_alphabet='greek' .*letters, index"),
        (lambda: NiahMultiValue(n_values=0), r"n_values=0"),
        (lambda: InductionCopy(length=233), r"length=233 .*\[16, 232\]"),
        (lambda: InductionCopy(chunk=1), r"chunk=1 .*\[2, 8\]"),
        (lambda: InductionCopy(starts="edge"), r"starts='edge' .*random, aligned"),
        (lambda: InductionCopy(length=32, chunk=8, n_recall=4),
         r"length=32, chunk=8, n_recall=4 .*26 words.*32 words"),
        (lambda: VariableTracking(n_chains=8, n_hops=4), r"n_chains=8, n_hops=4 .*<= 32"),
        (lambda: VariableTracking(value_len=6), r"value_len=6 .*\[1, 5\]"),
        (lambda: VariableTracking(n_chains=11, n_hops=1, value_len=1),
         r"n_chains=11 .*value_len=1.*<= 10"),
        (lambda: VariableTracking(restate="yes"), r"restate='yes' .*True or False"),
        (lambda: make_task("var_chain", n_vars=-3), r"n_vars=-3"),
    ],
)
def test_bad_settings_raise(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_settings_are_frozen_and_numpy_ints_accepted():
    t = RunningSum(n_digits=np.int64(8))
    assert type(t.n_digits) is int and t.max_len == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.n_digits = 4
    with pytest.raises(TypeError, match="Generator"):
        t.sample(0)


def test_extract_answer():
    assert extract_answer("i0 A : 1 2 ; A : 3   4 <eos> A : 9") == "3 4"
    assert extract_answer("A : 5") == "5"
    assert extract_answer("no marker here") == ""
    assert extract_answer("A :") == ""
    assert extract_answer(vocab.encode("A : X3 X7") + [vocab.EOS_ID, vocab.PAD_ID]) == "X3 X7"


# ----------------------------------------------------------------------------------------------
# JSONL benchmark files.
# ----------------------------------------------------------------------------------------------


def test_read_jsonl_gsm8k_and_math500(tmp_path):
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(
        json.dumps({"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7 apples.\n#### 1,234"}) + "\n\n"
        + json.dumps({"question": "Q2", "answer": "#### 42"}) + "\n"
    )
    probs = read_jsonl(gsm)
    assert [p.question for p in probs] == ["How many?", "Q2"]
    assert [p.answer for p in probs] == ["1,234", "42"]
    assert [p.line for p in probs] == [1, 3]
    assert answers_match("The total is 1234.", "1,234") is False  # full text is not an answer
    assert answers_match(extract_final_answer("The total is 1234."), probs[0].answer)

    math = tmp_path / "math500.jsonl"
    math.write_text(
        json.dumps(
            {"problem": "Half?", "solution": "So it is $\\boxed{\\frac{1}{2}}$.", "answer": "\\frac{1}{2}"}
        )
        + "\n"
        + json.dumps({"problem": "Nested", "solution": "x = \\boxed{\\frac{a}{b^{2}}}"}) + "\n"
    )
    probs = read_jsonl(math)
    assert probs[0].answer == "\\frac{1}{2}" and probs[0].solution.startswith("So it is")
    assert probs[1].answer == "\\frac{a}{b^{2}}"  # no `answer` key: falls back to `solution`
    assert answers_match(extract_final_answer("thus \\boxed{0.5}"), probs[0].answer)
    assert answers_match("1/2", probs[0].answer)
    assert not answers_match("\\frac{1}{3}", probs[0].answer)

    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"q": "x", "a": 7}) + "\n")
    (p,) = read_jsonl(custom, question_key="q", answer_key="a")
    assert (p.question, p.answer) == ("x", "7")
    with pytest.raises(ValueError, match=r"custom.jsonl:1: no question field"):
        read_jsonl(custom)


def test_read_jsonl_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "a", "answer": "1"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2")):
        read_jsonl(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object"):
        read_jsonl(bad)


def test_extract_and_normalize():
    assert extract_final_answer("a \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_final_answer("\\boxed{\\sqrt{x^{2}}} \\boxed{oops") == "\\sqrt{x^{2}}"
    assert extract_final_answer("We get 3 apples and 1,250 pears.") == "1,250"
    assert extract_final_answer("final: -2.5") == "-2.5"
    assert extract_final_answer("no numbers") is None
    assert normalize_answer("$\\dfrac{3}{4}$") == "3/4"
    assert normalize_answer("\\frac12") == "1/2"
    assert normalize_answer("\\frac{x+1}{2}") == "(x+1)/2"
    assert normalize_answer(" 1,000,000 ") == "1000000"
    assert normalize_answer("42.0") == "42" and normalize_answer("2.50") == "2.5"
    assert normalize_answer("\\text{(C)}") == "(C)"
    assert normalize_answer("\\boxed{7}") == "7"
    assert answers_match("0.5", "\\frac{1}{2}") and answers_match("$18$", "18.00")
    assert answers_match("(1,2)", "(1, 2)") and not answers_match("3", "4")
    assert not answers_match(None, "1")


# ----------------------------------------------------------------------------------------------
# Batching.
# ----------------------------------------------------------------------------------------------


def test_make_training_batch_loss_mask():
    exs = [RunningSum(n_digits=2).make_example([3, 4]), RunningSum(n_digits=3).make_example([1, 2, 3])]
    batch = make_training_batch(exs, seq_len=40)
    tokens, mask = batch["tokens"], batch["loss_mask"]
    assert tokens.shape == mask.shape == (2, 40)
    assert tokens.dtype == np.int32 and mask.dtype == np.float32
    for b, ex in enumerate(exs):
        p, t = ex.prompt_ids, ex.target_ids
        n = len(p) + len(t)
        assert tokens[b, :n].tolist() == p + t
        assert (tokens[b, n:] == vocab.PAD_ID).all()
        ones = np.nonzero(mask[b])[0]
        # positions whose NEXT token is a target token: P-1 .. P+T-2
        assert ones.tolist() == list(range(len(p) - 1, n - 1))
        assert tokens[b, ones + 1].tolist() == t
    # exact fit is fine, one token too few is not
    n0 = exs[0].num_tokens
    assert make_training_batch(exs[:1], n0)["loss_mask"][0, -1] == 0
    with pytest.raises(ValueError, match=f"seq_len={n0 - 1}"):
        make_training_batch(exs[:1], n0 - 1)


def test_pad_prompts():
    tokens, lengths = pad_prompts([[1, 5, 6], [1], [1, 7]])
    assert tokens.dtype == np.int32 and lengths.dtype == np.int32
    assert tokens.tolist() == [[1, 5, 6], [1, 0, 0], [1, 7, 0]]
    assert lengths.tolist() == [3, 1, 2]
    tokens, _ = pad_prompts([np.array([1, 2])], pad_to=4)
    assert tokens.tolist() == [[1, 2, 0, 0]]
    with pytest.raises(ValueError):
        pad_prompts([[1, 2, 3]], pad_to=2)
    with pytest.raises(ValueError):
        pad_prompts([])


def test_running_sum_random_offset_labels_and_default():
    from jaxkv.tasks import make_task
    import numpy as np
    task = make_task("running_sum", n_digits=4, random_offset=True)
    seen = set()
    for seed in range(40):
        ex = task.sample(np.random.default_rng(seed))
        labels = [w for w in ex.prompt.split() if w.startswith("i")]
        first = int(labels[0][1:])
        # four consecutive labels from a random start in [0, 60]
        assert labels == [f"i{first + k}" for k in range(4)] and 0 <= first <= 60
        assert task.verify(ex, ex.target)
        seen.add(first)
    assert len(seen) > 10
    # the default keeps labels from i0, so evaluation sets are unchanged
    plain = make_task("running_sum", n_digits=4).sample(np.random.default_rng(0))
    assert plain.prompt.split()[1] == "i0"
    # hand case, offset 5: digits 3 9 -> sums 03 12
    ex = make_task("running_sum", n_digits=2).make_example([3, 9], offset=5)
    assert ex.prompt == "SUM i5 3 i6 9 ?" and ex.target == "i5 3 0 3 ; i6 9 1 2 ; A : 1 2"
    import pytest
    with pytest.raises(ValueError, match="offset=63"):
        make_task("running_sum", n_digits=2).make_example([1, 2], offset=63)
    with pytest.raises(ValueError, match="random_offset"):
        make_task("running_sum", random_offset="yes")


def test_variable_tracking_new_settings_leave_the_default_stream_unchanged():
    """value_len / restate came after the shipped models were trained: at their defaults the
    examples are the ones drawn before (pinned hash)."""
    import hashlib
    ex = sample_examples(VariableTracking(length=224), 8, 0)
    digest = hashlib.sha256("|".join(e.prompt + "#" + e.target for e in ex).encode()).hexdigest()
    assert digest[:16] == "3ef768a207b14f3c"


def test_multikey_curriculum_settings_leave_the_default_stream_unchanged():
    """key_len / n_queries came after the shipped models were trained on niah_multikey: at their
    defaults the examples are the ones drawn before (pinned hash), so those runs reproduce."""
    import hashlib
    ex = sample_examples(NiahMultiKey(length=224), 8, 0)
    digest = hashlib.sha256("|".join(e.prompt + "#" + e.target for e in ex).encode()).hexdigest()
    assert digest[:16] == "2935eea48939bcda"
    one = NiahMultiKey(length=96, n_keys=6, key_len=1, n_queries=3).sample(np.random.default_rng(3))
    assert one.target.count("Q ") == 2 and one.target.count("A :") == 3
    assert all(len(k) == 1 for k in re.findall(r"MK (\S+) =", one.prompt))
    index = NiahMultiKey(length=96, n_keys=6, key_len=2, key_alphabet="index")
    keys = re.findall(r"MK (\S+) (\S+) =", index.sample(np.random.default_rng(3)).prompt)
    assert len(keys) == 6 and all(w in vocab.INDEX_TOKENS for k in keys for w in k)


def test_induction_copy_random_starts_leave_no_slot_shortcut():
    """Aligned chunks tell a word's slot from its source position mod chunk; random starts must
    not (every residue appears), and the aligned draw keeps to multiples of chunk."""
    def residues(task):
        out = set()
        for ex in sample_examples(task, 30, seed=5):
            w = ex.prompt.split()
            q = w.index("?")
            out |= {w[:q].index(c) % task.chunk for c in w[q + 1:]}
        return out
    assert residues(InductionCopy(chunk=4)) == {0, 1, 2, 3}
    assert residues(InductionCopy(chunk=4, starts="aligned")) == {0}
