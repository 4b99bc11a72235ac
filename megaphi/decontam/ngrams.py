"""Word n-grams of many documents at once, as 64-bit hashes, in numpy.

Normalisation (default): lowercase (``str.lower``), then every character that is not a letter
or a digit (``str.isalnum``: punctuation, symbols, the underscore, whitespace) separates words.
"Ten-year-old's" becomes ``ten year old s``, and "The CAT, sat." matches "the cat sat". Why:
benchmark items reach training data re-typed, re-cased and re-punctuated (quotes, markdown,
LaTeX, HTML), and the words carry the content. Digits stay words, so numbers still have to
match. ``keep_case`` and ``keep_punctuation`` (words are then runs of non-whitespace, as
lm-evaluation-harness's ``Janitor`` splits after deleting ASCII punctuation) turn each part off.
Scripts written without spaces (Chinese, Japanese) give one "word" per run of letters.

Hashing: the documents of a batch are lowercased, joined, and read as one array of code points.
A word's hash is a polynomial over its code points (each mixed to 64 bits), an n-gram's a
polynomial over its words' hashes, both modulo 2**64 and both read off prefix sums, so no Python
loop runs per word. The result is mixed again so that its top bits index a bitmap. Two
different n-grams collide with probability about 2**-64; with ten million benchmark n-grams a
corpus of a trillion n-grams expects well under one false match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ADD = np.uint64(0x9E3779B97F4A7C15)
_P = 0x100000001B3  # word base (odd: invertible modulo 2**64)
_Q = 0xC2B2AE3D27D4EB4F  # n-gram base (odd)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x + _ADD
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class Normalization:
    """How text becomes words; see the module docstring."""

    keep_case: bool = False
    keep_punctuation: bool = False

    def describe(self) -> str:
        case = "case kept" if self.keep_case else "lowercase"
        words = ("words: runs of non-whitespace" if self.keep_punctuation
                 else "words: runs of letters and digits (str.isalnum)")
        return f"{case}; {words}"

    def words(self, text: str) -> List[str]:
        """The words of ``text``, in Python (for display, allow-lists and tests)."""
        if not self.keep_case:
            text = text.lower()
        table = _word_table(self.keep_punctuation)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        out, start = [], None
        for i, is_word in enumerate(table[codes]):
            if is_word and start is None:
                start = i
            elif not is_word and start is not None:
                out.append(text[start:i])
                start = None
        if start is not None:
            out.append(text[start:])
        return out


_TABLES: Dict[bool, np.ndarray] = {}
_CODE_HASHES: List[np.ndarray] = []


def _code_hashes() -> np.ndarray:
    """``table[code point]``: the code point mixed to 64 bits."""
    if not _CODE_HASHES:
        with np.errstate(over="ignore"):
            _CODE_HASHES.append(mix(np.arange(0x110000, dtype=np.uint64)))
    return _CODE_HASHES[0]


def _word_table(keep_punctuation: bool) -> np.ndarray:
    """``table[code point]``: whether the character belongs to a word."""
    if keep_punctuation not in _TABLES:
        chars = [chr(c) for c in range(0x110000)]
        if keep_punctuation:
            table = np.fromiter((not c.isspace() for c in chars), dtype=bool, count=len(chars))
        else:
            table = np.fromiter((c.isalnum() for c in chars), dtype=bool, count=len(chars))
        _TABLES[keep_punctuation] = table
    return _TABLES[keep_punctuation]


class _Powers:
    """``base**i`` and ``base**-i`` modulo 2**64 for i < len, grown on demand."""

    def __init__(self, base: int):
        self.base, self.inverse = base, pow(base, -1, 1 << 64)
        self.up = self.down = np.ones(1, dtype=np.uint64)

    def get(self, n: int):
        if len(self.up) < n:
            size = max(n, 2 * len(self.up))
            self.up = np.cumprod(np.full(size, self.base, dtype=np.uint64), dtype=np.uint64)
            self.down = np.cumprod(np.full(size, self.inverse, dtype=np.uint64), dtype=np.uint64)
            # cumprod starts at base**1: shift to start at base**0
            self.up = np.concatenate([np.ones(1, np.uint64), self.up[:-1]])
            self.down = np.concatenate([np.ones(1, np.uint64), self.down[:-1]])
        return self.up[:n], self.down[:n]


_WORD_POWERS, _GRAM_POWERS = _Powers(_P), _Powers(_Q)


def _segment_hashes(values: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                    powers: _Powers) -> np.ndarray:
    """For each segment ``values[s:e]``: sum of ``values[j] * base**(e-1-j)`` mod 2**64."""
    with np.errstate(over="ignore"):
        up, down = powers.get(len(values))
        prefix = np.empty(len(values) + 1, dtype=np.uint64)
        prefix[0] = 0
        np.cumsum(values * down, dtype=np.uint64, out=prefix[1:])
        return up[ends - 1] * (prefix[ends] - prefix[starts])


@dataclass
class Grams:
    """The n-grams of a batch: ``hashes[k]`` starts at word ``first[k]`` of document ``doc[k]``."""

    hashes: np.ndarray  # uint64
    first: np.ndarray  # int64 word index into HashedBatch.starts
    doc: np.ndarray  # int64 document index in the batch


@dataclass
class HashedBatch:
    """A batch of documents cut into words (``text[starts[i]:ends[i]]`` is word i, which
    belongs to document ``word_doc[i]``), with their n-grams for each n asked."""

    text: str  # the normalised-case text of the batch, documents joined by a newline
    starts: np.ndarray
    ends: np.ndarray
    word_doc: np.ndarray
    grams: Dict[int, Grams]
    num_docs: int

    def ngram_text(self, first: int, n: int) -> str:
        return " ".join(self.text[self.starts[i]:self.ends[i]] for i in range(first, first + n))


def hash_texts(texts: Sequence[str], ns: Sequence[int], norm: Normalization) -> HashedBatch:
    """Cut ``texts`` into words and hash their n-grams for every n in ``ns``."""
    if not norm.keep_case:
        texts = [t.lower() for t in texts]
    lengths = np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=len(texts))
    text = "\n".join(texts)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    is_word = np.zeros(len(codes) + 2, dtype=np.int8)
    np.take(_word_table(norm.keep_punctuation).view(np.int8), codes, out=is_word[1:-1])
    edges = np.flatnonzero(is_word[1:] != is_word[:-1])
    starts, ends = edges[0::2], edges[1::2]  # each word: a rise then a fall
    doc_offsets = np.cumsum(lengths)
    word_doc = np.searchsorted(doc_offsets, starts, side="right")
    with np.errstate(over="ignore"):
        word_hashes = mix(_segment_hashes(_code_hashes()[codes], starts, ends,
                                          _WORD_POWERS))
    grams = {}
    for n in ns:
        count = len(starts) - n + 1
        if count <= 0:
            grams[n] = Grams(np.empty(0, np.uint64), np.empty(0, np.int64),
                             np.empty(0, np.int64))
            continue
        first = np.arange(count, dtype=np.int64)
        valid = word_doc[:count] == word_doc[n - 1:]
        first = first[valid]
        with np.errstate(over="ignore"):
            hashes = mix(_segment_hashes(word_hashes, first, first + n, _GRAM_POWERS)
                         + np.uint64(n))
        grams[n] = Grams(hashes, first, word_doc[first])
    return HashedBatch(text, starts, ends, word_doc, grams, len(texts))
