"""Small GGUF files for the tests, written with `gguf.GGUFWriter` from a jaxkv model's weights.

  write_gguf(model, path, arch, qtype, tokenizer=...) writes the model as llama.cpp's converter
      would: llama-type files get Q and K rows permuted (llama.cpp's RoPE pairing), 1-D tensors
      stay F32, matrices are stored in `qtype`.
  quantize(w, qtype) -> raw block bytes: the gguf package's own quantizers, plus encoders of the
      K-quants (Q4_K, Q5_K, Q6_K), which the gguf package can only decode. They follow llama.cpp's
      block layouts (ggml-common.h) with a simple scale search, so a file of those types can be
      checked against the float weights it came from.
  bpe_vocab() / spm_vocab(): small byte-level BPE and SentencePiece-style vocabularies trained on
      CPython's bundled documentation, as GGUF tokenizer metadata.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional

import numpy as np

QK_K = 256


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float16).reshape(-1, 1).view(np.uint8)  # [n, 2]


def _quant_q4_k(w: np.ndarray) -> np.ndarray:
    """[rows, n] float -> [rows, n / 256 * 144] uint8: d, dmin (f16), 12 bytes of 6-bit scales and
    mins for 8 sub-blocks of 32, 128 bytes of 4-bit codes; value = d * sc * q - dmin * m."""
    blocks = w.reshape(-1, 8, 32).astype(np.float32)  # [nb, sub, 32]
    lo = np.minimum(blocks.min(-1), 0.0)  # [nb, 8]: min <= 0 so the offset m >= 0
    hi = blocks.max(-1)
    step = np.maximum(hi - lo, 1e-12) / 15.0
    mins = -lo
    d = step.max(-1) / 63.0
    dmin = np.maximum(mins.max(-1), 1e-12) / 63.0
    d16 = np.asarray(d, np.float16).astype(np.float32)
    dmin16 = np.asarray(dmin, np.float16).astype(np.float32)
    sc = np.clip(np.ceil(step / np.maximum(d16[:, None], 1e-12)), 1, 63).astype(np.int64)
    m = np.clip(np.round(mins / np.maximum(dmin16[:, None], 1e-12)), 0, 63).astype(np.int64)
    scale = d16[:, None] * sc  # [nb, 8]
    offset = dmin16[:, None] * m
    q = np.clip(np.round((blocks + offset[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    packed = np.zeros((blocks.shape[0], 12), np.uint8)
    for j in range(8):
        if j < 4:
            packed[:, j] |= (sc[:, j] & 63).astype(np.uint8)
            packed[:, j + 4] |= (m[:, j] & 63).astype(np.uint8)
        else:
            packed[:, j + 4] |= ((sc[:, j] & 0xF) | ((m[:, j] & 0xF) << 4)).astype(np.uint8)
            packed[:, j - 4] |= ((sc[:, j] >> 4) << 6).astype(np.uint8)
            packed[:, j] |= ((m[:, j] >> 4) << 6).astype(np.uint8)
    qs = np.zeros((blocks.shape[0], 128), np.uint8)
    for c in range(4):
        qs[:, 32 * c:32 * c + 32] = q[:, 2 * c] | (q[:, 2 * c + 1] << 4)
    out = np.concatenate([_f16_bytes(d16), _f16_bytes(dmin16), packed, qs], axis=1)
    return out.reshape(w.shape[0], -1)


def _quant_q5_k(w: np.ndarray) -> np.ndarray:
    """Like Q4_K with 5-bit codes: d, dmin, 12 bytes of scales, qh[32] (the fifth bits), qs[128]."""
    blocks = w.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(blocks.min(-1), 0.0)
    hi = blocks.max(-1)
    step = np.maximum(hi - lo, 1e-12) / 31.0
    mins = -lo
    d16 = np.asarray(step.max(-1) / 63.0, np.float16).astype(np.float32)
    dmin16 = np.asarray(np.maximum(mins.max(-1), 1e-12) / 63.0, np.float16).astype(np.float32)
    sc = np.clip(np.ceil(step / np.maximum(d16[:, None], 1e-12)), 1, 63).astype(np.int64)
    m = np.clip(np.round(mins / np.maximum(dmin16[:, None], 1e-12)), 0, 63).astype(np.int64)
    scale = d16[:, None] * sc
    offset = dmin16[:, None] * m
    q = np.clip(np.round((blocks + offset[..., None]) / scale[..., None]), 0, 31).astype(np.uint8)
    packed = np.zeros((blocks.shape[0], 12), np.uint8)
    for j in range(8):
        if j < 4:
            packed[:, j] |= (sc[:, j] & 63).astype(np.uint8)
            packed[:, j + 4] |= (m[:, j] & 63).astype(np.uint8)
        else:
            packed[:, j + 4] |= ((sc[:, j] & 0xF) | ((m[:, j] & 0xF) << 4)).astype(np.uint8)
            packed[:, j - 4] |= ((sc[:, j] >> 4) << 6).astype(np.uint8)
            packed[:, j] |= ((m[:, j] >> 4) << 6).astype(np.uint8)
    qs = np.zeros((blocks.shape[0], 128), np.uint8)
    qh = np.zeros((blocks.shape[0], 32), np.uint8)
    for c in range(4):
        a, b = q[:, 2 * c], q[:, 2 * c + 1]
        qs[:, 32 * c:32 * c + 32] = (a & 0xF) | ((b & 0xF) << 4)
        qh |= ((a >> 4) << (2 * c)) | ((b >> 4) << (2 * c + 1))
    out = np.concatenate([_f16_bytes(d16), _f16_bytes(dmin16), packed, qh, qs], axis=1)
    return out.reshape(w.shape[0], -1)


def _quant_q6_k(w: np.ndarray) -> np.ndarray:
    """ql[128] (low 4 bits), qh[64] (high 2 bits), 16 int8 scales (sub-blocks of 16), d (f16);
    value = d * scale * (q - 32)."""
    blocks = w.reshape(-1, 16, 16).astype(np.float32)  # [nb, sub, 16]
    amax = np.abs(blocks).max(-1)  # [nb, 16]
    step = np.maximum(amax, 1e-12) / 31.0
    d16 = np.asarray(step.max(-1) / 127.0, np.float16).astype(np.float32)
    sc = np.clip(np.ceil(step / np.maximum(d16[:, None], 1e-12)), 1, 127).astype(np.int64)
    scale = d16[:, None] * sc
    q = (np.clip(np.round(blocks / scale[..., None]), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(-1, 2, 128)  # two halves of 128 values
    ql = np.zeros((q.shape[0], 2, 64), np.uint8)
    qh = np.zeros((q.shape[0], 2, 32), np.uint8)
    for part in range(4):  # values l + 32 * part of each half
        vals = q[:, :, 32 * part:32 * part + 32]
        low, high = vals & 0xF, vals >> 4
        if part == 0:
            ql[:, :, :32] |= low
        elif part == 1:
            ql[:, :, 32:] |= low
        elif part == 2:
            ql[:, :, :32] |= low << 4
        else:
            ql[:, :, 32:] |= low << 4
        qh |= high << (2 * part)
    out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64),
                          sc.astype(np.int8).view(np.uint8), _f16_bytes(d16)], axis=1)
    return out.reshape(w.shape[0], -1)


_K_QUANTS = {"Q4_K": _quant_q4_k, "Q5_K": _quant_q5_k, "Q6_K": _quant_q6_k}


def quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """[rows, n] float32 -> what GGUFWriter.add_tensor takes for `qtype`."""
    import gguf
    w = np.ascontiguousarray(w, np.float32)
    if qtype == "F32":
        return w
    if qtype in _K_QUANTS:
        if w.shape[-1] % QK_K:
            raise ValueError(f"{qtype}: rows of {w.shape[-1]} values, need a multiple of {QK_K}")
        return _K_QUANTS[qtype](w)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])


def llama_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows: head h's rows (i, i + D/2) become
    adjacent (2i, 2i + 1). w: [n_heads * D, ...]."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def torch_layout(model) -> Dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array in torch layout ([out, in]) of a jaxkv model's params."""
    p = {k: v for k, v in model.params.items()}
    c = model.config
    out = {"token_embd.weight": np.asarray(p["embed_tokens"]["embedding"], np.float32),
           "output_norm.weight": np.asarray(p["norm"]["weight"], np.float32)}
    if "lm_head" in p:
        out["output.weight"] = np.asarray(p["lm_head"]["kernel"], np.float32).T
    names = {("self_attn", "q_proj"): "attn_q", ("self_attn", "k_proj"): "attn_k",
             ("self_attn", "v_proj"): "attn_v", ("self_attn", "o_proj"): "attn_output",
             ("mlp", "gate_proj"): "ffn_gate", ("mlp", "up_proj"): "ffn_up",
             ("mlp", "down_proj"): "ffn_down"}
    for i in range(c.num_layers):
        layer = p[f"layers_{i}"]
        out[f"blk.{i}.attn_norm.weight"] = np.asarray(layer["input_layernorm"]["weight"], np.float32)
        out[f"blk.{i}.ffn_norm.weight"] = np.asarray(layer["post_attention_layernorm"]["weight"],
                                                     np.float32)
        for (group, proj), short in names.items():
            leaf = layer[group][proj]
            out[f"blk.{i}.{short}.weight"] = np.asarray(leaf["kernel"], np.float32).T
            if "bias" in leaf:
                out[f"blk.{i}.{short}.bias"] = np.asarray(leaf["bias"], np.float32)
        for norm, short in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            if norm in layer["self_attn"]:
                out[f"blk.{i}.{short}.weight"] = np.asarray(layer["self_attn"][norm]["weight"],
                                                            np.float32)
    return out


def write_gguf(model, path: str, arch: str = "llama", qtype: str = "F32",
               tokenizer: Optional[dict] = None, extra: Optional[dict] = None,
               embed_qtype: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Write `model` as a GGUF file; returns the float tensors written (torch layout, before the
    llama permutation). tokenizer: GGUF tokenizer metadata (see bpe_vocab)."""
    import gguf
    c = model.config
    tensors = torch_layout(model)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    if c.head_dim != c.hidden_size // c.num_heads:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    for key, value in (extra or {}).items():
        if isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, int(value))
    if tokenizer:
        _add_tokenizer(w, tokenizer)
    for name, arr in tensors.items():
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            arr = llama_permute(arr, c.num_heads if ".attn_q." in name else c.num_kv_heads)
        kind = qtype if arr.ndim == 2 else "F32"
        if name == "token_embd.weight" and embed_qtype is not None:
            kind = embed_qtype
        data = quantize(arr, kind)
        if kind in ("F32", "F16"):
            w.add_tensor(name, data.astype(np.float16) if kind == "F16" else data)
        else:
            w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])  # byte shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def _add_tokenizer(w, tok: dict) -> None:
    w.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if tok.get("merges"):
        w.add_token_merges(tok["merges"])
    if tok.get("scores") is not None:
        w.add_token_scores(tok["scores"])
    for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                    ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        if tok.get(key) is not None:
            fn(tok[key])
    if "add_bos" in tok:
        w.add_add_bos_token(tok["add_bos"])
    if "add_space_prefix" in tok:
        w.add_add_space_prefix(tok["add_space_prefix"])
    if tok.get("chat_template"):
        w.add_chat_template(tok["chat_template"])


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


def _corpus() -> list:
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)[:60]]


@functools.lru_cache(maxsize=None)
def bpe_vocab(size: int = 400, pre: str = "smollm") -> dict:
    """A byte-level BPE trained on Python's docs, as GGUF metadata (model "gpt2"); three control
    tokens (<|endoftext|>, <|im_start|>, <|im_end|>) first, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    data = __import__("json").loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t in specials else 1 for t in tokens]
    return dict(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges, bos=1, eos=2,
                pad=0, add_bos=False, chat_template=CHATML)


@functools.lru_cache(maxsize=None)
def spm_vocab(size: int = 500) -> dict:
    """A SentencePiece-style vocabulary (model "llama"): <unk>, <s>, </s>, the 256 byte tokens,
    then pieces learned by a BPE over "▁"-joined words, scored by merge order (no merges stored,
    as in llama.cpp's SPM files)."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    data = __import__("json").loads(tok.to_str())
    learned = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    pieces = [t for t, _ in learned if t not in ("<unk>", "<s>", "</s>")]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>"] + byte_tokens + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    return dict(model="llama", tokens=tokens, types=types, scores=scores, bos=1, eos=2, unk=0,
                add_bos=True, add_space_prefix=True)
