"""The benchmark side of decontamination: test items read from JSON-lines files, their 13-grams
and 7-grams held in memory as sorted 64-bit hashes with a bitmap in front, the allow-list, and
the classification of a batch of documents (Phi-4 report, App. B.1, Algorithm 1).

A document is
- ``contaminated`` when it shares a 13-gram with any test item, allow-listed 13-grams aside;
- otherwise, with ``ratio`` the largest over test items of
  ``|shared 7-grams| / min(|document's 7-grams|, |item's 7-grams|)`` (distinct 7-grams,
  allow-listed ones not counted on the item's side and never shared),
  ``contaminated`` when ``ratio >= contaminated_7gram``, ``partial`` when
  ``ratio >= info_7gram``, else ``clean``.

The 7-gram stage catches test items too short to hold a 13-gram (an item of 7 to 12 words
embedded verbatim scores 1.0) and copies broken up by edits. Items of fewer than 7 words have no
n-gram and are never matched.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megaphi.decontam.ngrams import HashedBatch, Normalization, hash_texts

LONG, SHORT = 13, 7  # the report's two n
CATEGORIES = ("clean", "partial", "contaminated")


class DecontamError(Exception):
    """Bad input or settings: the message names the file, line or option and the fix."""


@dataclass(frozen=True)
class Thresholds:
    """The 7-gram ratio cut-offs (the report gives no values).

    ``contaminated_7gram=0.5``: more than half of an item's 7-grams appear in the document (or,
    for a document shorter than the item, half of the document's) although no 13 words in a
    row do, which is an edited or fragmented copy rather than shared phrasing. ``info_7gram=0.2``:
    a fifth of the item, several 7-word runs or one 7-word run of a short item, worth a look;
    such documents go to partial.jsonl and stay out of clean.jsonl. The report's ratio
    histogram (report.json) shows where a corpus sits, to tune them.
    """

    info_7gram: float = 0.2
    contaminated_7gram: float = 0.5

    def check(self) -> None:
        if not 0 < self.info_7gram <= self.contaminated_7gram <= 1:
            raise DecontamError(
                f"need 0 < --info-7gram-threshold ({self.info_7gram}) <= "
                f"--contaminated-7gram-threshold ({self.contaminated_7gram}) <= 1")

    def category(self, ratio: float) -> str:
        if ratio >= self.contaminated_7gram:
            return "contaminated"
        return "partial" if ratio >= self.info_7gram else "clean"


def open_text(path: str):
    """A text file, gzipped when its name ends in .gz."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def dataset_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name[:-len(suffix)] if name.endswith(suffix) else name
    return name


def read_benchmark(path: str, field: str, id_field: str) -> Tuple[List[str], List[str]]:
    """The texts and ids of a benchmark file: one JSON object per line, its text in ``field``,
    its id in ``id_field`` when present, else its line number."""
    if not Path(path).is_file():
        raise DecontamError(f"--benchmark {path}: no such file")
    texts, ids = [], []
    with open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DecontamError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DecontamError(
                    f"{path}:{number}: no field {field!r} (it has {keys}); name the text "
                    f"field with --benchmark-field")
            text = record[field]
            if not isinstance(text, str):
                raise DecontamError(f"{path}:{number}: field {field!r} is "
                                    f"{type(text).__name__}, not a string")
            texts.append(text)
            ids.append(str(record.get(id_field, number)))
    if not texts:
        raise DecontamError(f"--benchmark {path}: no items")
    return texts, ids


def batches(texts: Sequence[str], max_chars: int = 1 << 19) -> Iterator[Tuple[int, int]]:
    """``(start, stop)`` ranges of ``texts`` of about ``max_chars`` characters each (numpy
    hashing runs fastest on batches that fit in cache)."""
    start, size = 0, 0
    for i, text in enumerate(texts):
        size += len(text) + 1
        if size >= max_chars:
            yield start, i + 1
            start, size = i + 1, 0
    if start < len(texts):
        yield start, len(texts)


# --------------------------------------------------------------------------------------------
# The allow-list
# --------------------------------------------------------------------------------------------

ALLOWLIST_HEADER = "# megaphi decontamination allow-list"


def write_allowlist(path: str, rows: Iterable[Tuple[int, int, str]], norm: Normalization,
                    rule: str) -> int:
    """Write ``(n, documents, ngram)`` rows as ``n<TAB>documents<TAB>ngram`` lines under a
    header naming the normalisation and the rule; atomically. Returns the row count."""
    rows = sorted(rows, key=lambda r: (-r[0], -r[1], r[2]))
    tmp = Path(f"{path}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{ALLOWLIST_HEADER}\n# normalization: {norm.describe()}\n# rule: {rule}\n"
                "# n\treference documents\tn-gram\n")
        for n, documents, ngram in rows:
            f.write(f"{n}\t{documents}\t{ngram}\n")
    tmp.replace(path)
    return len(rows)


def read_allowlist(path: str, norm: Normalization) -> Dict[int, np.ndarray]:
    """The hashes of an allow-list's n-grams, per n. Lines: ``n<TAB>count<TAB>ngram``, or just
    an n-gram (its n is its word count); ``#`` starts a comment."""
    if not Path(path).is_file():
        raise DecontamError(f"--allowlist {path}: no such file")
    grams: Dict[int, List[str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if line.startswith("# normalization:"):
                written = line.split(":", 1)[1].strip()
                if written != norm.describe():
                    raise DecontamError(
                        f"{path}:{number}: written with normalization '{written}', this run "
                        f"uses '{norm.describe()}'; rebuild it with the same --keep-case/"
                        "--keep-punctuation")
            if not line.strip() or line.startswith("#"):
                continue
            ngram = line.split("\t")[-1]
            words = norm.words(ngram)
            if len(words) not in (LONG, SHORT):
                raise DecontamError(f"{path}:{number}: {len(words)} words; an allow-list "
                                    f"line holds a {LONG}-gram or a {SHORT}-gram")
            grams.setdefault(len(words), []).append(" ".join(words))
    out = {}
    for n, texts in grams.items():
        out[n] = np.unique(hash_texts(texts, (n,), norm).grams[n].hashes)
    return out


# --------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------


class NgramSet:
    """Distinct n-gram hashes (sorted) with, for each, the items holding it
    (``items[offsets[k]:offsets[k+1]]``), behind a bitmap of their top bits."""

    def __init__(self, hashes: np.ndarray, items: np.ndarray):
        order = np.lexsort((items, hashes))
        hashes, items = hashes[order], items[order]
        keep = np.ones(len(hashes), dtype=bool)
        keep[1:] = (hashes[1:] != hashes[:-1]) | (items[1:] != items[:-1])
        hashes, self.items = hashes[keep], items[keep].astype(np.int32)
        self.keys, first = np.unique(hashes, return_index=True)
        self.offsets = np.append(first, len(hashes)).astype(np.int64)
        # a bitmap of the top bits (about 1 in 32 set) turns most positions away; a directory
        # of buckets by top bits (about one key each) finds the rest without a binary search
        self.bits = min(32, max(16, math.ceil(math.log2(max(len(self.keys), 1) * 32))))
        self.shift = np.uint64(64 - self.bits)
        self.bitmap = np.zeros(1 << (self.bits - 3), dtype=np.uint8)
        top = self.keys >> self.shift
        np.bitwise_or.at(self.bitmap, (top >> np.uint64(3)).astype(np.int64),
                         (np.uint8(1) << (top & np.uint64(7)).astype(np.uint8)))
        bucket_bits = min(32, max(8, math.ceil(math.log2(max(len(self.keys), 1)))))
        self.bucket_shift = np.uint64(64 - bucket_bits)
        sizes = np.bincount((self.keys >> self.bucket_shift).astype(np.int64),
                            minlength=1 << bucket_bits)
        self.bucket_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.bucket_max = int(sizes.max()) if len(sizes) else 0

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, hashes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(positions, keys)``: which of ``hashes`` are in the set, and their key index."""
        top = hashes >> self.shift
        maybe = (self.bitmap[(top >> np.uint64(3)).astype(np.int64)]
                 >> (top & np.uint64(7)).astype(np.uint8)) & 1
        positions = np.flatnonzero(maybe)
        queries = hashes[positions]
        bucket = (queries >> self.bucket_shift).astype(np.int64)
        at, stop = self.bucket_start[bucket], self.bucket_start[bucket + 1]
        found_pos, found_key = [], []
        alive = np.arange(len(positions))
        for _ in range(self.bucket_max):
            alive = alive[at[alive] < stop[alive]]
            if not len(alive):
                break
            hit = self.keys[at[alive]] == queries[alive]
            found_pos.append(positions[alive[hit]])
            found_key.append(at[alive[hit]])
            alive = alive[~hit]
            at[alive] += 1
        if not found_pos:
            return positions[:0], positions[:0]
        positions, keys = np.concatenate(found_pos), np.concatenate(found_key)
        order = np.argsort(positions, kind="stable")
        return positions[order], keys[order]

    def first_item(self, keys: np.ndarray) -> np.ndarray:
        """The lowest-numbered item holding each key."""
        return self.items[self.offsets[keys]]

    def expand(self, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(which, items)``: every item holding ``keys[which[j]]``."""
        counts = self.offsets[keys + 1] - self.offsets[keys]
        which = np.repeat(np.arange(len(keys)), counts)
        starts = np.repeat(self.offsets[keys] - np.cumsum(counts) + counts, counts)
        return which, self.items[starts + np.arange(len(which))]


@dataclass
class Match:
    """What the classification found for one document."""

    category: str
    stage: Optional[str] = None  # "13gram" or "7gram"
    item: int = -1  # global item index
    ngram: Optional[str] = None
    ratio: float = 0.0
    overlap: int = 0
    doc_grams: int = 0
    item_grams: int = 0


class BenchmarkIndex:
    """The test items of every benchmark, hashed."""

    def __init__(self, benchmarks: Dict[str, Tuple[List[str], List[str]]], norm: Normalization,
                 allowlist: Optional[Dict[int, np.ndarray]] = None):
        self.norm = norm
        self.names = list(benchmarks)
        self.item_ids: List[str] = []
        bench_of, texts = [], []
        for b, (item_texts, ids) in enumerate(benchmarks.values()):
            texts += item_texts
            self.item_ids += ids
            bench_of += [b] * len(item_texts)
        self.item_bench = np.array(bench_of, dtype=np.int32)
        self.item_texts = texts
        allowlist = allowlist or {}
        hashes: Dict[int, List[np.ndarray]] = {LONG: [], SHORT: []}
        items: Dict[int, List[np.ndarray]] = {LONG: [], SHORT: []}
        self.allowed = {n: 0 for n in (LONG, SHORT)}
        for start, stop in batches(texts):
            batch = hash_texts(texts[start:stop], (LONG, SHORT), norm)
            for n in (LONG, SHORT):
                g = batch.grams[n]
                keep = ~np.isin(g.hashes, allowlist.get(n, np.empty(0, np.uint64)))
                self.allowed[n] += int((~keep).sum())
                hashes[n].append(g.hashes[keep])
                items[n].append(g.doc[keep] + start)
        self.sets = {n: NgramSet(np.concatenate(hashes[n]), np.concatenate(items[n]))
                     for n in (LONG, SHORT)}
        s = self.sets[SHORT]
        self.item_grams = np.bincount(s.items, minlength=len(texts)).astype(np.int64)

    @classmethod
    def from_files(cls, paths: Sequence[str], field: str, id_field: str, norm: Normalization,
                   allowlist: Optional[str] = None) -> "BenchmarkIndex":
        benchmarks: Dict[str, Tuple[List[str], List[str]]] = {}
        for path in paths:
            name = dataset_name(path)
            if name in benchmarks:
                raise DecontamError(f"--benchmark: two files named {name!r}; a benchmark is "
                                    "known by its file name, so rename one")
            benchmarks[name] = read_benchmark(path, field, id_field)
        allowed = read_allowlist(allowlist, norm) if allowlist else None
        return cls(benchmarks, norm, allowed)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def describe_item(self, item: int) -> Tuple[str, str]:
        return self.names[self.item_bench[item]], self.item_ids[item]

    def classify(self, batch: HashedBatch, thresholds: Thresholds) -> List[Match]:
        """Algorithm 1 for every document of ``batch``."""
        out = [Match("clean") for _ in range(batch.num_docs)]
        long_g = batch.grams[LONG]
        ls = self.sets[LONG]
        positions, keys = ls.find(long_g.hashes)
        # each contaminated document names the item sharing the most distinct 13-grams with it
        # (lowest index on ties: not template text many items share), and the first of them
        _, first = np.unique(long_g.doc[positions] * len(ls) + keys, return_index=True)
        first.sort()
        positions, keys = positions[first], keys[first]
        which, items = ls.expand(keys)
        hit_docs = long_g.doc[positions[which]]
        pair, inverse, shared = np.unique(hit_docs * self.num_items + items,
                                          return_inverse=True, return_counts=True)
        order = np.lexsort((pair % self.num_items, -shared, pair // self.num_items))
        best = order[np.unique(pair[order] // self.num_items, return_index=True)[1]]
        best_of_doc = np.full(batch.num_docs, -1, dtype=np.int64)
        best_of_doc[pair[best] // self.num_items] = pair[best]
        mine = np.flatnonzero(best_of_doc[hit_docs] == pair[inverse.ravel()])
        docs, at = np.unique(hit_docs[mine], return_index=True)  # rows are in text order
        for doc, row in zip(docs.tolist(), mine[at].tolist()):
            out[doc] = Match("contaminated", "13gram", int(items[row]),
                             ngram=batch.ngram_text(int(long_g.first[positions[which[row]]]),
                                                    LONG),
                             overlap=int(shared[inverse.ravel()[row]]))
        dirty = np.zeros(batch.num_docs, dtype=bool)
        dirty[docs] = True

        short = batch.grams[SHORT]
        s = self.sets[SHORT]
        positions, keys = s.find(short.hashes)
        hit_docs = short.doc[positions]
        keep = ~dirty[hit_docs]
        if not keep.any():
            return out
        pairs = np.unique(hit_docs[keep] * len(s) + keys[keep])  # distinct (doc, 7-gram)
        pair_docs, pair_keys = pairs // len(s), pairs % len(s)
        which, items = s.expand(pair_keys)
        doc_item, overlap = np.unique(pair_docs[which] * self.num_items + items,
                                      return_counts=True)
        docs, items = doc_item // self.num_items, doc_item % self.num_items
        doc_grams = self._distinct_grams(short, np.unique(docs), batch.num_docs)
        denominator = np.minimum(doc_grams[docs], self.item_grams[items])
        ratio = overlap / np.maximum(denominator, 1)
        order = np.lexsort((items, -ratio, docs))
        best = order[np.unique(docs[order], return_index=True)[1]]
        for j in best.tolist():
            r = float(ratio[j])
            out[int(docs[j])] = Match(thresholds.category(r), "7gram", int(items[j]), ratio=r,
                                      overlap=int(overlap[j]),
                                      doc_grams=int(doc_grams[docs[j]]),
                                      item_grams=int(self.item_grams[items[j]]))
        return out

    @staticmethod
    def _distinct_grams(grams, docs: np.ndarray, num_docs: int) -> np.ndarray:
        """Distinct n-grams of each of ``docs`` (others: 0), indexed by document."""
        wanted = np.zeros(num_docs, dtype=bool)
        wanted[docs] = True
        sel = wanted[grams.doc]
        d, h = grams.doc[sel], grams.hashes[sel]
        order = np.lexsort((h, d))
        d, h = d[order], h[order]
        new = np.ones(len(d), dtype=bool)
        new[1:] = (d[1:] != d[:-1]) | (h[1:] != h[:-1])
        return np.bincount(d[new], minlength=num_docs)
