#!/usr/bin/env python
"""Decontamination throughput: megaphi against lm-evaluation-harness's 13-gram Janitor on the
same generated corpus and 20 benchmark stand-ins (megaphi/decontam/benchmark.py).

The Janitor is not a dependency; for its column install it anywhere and name the file:
    pip install --no-deps --target /tmp/lmeval lm-eval
    python tools/benchmark_decontam.py --janitor /tmp/lmeval/lm_eval/decontamination/janitor.py
Goals: megaphi >= 20 MB/s per core and >= 3x the Janitor.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus-mb", type=float, default=100.0)
    p.add_argument("--janitor-mb", type=float, default=10.0,
                   help="the side-by-side runs on this first part of the corpus")
    p.add_argument("--items-scale", type=float, default=1.0,
                   help="benchmark sizes as a fraction of the real test sets' (default 1)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--janitor", metavar="janitor.py",
                   help="lm-evaluation-harness's lm_eval/decontamination/janitor.py (default: "
                        "the installed lm_eval's, if any)")
    p.add_argument("--workdir", help="keep the generated data here (default: a temporary dir)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaphi.decontam import benchmark as B

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        vocab = B.Vocabulary(__import__("random").Random(0))
        benches = B.make_benchmarks(work, vocab, scale=args.items_scale)
        corpus = work / "corpus.jsonl"
        kinds = B.make_corpus(corpus, int(args.corpus_mb * 1e6), vocab, benches)
        small = work / "corpus_head.jsonl"
        B.head(corpus, small, int(args.janitor_mb * 1e6))
        print(f"data: {corpus.stat().st_size / 1e6:.1f} MB corpus ({sum(kinds.values())} docs: "
              f"{kinds['whole item']} with a whole test item, {kinds['half item']} with half "
              f"of one), {sum(1 for b in benches for _ in open(b))} test items in "
              f"{len(B.BENCHMARKS)} benchmarks; generated in {time.perf_counter() - start:.0f} s")

        rows = []
        one = B.time_megaphi(benches, corpus, work / "out1", workers=1)
        rows.append(("megaphi, 1 worker", corpus, one))
        if args.workers > 1:
            many = B.time_megaphi(benches, corpus, work / "outN", workers=args.workers)
            rows.append((f"megaphi, {args.workers} workers", corpus, many))
        head = B.time_megaphi(benches, small, work / "out_head", workers=1)
        rows.append(("megaphi, 1 worker (head)", small, head))
        janitor_module = B.load_janitor(args.janitor)
        jan = None
        if janitor_module is not None:
            jan = B.time_janitor(janitor_module, benches, small)

        print(f"\n{'run':<30} {'MB':>7} {'seconds':>8} {'MB/s':>7} {'MB/s/core':>10}")
        for name, path, r in rows:
            print(f"{name:<30} {path.stat().st_size / 1e6:>7.1f} {r['seconds']:>8.2f} "
                  f"{r['mb_s']:>7.1f} {r['mb_s_per_core']:>10.1f}")
        print(f"(megaphi's index of the 20 benchmarks: {one['index_s']:.1f} s, not in the "
              "seconds above)")
        t = one["totals"]
        print(f"megaphi categories: {t['clean']} clean, {t['partial']} partial, "
              f"{t['contaminated']} contaminated")
        if jan is None:
            print("\nJanitor: lm_eval not found (see --help); no side-by-side figure")
            return 0
        print(f"{'Janitor (python), 1 core':<30} {small.stat().st_size / 1e6:>7.1f} "
              f"{jan['seconds']:>8.2f} {jan['mb_s']:>7.1f} {jan['mb_s']:>10.1f}")
        print(f"(Janitor's registration of the 20 benchmarks: {jan['register_s']:.1f} s)")
        ours, theirs = set(head["flagged13"]), set(jan["flagged"])
        print(f"\nspeed-up on the same {small.stat().st_size / 1e6:.1f} MB, one core each: "
              f"{head['mb_s'] / jan['mb_s']:.1f}x")
        print(f"13-gram detections: megaphi {len(ours)}, Janitor {len(theirs)}, both "
              f"{len(ours & theirs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
