"""Fuzz a real daemon process over a real socket (a sample in the suite; scripts/fuzz.py --daemon at length)."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import zmq

from tests import fuzzing
from tests.integration.harness import DaemonProcess
from xentd.errors import Reason

CONFIG = """
[ingest]
max_message_bytes = 1048576
[limits]
max_models = 16
"""


def fuzz_real_daemon(tmp: Path, seed: int, messages: int) -> tuple[list[str], str]:
    """Send ``messages`` fuzz messages to a fresh daemon; return (problems, summary)."""
    d = DaemonProcess(tmp, CONFIG)
    problems: list[str] = []
    try:
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDTIMEO, 60_000)  # blocks at the high-water mark: back-pressure, not loss
        push.connect(d.ingest)
        expected: Counter[str] = Counter()
        sent = 0
        for _, frames, valid in fuzzing.stream(seed, messages):
            push.send_multipart(frames or [b""])  # ZeroMQ has no zero-frame message
            sent += 1
            if valid is not None:
                expected[valid.model] += valid.samples
        push.close(linger=60_000)
        ctx.term()
        d.wait_for("xentd_messages_received_total", float(sent), timeout=300)
        s = d.samples()
        rejected = {dict(k)["reason"]: v for (n, k), v in s.items() if n == "xentd_rejected_batches_total"}
        batches = sum(v for (n, _), v in s.items() if n == "xentd_batches_total")
        if rejected.get(Reason.INTERNAL_ERROR.value):
            problems.append(f"{rejected[Reason.INTERNAL_ERROR.value]} internal errors")
        duplicates = s[("xentd_duplicate_batches_total", frozenset())]
        # Zero-row batches are accepted and not scored; some mutations make one (a flipped shape, say).
        empty = s[("xentd_empty_batches_total", frozenset())]
        if batches + sum(rejected.values()) + duplicates + empty != sent:
            problems.append(
                f"{batches} scored + {sum(rejected.values())} rejected + {duplicates} duplicates "
                f"+ {empty} empty != {sent} sent"
            )
        for model, n in expected.items():
            got = d.value("xentd_samples_total", model=model)
            if n and got != n:
                problems.append(f"{model}: {got} samples counted, {n} sent")
        health = d.get("/healthz")
        if health[0] != 200:
            problems.append(f"/healthz says {health}")
        code = d.stop(signal.SIGTERM)
        if code != 0:
            problems.append(f"daemon exited {code}")
        summary = (
            f"{sent} messages through a real daemon: {int(batches)} scored, "
            f"{int(sum(rejected.values()))} rejected under {sum(1 for v in rejected.values() if v)} reasons"
        )
        return problems, summary
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
