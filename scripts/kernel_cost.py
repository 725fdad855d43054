#!/usr/bin/env python3
"""What a change costs the scoring kernels and the per-model state, side by side with another checkout.

Usage:
    .venv/bin/python scripts/kernel_cost.py --against /tmp/base            # kernels and state memory
    .venv/bin/python scripts/kernel_cost.py --against /tmp/base --repeats 7

Every measurement runs in a fresh process, alternating between the other
checkout's xentd ("before") and this one's ("after"); the table shows medians
over ``--repeats`` rounds, and the ratio after / before. The machine is shared
and noisy: only side-by-side medians mean anything.

- ``kernel C=...``: seconds per ``CpuBackend.score`` call (best of many calls in
  one process) on FP32 logits with class-index targets, N x C, and on FP64
  binary logits; serial kernels (one core), so that the other core's noise
  matters less.
- ``state RSS``: the growth of the process's resident memory when 10,000 models
  of 10 classes each fold ten 64-sample batches (what ``bench.py scale`` sends),
  with the default windows, through ``StateStore`` and ``ModelState.fold``;
- ``steady KB``: the bytes each component of one 10-class model holds once it has
  seen traffic for longer than every window (every time bucket used, the count
  ring full): what a busy model costs, whatever the benchmark's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent

# (label, rows, classes); classes 0 is binary.
CASES = (("C=10", 65_536, 10), ("C=32000", 64, 32_000), ("binary", 1 << 20, 0))
MODELS = 10_000
BATCHES_PER_MODEL = 10
ROWS = 64


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(root: str) -> dict[str, Any]:
    sys.path.insert(0, root)
    import numpy as np

    from xentd import wire
    from xentd.kernels import SampleScores, ScoringParams
    from xentd.kernels.cpu import CpuBackend
    from xentd.validate import validate

    assert Path(sys.modules["xentd"].__file__ or "").resolve().is_relative_to(Path(root).resolve())
    out: dict[str, Any] = {}
    backend = CpuBackend(parallel_threshold=1 << 62)
    rng = np.random.default_rng(0)
    for label, n, c in CASES:
        if c:
            pred = rng.normal(0, 2, (n, c)).astype(np.float32)
            tgt: Any = rng.integers(0, c, n)
        else:
            pred = rng.normal(0, 2, n)
            tgt = rng.integers(0, 2, n).astype(np.float64)
        frames = wire.encode("m", pred, tgt, input="logits")
        batch = validate(wire.decode([bytes(f) for f in frames], max_message_bytes=1 << 31, max_header_bytes=1 << 16))
        params = ScoringParams(eps=1e-7, focal_gamma=2.0, normalization_tolerance=1e-3)
        backend.score(batch, params)  # compile or load
        best = float("inf")
        deadline = time.perf_counter() + 1.5
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            backend.score(batch, params)
            best = min(best, time.perf_counter() - t)
        out[f"kernel {label}"] = best

    from xentd.config import LimitsConfig, WindowsConfig
    from xentd.state import StateStore

    fields = set(SampleScores.__dataclass_fields__)
    values = {
        "loss": rng.random(ROWS),
        "focal": rng.random(ROWS),
        "correct": rng.integers(0, 2, ROWS).astype(np.uint8),
        "true_class": rng.integers(0, 10, ROWS),
        "unnormalized_rows": 0,
        "confidence": rng.random(ROWS),
        "brier": rng.random(ROWS),
    }
    scores = SampleScores(**{k: v for k, v in values.items() if k in fields})
    store = StateStore(WindowsConfig(), LimitsConfig(max_models=MODELS), lambda: 1.7e9)
    store.warmup()
    before = _rss()
    for b in range(BATCHES_PER_MODEL):
        for i in range(MODELS):
            store.model(f"model-{i}", 10).fold(scores, None, 1.7e9 + b, None)
    out["state RSS MiB"] = (_rss() - before) / 2**20

    # One model at steady state: every time bucket used (4,000 s of traffic, past the 1 h
    # window) and the count-window ring full (12,000 samples, past last_10000).
    from xentd.state import ModelState

    model = ModelState("steady", 10, WindowsConfig(), LimitsConfig(), 1.7e9)
    three = SampleScores(**{k: (v[:3] if isinstance(v, np.ndarray) else v) for k, v in values.items() if k in fields})
    for k in range(4_000):
        model.fold(three, None, 1.7e9 + k, None)
    for name, component in model.components().items():
        arrays = component.save()[1]
        out[f"steady KB {name or 'loss'}"] = sum(a.nbytes for a in arrays.values()) / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the other checkout's root ('before')")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child)))
        return
    sides = {"before": str(Path(args.against).resolve()), "after": str(HERE)}
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for run in range(args.repeats):
        for side, root in sides.items():
            done = subprocess.run(
                [sys.executable, __file__, "--against", root, "--child", root],
                check=True,
                capture_output=True,
                text=True,
                cwd=root,
            )
            results[side].append(json.loads(done.stdout.splitlines()[-1]))
            print(f"run {run + 1}/{args.repeats} {side}: done", file=sys.stderr)
    print(f"median of {args.repeats} alternating runs; kernels in ms per call (serial build)")
    print(f"{'measure':<24} {'before':>10} {'after':>10} {'after/before':>13}")
    for key in results["after"][0]:
        a = statistics.median(r[key] for r in results["after"])
        if key not in results["before"][0]:  # a component the other checkout does not have
            print(f"{key:<24} {'-':>10} {a:>10.3f}")
            continue
        b = statistics.median(r[key] for r in results["before"])
        scale = 1 if "RSS" in key or "KB" in key else 1e3
        print(f"{key:<24} {b * scale:>10.3f} {a * scale:>10.3f} {a / b:>13.3f}")


if __name__ == "__main__":
    main()
