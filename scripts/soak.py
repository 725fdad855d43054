#!/usr/bin/env python3
"""Soak: the real daemon under a steady load, with snapshots and scrapes, watching memory and loss.

    python scripts/soak.py [--minutes 10] [--rate 500] [--json PATH]

Sends ``rate`` messages per second (256 x 10 FP32 probs each, 8 models, 1% with
NaN, every valid one with a batch_id), scrapes /metrics every 5 s and snapshots
state every 30 s, and checks that every message was counted. Reports RSS growth
to the end from two baselines: one minute in, and the steady state, once every
bounded structure has filled (the deduplication window holds 65,536 batch ids,
which takes 65,536 / rate seconds to fill; the baseline is twice that). The
steady-state growth is the leak check (target < 5%). Exits 1 on loss or on
missing the target. The test suite runs a few seconds of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.soak import run_soak  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=500.0, help="messages per second")
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before the steady-state RSS baseline (default: 2 x 65,536 / rate, at least 60)",
    )
    p.add_argument("--json", type=Path, default=ROOT / "bench-results" / "soak.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run_soak(Path(tmp), args.minutes * 60, args.rate)
    steady_at = min(args.warmup if args.warmup is not None else max(60.0, 2 * 65536 / args.rate), r.seconds / 2)
    early_at = min(60.0, r.seconds / 2)
    growth, early = r.growth(steady_at), r.growth(early_at)

    def rss_at(t: float) -> float:
        return next(b for s, b in r.rss if s >= t) / 2**20

    print(
        f"{r.messages} messages ({r.bad_messages} malformed) over {r.seconds / 60:.1f} min at {args.rate:g}/s, "
        f"{r.scrapes} scrapes"
    )
    print(
        f"RSS: {r.rss[0][1] / 2**20:.1f} MiB at start, {rss_at(early_at):.1f} MiB at {early_at:.0f} s, "
        f"{rss_at(steady_at):.1f} MiB at {steady_at:.0f} s, {r.rss[-1][1] / 2**20:.1f} MiB at the end"
    )
    print(
        f"growth to the end: {early * 100:+.2f}% from {early_at:.0f} s; {growth * 100:+.2f}% from the steady "
        f"state at {steady_at:.0f} s (target < 5%)"
    )
    print("loss: none" if not r.problems else "PROBLEMS:\n  " + "\n  ".join(r.problems))
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "minutes": args.minutes,
                "rate": args.rate,
                "messages": r.messages,
                "growth": growth,
                "growth_from_60s": early,
                "steady_at": steady_at,
                "rss": r.rss,
                "problems": r.problems,
            },
            indent=1,
        )
    )
    return 1 if r.problems or growth >= 0.05 else 0


if __name__ == "__main__":
    sys.exit(main())
