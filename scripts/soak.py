#!/usr/bin/env python3
"""Soak: the real daemon under a steady load, with snapshots and scrapes, watching memory and loss.

    python scripts/soak.py [--minutes 10] [--rate 500] [--json PATH]

Sends ``rate`` messages per second (256 x 10 FP32 probs each, 8 models, 1% with
NaN), scrapes /metrics every 5 s and snapshots state every 30 s. Reports RSS
growth from the end of a one-minute warm-up to the end (target < 5%) and checks
that every message was counted. Exits 1 on loss or on missing the RSS target.
The test suite runs a few seconds of it (tests/integration/test_reliability.py).
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
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline")
    p.add_argument("--json", type=Path, default=ROOT / "bench-results" / "soak.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run_soak(Path(tmp), args.minutes * 60, args.rate)
    growth = r.growth(min(args.warmup, r.seconds / 2))
    base = next(b for t, b in r.rss if t >= min(args.warmup, r.seconds / 2))
    print(f"{r.messages} messages ({r.bad_messages} malformed) over {r.seconds / 60:.1f} min at {args.rate:g}/s, "
          f"{r.scrapes} scrapes")
    print(f"RSS: {r.rss[0][1] / 2**20:.1f} MiB at start, {base / 2**20:.1f} MiB after warm-up, "
          f"{r.rss[-1][1] / 2**20:.1f} MiB at the end: growth {growth * 100:+.2f}% (target < 5%)")
    print("loss: none" if not r.problems else "PROBLEMS:\n  " + "\n  ".join(r.problems))
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps({"minutes": args.minutes, "rate": args.rate, "messages": r.messages,
                                     "growth": growth, "rss": r.rss, "problems": r.problems}, indent=1))
    return 1 if r.problems or growth >= 0.05 else 0


if __name__ == "__main__":
    sys.exit(main())
