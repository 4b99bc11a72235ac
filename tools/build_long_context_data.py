"""Build mid-training's long-context data: the long documents of existing indexed datasets.

A thin command line over :mod:`megaphi.data.long_context`; run with ``--help`` for the details.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

PROG = "build_long_context_data"

DESCRIPTION = """\
Select the documents longer than --min-tokens (default 8,192; the end-of-document token is not
counted) from indexed datasets made by tools/preprocess_data.py, into new datasets
OUTPUT_DIR/<name>.{bin,idx,meta.json} with the same tokenizer. Documents of at least
--upweight-min-tokens (default 16,384) can be written --upweight-factor times (Phi-4 up-weights
them; the factor is unstated in its report). Prints documents and tokens kept per source.

Inputs are dataset prefixes (--input), or the sources of a mixture file (--mixture, optionally
only --sources a,b): Phi-4 takes its long documents from the non-synthetic sources. Outputs are
written atomically (temp names, meta.json last)."""

EPILOG = """\
examples:
  %(prog)s --input data/web data/books --output-dir data/long
  %(prog)s --mixture examples/phi4_pretrain_mixture.yaml --sources web,code,acquired \\
      --output-dir examples/data/long --upweight-factor 2

exit status: 0 on success, 2 on bad arguments or input (one 'error:' line)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PREFIX",
                        help="indexed datasets (without .bin/.idx); each is its own source")
    source.add_argument("--mixture", metavar="FILE.yaml",
                        help="take the datasets of this mixture's sources")
    parser.add_argument("--split", default="train", help="mixture split (default: train)")
    parser.add_argument("--sources", metavar="A,B",
                        help="with --mixture: only these sources (default: all)")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="where the selected datasets are written")
    parser.add_argument("--min-tokens", type=int, default=8192, metavar="N",
                        help="keep documents longer than N tokens (default: 8192)")
    parser.add_argument("--upweight-min-tokens", type=int, default=16384, metavar="N",
                        help="documents of at least N tokens are up-weighted (default: 16384)")
    parser.add_argument("--upweight-factor", type=int, default=1, metavar="K",
                        help="write those documents K times (default: 1, no up-weighting)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def plan(args) -> list:
    """``(source, input_prefix, output_prefix)`` for every dataset, checked before any work."""
    from megaphi.data.mixture import load_mixture
    from megaphi.data.preprocess import PreprocessError, read_meta

    if args.input:
        inputs = [(os.path.basename(p.removesuffix(".bin").removesuffix(".idx")),
                   p.removesuffix(".bin").removesuffix(".idx")) for p in args.input]
    else:
        mixture = load_mixture(args.mixture)
        sources = {s.name: s for s in mixture.sources(args.split)}
        wanted = args.sources.split(",") if args.sources else list(sources)
        unknown = [name for name in wanted if name not in sources]
        if unknown:
            raise PreprocessError(f"--sources: {unknown} not in the {args.split} split of "
                                  f"{args.mixture}; it has {list(sources)}")
        inputs = [(name, ref.prefix) for name in wanted for ref in sources[name].datasets]
    jobs, names = [], set()
    for source, prefix in inputs:
        read_meta(prefix)  # a complete dataset, made by preprocessing
        name = os.path.basename(prefix)
        if name in names:
            raise PreprocessError(f"two inputs are named '{name}' ({prefix}); outputs would "
                                  "collide: select them in separate runs or rename one")
        names.add(name)
        jobs.append((source, prefix, str(Path(args.output_dir) / name)))
    return jobs


def report(results) -> str:
    header = (f"{'source':<16} {'dataset':<22} {'docs':>8} {'kept':>7} {'up-wt':>6} "
              f"{'tokens':>14} {'kept tokens':>14} {'written':>14} {'kept %':>7}")
    lines = [header, "-" * len(header)]
    for r in results:
        share = 100.0 * r.kept_tokens / r.tokens if r.tokens else 0.0
        lines.append(f"{r.source:<16} {os.path.basename(r.input_prefix):<22} {r.documents:>8,} "
                     f"{r.kept_documents:>7,} {r.upweighted_documents:>6,} {r.tokens:>14,} "
                     f"{r.kept_tokens:>14,} {r.written_tokens:>14,} {share:>6.1f}%")
    lines.append(f"total: {sum(r.kept_documents for r in results):,} documents kept, "
                 f"{sum(r.written_tokens for r in results):,} tokens written")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from megaphi.platform import prepare_megatron_import

    prepare_megatron_import()  # before Megatron-Core is imported: quiet, compiler deferred
    from megaphi.data.long_context import check_selection, select_long_documents
    from megaphi.data.mixture import MixtureError
    from megaphi.data.preprocess import PreprocessError

    try:
        check_selection(args.min_tokens, args.upweight_min_tokens, args.upweight_factor)
        jobs = plan(args)
        results = [select_long_documents(
            prefix, out, source=source, min_tokens=args.min_tokens,
            upweight_min_tokens=args.upweight_min_tokens, upweight_factor=args.upweight_factor,
            progress=not args.quiet) for source, prefix, out in jobs]
    except (PreprocessError, MixtureError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
