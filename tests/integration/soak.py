"""A steady load on the real daemon: memory over time and exact counts (scripts/soak.py runs it for 10 minutes)."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.integration.harness import DaemonProcess
from xentd.client import Publisher

MODELS = tuple(f"soak-{i}" for i in range(8))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass
class SoakResult:
    seconds: float
    messages: int
    bad_messages: int
    samples: Counter[str]
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    scrapes: int = 0
    problems: list[str] = field(default_factory=list)

    def growth(self, warmup: float) -> float:
        """RSS at the end over RSS at the end of the warm-up, minus 1."""
        base = next(r for t, r in self.rss if t >= warmup)
        return self.rss[-1][1] / base - 1.0


def run_soak(tmp: Path, seconds: float, rate: float, *, sample_every: float = 5.0) -> SoakResult:
    """Send ``rate`` messages/s for ``seconds`` (1% malformed), scrape like Prometheus, sample RSS."""
    config = f'[state]\ndirectory = "{tmp / "state"}"\nsnapshot_interval = "30s"\n[limits]\nmodel_ttl = "never"\n'
    d = DaemonProcess(tmp, config)
    result = SoakResult(seconds=seconds, messages=0, bad_messages=0, samples=Counter())
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(5.0):  # Prometheus's default scrape interval is 15 s; this is harsher
            with urllib.request.urlopen(d.http + "/metrics", timeout=30) as resp:
                resp.read()
            result.scrapes += 1

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    rng = np.random.default_rng(0)
    batches = [(rng.random((256, 10)).astype(np.float32), rng.integers(0, 10, 256)) for _ in range(16)]
    batches = [(p / p.sum(axis=1, keepdims=True), y) for p, y in batches]
    started = time.monotonic()
    next_sample = 0.0
    try:
        with Publisher(d.ingest, send_timeout_ms=60_000) as pub:
            i = 0
            while (elapsed := time.monotonic() - started) < seconds:
                if elapsed >= next_sample:
                    result.rss.append((elapsed, rss_bytes(d.proc.pid)))
                    next_sample += sample_every
                target = int(elapsed * rate)
                while i < target:
                    model = MODELS[i % len(MODELS)]
                    if i % 100 == 99:
                        pub.send(model, np.full((4, 10), np.nan, np.float32), np.zeros(4, np.int64))
                        result.bad_messages += 1
                    else:
                        p, y = batches[i % len(batches)]
                        pub.send(model, p, y, batch_id=f"b{i}")
                        result.samples[model] += len(y)
                    result.messages += 1
                    i += 1
                time.sleep(0.002)
        d.wait_for("xentd_messages_received_total", float(result.messages), timeout=120)
        result.rss.append((time.monotonic() - started, rss_bytes(d.proc.pid)))
        for model, n in result.samples.items():
            got = d.value("xentd_samples_total", model=model)
            if got != n:
                result.problems.append(f"{model}: {got} samples counted, {n} sent")
        nan = d.value("xentd_rejected_batches_total", reason="non_finite")
        if nan != result.bad_messages:
            result.problems.append(f"{nan} non_finite rejections, {result.bad_messages} sent")
        if d.value("xentd_rejected_batches_total", reason="internal_error"):
            result.problems.append("internal errors")
    finally:
        stop.set()
        scraper.join(35)
        code = d.stop(signal.SIGTERM)
        if code != 0:
            result.problems.append(f"daemon exited {code}")
    return result
