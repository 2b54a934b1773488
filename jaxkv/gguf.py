"""GGUF checkpoints (llama.cpp's single-file format), dequantised once at load.

    model = jaxkv.load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")

Read with the `gguf` package (llama.cpp's own Python reader): GGUF v2 / v3, architectures
`llama` (Llama 1/2/3, SmolLM, Mistral-style files), `qwen2` and `qwen3`, and every tensor type
`gguf.quants` can dequantise (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ*, ...).
Every tensor is dequantised to float32 with numpy, then cast to the requested dtype; the weights
are not kept quantised (jaxkv compresses the KV cache, not the weights).

llama.cpp's converter permutes the rows of Q and K of `llama` files (its RoPE pairs channels
(2i, 2i+1), Hugging Face's (i, i + D/2)); the permutation is undone here, so the model runs the
Hugging Face convention like every other checkpoint. Qwen files are not permuted.

The model config comes from the metadata (`{arch}.block_count`, `.embedding_length`, head counts,
`.rope.freq_base`, rope scaling, `.attention.layer_norm_rms_epsilon`, `.context_length`, ...);
the embeddings are tied when the file has no `output.weight`. The tokenizer and chat template come
from `tokenizer.ggml.*` (`jaxkv.tokenizer.Tokenizer.from_gguf_metadata`).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from jaxkv.model.config import ModelConfig, normalize_dtype

#: GGUF general.architecture -> the decoder family it maps to
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
#: llama.cpp rope scaling types handled (yarn, longrope, ... are refused)
ROPE_SCALING_TYPES = ("none", "linear")

# per-layer tensor names (after "blk.{i}.") -> (path under layers_{i}, kind)
_LAYER_TENSORS = {
    "attn_norm.weight": (("input_layernorm", "weight"), "vector"),
    "ffn_norm.weight": (("post_attention_layernorm", "weight"), "vector"),
    "attn_q.weight": (("self_attn", "q_proj", "kernel"), "q"),
    "attn_k.weight": (("self_attn", "k_proj", "kernel"), "k"),
    "attn_v.weight": (("self_attn", "v_proj", "kernel"), "matrix"),
    "attn_output.weight": (("self_attn", "o_proj", "kernel"), "matrix"),
    "attn_q.bias": (("self_attn", "q_proj", "bias"), "q_bias"),
    "attn_k.bias": (("self_attn", "k_proj", "bias"), "k_bias"),
    "attn_v.bias": (("self_attn", "v_proj", "bias"), "vector"),
    "attn_q_norm.weight": (("self_attn", "q_norm", "weight"), "vector"),
    "attn_k_norm.weight": (("self_attn", "k_norm", "weight"), "vector"),
    "ffn_gate.weight": (("mlp", "gate_proj", "kernel"), "matrix"),
    "ffn_up.weight": (("mlp", "up_proj", "kernel"), "matrix"),
    "ffn_down.weight": (("mlp", "down_proj", "kernel"), "matrix"),
}


def supported_tensor_types() -> Tuple[str, ...]:
    """Names of the GGML tensor types this reader can dequantise (those of `gguf.quants`)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    out = ["F32", "F16"]
    for qt in Q:
        if qt.name in out:
            continue
        try:
            gguf.quants.dequantize(np.zeros(0, np.uint8), qt)
        except NotImplementedError:
            continue
        except Exception:  # implemented; an empty input may still be refused
            pass
        out.append(qt.name)
    return tuple(out)


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> Python value; the big token arrays included) and
    `tensors` (name -> gguf ReaderTensor). Raises ValueError naming the file when it is not a
    readable GGUF file (bad magic, unsupported version, truncated)."""

    def __init__(self, path: str):
        import gguf
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such GGUF file (jaxkv never downloads checkpoints)")
        self.path = path
        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError, KeyError, IndexError, ...
            raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        self.version = int(reader.fields["GGUF.version"].contents()) \
            if "GGUF.version" in reader.fields else None
        if self.version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {self.version} is not supported; supported "
                             f"are 2 and 3")
        self.metadata: Dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception as e:
                raise ValueError(f"{path}: metadata {key!r} is unreadable ({e})") from e
        size = os.path.getsize(path)
        self.tensors = {}
        for t in reader.tensors:
            end = t.data_offset + int(t.n_bytes)
            if end > size or t.data.nbytes != int(t.n_bytes):
                raise ValueError(f"{path}: tensor {t.name!r} ends at byte {end} but the file has "
                                 f"{size} bytes (truncated or corrupt file)")
            self.tensors[t.name] = t
        self.reader = reader

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "?")

    def get(self, key: str, default=None):
        """Metadata `{arch}.key`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def array(self, name: str) -> np.ndarray:
        """Tensor `name` dequantised to float32, in numpy order (ggml's dims reversed)."""
        import gguf
        t = self.tensors[name]
        try:
            out = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which "
                             f"cannot be dequantised; supported types are "
                             f"{', '.join(supported_tensor_types())}") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return np.asarray(out, np.float32).reshape(shape)


def config_from_gguf(f: GGUFFile, dtype: Optional[str] = "float32") -> ModelConfig:
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise ValueError(f"{f.path}: architecture {arch!r} is not supported; supported are "
                         f"{', '.join(ARCHITECTURES)}")
    m = f.metadata

    def need(key):
        value = f.get(key)
        if value is None:
            raise ValueError(f"{f.path}: metadata {arch}.{key} is missing")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(f.get("attention.head_count_kv", heads))
    head_dim = int(f.get("attention.key_length", hidden // heads))
    if "token_embd.weight" not in f.tensors:
        raise ValueError(f"{f.path}: no token_embd.weight tensor")
    vocab = int(f.tensors["token_embd.weight"].shape[1])
    scaling = str(f.get("rope.scaling.type", "none"))
    rope_scaling = None
    if scaling not in ROPE_SCALING_TYPES:
        raise ValueError(f"{f.path}: rope scaling {scaling!r} is not supported; supported are "
                         f"{', '.join(ROPE_SCALING_TYPES)}")
    if scaling == "linear":
        rope_scaling = (("factor", float(need("rope.scaling.factor"))), ("rope_type", "linear"))
    if "rope_freqs.weight" in f.tensors:  # Llama 3.1 style: per-frequency divisors in a tensor
        factors = tuple(float(x) for x in f.array("rope_freqs.weight").ravel())
        rope_scaling = (("factors", factors), ("rope_type", "freq_factors"))
    eos = [m.get("tokenizer.ggml.eos_token_id"), m.get("tokenizer.ggml.eot_token_id"),
           m.get("tokenizer.ggml.eom_token_id")]
    eos = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
    pad = m.get("tokenizer.ggml.padding_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(f.get("context_length", 4096)),
        rope_theta=float(f.get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(f.get("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in f.tensors,
        attention_bias="blk.0.attn_q.bias" in f.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in f.tensors,
        sliding_window=(int(f.get("attention.sliding_window"))
                        if f.get("attention.sliding_window") else None),
        architecture=ARCHITECTURES[arch],
        dtype=normalize_dtype(dtype) or "float32",
        bos_token_id=m.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos or None,
        pad_token_id=int(pad),
    )


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. w: [n_heads * D, ...] (torch layout, rows = output
    channels). llama.cpp stores head h's rows in the order (0, D/2, 1, D/2 + 1, ...); Hugging Face
    (rotate-half RoPE) wants (0, 1, ..., D - 1)."""
    rows = w.shape[0]
    d = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, d // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def load_gguf(path: str, dtype=None):
    """A `jaxkv.Model` from a GGUF file (weights dequantised into `dtype`, default float32)."""
    import jax
    import jax.numpy as jnp

    from jaxkv.model.model import Model
    from jaxkv.tokenizer import Tokenizer

    f = GGUFFile(path)
    config = config_from_gguf(f, normalize_dtype(dtype) or "float32")
    target = config.jnp_dtype
    permute = f.architecture == "llama"
    params: Dict[str, Any] = {}
    sample: Dict[str, np.ndarray] = {}

    def put(key: Tuple[str, ...], arr: np.ndarray, name: str, want: Tuple[int, ...]):
        if arr.shape != want:
            raise ValueError(f"{f.path}: tensor {name!r} has shape {arr.shape}, expected {want} "
                             f"for the config in the file's metadata")
        node = params
        for part in key[:-1]:
            node = node.setdefault(part, {})
        sample[jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in key))] = \
            np.asarray(arr.ravel()[:16], np.float32)  # dequantised values, before the cast
        node[key[-1]] = jnp.asarray(arr, target)

    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    expected = {"q": (q_out, c.hidden_size), "k": (kv_out, c.hidden_size),
                "q_bias": (q_out,), "k_bias": (kv_out,)}
    shapes = {  # torch layout [out, in] of the plain matrices, by flax leaf path
        ("self_attn", "v_proj", "kernel"): (kv_out, c.hidden_size),
        ("self_attn", "o_proj", "kernel"): (c.hidden_size, q_out),
        ("mlp", "gate_proj", "kernel"): (c.intermediate_size, c.hidden_size),
        ("mlp", "up_proj", "kernel"): (c.intermediate_size, c.hidden_size),
        ("mlp", "down_proj", "kernel"): (c.hidden_size, c.intermediate_size),
        ("self_attn", "v_proj", "bias"): (kv_out,),
        ("self_attn", "q_norm", "weight"): (c.head_dim,),
        ("self_attn", "k_norm", "weight"): (c.head_dim,),
        ("input_layernorm", "weight"): (c.hidden_size,),
        ("post_attention_layernorm", "weight"): (c.hidden_size,),
    }
    seen = set()
    for name in f.tensors:
        if name == "token_embd.weight":
            put(("embed_tokens", "embedding"), f.array(name), name, (c.vocab_size, c.hidden_size))
        elif name == "output_norm.weight":
            put(("norm", "weight"), f.array(name), name, (c.hidden_size,))
        elif name == "output.weight":
            put(("lm_head", "kernel"), f.array(name).T, name, (c.hidden_size, c.vocab_size))
        elif name == "rope_freqs.weight":
            pass  # read into the config
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in _LAYER_TENSORS or not idx.isdigit() or int(idx) >= c.num_layers:
                raise ValueError(f"{f.path}: tensor {name!r} is not part of a {f.architecture} "
                                 f"decoder with {c.num_layers} layers")
            path, kind = _LAYER_TENSORS[rest]
            arr = f.array(name)
            if kind in ("q", "k", "q_bias", "k_bias"):
                want = expected[kind]
                if arr.shape != want:
                    raise ValueError(f"{f.path}: tensor {name!r} has shape {arr.shape}, "
                                     f"expected {want}")
                if permute:
                    arr = unpermute_rows(arr, c.num_heads if kind[0] == "q" else c.num_kv_heads)
                if kind in ("q", "k"):
                    arr = arr.T
                put((f"layers_{idx}",) + path, arr, name, arr.shape)
            elif path[-1] == "kernel":
                want = shapes[path]
                if arr.shape != want:
                    raise ValueError(f"{f.path}: tensor {name!r} has shape {arr.shape}, "
                                     f"expected {want}")
                put((f"layers_{idx}",) + path, arr.T, name, want[::-1])
            else:
                put((f"layers_{idx}",) + path, arr, name, shapes[path])
        else:
            raise ValueError(f"{f.path}: tensor {name!r} is not part of a {f.architecture} "
                             f"decoder")
        seen.add(name)
    _check_complete(f, config, params)
    tokenizer = None
    if "tokenizer.ggml.model" in f.metadata:
        tokenizer = Tokenizer.from_gguf_metadata(f.metadata, name=os.path.basename(f.path))
    model = Model(config=config, params=params, tokenizer=tokenizer, path=f.path)
    model._weights_sample = sample
    return model


def _check_complete(f: GGUFFile, config: ModelConfig, params) -> None:
    import jax

    from jaxkv.model.decoder import init_params
    shapes = jax.eval_shape(lambda: init_params(config))
    want = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    got = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(want - got)
    if missing:
        raise ValueError(f"{f.path}: the file lacks {len(missing)} tensors of a "
                         f"{config.architecture}, e.g. {missing[:3]}")


__all__ = ["load_gguf", "GGUFFile", "config_from_gguf", "unpermute_rows", "ARCHITECTURES",
           "supported_tensor_types"]
