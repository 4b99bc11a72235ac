#!/usr/bin/env python
"""Decontaminate training data against benchmark test sets with the Phi-4 hybrid 13-gram /
7-gram algorithm (report App. B.1); see megaphi/decontam/ and --help."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaphi.decontam.index import DecontamError, Thresholds  # noqa: E402
from megaphi.decontam.ngrams import Normalization  # noqa: E402

PROG = "decontaminate"

DESCRIPTION = """\
Phi-4's decontamination (report App. B.1, Algorithm 1). A document sharing any 13-gram with a
test item is contaminated, unless the 13-gram is on the allow-list; otherwise its 7-gram ratio
(shared distinct 7-grams over the smaller of the document's and the item's 7-gram counts,
maximised over test items) makes it contaminated at --contaminated-7gram-threshold or above,
partial at --info-7gram-threshold or above, else clean. The 7-gram stage catches items too
short for a 13-gram. Allow-listed 7-grams are never counted.

Normalisation (the report does not say): lowercase, and every character that is not a letter
or digit separates words, so case, punctuation, markdown and spacing changes still match while
the words and numbers must. --keep-case and --keep-punctuation turn each part off.

Benchmarks are local JSON-lines files, one test item per line (the item's text in
--benchmark-field, its id in --benchmark-id-field, else its line number); a benchmark is named
by its file name. Nothing is downloaded."""

EPILOG = """\
examples:
  python tools/decontaminate.py allowlist --benchmark bench/*.jsonl --reference wiki.jsonl train/*.jsonl.gz \\
      --output allow.tsv
  python tools/decontaminate.py run --benchmark bench/*.jsonl --input train/*.jsonl.gz --output-dir decon \\
      --allowlist allow.tsv
then: python tools/preprocess_data.py --input decon/clean.jsonl.gz ...

outputs (run): DIR/clean.jsonl, DIR/partial.jsonl, DIR/contaminated.jsonl (.gz when the input
is), every input record once with its fields and a "decontamination" object (category, stage,
benchmark, item, and the 13-gram or the 7-gram ratio); DIR/report.json per benchmark and per
input file, with a histogram of the 7-gram ratios to tune the thresholds by. A killed run
resumes where it stopped: rerun the same command.

scale: --workers processes per node over parts of the input (--part-size MB of an uncompressed
file, or a whole .gz file). Over a SLURM array, --shard-index/--num-shards default to
SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT: each task does every N-th part and leaves
DIR/shards/shard-I-of-N.done; the last task to finish merges (examples/launch/
decontaminate_array.sbatch). Any layout writes the same outputs.

exit status: 0 when done (or this shard done), 2 on bad arguments or input."""


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", nargs="+", required=True, metavar="B.jsonl",
                   help="benchmark test sets (.jsonl or .jsonl.gz)")
    p.add_argument("--benchmark-field", default="text", metavar="FIELD",
                   help="the field holding an item's text (default text)")
    p.add_argument("--text-field", default="text", metavar="FIELD",
                   help="the field holding a document's text (default text)")
    p.add_argument("--keep-case", action="store_true", help="do not lowercase")
    p.add_argument("--keep-punctuation", action="store_true",
                   help="words are runs of non-whitespace, punctuation included")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: one per CPU)")
    p.add_argument("--part-size", type=float, default=64, metavar="MB",
                   help="bytes of an uncompressed input per part (default 64 MB)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) lines that are not JSON objects with the text field, "
                        "instead of stopping at the first")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    allow = sub.add_parser(
        "allowlist", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write the benchmark n-grams common in reference corpora",
        description="Write the benchmark 13-grams and 7-grams that at least --min-documents "
                    "documents of the reference corpora (a Wikipedia sample and the training "
                    "set, per the report) hold: phrases that common are language or template "
                    "boilerplate, not a test item. One line each: n, reference documents, the "
                    "n-gram; edit it freely.")
    add_common(allow)
    allow.add_argument("--reference", nargs="+", required=True, metavar="R.jsonl")
    allow.add_argument("--output", required=True, metavar="ALLOW.tsv")
    allow.add_argument("--min-documents", type=int, default=10, metavar="K",
                       help="the document-frequency rule: allow an n-gram held by at least K "
                            "reference documents (default 10, GPT-3's cut for its 13-grams)")
    run = sub.add_parser("run", help="decontaminate a corpus", description=DESCRIPTION,
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(run)
    run.add_argument("--input", nargs="+", required=True, metavar="TRAIN.jsonl[.gz]")
    run.add_argument("--output-dir", required=True, metavar="DIR")
    run.add_argument("--allowlist", metavar="ALLOW.tsv")
    run.add_argument("--benchmark-id-field", default="id", metavar="FIELD",
                     help="the field holding an item's id (default id; else its line number)")
    defaults = Thresholds()
    run.add_argument("--info-7gram-threshold", type=float, default=defaults.info_7gram,
                     metavar="R", help=f"partial at this 7-gram ratio or above (default "
                                       f"{defaults.info_7gram})")
    run.add_argument("--contaminated-7gram-threshold", type=float,
                     default=defaults.contaminated_7gram, metavar="R",
                     help=f"contaminated at this 7-gram ratio or above (default "
                          f"{defaults.contaminated_7gram})")
    run.add_argument("--shard-index", type=int,
                     default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)))
    run.add_argument("--num-shards", type=int,
                     default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
    run.add_argument("--gzip-level", type=int, default=1, choices=range(1, 10), metavar="1-9",
                     help="compression of .gz outputs (default 1: on 100 MB of text, level 6 "
                          "made the whole run 2.4x slower)")
    run.add_argument("--no-merge", action="store_true",
                     help="leave the outputs per part in DIR/parts (no copy into one file)")
    return p


def print_report(report: dict, out_dir: str) -> None:
    t = report["totals"]
    print(f"{out_dir}: {t['clean']} clean, {t['partial']} partial, {t['contaminated']} "
          f"contaminated" + (f", {t['skipped']} bad lines skipped" if t["skipped"] else ""))
    print(f"\n{'input':<40} {'MB':>8} {'clean':>9} {'partial':>8} {'contam.':>8}")
    for path, row in report["per_input"].items():
        print(f"{path[-40:]:<40} {row['bytes'] / 1e6:>8.1f} {row['clean']:>9} "
              f"{row['partial']:>8} {row['contaminated']:>8}")
    print(f"\n{'benchmark':<24} {'items':>7} {'docs contam.':>13} {'items hit':>10} "
          f"{'docs partial':>13} {'items hit':>10}")
    for name, b in report["per_benchmark"].items():
        print(f"{name[:24]:<24} {b['items']:>7} {b['docs_contaminated']:>13} "
              f"{b['items_contaminated']:>10} {b['docs_partial']:>13} {b['items_partial']:>10}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megaphi").setLevel(args.log_level)
    from megaphi.decontam import run as decon

    norm = Normalization(keep_case=args.keep_case, keep_punctuation=args.keep_punctuation)
    if args.part_size * (1 << 20) < 1:
        print(f"{PROG}: error: --part-size {args.part_size}: must be positive (MB)",
              file=sys.stderr)
        return 2
    try:
        if args.command == "allowlist":
            counts = decon.build_allowlist(
                args.benchmark, args.reference, args.output, args.min_documents,
                args.benchmark_field, args.text_field, norm, args.workers,
                int(args.part_size * (1 << 20)), args.skip_bad_lines, not args.no_progress)
            print(f"{args.output}: {counts['13-grams']} of {counts['benchmark 13-grams']} "
                  f"benchmark 13-grams and {counts['7-grams']} of {counts['benchmark 7-grams']} "
                  f"7-grams are held by {args.min_documents} or more reference documents")
            return 0
        settings = decon.Settings(
            inputs=list(args.input), benchmarks=list(args.benchmark),
            text_field=args.text_field, benchmark_field=args.benchmark_field,
            benchmark_id_field=args.benchmark_id_field, allowlist=args.allowlist,
            thresholds=Thresholds(args.info_7gram_threshold, args.contaminated_7gram_threshold),
            normalization=norm, part_bytes=int(args.part_size * (1 << 20)),
            skip_bad_lines=args.skip_bad_lines, gzip_level=args.gzip_level)
        report = decon.decontaminate(settings, args.output_dir, args.workers, args.shard_index,
                                     args.num_shards, not args.no_merge, not args.no_progress)
    except DecontamError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if report is not None:
        print_report(report, args.output_dir)
    elif args.no_merge:
        print(f"{args.output_dir}: shard {args.shard_index} of {args.num_shards} done; the "
              "outputs are per part in parts/")
    else:
        print(f"{args.output_dir}: shard {args.shard_index} of {args.num_shards} done; the "
              "last shard to finish merges")
    return 0


if __name__ == "__main__":
    sys.exit(main())
