"""Loading Hugging Face folders as a user would: the fixes of the real-checkpoints issue.

`"architectures": null` falls back to model_type; dtype objects and short names; a pad id
outside the vocabulary refused at load; Mistral's sliding_window is an attention window (greedy
tokens past the window equal transformers'), not a cap on the prompt; generation_config.json's
eos ids; chat templates from tokenizer_config.json and chat_template.jinja.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from tests.helpers import assert_close, hf_greedy, tiny_hf_checkpoint

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_architectures_null_falls_back_to_model_type(tmp_path):
    folder, _ = tiny_hf_checkpoint("llama", tmp_path)
    _edit_config(folder, architectures=None)
    assert jaxkv.load(folder).config.architecture == "LlamaForCausalLM"
    _edit_config(folder, architectures=None, model_type="gpt_neox")
    with pytest.raises(ValueError, match="'gpt_neox'.*not supported.*llama, qwen2, qwen3, mistral"):
        jaxkv.load(folder)


def test_dtype_objects_and_names(tmp_path):
    folder, _ = tiny_hf_checkpoint("qwen2", tmp_path)
    for dtype, name in ((jnp.float32, "float32"), (jnp.bfloat16, "bfloat16"),
                        (np.float16, "float16"), ("bf16", "bfloat16"), ("fp32", "float32"),
                        (np.dtype("float32"), "float32")):
        m = jaxkv.load_hf(folder, dtype=dtype)
        assert m.config.dtype == name
        assert m.params["embed_tokens"]["embedding"].dtype == jnp.dtype(name)
    for bad in ("int8", jnp.int32, 3):
        with pytest.raises(ValueError, match="dtype=.*float32, bfloat16, float16"):
            jaxkv.load_hf(folder, dtype=bad)


def test_pad_token_outside_the_vocabulary_is_refused(tmp_path):
    folder, _ = tiny_hf_checkpoint("llama", tmp_path)
    _edit_config(folder, pad_token_id=128)  # vocab_size 128
    with pytest.raises(ValueError, match="pad_token_id=128: outside the vocabulary"):
        jaxkv.load(folder)


def test_mistral_sliding_window_is_an_attention_window(tmp_path):
    window = 8
    folder, torch_model = tiny_hf_checkpoint("mistral", tmp_path, sliding_window=window,
                                             initializer_range=0.1)
    model = jaxkv.load(folder)
    assert model.config.sliding_window == window
    prompt = np.random.default_rng(0).integers(3, 128, 21).tolist()  # longer than the window
    with torch.no_grad():
        ref = torch_model(torch.tensor([prompt])).logits.float().numpy()
    assert_close(jaxkv.forward(model, [prompt]), ref, "float32")
    gen = jaxkv.generate(model, [prompt], 12, eos_ids=())
    assert gen.tokens[0] == hf_greedy(torch_model, prompt, 12)
    with pytest.raises(ValueError, match="sliding_window=8.*policy=None"):
        jaxkv.generate(model, [prompt], 4, policy=jaxkv.make_policy(
            "streaming", 0.5, model))


def test_generation_config_adds_eos_ids(tmp_path):
    folder, _ = tiny_hf_checkpoint("llama", tmp_path)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 7]}, f)
    assert jaxkv.load(folder).config.eos_ids == (2, 7)


def _word_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "hi", "there"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(words[:6])  # matched whole, as in real tokenizer.json files
    tok.save(os.path.join(folder, "tokenizer.json"))


def test_chat_template_from_tokenizer_config_and_jinja_file(tmp_path):
    folder, _ = tiny_hf_checkpoint("llama", tmp_path)
    _word_tokenizer(folder)
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": template, "bos_token": "<s>",
                   "eos_token": {"content": "</s>"}}, f)
    m = jaxkv.load(folder)
    msgs = [{"role": "user", "content": "hi there"}]
    assert m.chat_prompt(msgs) == "<s><|user|> hi there <|assistant|>"
    assert m.encode_chat(msgs) == [1, 4, 6, 7, 5]
    assert m.tokenizer.eos_token_id == 2
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert jaxkv.load(folder).chat_prompt(msgs) == "hi there"
    os.remove(os.path.join(folder, "chat_template.jinja"))
    os.remove(os.path.join(folder, "tokenizer_config.json"))
    with pytest.raises(ValueError, match="no chat template"):
        jaxkv.load(folder).chat_prompt(msgs)
