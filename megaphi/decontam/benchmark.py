"""Decontamination throughput, against lm-evaluation-harness's 13-gram ``Janitor`` on the same
data in the same run.

The data: a generated corpus (English-like prose of Zipf-distributed words, 100 to 8,000
characters a document) and stand-ins for the 20 benchmarks Phi-4 was decontaminated against,
with their test sets' sizes and typical item lengths in words and a template per benchmark
(89,567 items). One document in 200 holds a whole test item, one in 200 the first half of one.

megaphi runs :func:`megaphi.decontam.run.decontaminate` (reading, JSON parsing, both stages,
writing the three outputs and the report) with one worker, then with ``--workers``; MB/s per core
is input megabytes over seconds over workers. The Janitor (its Python mode, the one its wheel
ships: the C++ ``janitor_util`` must be compiled by hand) registers every test item and runs
``clean_python`` on every document of the first ``--janitor-mb`` of the corpus, which megaphi
also decontaminates alone, for the side-by-side figure.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# name, test items, mean words per item, template (the words every item of it carries)
BENCHMARKS: Sequence[Tuple[str, int, int, str]] = (
    ("mmlu", 14042, 60, "The following is a multiple choice question. Answer with A, B, C or D."),
    ("mmlu_pro", 12032, 120, "Answer the question by choosing one of the ten options."),
    ("gpqa", 448, 150, "What is the correct answer to this question:"),
    ("math", 5000, 45, "Solve the problem and put the final answer in a box."),
    ("humaneval", 164, 90, "Complete the following Python function."),
    ("mbpp", 500, 30, "Write a python function to"),
    ("mgsm", 2750, 50, "Solve this math word problem step by step."),
    ("drop", 9536, 220, "Read the passage and answer the question."),
    ("simpleqa", 4326, 18, ""),
    ("arena_hard", 500, 120, ""),
    ("ifeval", 541, 40, "Your response should contain"),
    ("gsm8k", 1319, 46, ""),
    ("arc_challenge", 1172, 35, "Question:"),
    ("arc_easy", 2376, 30, "Question:"),
    ("hellaswag", 10042, 70, "Choose the most plausible continuation."),
    ("piqa", 1838, 35, "Goal: Which solution is better?"),
    ("openbookqa", 500, 25, "Question:"),
    ("winogrande", 1267, 22, "Fill in the blank with the right option."),
    ("triviaqa", 17944, 16, ""),
    ("boolq", 3270, 110, "Answer yes or no."),
)


class Vocabulary:
    """Words made of syllables, drawn with Zipf weights (function words the most common)."""

    def __init__(self, rng: random.Random, size: int = 30000):
        syllables = ["ta", "re", "mon", "ex", "pli", "ca", "tion", "st", "ro", "ing", "an",
                     "ver", "ble", "de", "sy", "ment", "qu", "al", "is", "ter", "o", "un",
                     "per", "form", "lo", "gi", "na", "ky"]
        common = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "with", "as",
                  "was", "on", "be", "by", "this", "are", "or", "from"]
        words = list(dict.fromkeys(common + ["".join(rng.choices(syllables,
                                                                 k=rng.randint(1, 4)))
                                             for _ in range(size)]))
        self.words = words
        weights = [1.0 / (rank + 2) for rank in range(len(words))]
        total, acc, self.cum = sum(weights), 0.0, []
        for w in weights:
            acc += w / total
            self.cum.append(acc)

    def sentence(self, rng: random.Random, n: int) -> str:
        words = rng.choices(self.words, cum_weights=self.cum, k=n)
        words[0] = words[0].capitalize()
        return " ".join(words) + rng.choice([".", ".", ".", "?", "!", ";", ","])

    def text(self, rng: random.Random, n_words: int) -> str:
        out, left = [], n_words
        while left > 0:
            n = min(left, rng.randint(5, 25))
            out.append(self.sentence(rng, n))
            left -= n
        return " ".join(out)


def make_benchmarks(directory: Path, vocab: Vocabulary, seed: int = 1,
                    scale: float = 1.0) -> List[Path]:
    """One JSON-lines file per benchmark, ``scale`` times its test set's size."""
    rng = random.Random(seed)
    paths = []
    for name, count, mean_words, template in BENCHMARKS:
        count = max(1, round(count * scale))
        path = directory / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i in range(count):
                n = max(4, int(rng.gauss(mean_words, mean_words / 3)))
                text = vocab.text(rng, n)
                if name in ("mmlu", "arc_challenge", "arc_easy", "openbookqa", "hellaswag"):
                    options = " ".join(f"{letter}. {vocab.sentence(rng, rng.randint(1, 6))}"
                                       for letter in "ABCD")
                    text = f"{text}\n{options}"
                if template:
                    text = f"{template} {text}"
                f.write(json.dumps({"id": f"{name}-{i}", "text": text}) + "\n")
        paths.append(path)
    return paths


def make_corpus(path: Path, target_bytes: int, vocab: Vocabulary, benchmark_paths: List[Path],
                seed: int = 2) -> Dict[str, int]:
    """Write about ``target_bytes`` of documents; returns how many of each kind."""
    rng = random.Random(seed)
    items = []
    for bench in benchmark_paths:
        with open(bench, encoding="utf-8") as f:
            items += [json.loads(line)["text"] for line in f]
    kinds = {"plain": 0, "whole item": 0, "half item": 0}
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            text = vocab.text(rng, max(20, int(rng.expovariate(1 / 400))) % 1400 + 20)
            roll = rng.random()
            if roll < 0.005:
                item = rng.choice(items)
                text, kind = f"{text} {item} {vocab.text(rng, 50)}", "whole item"
            elif roll < 0.01:
                words = rng.choice(items).split()
                text, kind = f"{' '.join(words[:len(words) // 2])} {text}", "half item"
            else:
                kind = "plain"
            kinds[kind] += 1
            line = json.dumps({"id": f"doc-{sum(kinds.values())}", "text": text}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    return kinds


def head(src: Path, dst: Path, n_bytes: int) -> None:
    """The first whole lines of ``src`` up to ``n_bytes``."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        written = 0
        for line in f:
            if written >= n_bytes:
                break
            g.write(line)
            written += len(line)


def load_janitor(path: Optional[str]):
    """lm-evaluation-harness's ``janitor`` module, loaded from its file so that importing the
    ``lm_eval`` package (and its dependencies) is not needed."""
    if path is None:
        spec = importlib.util.find_spec("lm_eval")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = str(Path(list(spec.submodule_search_locations)[0]) / "decontamination"
                   / "janitor.py")
    spec = importlib.util.spec_from_file_location("lm_eval_janitor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_janitor(janitor_module, benchmark_paths: List[Path], corpus: Path) -> Dict[str, float]:
    # minimum_slice_length=0: clean_python then returns [text] exactly when no 13-gram matched
    # (by default it also returns [] for any document under 200 characters)
    janitor = janitor_module.Janitor(ngram_n=13, minimum_slice_length=0)
    start = time.perf_counter()
    for bench in benchmark_paths:
        with open(bench, encoding="utf-8") as f:
            for line in f:
                janitor.register_contaminant_python(json.loads(line)["text"])
    register = time.perf_counter() - start
    flagged: List[str] = []
    start = time.perf_counter()
    n_bytes = 0
    with open(corpus, "rb") as f:
        for line in f:
            n_bytes += len(line)
            record = json.loads(line)
            if janitor.clean_python(record["text"]) != [record["text"]]:
                flagged.append(record["id"])
    secs = time.perf_counter() - start
    return {"register_s": register, "seconds": secs, "mb_s": n_bytes / 1e6 / secs,
            "flagged": flagged}


def time_megaphi(benchmark_paths: List[Path], corpus: Path, out: Path, workers: int,
                 part_mb: int = 16) -> Dict[str, float]:
    from megaphi.decontam.index import BenchmarkIndex
    from megaphi.decontam.ngrams import Normalization
    from megaphi.decontam.run import Settings, decontaminate

    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
    settings = Settings(inputs=[str(corpus)], benchmarks=[str(p) for p in benchmark_paths],
                        part_bytes=part_mb << 20)
    start = time.perf_counter()
    index = BenchmarkIndex.from_files(settings.benchmarks, "text", "id", Normalization())
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    report = decontaminate(settings, str(out), workers=workers, progress=False, index=index)
    secs = time.perf_counter() - start
    n_bytes = corpus.stat().st_size
    flagged13 = []
    with open(out / "contaminated.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["decontamination"]["stage"] == "13gram":
                flagged13.append(record["id"])
    return {"index_s": index_s, "seconds": secs, "mb_s": n_bytes / 1e6 / secs,
            "mb_s_per_core": n_bytes / 1e6 / secs / workers, "totals": report["totals"],
            "flagged13": flagged13}
