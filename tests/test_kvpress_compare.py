"""benchmarks/kvpress_compare.py's pure parts: the budget conversion (jaxkv's byte budget -> kept
prompt tokens per head -> kvpress's compression_ratio) and the merging of both sides' records.
Needs neither kvpress nor the real model."""
import importlib.util
import math
import os
import sys

import numpy as np
import pytest

from jaxkv.policies.snapkv import SLOT_INDEX_BYTES

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "kvpress_compare.py")
_spec = importlib.util.spec_from_file_location("kvpress_compare", _PATH)
kc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = kc  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(kc)

# SmolLM2-135M: 3 KV heads of 64 dims, float32
K, D, S = 3, 64, 4


def _snap_keep_by_hand(budget, length, padded, extra):
    """SnapKV.mean_keep written out: K n (2 D s + 8) + K extra 2 D s + 4 = budget (K (padded +
    extra) 2 D s + 4), n_max = floor(n), then scaled to the row: floor(n_max / padded * L)."""
    tb = 2 * D * S
    n = (budget * (K * (padded + extra) * tb + 4) - K * extra * tb - 4) / (K * (tb + SLOT_INDEX_BYTES))
    n_max = math.floor(n + 1e-9)
    return max(32, min(length, math.floor(n_max / padded * length + 1e-6)))


@pytest.mark.parametrize("method", ["snapkv", "adakv", "criticalkv", "critical_adakv", "chunkkv",
                                    "cam"])
@pytest.mark.parametrize("budget,length,padded,extra", [
    (0.1, 2048, 2048, 16), (0.25, 2040, 2048, 16), (0.1, 4090, 4096, 128), (0.5, 1000, 1024, 0)])
def test_snap_family_keep_matches_the_byte_formula(method, budget, length, padded, extra):
    n = kc.jaxkv_prompt_keep(method, budget, length, padded, extra, K, D)
    assert n == _snap_keep_by_hand(budget, length, padded, extra)
    # index bytes and decode slots make it fewer than budget * length
    assert n < budget * length


def test_known_values():
    # 2048-token prompt, 16 decode slots, 512 bytes of K and V per token and head: 0.1 of
    # (3 * 2064 * 512 + 4) bytes, less the 3 * 16 * 512 of the decode slots and the 4 of the
    # length, is 187.5 tokens of 3 * (512 + 8) bytes (8 index bytes per kept token)
    assert kc.jaxkv_prompt_keep("snapkv", 0.1, 2048, 2048, 16, K, D) == 187
    assert kc.jaxkv_prompt_keep("snapkv", 0.25, 2048, 2048, 16, K, D) == 492
    # a shorter row keeps its share of the padded prompt's slots: floor(187 / 2048 * 2000)
    assert kc.jaxkv_prompt_keep("snapkv", 0.1, 2000, 2048, 16, K, D) == 182
    # streaming: floor(0.1 * 2064) = 206 slots of sink + ring, all prompt at the end of prefill
    assert kc.jaxkv_prompt_keep("streaming", 0.1, 2048, 2048, 16, K, D) == 206
    assert kc.jaxkv_prompt_keep("full", 0.1, 2000, 2048, 16, K, D) == 2000


def test_streaming_keep_is_sink_plus_window():
    from jaxkv.policies.streaming import window_for_budget
    for budget, length, padded, extra in [(0.1, 2048, 2048, 16), (0.3, 1500, 1536, 64)]:
        w = window_for_budget(budget, padded + extra, S, K * 2 * D * S)
        assert kc.jaxkv_prompt_keep("streaming", budget, length, padded, extra, K, D) == 4 + w
    # a budget holding more than the prompt keeps the prompt
    assert kc.jaxkv_prompt_keep("streaming", 0.99, 100, 2048, 16, K, D) == 100


@pytest.mark.parametrize("length", [37, 511, 2008, 2048, 4093])
def test_kvpress_ratio_keeps_exactly_n(length):
    for n in sorted({1, 2, 32, length // 10, length // 4, length - 1}):
        ratio = kc.kvpress_ratio(n, length)
        assert 0.0 <= ratio < 1.0
        assert max(1, int(length * (1 - ratio))) == n  # kvpress's compute_n_kept
    assert kc.kvpress_ratio(length, length) == 0.0
    assert kc.kvpress_ratio(length + 5, length) == 0.0


def _chunkkv_tokens(length, ratio, chunk):
    """Tokens ChunkKVPress keeps when the partial last chunk is among the chosen ones."""
    full, r = divmod(length, chunk)
    m = max(1, int((full + (r > 0)) * (1 - ratio)))
    return (m - 1) * chunk + r if r else m * chunk


@pytest.mark.parametrize("length", [511, 2008, 2040, 2048, 4095])
def test_kvpress_chunk_ratio_comes_nearest_n(length):
    for n in (113, 196, 497, 1000):
        if n >= length:
            assert kc.kvpress_chunk_ratio(n, length, 10) == 0.0  # no compression
            continue
        tokens = _chunkkv_tokens(length, kc.kvpress_chunk_ratio(n, length, 10), 10)
        assert abs(tokens - n) <= 5
    assert kc.kvpress_job_ratio("chunkkv", 196, 2048) == kc.kvpress_chunk_ratio(196, 2048)
    assert kc.kvpress_job_ratio("snapkv", 196, 2048) == kc.kvpress_ratio(196, 2048)


def test_mask_overlap():
    a = np.zeros((2, 3, 10), bool)
    b = a.copy()
    assert kc.mask_overlap(a, b) == 1.0
    a[0, 0, :4] = True
    b[0, 0, 2:6] = True
    assert kc.mask_overlap(a, b) == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        kc.mask_overlap(a, b[:1])


def test_masks_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    masks = {"snapkv@0.1": rng.random((30, 3, 2041)) < 0.1, "full@1": np.ones((2, 3, 5), bool)}
    path = str(tmp_path / "m.npz")
    kc.save_masks(path, masks)
    back = kc.load_masks(path)
    assert set(back) == set(masks)
    for k in masks:
        assert back[k].shape == masks[k].shape and (back[k] == masks[k]).all()


def _rec(key, task, prefill, runs, cold=False):
    return dict(key=key, task=task, prefill_s=prefill, prefill_cold=cold, runs=runs)


def _run(label, budget, score, text, compress=0.1, decode=1.0, kept=100.0, cold=False):
    return dict(label=label, budget=budget, score=score, text=text, compress_s=compress,
                decode_s=decode, kept_per_head=kept, cold=cold)


def test_compare_counts_disagreements_and_times():
    jx = [_rec("passkey/0", "passkey", 9.0, [_run("snapkv", 0.1, 1.0, "12345", 5.0, 9.0)],
               cold=True),
          _rec("passkey/1", "passkey", 2.0, [_run("snapkv", 0.1, 1.0, "777")]),
          _rec("niah/0", "niah", 4.0, [_run("snapkv", 0.1, 0.0, "no", 0.3, 2.0)])]
    kv = [_rec("passkey/0", "passkey", 3.0, [_run("snapkv", 0.1, 1.0, "12345", 0.2),
                                             _run("kvzip", 0.1, 1.0, "12345", 2.0)]),
          _rec("passkey/1", "passkey", 3.0, [_run("snapkv", 0.1, 0.0, "778", 0.2),
                                             _run("kvzip", 0.1, 0.0, "x", 2.0)]),
          _rec("niah/0", "niah", 5.0, [_run("snapkv", 0.1, 0.0, "nope", 0.4),
                                       _run("kvzip", 0.1, 1.0, "y", 4.0)])]
    overlaps = {("snapkv", 0.1, "passkey/0"): 1.0, ("snapkv", 0.1, "passkey/1"): 0.5,
                ("snapkv", 0.1, "niah/0"): 0.75}
    out = kc.compare(jx, kv, [("snapkv", "snapkv", "snapkv"), ("adakv", "adakv", "adakv")],
                     [("kvzip", "kvzip")], overlaps)
    assert len(out["pairs"]) == 1  # adakv has no records
    row = out["pairs"][0]
    assert row["n"] == 3 and row["budget"] == 0.1
    assert row["acc_jaxkv"] == pytest.approx(2 / 3) and row["acc_kvpress"] == pytest.approx(1 / 3)
    assert row["per_task"]["passkey"] == dict(n=2, jaxkv=1.0, kvpress=0.5, disagree=1,
                                              text_diff=1)
    assert row["per_task"]["niah"]["disagree"] == 0 and row["per_task"]["niah"]["text_diff"] == 1
    assert row["disagree"] == 1 and row["text_diff"] == 2
    d = row["disagreements"][0]
    assert d["key"] == "passkey/1" and d["jaxkv_text"] == "777" and d["overlap"] == 0.5
    assert row["overlap"] == pytest.approx(0.75)
    # the cold (compiling) prompt is left out of the jaxkv timings
    assert row["time_jaxkv"]["n_timed"] == 2
    assert row["time_jaxkv"]["prefill_s"] == pytest.approx(3.0)
    assert row["time_jaxkv"]["prefill_compress_s"] == pytest.approx((2.1 + 4.3) / 2)
    assert row["time_kvpress"]["n_timed"] == 3
    assert row["time_kvpress"]["prefill_compress_s"] == pytest.approx(3.2)
    assert row["time_kvpress"]["decode_s"] == pytest.approx(1.0)
    assert row["time_kvpress"]["prefill_compress_min_s"] == pytest.approx(3.2)
    assert row["time_jaxkv"]["prefill_compress_min_s"] == pytest.approx(2.1)
    extra = out["extras"][0]
    assert extra["label"] == "kvzip" and extra["acc_kvpress"] == pytest.approx(2 / 3)
    assert extra["per_task"]["niah"] == dict(n=1, kvpress=1.0)
    assert extra["time_kvpress"]["compress_s"] == pytest.approx(2.0)
    table = kc.format_table(out, ["passkey", "niah"])
    assert "snapkv" in table and "kvzip" in table


def test_compare_pairs_only_prompts_both_sides_ran():
    jx = [_rec("a/0", "a", 1.0, [_run("full", 1.0, 1.0, "x")]),
          _rec("a/1", "a", 1.0, [_run("full", 1.0, 1.0, "x")])]
    kv = [_rec("a/0", "a", 1.0, [_run("full", 1.0, 1.0, "x")])]
    row = kc.compare(jx, kv, [("full", "full", "none")])["pairs"][0]
    assert row["n"] == 1 and row["disagree"] == 0 and row["overlap"] is None


def test_cut_at_eos():
    assert kc.cut_at_eos([5, 6, 2, 0, 0], (2,)) == [5, 6, 2]
    assert kc.cut_at_eos([5, 6], (2,)) == [5, 6]
