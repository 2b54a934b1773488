"""Smoke test of benchmarks/kernels.py: `main(["--smoke", ...])` in process (tiny shapes), then the
JSON's fields, the PNG and the bytes of every cache type."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
ROW_FIELDS = {"type", "context", "budget", "bytes", "MB", "bytes_fraction", "mode", "kernel_used",
              "kernel_ms", "kernel_GBps", "kernel_pct_copy", "ref_ms", "ref_GBps",
              "ref_pct_copy", "speedup"}


@pytest.fixture(scope="module")
def bench():
    """benchmarks/kernels.py as a module (it imports benchmarks/common.py as `common`)."""
    sys.path.insert(0, BENCH_DIR)
    try:
        spec = importlib.util.spec_from_file_location("bench_kernels",
                                                      os.path.join(BENCH_DIR, "kernels.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(BENCH_DIR)
    return module


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_smoke_every_cache_type(bench, tmp_path):
    out = str(tmp_path / "kernels.json")
    result = bench.main(["--smoke", "--out", out])
    data = _load(out)
    assert {"device", "platform", "mode", "args", "copy", "rows"} <= set(data)
    assert data["copy"]["GBps"] > 0 and data["copy"]["bytes"] == 2 * 8 * 2 ** 20
    assert [r["type"] for r in data["rows"]] == list(bench.CACHE_TYPES)
    for r in data["rows"]:
        assert set(r) == ROW_FIELDS, r["type"]
        assert r["context"] == 256 and r["bytes"] > 0 and r["ref_ms"] > 0
        assert r["ref_GBps"] > 0 and r["ref_pct_copy"] > 0
        assert abs(r["MB"] - r["bytes"] / 1e6) < 1e-9
        if data["platform"] == "cpu":  # no accelerator: the reference only
            assert data["mode"] == "reference" and r["kernel_ms"] is None
            assert r["speedup"] is None and not r["kernel_used"]
    fraction = {r["type"]: r["bytes_fraction"] for r in data["rows"]}
    assert fraction["dense"] == pytest.approx(1.0, abs=1e-3)  # + the int32 lengths
    for kind in ("headsplit", "sparse", "quantized", "mixed"):  # compressed at budget 0.2
        assert fraction[kind] < 0.7, (kind, fraction[kind])
    assert os.path.getsize(result["png"]) > 0 and result["png"].endswith(".png")


def test_smoke_kernel_mode_interpret(bench, tmp_path):
    """--mode interpret times the Pallas kernel (in interpret mode) against the reference and
    records that the traced function really holds a pallas_call."""
    out = str(tmp_path / "kernels.json")
    bench.main(["--smoke", "--mode", "interpret", "--types", "dense", "--out", out])
    (row,) = _load(out)["rows"]
    assert row["mode"] == "interpret" and row["kernel_used"] is True
    assert row["kernel_ms"] > 0 and row["kernel_GBps"] > 0 and row["speedup"] > 0


def test_gpu_mode_traces_a_kernel_for_every_cache_type(bench):
    """Under --mode gpu every cache type's attend holds a Mosaic GPU kernel (traced on CPU, not
    run: the GPU kernels compile only for CUDA), so on a GPU `kernel_used` is True for each row
    of a bfloat16 run; a float32 cache falls back to the reference (16-bit caches only)."""
    import jax
    import jax.numpy as jnp
    args = bench.parse_args(["--smoke"])
    fn = bench.attend_loop("gpu", 0.125, 1)
    runs = [("bfloat16", kind, True) for kind in bench.CACHE_TYPES] + [("float32", "dense", False)]
    for dtype, kind, expected in runs:
        shape = bench.Shape(1, 4, 2, 64, dtype)
        cache = bench.build_cache(kind, jax.random.PRNGKey(0), shape, 256, args)
        assert bench.uses_kernel(fn, jnp.zeros((1, 4, 64), dtype), cache) is expected, kind


def test_sparse_decode_overhead_smoke(tmp_path):
    """benchmarks/sparse_decode.py's compression overhead on a random 1-layer model: interleaved
    rounds, the per-round ratios and their median, the CPU-time ratio."""
    sys.path.insert(0, BENCH_DIR)
    try:
        spec = importlib.util.spec_from_file_location("bench_sparse_decode",
                                                      os.path.join(BENCH_DIR, "sparse_decode.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(BENCH_DIR)
    out = str(tmp_path / "sparse.json")
    module.main(["--no-decode", "--overhead-context", "96", "--layers", "1", "--hidden", "64",
                 "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--window", "4",
                 "--overhead-budget", "0.5", "--repeats", "2", "--out", out,
                 "--overhead-methods", "snapkv", "grkv"])
    o = _load(out)["overhead"]
    assert o["rounds"] == 2 and o["prefill_s"] > 0
    for m in ("snapkv", "grkv"):
        rounds = o[m]["overhead_per_round"]
        assert len(rounds) == 2 and o[m]["prefill_with_policy_s"] > 0
        assert min(rounds) <= o[m]["overhead"] <= max(rounds)
        assert o[m]["cpu_overhead"] > -1
