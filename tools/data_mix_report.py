"""Report a data mixture against a training budget: per source, its weight, unique tokens (read
from the .idx files), allocated tokens and epochs, as in Table 5 of the Phi-4 report.

    python tools/data_mix_report.py examples/phi4_pretrain_mixture.yaml --train-tokens 10T
"""

import argparse
import logging
import sys

from megaphi.data.mixture import MixtureError, load_mixture, mixture_report, parse_token_count
from megaphi.platform import prepare_megatron_import

logger = logging.getLogger("data_mix_report")


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f}{unit}"
    return f"{n:,.0f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mixture", help="mixture YAML file")
    parser.add_argument("--train-tokens", required=True,
                        help="training budget in tokens, e.g. 10T, 250B, 1e9")
    parser.add_argument("--split", default="train", choices=["train", "valid", "test"])
    parser.add_argument("--max-epochs", type=float, default=4.0,
                        help="warn when a source would be repeated more often than this")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s")
    prepare_megatron_import()
    try:
        budget = parse_token_count(args.train_tokens)
        rows = mixture_report(load_mixture(args.mixture), budget, args.split)
    except (MixtureError, ValueError) as exc:
        print(f"data_mix_report: error: {exc}", file=sys.stderr)
        return 2
    w = max([16, *(len(r.name) + 2 for r in rows)])
    print(f"{'source':<{w}}{'weight':>8}{'unique tokens':>16}{'allocated':>14}{'epochs':>14}")
    for r in rows:
        print(f"{r.name:<{w}}{r.share:>8.1%}{human(r.unique_tokens):>16}"
              f"{human(r.allocated_tokens):>14}{r.epochs:>14,.2f}")
    print(f"{'total':<{w}}{sum(r.share for r in rows):>8.1%}"
          f"{human(sum(r.unique_tokens for r in rows)):>16}{human(budget):>14}")
    for r in rows:
        if r.epochs > args.max_epochs:
            logger.warning("source '%s' would be repeated %s times (more than --max-epochs %g); "
                           "add unique data or lower its weight", r.name, f"{r.epochs:,.1f}",
                           args.max_epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
