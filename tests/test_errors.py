"""Bad input fails early with a ValueError (FileNotFoundError for missing files) whose message
names the argument, the value and what is allowed."""
import json
import math
import os

import numpy as np
import pytest

import jaxkv
from jaxkv.policies import check_budget
try:  # tests/ as a package (tests/__init__.py) or as a plain folder on sys.path
    from tests.helpers import tiny_model
except ImportError:  # pragma: no cover
    from helpers import tiny_model

# tiny_config: vocab 128, context (max_position_embeddings) 256


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture
def checkpoint(model, tmp_path):
    """A valid local checkpoint folder (config.json + model.safetensors) to break."""
    folder = str(tmp_path / "ckpt")
    jaxkv.save_hf(model, folder)
    return folder


# ---- prompts and tokens ------------------------------------------------------------------------
def test_empty_prompt(model):
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        jaxkv.generate(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompts: give a string, .* or a non-empty list"):
        jaxkv.generate(model, [], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"tokens: empty sequence"):
        jaxkv.forward(model, np.zeros((1, 0), np.int32))


def test_prompt_longer_than_context(model):
    with pytest.raises(ValueError, match=r"tokens: length 257 exceeds the model's context of 256"):
        jaxkv.forward(model, np.ones((1, 257), np.int32))
    # the prompt fits, but not with the tokens to generate
    with pytest.raises(ValueError, match=r"prompts\[0\] has 250 tokens; with max_new_tokens=16 "
                                         r"that exceeds the model's context of 256"):
        jaxkv.generate(model, [[1] * 250], max_new_tokens=16)


@pytest.mark.parametrize("bad", [128, 1000, -1])
def test_token_ids_out_of_vocabulary(model, bad):
    with pytest.raises(ValueError, match=r"tokens: ids must lie in \[0, 128\)"):
        jaxkv.forward(model, np.array([[3, bad, 5]]))
    with pytest.raises(ValueError, match=r"prompts\[0\]: token ids must lie in \[0, 128\)"):
        jaxkv.generate(model, [[3, bad, 5]], max_new_tokens=2)


def test_non_integer_tokens(model):
    with pytest.raises(ValueError, match=r"tokens: expected integer token ids, got dtype float"):
        jaxkv.forward(model, np.array([[1.0, 2.0]]))


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_max_new_tokens_must_be_positive(model, bad):
    with pytest.raises(ValueError, match=rf"max_new_tokens={bad}: must be a positive integer"):
        jaxkv.generate(model, [[1, 2, 3]], max_new_tokens=bad)


def test_sampling_settings(model):
    with pytest.raises(ValueError, match=r"temperature=-1.0: must be >= 0"):
        jaxkv.generate(model, [[1, 2]], max_new_tokens=2, temperature=-1.0)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"top_p={top_p}: must lie in \(0, 1\]"):
            jaxkv.generate(model, [[1, 2]], max_new_tokens=2, temperature=1.0, top_p=top_p)


# ---- budgets -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -0.1, 1.5, math.nan, "0.5", True])
def test_budget_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"budget=.*: must be a fraction in \(0, 1\]"):
        check_budget(bad)


def test_budget_error_names_the_argument():
    with pytest.raises(ValueError, match=r"^head_budget=1.5: must be a fraction in \(0, 1\]$"):
        check_budget(1.5, name="head_budget")
    assert check_budget(1) == 1.0 and check_budget(0.25) == 0.25


# ---- checkpoints -------------------------------------------------------------------------------
def test_checkpoint_round_trip_is_valid(checkpoint, model):
    """The folder the other tests break is itself fine."""
    loaded = jaxkv.load_hf(checkpoint)
    assert loaded.config == model.config.replace(dtype="float32")


def test_unknown_architecture(checkpoint):
    cfg_path = os.path.join(checkpoint, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"architecture 'GPT2LMHeadModel' in config.json is not "
                                         r"supported; supported are LlamaForCausalLM"):
        jaxkv.load_hf(checkpoint)


def test_invalid_config_json(checkpoint):
    with open(os.path.join(checkpoint, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
        jaxkv.load_hf(checkpoint)


def test_corrupt_safetensors(checkpoint):
    with open(os.path.join(checkpoint, "model.safetensors"), "wb") as f:
        f.write(os.urandom(64) + b"\x00garbage, not a safetensors header" * 10)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        jaxkv.load_hf(checkpoint)


def test_truncated_safetensors(checkpoint):
    path = os.path.join(checkpoint, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])  # valid header, half the tensor bytes
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        jaxkv.load_hf(checkpoint)


def test_missing_config_json(checkpoint):
    os.remove(os.path.join(checkpoint, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        jaxkv.load_hf(checkpoint)


def test_missing_weights(checkpoint):
    os.remove(os.path.join(checkpoint, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        jaxkv.load_hf(checkpoint)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a local folder"):
        jaxkv.load_hf(str(tmp_path / "nowhere"))


def test_bad_dtype(checkpoint):
    with pytest.raises(ValueError, match=r"dtype='int8' is not allowed; expected one of float32, bfloat16, float16"):
        jaxkv.load_hf(checkpoint, dtype="int8")
