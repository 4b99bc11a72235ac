"""Tokenise JSON-lines corpora into Megatron-Core indexed datasets, or merge such datasets.

A thin command line over :mod:`megaphi.data.preprocess`; run with ``--help`` for the details.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

PROG = "preprocess_data"
FORMATS = ("text", "chat", "preference")  # preprocess.KINDS (not imported: fast --help)

DESCRIPTION = """\
Tokenise JSON-lines files (plain or gzip) into a Megatron-Core indexed dataset:
PREFIX.bin and PREFIX.idx (read them with megatron.core.datasets.indexed_dataset.IndexedDataset)
plus PREFIX.meta.json, which records the kind of data, the tokenizer's fingerprint, the document
and token counts and the inputs. Each non-blank line is one JSON object and becomes one document,
followed by the tokenizer's end-of-document token:

  --format text (default)  the string under --json-key, tokenised as plain text (special-token
                           strings are not interpreted); pre-training data.
  --format chat            a conversation for SFT, {"messages": [{"role": "system"|"user"|
                           "assistant", "content": "..."}, ...]} with at least one assistant
                           message ("id" and other fields are ignored), rendered in Phi-4's chat
                           format: <|im_start|>ROLE<|im_sep|>CONTENT<|im_end|> per message, content
                           as plain text. The loss mask (assistant content and its <|im_end|>) is
                           recovered from the ids at training time; the meta records the number
                           of assistant tokens.
  --format preference      a DPO pair, either full-length {"prompt": [messages ending with a user
                           turn], "chosen": "...", "rejected": "..."} (chosen/rejected may be
                           [{"role": "assistant", "content": "..."}], TRL's form) or a token pair
                           from Pivotal Token Search {"prompt": [...], "prefix_ids": [ids],
                           "chosen_token_id": id, "rejected_token_id": id} (ids are kept as
                           they are, never re-tokenised; each must be in the vocabulary). One
                           document per pair, no end-of-document token: 3 sequences (prompt +
                           assistant header, chosen, rejected; a response is its content and
                           <|im_end|>) or 2 (prompt + header + prefix_ids, [chosen, rejected]).
                           Other fields ("id", "source", ...) go to PREFIX.extra.jsonl, one JSON
                           object per pair. Read with megaphi.data.preference.PreferencePairs.

Workers tokenise chunks of lines in parallel; the output does not depend on their number. Files
are written under .tmp names and renamed on success, PREFIX.meta.json last, so a failed or
interrupted run leaves no complete-looking dataset and does not touch an earlier one."""

EPILOG = """\
examples:
  %(prog)s --input data/web.jsonl.gz data/books.jsonl --output-prefix out/pretrain
  %(prog)s --input posts.jsonl --json-key content --skip-bad-lines --output-prefix out/posts
  %(prog)s --format chat --input examples/data/chat/faq_train.jsonl --output-prefix out/sft
  %(prog)s --format preference --input pairs.jsonl --output-prefix out/dpo
  %(prog)s --merge out/part0 out/part1 --output-prefix out/all
  %(prog)s --adopt megatron/web_text_document megatron/code_text_document --tokenizer phi4

adopting: a dataset written by Megatron-LM's tools/preprocess_data.py (or any
IndexedDatasetBuilder) trains once it has a PREFIX.meta.json. --adopt checks, per prefix: that
Megatron-Core's IndexedDataset reads it and the .bin matches the .idx; an integer dtype wide
enough for the tokenizer; every id inside the vocabulary (else the document is named); every
document ending with the end-of-document id (else refused, unless --allow-missing-eod); and
that sampled documents decode and re-encode to the same ids (at least --min-roundtrip of them:
ids from another tokenizer do not). It then writes PREFIX.meta.json marked "adopted", and
nothing at all when a check fails. Text (pre-training) datasets only.

exit status: 0 on success, 2 on bad arguments or input (one 'error:' line), 1 on a
system error (disk full, permissions), 130 if interrupted."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE",
                        help="JSON-lines files to tokenise, in order (.gz or gzip content is "
                             "decompressed)")
    source.add_argument("--merge", nargs="+", metavar="PREFIX",
                        help="instead of tokenising, concatenate these datasets in order; their "
                             "tokenizer fingerprints must match")
    source.add_argument("--adopt", nargs="+", metavar="PREFIX",
                        help="instead of tokenising, check indexed datasets another tool wrote "
                             "(Megatron-LM's tools/preprocess_data.py: PREFIX_text_document) "
                             "against --tokenizer and write the PREFIX.meta.json training needs "
                             "(see 'adopting' below); the .bin and .idx are only read")
    parser.add_argument("--output-prefix", metavar="PREFIX",
                        help="write PREFIX.bin, PREFIX.idx and PREFIX.meta.json (the directory "
                             "is created if missing); with --input or --merge")
    tokenise = parser.add_argument_group("tokenising (with --input)")
    tokenise.add_argument("--format", default=None, choices=FORMATS,
                          help="what each line holds: a document's text, a conversation or a "
                               "preference pair (see above; default: text)")
    tokenise.add_argument("--json-key", default=None, metavar="KEY",
                          help="key of the text in each JSON object (--format text only; "
                               "default: text)")
    tokenise.add_argument("--tokenizer", default=None, metavar="phi4|HF_DIR",
                          help="'phi4' (offline cl100k_base with Phi-4's special tokens) or a "
                               "Hugging Face tokenizer directory (default: phi4)")
    tokenise.add_argument("--workers", type=int, default=None, metavar="N",
                          help="tokenising processes (default: one per CPU)")
    tokenise.add_argument("--skip-bad-lines", action="store_true",
                          help="skip and count bad lines (text: not a JSON object with a string "
                               "under --json-key; chat: not a valid conversation; preference: "
                               "not a valid pair) instead of stopping at the first one")
    adopting = parser.add_argument_group("adopting (with --adopt; also --tokenizer)")
    adopting.add_argument("--allow-missing-eod", action="store_true",
                          help="adopt datasets whose documents do not end with the tokenizer's "
                               "end-of-document id (Megatron-LM without --append-eod); training "
                               "then runs documents together")
    adopting.add_argument("--min-roundtrip", type=float, default=None, metavar="F",
                          help="refuse a dataset when fewer than this fraction of sampled "
                               "documents decode and re-encode to the same ids (default 0.9)")
    adopting.add_argument("--roundtrip-samples", type=int, default=None, metavar="N",
                          help="documents sampled for the round trip (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def fail(message: str, code: int = 2) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def given_flags(args, *names: str) -> list:
    """The command-line flags among ``names`` that were given (not left at None/False)."""
    return ["--" + name.replace("_", "-") for name in names
            if getattr(args, name) not in (None, False)]


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    # a kill (SIGTERM) cleans up like Ctrl-C: temporary files removed, earlier outputs kept
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from megaphi.platform import prepare_megatron_import

    prepare_megatron_import()  # before Megatron-Core is imported: quiet, compiler deferred

    from megaphi.data.preprocess import PreprocessError, merge, preprocess
    from megaphi.data.tokenizer import load_tokenizer

    adopt_flags = given_flags(args, "allow_missing_eod", "min_roundtrip", "roundtrip_samples")
    if args.adopt:
        given = given_flags(args, "output_prefix", "format", "json_key", "workers",
                            "skip_bad_lines")
        if given:
            fail(f"{', '.join(given)} do not apply with --adopt, which writes only "
                 "PREFIX.meta.json beside each dataset")
        adopt_datasets(args)
        return
    if adopt_flags:
        fail(f"{', '.join(adopt_flags)} only apply with --adopt")
    if not args.output_prefix:
        fail("--output-prefix is required with --input and --merge")
    try:
        if args.merge:
            given = given_flags(args, "format", "json_key", "tokenizer", "workers",
                                "skip_bad_lines")
            if given:
                fail(f"{', '.join(given)} only apply with --input; --merge keeps each dataset's "
                     "tokens as they are")
            result = merge(args.merge, args.output_prefix, progress=not args.no_progress)
        else:
            if args.format not in (None, "text") and args.json_key is not None:
                fail(f"--json-key applies to --format text only; --format {args.format} reads "
                     "each line whole: drop --json-key")
            try:
                tokenizer = load_tokenizer(args.tokenizer or "phi4")
            except ValueError as e:  # the message names data.tokenizer; the flag is --tokenizer
                fail(str(e).replace("data.tokenizer=", "--tokenizer "))
            result = preprocess(args.input, args.output_prefix, tokenizer,
                                format=args.format or "text", json_key=args.json_key,
                                workers=args.workers,
                                skip_bad_lines=args.skip_bad_lines,
                                progress=not args.no_progress)
    except PreprocessError as e:
        fail(str(e))
    except OSError as e:  # the disk, not the input: no traceback, but not status 2 either
        fail(f"{e}; nothing written to {args.output_prefix}", code=1)
    except KeyboardInterrupt:
        fail(f"interrupted; temporary files removed, {args.output_prefix} left as it was",
             code=130)
    print(f"{PROG}: {result.summary()}")


def adopt_datasets(args) -> None:
    """--adopt: check each prefix and write its meta.json; a report line per prefix."""
    from megaphi.data.adopt import DEFAULT_MIN_ROUNDTRIP, DEFAULT_ROUNDTRIP_SAMPLES, adopt
    from megaphi.data.preprocess import PreprocessError
    from megaphi.data.tokenizer import load_tokenizer

    min_roundtrip = DEFAULT_MIN_ROUNDTRIP if args.min_roundtrip is None else args.min_roundtrip
    samples = args.roundtrip_samples or DEFAULT_ROUNDTRIP_SAMPLES
    if not 0 <= min_roundtrip <= 1 or samples < 1:
        fail("--min-roundtrip must lie in [0, 1] and --roundtrip-samples be positive")
    try:
        tokenizer = load_tokenizer(args.tokenizer or "phi4")
    except ValueError as e:
        fail(str(e).replace("data.tokenizer=", "--tokenizer "))
    for prefix in args.adopt:
        try:
            report = adopt(prefix, tokenizer, allow_missing_eod=args.allow_missing_eod,
                           min_roundtrip=min_roundtrip, roundtrip_samples=samples)
        except PreprocessError as e:
            fail(str(e))
        print(f"{PROG}: {report.summary()}")


if __name__ == "__main__":
    main()
