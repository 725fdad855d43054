#!/usr/bin/env python3
"""Fuzz xentd's decoder, validator and scoring path with generated hostile messages.

    python scripts/fuzz.py [--messages 1000000] [--seed 1] [--chunk 64] [--workers 2]
    python scripts/fuzz.py --daemon [--messages 200000]

In-process (the default), each worker feeds its share of messages through a
daemon's real handling path (``Daemon.handle_many``) and checks, against a
control daemon fed only the valid messages, that the valid models' state is
identical, that every message is accounted for, and that no rejection is an
internal error. ``--daemon`` starts the real daemon as a process instead and
sends over a real ZeroMQ socket, then checks the same counts through /metrics.

Exits 1 on any problem and prints the seed and chunk that reproduce it. The
test suite runs a bounded sample of both modes (tests/test_fuzz.py,
tests/integration/test_reliability.py).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import fuzzing  # noqa: E402


def _worker(args: tuple[int, int, int]) -> fuzzing.Report:
    logging.basicConfig(level=logging.CRITICAL)  # rejections are expected; problems are in the report
    seed, count, chunk = args
    return fuzzing.run_in_process(seed, count, chunk)


def in_process(messages: int, seed: int, chunk: int, workers: int) -> int:
    shares = [(seed + i, messages // workers + (i < messages % workers), chunk) for i in range(workers)]
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        reports = pool.map(_worker, shares)
    elapsed = time.perf_counter() - started
    rejected: Counter[str] = Counter()
    for r in reports:
        rejected.update(r.rejected)
    total = sum(r.messages for r in reports)
    valid = sum(r.valid for r in reports)
    slowest = max(r.slowest[0] for r in reports)
    print(
        f"{total} messages ({valid} valid, {sum(rejected.values())} rejected) in {elapsed:.1f} s "
        f"with {workers} worker(s), chunk {chunk}; slowest drain {slowest * 1e3:.2f} ms per message"
    )
    for reason, n in rejected.most_common():
        print(f"  {reason:28s} {n}")
    problems = [(s, p) for (s, _, _), r in zip(shares, reports, strict=True) for p in r.problems]
    for s, p in problems:
        print(f"PROBLEM (seed {s}, chunk {chunk}): {p}")
    return 1 if problems else 0


def through_daemon(messages: int, seed: int) -> int:
    from tests.integration.fuzz_daemon import fuzz_real_daemon

    started = time.perf_counter()
    problems, summary = fuzz_real_daemon(Path("/tmp"), seed, messages)
    print(f"{summary} in {time.perf_counter() - started:.1f} s")
    for p in problems:
        print(f"PROBLEM (seed {seed}): {p}")
    return 1 if problems else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--chunk", type=int, default=64, help="messages per drain (1 attributes reasons exactly)")
    p.add_argument("--workers", type=int, default=max(1, min(4, mp.cpu_count())))
    p.add_argument("--daemon", action="store_true", help="fuzz a real daemon process over a real socket")
    args = p.parse_args()
    if args.daemon:
        return through_daemon(args.messages, args.seed)
    return in_process(args.messages, args.seed, args.chunk, args.workers)


if __name__ == "__main__":
    sys.exit(main())
