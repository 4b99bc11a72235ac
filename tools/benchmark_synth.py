#!/usr/bin/env python
"""Measure megaphi-synth's client against the concurrency bound: a local server answers after
a fixed latency, so C requests in flight can at best make C / latency requests per second.
A thin command line over megaphi.synth.benchmark.run; see --help."""

from __future__ import annotations

import argparse
import json
import logging
import sys

PROG = "benchmark_synth"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--latency", type=float, default=0.25,
                        help="seconds the server waits before each answer (default 0.25)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64],
                        help="concurrencies to measure (default 1 8 64)")
    parser.add_argument("--rounds", type=int, default=32,
                        help="requests per run = rounds x concurrency, at least 16 "
                             "(default 32)")
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = parser.parse_args(argv)
    if args.latency <= 0 or args.rounds < 1 or min(args.concurrency) < 1:
        print(f"{PROG}: error: --latency must be > 0, --rounds and --concurrency >= 1",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    from megaphi.synth.benchmark import run

    rows = run(args.latency, args.concurrency, args.rounds)
    if args.json:
        print(json.dumps({"latency_s": args.latency, "runs": rows}))
        return 0
    print(f"server latency {args.latency} s; bound = concurrency / latency")
    print(f"{'concurrency':>11} {'requests':>8} {'req/s':>8} {'bound':>8} {'of bound':>8} "
          f"{'mean in flight':>14} {'peak (client/server)':>21}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['requests']:>8} {r['throughput']:>8.1f} "
              f"{r['bound']:>8.1f} {r['fraction_of_bound']:>8.1%} {r['mean_in_flight']:>14.1f} "
              f"{r['client_max_in_flight']:>10}/{r['server_max_in_flight']:<10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
