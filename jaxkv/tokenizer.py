"""Text tokenizers of real checkpoints: encoding, decoding, special tokens and chat templates.

    tok = model.tokenizer                       # a jaxkv.tokenizer.Tokenizer
    ids = tok.encode("Hello")                   # special tokens (BOS) as the checkpoint asks
    text = tok.chat_prompt([{"role": "user", "content": "Hi"}])   # the rendered chat template
    tok.decode(ids)

A `Tokenizer` wraps a `tokenizers.Tokenizer` (the "backend": normalizer, pre-tokenizer, model,
post-processor, decoder) and adds what a checkpoint states beside it: the BOS / EOS / PAD / UNK
tokens, whether BOS is prepended, and the chat template (Jinja, rendered in a sandbox as
transformers renders it). It is built from

* a Hugging Face folder: `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template),
  `chat_template.jinja` (newer checkpoints) -> `Tokenizer.from_folder(path)`;
* a GGUF file's `tokenizer.ggml.*` metadata (`Tokenizer.from_gguf_metadata`, called by
  `jaxkv.gguf`): GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`, with the split
  regex that `tokenizer.ggml.pre` names, llama.cpp's names) and SentencePiece-style BPE
  (`"llama"`: byte fallback, merges from the file or derived from the token scores).

Control tokens (GGUF token type 3) and user-defined tokens (type 4) are matched whole in the text,
so a rendered chat prompt encodes its markers (`<|im_start|>`) as single tokens.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(1, 7)

_GPT2_SPLIT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

#: tokenizer.ggml.pre (llama.cpp's names) -> how text is split before byte-level BPE:
#: ("digits+gpt2",): every digit its own piece, then GPT-2's regex; ("regex", R): split by R.
BPE_PRE_TOKENIZERS: Dict[str, Tuple[str, ...]] = {
    "default": ("gpt2",), "gpt2": ("gpt2",), "gpt-2": ("gpt2",),
    "smollm": ("digits+gpt2",),
    "llama-bpe": ("regex", _LLAMA3_SPLIT), "llama3": ("regex", _LLAMA3_SPLIT),
    "llama-v3": ("regex", _LLAMA3_SPLIT), "smaug-bpe": ("regex", _LLAMA3_SPLIT),
    "qwen2": ("regex", _QWEN2_SPLIT), "deepseek-r1-qwen": ("regex", _QWEN2_SPLIT),
}
TOKENIZER_MODELS = ("gpt2", "llama")


class Tokenizer:
    """backend: a `tokenizers.Tokenizer` whose post-processor adds the special tokens the model
    expects (BOS, when it wants one). The ids below are None when the checkpoint has none."""

    def __init__(self, backend, *, bos_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 unk_token_id: Optional[int] = None, chat_template: Optional[str] = None,
                 name: Optional[str] = None):
        self.backend = backend
        size = backend.get_vocab_size(with_added_tokens=True)
        for arg, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                           ("pad_token_id", pad_token_id), ("unk_token_id", unk_token_id)):
            if value is not None and not (isinstance(value, int) and 0 <= value < size):
                raise ValueError(f"{arg}={value!r}: outside the tokenizer's {size} tokens")
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.chat_template = chat_template
        self.name = name

    # ---- text <-> ids -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        if not isinstance(text, str):
            raise ValueError(f"text: expected a str, got {type(text).__name__}")
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> List[List[int]]:
        return [list(e.ids) for e in
                self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.backend.id_to_token(int(i))

    def _token(self, i: Optional[int]) -> Optional[str]:
        return None if i is None else self.backend.id_to_token(i)

    @property
    def bos_token(self) -> Optional[str]:
        return self._token(self.bos_token_id)

    @property
    def eos_token(self) -> Optional[str]:
        return self._token(self.eos_token_id)

    # ---- chat ---------------------------------------------------------------------------------
    def chat_prompt(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat template rendered for `messages` ([{"role": ..., "content": ...}, ...]);
        with add_generation_prompt the text ends where the assistant's reply starts. Encode it
        with `add_special_tokens=False` (the template writes its own BOS when it wants one)."""
        check_messages(messages)
        if not self.chat_template:
            raise ValueError(f"{self.name or 'this tokenizer'} has no chat template (the "
                             f"checkpoint states none); pass plain text or token ids instead")
        template = _compile_template(self.chat_template)
        return template.render(messages=[dict(m) for m in messages],
                               add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                               **kwargs)

    # same name as transformers' (tokenize=False form), for code written against it
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        return self.chat_prompt(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    # ---- files --------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        """tokenizer.json and tokenizer_config.json (special tokens, chat template) in `folder`,
        which `Tokenizer.from_folder` reads back."""
        os.makedirs(folder, exist_ok=True)
        self.backend.save(os.path.join(folder, "tokenizer.json"))
        config = {name: self._token(getattr(self, f"{name}_id"))
                  for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        config = {k: v for k, v in config.items() if v is not None}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)

    @classmethod
    def from_folder(cls, path: str, name: Optional[str] = None) -> Optional["Tokenizer"]:
        """The tokenizer of a Hugging Face folder; None when it has no tokenizer.json."""
        from tokenizers import Tokenizer as Backend
        tok_path = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_path):
            return None
        try:
            backend = Backend.from_file(tok_path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{tok_path}: not a readable tokenizer.json ({e})") from e
        config = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()

        def token_id(key):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        return cls(backend, bos_token_id=token_id("bos_token"), eos_token_id=token_id("eos_token"),
                   pad_token_id=token_id("pad_token"), unk_token_id=token_id("unk_token"),
                   chat_template=template, name=name or path)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], name: Optional[str] = None) -> "Tokenizer":
        """Build from a GGUF file's metadata (keys `tokenizer.ggml.*`, `tokenizer.chat_template`)."""
        where = name or "GGUF file"
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model not in TOKENIZER_MODELS:
            raise ValueError(f"{where}: tokenizer.ggml.model={model!r} is not supported; supported "
                             f"are {', '.join(TOKENIZER_MODELS)}")
        if not tokens:
            raise ValueError(f"{where}: no tokenizer.ggml.tokens in the metadata")
        types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        if model == "gpt2":
            backend = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges"),
                                      meta.get("tokenizer.ggml.pre", "default"), where)
        else:
            backend = _sentencepiece_bpe(tokens, types, meta.get("tokenizer.ggml.scores"),
                                         meta.get("tokenizer.ggml.merges"),
                                         meta.get("tokenizer.ggml.add_space_prefix", True))
        _add_special(backend, tokens, types, byte_level=model == "gpt2")
        ids = {key: meta.get(f"tokenizer.ggml.{key}_token_id")
               for key in ("bos", "eos", "padding", "unknown")}
        add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama")
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        _set_post_processor(backend, tokens, ids["bos"] if add_bos else None,
                            ids["eos"] if add_eos else None)
        return cls(backend, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                   pad_token_id=ids["padding"], unk_token_id=ids["unknown"],
                   chat_template=meta.get("tokenizer.chat_template"), name=name)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name or ''!s}, vocab={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, chat_template={'yes' if self.chat_template else 'no'})")


def as_tokenizer(tok) -> Optional[Tokenizer]:
    """A jaxkv Tokenizer from a jaxkv Tokenizer, a bare `tokenizers.Tokenizer` or None."""
    if tok is None or isinstance(tok, Tokenizer):
        return tok
    from tokenizers import Tokenizer as Backend
    if isinstance(tok, Backend):
        return Tokenizer(tok)
    raise ValueError(f"tokenizer: expected a jaxkv.tokenizer.Tokenizer or a tokenizers.Tokenizer, "
                     f"got {type(tok).__name__}")


def check_messages(messages, name: str = "messages") -> None:
    """A conversation: a non-empty list of {"role": str, "content": str} dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"{name}: expected a non-empty list of {{'role': ..., 'content': ...}} "
                         f"dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"{name}[{i}]={m!r}: expected a dict with string 'role' and "
                             f"'content'")


def is_conversation(obj) -> bool:
    """True for a list of message dicts (one chat prompt)."""
    return (isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)) and len(obj) > 0
            and all(isinstance(m, Mapping) for m in obj))


# ---- construction helpers -----------------------------------------------------------------------

def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e


def _byte_level_bpe(tokens: Sequence[str], merges, pre: str, where: str):
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, pre_tokenizers
    if pre not in BPE_PRE_TOKENIZERS:
        raise ValueError(f"{where}: tokenizer.ggml.pre={pre!r} is not supported; supported are "
                         f"{', '.join(sorted(BPE_PRE_TOKENIZERS))}")
    if not merges:
        raise ValueError(f"{where}: a byte-level BPE vocabulary needs tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    kind = BPE_PRE_TOKENIZERS[pre]
    if kind[0] == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind[0] == "digits+gpt2":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(kind[1]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens, types, scores, merges, add_space_prefix: bool):
    """llama.cpp's SPM vocabulary as a BPE with byte fallback (how transformers' Llama fast
    tokenizer runs a SentencePiece BPE model): "▁" for spaces, a "▁" prefix, <0xNN> byte tokens."""
    from tokenizers import Tokenizer as Backend, decoders, models, normalizers
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = derive_merges(tokens, scores if scores is not None else [0.0] * len(tokens), types)
    unk = next((t for t, ty in zip(tokens, types) if ty == TOKEN_UNKNOWN), None)
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True,
                                 byte_fallback=True))
    steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(dec)
    return backend


def derive_merges(tokens: Sequence[str], scores: Sequence[float], types=None) -> List[Tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary (llama.cpp's SPM files store none): every
    split of a normal token into two tokens of the vocabulary is a merge, ranked by the merged
    token's score (higher first), then by the longer left piece, then the longer right piece,
    ties kept in vocabulary order (transformers' ranking, so both build the same BPE). Control,
    byte and unused tokens take part in no merge."""
    ids = {t: i for i, t in enumerate(tokens)}
    normal = [ty in (TOKEN_NORMAL, TOKEN_USER_DEFINED) for ty in (types or [1] * len(tokens))]
    ranked = []
    for i, tok in enumerate(tokens):
        if not normal[i] or len(tok) < 2:
            continue
        local = []
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            li, ri = ids.get(left), ids.get(right)
            if li is not None and ri is not None and normal[li] and normal[ri]:
                local.append((li, ri, left, right))
        ranked += [(float(scores[i]), left, right) for _, _, left, right in sorted(local)]
    ranked.sort(key=lambda m: (-m[0], -len(m[1]), -len(m[2])))  # stable: ties keep their order
    return [(left, right) for _, left, right in ranked]


def _add_special(backend, tokens, types, byte_level: bool) -> None:
    """Control tokens as special tokens, user-defined ones as plain added tokens: both matched
    whole in the text. In a byte-level vocabulary a control token spelled outside the byte
    alphabet cannot be a real token (a mislabel): it is left out, as transformers does."""
    from tokenizers import AddedToken
    alphabet = set(_byte_alphabet()) if byte_level else None
    special, user = [], []
    for tok, ty in zip(tokens, types):
        if ty == TOKEN_CONTROL and (alphabet is None or set(tok) <= alphabet):
            special.append(AddedToken(tok, special=True, normalized=False))
        elif ty == TOKEN_USER_DEFINED:
            user.append(AddedToken(tok, special=False, normalized=False))
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _set_post_processor(backend, tokens, bos: Optional[int], eos: Optional[int]) -> None:
    from tokenizers import processors
    if bos is None and eos is None:
        return
    pre = [tokens[bos]] if bos is not None else []
    post = [tokens[eos]] if eos is not None else []
    single = " ".join(pre + ["$A"] + post)
    pair = " ".join(pre + ["$A"] + post + ["$B:1"] + post)
    special = [(tokens[i], i) for i in (bos, eos) if i is not None]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=special)


def _byte_alphabet() -> List[str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE spells tokens in these)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


_TEMPLATES: Dict[str, Any] = {}


def _compile_template(source: str):
    """A Jinja template in a sandbox, set up as transformers renders chat templates (trim_blocks,
    lstrip_blocks, `raise_exception`, `strftime_now`, `tojson` keeping non-ASCII)."""
    if source in _TEMPLATES:
        return _TEMPLATES[source]
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: not a valid Jinja template ({e})") from e
    _TEMPLATES[source] = template
    return template


__all__ = ["Tokenizer", "as_tokenizer", "check_messages", "is_conversation", "derive_merges",
           "BPE_PRE_TOKENIZERS", "TOKENIZER_MODELS"]
