"""Fixed word-level vocabulary and tokenizer for the embedded tasks.

The token order below IS PART OF THE MODEL FORMAT: a checkpoint's embedding rows are indexed by
these ids. Never reorder, rename or delete tokens. New tokens may only take over one of the
reserved ``<rK>`` slots at the end (same id, same vocabulary size), or be appended.

Text is a sequence of tokens separated by whitespace; every token is one word of the vocabulary.
Two equivalent encoders are provided:

* :func:`build_tokenizer` builds a ``tokenizers.Tokenizer`` (WordLevel model, WhitespaceSplit
  pre-tokenizer, ``<unk>`` for unknown words, a post-processor that prepends ``<bos>``), which
  :func:`save_tokenizer` writes as a standard ``tokenizer.json``.
* :func:`encode` / :func:`decode` are pure-Python dict lookups (no ``tokenizers`` needed, and
  much faster for the short texts used here) that give identical ids and strings.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterable

# ---------------------------------------------------------------------------------------------
# The vocabulary (order = ids).
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
DIGIT_TOKENS: tuple[str, ...] = tuple(str(d) for d in range(10))
LETTER_TOKENS: tuple[str, ...] = tuple(chr(c) for c in range(ord("a"), ord("z") + 1))
PUNCT_TOKENS: tuple[str, ...] = ("=", "+", ";", ":", "?", ",", "|", ">", ".")
#: Task-marker words. ``Q`` starts a query, ``A :`` starts the final answer.
MARKER_TOKENS: tuple[str, ...] = ("SUM", "VC", "NIAH", "MK", "MV", "VT", "PASS", "Q", "A")
INDEX_TOKENS: tuple[str, ...] = tuple(f"i{k}" for k in range(64))
FILLER_TOKENS: tuple[str, ...] = tuple(f"w{k}" for k in range(96))
VAR_TOKENS: tuple[str, ...] = tuple(f"X{k}" for k in range(32))
#: Unused slots, so that later additions keep the vocabulary size (256) of existing checkpoints.
RESERVED_TOKENS: tuple[str, ...] = tuple(f"<r{k}>" for k in range(6))

TOKENS: tuple[str, ...] = (
    SPECIAL_TOKENS
    + DIGIT_TOKENS
    + LETTER_TOKENS
    + PUNCT_TOKENS
    + MARKER_TOKENS
    + INDEX_TOKENS
    + FILLER_TOKENS
    + VAR_TOKENS
    + RESERVED_TOKENS
)
VOCAB_SIZE: int = len(TOKENS)  # 256
TOKEN_TO_ID: dict[str, int] = {t: i for i, t in enumerate(TOKENS)}
ID_TO_TOKEN: tuple[str, ...] = TOKENS

PAD_ID: int = TOKEN_TO_ID["<pad>"]  # 0
BOS_ID: int = TOKEN_TO_ID["<bos>"]  # 1
EOS_ID: int = TOKEN_TO_ID["<eos>"]  # 2
UNK_ID: int = TOKEN_TO_ID["<unk>"]  # 3

#: Tokens that ``decode`` drops by default (``<unk>`` is kept so that unknown words stay visible).
SKIPPED_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>") + RESERVED_TOKENS
_SKIPPED_IDS: frozenset[int] = frozenset(TOKEN_TO_ID[t] for t in SKIPPED_SPECIAL_TOKENS)

assert len(TOKEN_TO_ID) == VOCAB_SIZE, "duplicate token in the vocabulary"


def vocab_fingerprint() -> str:
    """SHA-256 of the ordered token list; changes iff the model format changes."""
    return hashlib.sha256("\n".join(TOKENS).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Fast pure-Python encode / decode (identical to the `tokenizers` tokenizer below).
# ---------------------------------------------------------------------------------------------

# `tokenizers`' WhitespaceSplit splits on Rust's `char::is_whitespace` (Unicode White_Space).
# Python's `str.split()` additionally splits on U+001C..U+001F, so those need the slow path.
_RUST_WS_RE = re.compile(
    "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"
)
_PY_ONLY_WS_RE = re.compile("[\x1c-\x1f]")
# Special tokens are "added tokens" in the `tokenizers` tokenizer (single_word=True), so they are
# recognised even inside a whitespace-delimited word when flanked by non-word characters.
_ADDED_RE = re.compile("|".join(re.escape(t) for t in SKIPPED_SPECIAL_TOKENS))


def _split_words(text: str) -> list[str]:
    if _PY_ONLY_WS_RE.search(text) is None:
        return text.split()
    return [w for w in _RUST_WS_RE.split(text) if w]


# Symbols (category So) that have the Unicode Alphabetic property: circled / squared letters.
_ALPHABETIC_SYMBOLS = ((0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189))


def _is_word_char(c: str) -> bool:
    """The regex-crate ``\\w`` class (Alphabetic, M, Nd, Pc, Join_Control) that `tokenizers`
    uses to decide whether a single_word added token stands alone."""
    cat = unicodedata.category(c)
    if cat[0] in "LM" or cat in ("Nd", "Nl", "Pc") or c in "\u200c\u200d":
        return True
    o = ord(c)
    return cat == "So" and any(lo <= o <= hi for lo, hi in _ALPHABETIC_SYMBOLS)


def _encode_word_slow(word: str) -> list[int]:
    """Encode one out-of-vocabulary word that may contain embedded special tokens."""
    ids: list[int] = []
    start = 0
    for m in _ADDED_RE.finditer(word):
        a, b = m.span()
        if (a > 0 and _is_word_char(word[a - 1])) or (b < len(word) and _is_word_char(word[b])):
            continue  # not a standalone word: stays part of the surrounding text
        if a > start:
            ids.append(TOKEN_TO_ID.get(word[start:a], UNK_ID))
        ids.append(TOKEN_TO_ID[m.group()])
        start = b
    if start < len(word):
        ids.append(TOKEN_TO_ID.get(word[start:], UNK_ID))
    return ids


def encode(text: str, add_bos: bool = False) -> list[int]:
    """Token ids of ``text`` (whitespace-separated words; unknown words -> ``<unk>``).

    ``encode(text)`` equals ``build_tokenizer().encode(text, add_special_tokens=False).ids`` and
    ``encode(text, add_bos=True)`` equals ``build_tokenizer().encode(text).ids``. (Checked
    exhaustively for every code point up to U+2FFFF next to a special token; the only
    differences are characters unassigned in Python's Unicode database, glued to a special
    token inside a word -- text the tasks never produce.)
    """
    ids = [BOS_ID] if add_bos else []
    get = TOKEN_TO_ID.get
    for word in _split_words(text):
        i = get(word)
        if i is not None:
            ids.append(i)
        elif "<" in word:
            ids.extend(_encode_word_slow(word))
        else:
            ids.append(UNK_ID)
    return ids


def decode(ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Space-joined tokens of ``ids``; drops ``<pad>``/``<bos>``/``<eos>`` unless told not to.

    Equals ``build_tokenizer().decode(ids, skip_special_tokens=...)``. Accepts any iterable of
    integers (list, numpy or jax array). Raises ValueError on an id outside ``[0, VOCAB_SIZE)``
    (where `tokenizers` would silently drop it).
    """
    out = []
    for i in ids:
        i = int(i)
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {VOCAB_SIZE})")
        if skip_special_tokens and i in _SKIPPED_IDS:
            continue
        out.append(ID_TO_TOKEN[i])
    return " ".join(out)


# ---------------------------------------------------------------------------------------------
# `tokenizers` tokenizer.
# ---------------------------------------------------------------------------------------------


def build_tokenizer():
    """A ``tokenizers.Tokenizer`` for :data:`TOKENS`.

    WordLevel model over the fixed vocabulary, WhitespaceSplit pre-tokenizer, ``<unk>`` for
    unknown words; ``<pad>``, ``<bos>``, ``<eos>`` and the reserved slots are special tokens
    (skipped by ``decode`` by default); ``encode`` prepends ``<bos>`` unless
    ``add_special_tokens=False``. With no decoder set, ``decode`` joins tokens with single spaces.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(dict(TOKEN_TO_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, single_word=True)
            for t in SKIPPED_SPECIAL_TOKENS
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return tok


def save_tokenizer(path: str | os.PathLike) -> Path:
    """Write the tokenizer as a standard ``tokenizer.json``; returns the file written.

    ``path`` is the file to write, or an existing directory (then ``path/tokenizer.json``).
    The result loads with ``tokenizers.Tokenizer.from_file``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(path))
    return path
