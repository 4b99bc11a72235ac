"""Preprocessing throughput against the raw tokenizer's, on the same text and the same cores.

End to end: :func:`megaphi.data.preprocess.preprocess` on a JSON-lines file (reading, JSON
parsing, tokenising in worker processes, writing .bin/.idx/.meta.json). Raw: the Phi-4 tokenizer's
own batch encoding (tiktoken, ``num_threads`` = the same number of workers) on texts already in
memory. Both count text tokens only (not the appended end-of-document ids); they take turns for
``--trials`` rounds and the best time of each counts, so load from elsewhere on the machine skews
them alike. The design target is preprocessing >= 90% of the raw tokenizer.

    python tools/benchmark_preprocess.py                    # examples/data/sample/*.jsonl
    python tools/benchmark_preprocess.py --input a.jsonl --workers 2 --repeat 20
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_GLOB = str(REPO / "examples" / "data" / "sample" / "*.jsonl")
TARGET_BYTES = 48 << 20  # default --repeat: enough text for a few seconds of work


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", metavar="FILE",
                        help=f"JSON-lines files (default: {SAMPLE_GLOB} if any, else generated "
                             "text)")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes / tokenizer threads (default: one per CPU)")
    parser.add_argument("--repeat", type=int, default=None, metavar="K",
                        help="repeat the corpus K times (default: enough for "
                             f"~{TARGET_BYTES >> 20} MiB)")
    parser.add_argument("--trials", type=int, default=5,
                        help="rounds of both, taking turns; the best time of each counts")
    return parser.parse_args(argv)


def generated_texts(n_docs: int = 2000, seed: int = 0):
    """English-like prose with some code and non-ASCII, documents of 100 to 8,000 characters."""
    rng = random.Random(seed)
    syllables = ["ta", "re", "mon", "ex", "pli", "ca", "tion", "st", "ro", "ing", "an", "ver",
                 "ble", "de", "sy", "ment", "qu", "al", "is", "ter", "o", "un", "per", "form"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(5000)]
    words += ["the", "of", "and", "to", "in", "is", "that", "for", "with", "as"] * 300
    extras = ["café", "naïve", "Straße", "日本語", "данные", "λόγος", "😀", "x = f(y) + 1;",
              "def f(a, b):", "2024-05-17", "3.14159", "https://example.org/a?b=c"]
    texts = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(1, 80)):
            sentence = rng.choices(words, k=rng.randint(4, 24))
            if rng.random() < 0.2:
                sentence.insert(rng.randrange(len(sentence)), rng.choice(extras))
            sentences.append(" ".join(sentence).capitalize() + rng.choice(".!?."))
        texts.append(" ".join(sentences) + ("\n\n" if rng.random() < 0.5 else ""))
    return texts


def load_texts(paths, key):
    from megaphi.data.preprocess import open_jsonl

    texts = []
    for path in paths:
        with open_jsonl(path) as f:
            for line in f:
                if line.strip():
                    texts.append(json.loads(line)[key])
    return texts


def shown(path) -> str:
    """``path`` relative to the repository when inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def best_times(trials, **fns):
    """The best wall time of each function over ``trials`` rounds; the functions take turns in
    every round, so a burst of load from elsewhere on the machine hits them alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(trials):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed")
    from megaphi.data.preprocess import default_workers, preprocess, read_meta
    from megaphi.data.tokenizer import Phi4Tokenizer
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import once, outside the timing)

    workers = args.workers or default_workers()
    paths = args.input or sorted(glob.glob(SAMPLE_GLOB))
    texts = load_texts(paths, args.json_key) if paths else generated_texts()
    source = ", ".join(shown(p) for p in paths) if paths else "generated text"
    corpus_bytes = sum(len(t.encode()) for t in texts)
    repeat = args.repeat or max(1, -(-TARGET_BYTES // max(corpus_bytes, 1)))
    texts = texts * repeat
    tokenizer = Phi4Tokenizer()

    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "corpus.jsonl"
        with open(jsonl, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({args.json_key: text}) + "\n")
        print(f"corpus: {source} x {repeat} = {len(texts):,} documents, "
              f"{jsonl.stat().st_size / 2**20:.1f} MiB of JSON lines; {workers} worker(s) on "
              f"{default_workers()} CPU(s)", flush=True)

        tokenizer.tokenize_batch(texts[:100], num_threads=workers)  # warm up
        n_text_tokens = sum(map(len, tokenizer.tokenize_batch(texts, num_threads=workers)))
        prefix = Path(tmp) / "out" / "corpus"
        best = best_times(
            args.trials,
            raw=lambda: tokenizer.tokenize_batch(texts, num_threads=workers),
            preprocess=lambda: preprocess([jsonl], prefix, tokenizer, json_key=args.json_key,
                                          workers=workers))
        raw_s, pre_s = best["raw"], best["preprocess"]
        meta = read_meta(prefix)
        assert meta["tokens"] - meta["documents"] == n_text_tokens, "token counts differ"

    raw_rate, pre_rate = n_text_tokens / raw_s, n_text_tokens / pre_s
    print(f"\n{'':<40}{'seconds':>10}{'tokens':>14}{'tok/s':>14}")
    print(f"{f'raw tokenizer (tiktoken, {workers} threads)':<40}{raw_s:>10.2f}"
          f"{n_text_tokens:>14,}{raw_rate:>14,.0f}")
    print(f"{f'preprocess end-to-end ({workers} workers)':<40}{pre_s:>10.2f}"
          f"{n_text_tokens:>14,}{pre_rate:>14,.0f}")
    ratio = pre_rate / raw_rate
    print(f"\npreprocess {pre_rate:,.0f} tok/s vs raw tokenizer {raw_rate:,.0f} tok/s = "
          f"{100 * ratio:.1f}% (target >= 90%: {'met' if ratio >= 0.9 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
