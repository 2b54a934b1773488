"""Offline text material for the real-text long-context tasks (:mod:`jaxkv.tasks.text`).

Nothing here is downloaded; everything is built deterministically from data in this file and
from CPython's bundled documentation, :data:`pydoc_data.topics.topics` (about 465,000 characters
of reference text on every Python install):

* :func:`essay_corpus` -- the English "essay" haystack (RULER draws it from Paul Graham's
  essays): the prose paragraphs of the pydoc topics (code samples, grammar rules, headings and
  version notes dropped), whitespace collapsed, as a tuple of words plus the indices of the
  words that start a sentence. Its exact content follows the Python version's documentation.
* :data:`NOISE_SENTENCES` -- the repeated-noise haystack of RULER / passkey retrieval
  ("The grass is green. The sky is blue. ...").
* :data:`KEY_ADJECTIVES`, :data:`KEY_NOUNS` -- RULER's needle keys are ``adjective-noun``
  pairs (from the ``wonderwords`` lists); these hand-written lists give
  ``len(KEY_ADJECTIVES) * len(KEY_NOUNS)`` distinct keys.
* :func:`common_words` -- single words for common-words extraction (RULER: ``wonderwords``
  nouns, adjectives and verbs): lowercase words of 4-12 letters of the essay prose plus the
  key lists.
* :func:`random_number`, :func:`random_uuid`, :func:`random_word_key`,
  :func:`draw_distinct` -- needle key / value generators on a ``numpy.random.Generator``.
"""

from __future__ import annotations

import functools
import re
import uuid
from typing import Collection

import numpy as np

#: RULER's noise haystack: one "paragraph" of five sentences, repeated.
NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

#: Adjectives of the ``adjective-noun`` needle keys (lowercase letters only, distinct).
KEY_ADJECTIVES: tuple[str, ...] = (
    "able", "ancient", "angry", "bitter", "black", "blue", "bold", "brave", "bright", "broad",
    "brown", "busy", "calm", "careful", "cheap", "clean", "clever", "cold", "cool", "crazy",
    "curious", "dark", "deep", "dry", "eager", "early", "easy", "empty", "fair", "famous",
    "fancy", "fast", "fierce", "flat", "fresh", "friendly", "funny", "gentle", "giant", "glad",
    "golden", "grand", "gray", "great", "green", "happy", "hard", "heavy", "honest", "hot",
    "huge", "humble", "hungry", "jolly", "kind", "large", "lazy", "little", "lively", "lonely",
    "loud", "lucky", "mighty", "modern", "narrow", "neat", "noble", "odd", "orange", "pale",
    "perfect", "pink", "plain", "polite", "proud", "purple", "quick", "quiet", "rapid", "rare",
    "red", "rich", "round", "royal", "rusty", "sad", "safe", "sharp", "shiny", "short",
    "silent", "silly", "silver", "simple", "slow", "small", "smart", "smooth", "soft", "solid",
    "sour", "spicy", "steady", "strange", "strong", "sweet", "swift", "tall", "tame", "tender",
    "thick", "thin", "tiny", "tough", "vast", "warm", "wet", "white", "wide", "wild", "wise",
    "wooden", "yellow", "young",
)

#: Nouns of the ``adjective-noun`` needle keys (lowercase letters only, distinct).
KEY_NOUNS: tuple[str, ...] = (
    "actor", "airport", "anchor", "apple", "arrow", "artist", "autumn", "badge", "bakery",
    "balloon", "banana", "barrel", "basket", "beach", "bean", "bear", "bell", "bicycle", "bird",
    "blanket", "boat", "book", "bottle", "bridge", "brush", "bucket", "butter", "button",
    "cabin", "cactus", "camel", "camera", "candle", "canyon", "captain", "carpet", "carrot",
    "castle", "cave", "chair", "cheese", "cherry", "chimney", "circle", "city", "cliff",
    "clock", "cloud", "coat", "coffee", "comet", "compass", "cookie", "cottage", "cousin",
    "crayon", "crown", "curtain", "desert", "diamond", "doctor", "dolphin", "door", "dragon",
    "drum", "eagle", "engine", "falcon", "farmer", "feather", "fence", "field", "flower",
    "flute", "forest", "fountain", "garden", "ghost", "giraffe", "glove", "goat", "guitar",
    "hammer", "harbor", "hill", "horse", "island", "jacket", "jungle", "kettle", "kitten",
    "ladder", "lake", "lamp", "lemon", "lion", "lizard", "magnet", "mango", "meadow", "mirror",
    "monkey", "moon", "mountain", "nest", "ocean", "onion", "orchard", "owl", "painter",
    "palace", "panda", "parrot", "pencil", "pepper", "piano", "pillow", "pirate", "planet",
    "pocket", "pond", "potato", "puzzle", "rabbit", "radio", "river", "robot", "rocket",
    "saddle", "sailor", "scarf", "shadow", "sheep", "shell", "ship", "shovel", "singer",
    "spider", "spoon", "squirrel", "statue", "stone", "storm", "sugar", "sunset", "swan",
    "teacher", "temple", "tiger", "tomato", "tower", "train", "trumpet", "tulip", "turtle",
    "umbrella", "valley", "village", "violin", "wagon", "wallet", "whale", "window", "wizard",
    "wolf", "zebra",
)

# Sentence ends: a word ending in . ? or ! (possibly followed by closing quotes / brackets).
_SENTENCE_END = re.compile(r"[.?!][\"'\u201d)\]]*$")
_SENTENCE_START = re.compile(r"^[\"'\u201c(\[]*[A-Z]")
_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")
_BULLET = re.compile(r"^\s*[*\-+]\s+")
# "of Python.This is" (a missing space in the source text), not "pdb.Pdb" or "abc.Mapping".
_GLUED_SENTENCES = re.compile(r'(?<=\s)([A-Za-z]+[)"\]]?)\.([A-Z][a-z]+)(?=\s)')


def _is_prose(paragraph: str) -> bool:
    """Heuristic: a paragraph of running English text (not code, grammar, heading or table)."""
    s = paragraph.strip()
    if len(s) < 40 or not s.endswith((".", "?", "!", '."', ".)")):
        return False
    if any(bad in s for bad in (">>>", "::=", "***", "===", "---", "+--", "|")):
        return False
    body = _BULLET.sub("", s)
    if not body[:1].isupper():
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters / len(s) >= 0.85


@functools.lru_cache(maxsize=1)
def essay_corpus() -> tuple[tuple[str, ...], np.ndarray]:
    """The English haystack: ``(words, sentence_starts)``.

    ``words`` are the whitespace-separated words of the prose paragraphs of
    :data:`pydoc_data.topics.topics` (topics in sorted order, bullets and ``*`` emphasis marks
    removed, a missing space after a full stop restored); joined by single spaces they are the
    text. ``sentence_starts`` is a sorted int
    array of the indices of the words that start a sentence (word 0, the first word of every
    paragraph, and a capitalised word after one ending in ``.``/``?``/``!``). Read-only; the
    result is cached (it only depends on the Python installation).
    """
    from pydoc_data.topics import topics

    words: list[str] = []
    starts: list[int] = []
    for key in sorted(topics):
        for paragraph in _PARAGRAPH_SPLIT.split(topics[key]):
            if not _is_prose(paragraph):
                continue
            text = _BULLET.sub("", paragraph.strip()).replace("*", "")
            text = _GLUED_SENTENCES.sub(r"\1. \2", text)
            para_words = text.split()
            if not para_words:
                continue
            for k, w in enumerate(para_words):
                if k == 0 or (_SENTENCE_END.search(para_words[k - 1]) and _SENTENCE_START.match(w)):
                    starts.append(len(words) + k)
            words.extend(para_words)
    arr = np.asarray(starts, dtype=np.int64)
    arr.setflags(write=False)
    return tuple(words), arr


@functools.lru_cache(maxsize=1)
def essay_uppercase_words() -> frozenset[str]:
    """Every maximal run of 2+ uppercase ASCII letters in the essay text (so that generated
    variable names can avoid words the haystack already holds, e.g. ``ASCII``)."""
    words, _ = essay_corpus()
    return frozenset(re.findall(r"[A-Z]{2,}", " ".join(words)))


#: Words of the common-words-extraction prompt, kept out of its word list.
_CWE_TEMPLATE_WORDS = frozenset(
    "below numbered list words these some appear more often than others memorize ones that "
    "most question what common above answer the".split())


@functools.lru_cache(maxsize=1)
def common_words() -> tuple[str, ...]:
    """Word list for common-words extraction, sorted and distinct (about 2,200 words).

    Every lowercase word of 4 to 12 ASCII letters of the essay prose (a bare word, or one
    followed by ``.``/``,``/``;``/``:``; so no identifiers, code or grammar symbols), plus the
    key adjectives and nouns of 4 letters or more, less the words of the task's own prompt.
    """
    words, _ = essay_corpus()
    found = {m.group(1) for w in words for m in [_CWE_WORD.fullmatch(w)] if m}
    found |= {w for w in KEY_ADJECTIVES + KEY_NOUNS if len(w) >= 4}
    return tuple(sorted(found - _CWE_TEMPLATE_WORDS))


_CWE_WORD = re.compile(r"([a-z]{4,12})[.,;:]?")


def random_number(rng: np.random.Generator, n_digits: int = 7) -> str:
    """A random ``n_digits``-digit decimal number (no leading zero), as RULER's needle values."""
    return str(int(rng.integers(10 ** (n_digits - 1), 10**n_digits)))


def random_uuid(rng: np.random.Generator) -> str:
    """A random version-4 UUID string (``8-4-4-4-12`` lowercase hex digits)."""
    return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))


def random_word_key(rng: np.random.Generator) -> str:
    """A random ``adjective-noun`` key, e.g. ``"brave-lantern"``."""
    a = KEY_ADJECTIVES[int(rng.integers(len(KEY_ADJECTIVES)))]
    n = KEY_NOUNS[int(rng.integers(len(KEY_NOUNS)))]
    return f"{a}-{n}"


#: Needle key / value kinds (RULER's ``type_needle_k`` / ``type_needle_v``).
KINDS: tuple[str, ...] = ("words", "numbers", "uuids")


def random_item(rng: np.random.Generator, kind: str) -> str:
    """One random key or value of ``kind`` (see :data:`KINDS`)."""
    if kind == "words":
        return random_word_key(rng)
    if kind == "numbers":
        return random_number(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"random_item: kind={kind!r} is not allowed; expected one of {KINDS}")


def draw_distinct(
    rng: np.random.Generator, kind: str, n: int, exclude: Collection[str] = ()
) -> list[str]:
    """``n`` distinct random items of ``kind``, none of them in ``exclude``."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        item = random_item(rng, kind)
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out
