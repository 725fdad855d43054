#!/usr/bin/env python3
"""The cost of a /metrics scrape at many models, in process, phase by phase.

Usage:
    .venv/bin/python scripts/scrape_bench.py                         # 10,000 models, this checkout
    .venv/bin/python scripts/scrape_bench.py --models 1000           # fewer models
    .venv/bin/python scripts/scrape_bench.py --against /tmp/sbase    # side by side with another checkout
    .venv/bin/python scripts/scrape_bench.py --profile               # plus a cProfile top list of one scrape
    .venv/bin/python scripts/scrape_bench.py --budget 1000000        # with [export] max_series

The store holds what ``bench.py scale`` sends its daemon: ``--models`` models of 10
classes, each folded ten times with 64 scored samples and their label-free
statistics, as the pipeline folds them, in ten rounds over all the models (so each
model's arrays are spread over the heap, as in the daemon: a store built model by
model reads faster). Then, ``--repeats`` times:

- ``snapshot``: :meth:`StateStore.snapshot` (copy under the lock, derive outside it),
  with the longest single hold of the state lock;
- ``render``: the text writer on that snapshot (:func:`xentd.exporter.render_text`);
- ``text``: what /metrics serves for text format 0.0.4 (``Exposition.text_view``, or
  ``Exposition.text`` where there is none): snapshot, render, the process collector;
  the scrape's cost in the daemon short of the HTTP transfer.

With ``--against DIR`` each measurement runs in a fresh process, alternating between
DIR's xentd and this checkout's, ``--rounds`` times; the table shows the best and the
median of each. The machine is shared and noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent.parent


class _TimedLock:
    """The state lock, recording how long each hold lasted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holds: list[float] = []
        self._t = 0.0

    def __enter__(self) -> None:
        self._lock.acquire()
        self._t = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.holds.append(time.perf_counter() - self._t)
        self._lock.release()


def _store(models: int) -> Any:
    from xentd.config import LimitsConfig, WindowsConfig
    from xentd.kernels import SampleScores
    from xentd.state import StateStore

    t = [1.7e9]
    store = StateStore(WindowsConfig(), LimitsConfig(max_models=models + 10), lambda: t[0])
    rng = np.random.default_rng(0)
    n = 64
    # Ten rounds over every model, as bench.py scale's producer sends them: each model's
    # arrays grow at different times and end up spread over the heap, as in the daemon.
    for _ in range(10):
        for i in range(models):
            m = store.model(f"model-{i:05d}", 10)
            loss = rng.exponential(2.3, n)
            scores = SampleScores(
                loss=loss,
                focal=loss * rng.random(n),
                correct=rng.integers(0, 2, n).astype(np.uint8),
                true_class=rng.integers(0, 10, n),
                unnormalized_rows=0,
                confidence=rng.uniform(0.1, 1.0, n),
                brier=rng.random(n),
            )
            label_free = (rng.uniform(0.0, 2.3, n), rng.uniform(0.1, 1.0, n))
            m.fold(scores, None, t[0], None, targets=scores.true_class, label_free=label_free)
            t[0] += 0.00015  # bench.py scale ingests 100,000 messages in about 15 s
    return store


def _measure(models: int, repeats: int, budget: int, profile: bool) -> dict[str, Any]:
    import xentd
    from xentd.config import ExportConfig
    from xentd.exporter import Exposition, render_text

    t0 = time.perf_counter()
    store = _store(models)
    build = time.perf_counter() - t0
    lock = _TimedLock()
    store.lock = lock
    export = ExportConfig(max_series=budget)
    expo = Exposition(store.snapshot, version="bench", backend="cpu", export=export)
    serve = getattr(expo, "text_view", expo.text)  # what /metrics sends
    snapshot, longest, render, text = [], [], [], []
    body = b""
    for _ in range(repeats):
        lock.holds.clear()
        t = time.perf_counter()
        snap = store.snapshot()
        snapshot.append(time.perf_counter() - t)
        longest.append(max(lock.holds))
        t = time.perf_counter()
        render_text(snap, version="bench", backend="cpu", export=export)
        render.append(time.perf_counter() - t)
        del snap
        t = time.perf_counter()
        body = serve()
        text.append(time.perf_counter() - t)
    body = bytes(body)
    series = sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))
    result: dict[str, Any] = {
        "xentd": str(Path(xentd.__file__).parent.parent),
        "models": models,
        "build_s": build,
        "snapshot_s": snapshot,
        "longest_hold_s": longest,
        "render_s": render,
        "text_s": text,
        "series": series,
        "bytes": len(body),
    }
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        serve()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        result["profile"] = out.getvalue()
    return result


def _run_in(checkout: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--models", str(args.models), "--repeats", str(args.repeats)]
    cmd += ["--budget", str(args.budget)]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def _row(label: str, results: list[dict[str, Any]]) -> str:
    def pool(key: str) -> list[float]:
        return [v for r in results for v in r[key]]

    cells = []
    for key in ("snapshot_s", "render_s", "text_s", "longest_hold_s"):
        values = pool(key)
        scale = 1e3 if key == "longest_hold_s" else 1.0
        unit = "ms" if key == "longest_hold_s" else "s"
        cells.append(f"{min(values) * scale:.3f}/{statistics.median(values) * scale:.3f} {unit}")
    r = results[-1]
    return f"{label:>8} | " + " | ".join(cells) + f" | {r['series']:,} | {r['bytes'] / 2**20:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per checkout with --against")
    parser.add_argument("--budget", type=int, default=0, help="[export] max_series (0: none, as bench.py scale)")
    parser.add_argument("--against", type=Path, help="another checkout, measured alternately")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_measure(args.models, args.repeats, args.budget, profile=False)))
        return 0
    if args.against is None:
        sys.path.insert(0, str(HERE))
        result = _measure(args.models, args.repeats, args.budget, args.profile)
        print("   phase | snapshot best/median | render | text (what /metrics serves) | longest hold | series | bytes")
        print(_row("this", [result]))
        if args.profile:
            print(result["profile"])
        results = {"this": [result]}
    else:
        results = {"before": [], "this": []}
        for _ in range(args.rounds):
            results["before"].append(_run_in(args.against.resolve(), args))
            results["this"].append(_run_in(HERE, args))
        print(f"{args.models} models, {args.rounds} processes x {args.repeats} scrapes per checkout")
        print("   phase | snapshot best/median | render | text (what /metrics serves) | longest hold | series | bytes")
        for label, rs in results.items():
            print(_row(label, rs))
        before = min(v for r in results["before"] for v in r["text_s"])
        this = min(v for r in results["this"] for v in r["text_s"])
        print(f"text best: this / before = {this / before:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
