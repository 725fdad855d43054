"""``xentd top``: a live terminal view of the models in a running daemon, read from its /metrics.

Rates come from the difference between two scrapes; the loss, perplexity and
accuracy columns are the daemon's own window gauges for the chosen window.
It reads only /metrics, so it works against any instance Prometheus can scrape.
"""

from __future__ import annotations

import base64
import math
import ssl
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

from xentd.errors import XentdError


@dataclass
class Scrape:
    at: float
    # (metric name, frozenset of labels) -> value
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    def by_model(self, name: str, **labels: str) -> dict[str, float]:
        out = {}
        want = set(labels.items())
        for (n, lbls), v in self.samples.items():
            if n == name and want <= lbls:
                model = dict(lbls).get("model")
                if model is not None:
                    out[model] = v
        return out

    def total(self, name: str) -> dict[str, float]:
        """Values of a daemon-wide family, keyed by its single label value (or "")."""
        out = {}
        for (n, lbls), v in self.samples.items():
            if n == name:
                out[next(iter(dict(lbls).values()), "")] = v
        return out


def scrape(url: str, *, auth: str | None = None, cafile: str | None = None, timeout: float = 10.0) -> Scrape:
    request = urllib.request.Request(url.rstrip("/") + "/metrics", headers={"Accept": "text/plain"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            text = resp.read().decode("utf-8")
    except OSError as exc:
        raise XentdError(f"cannot read {url}/metrics: {exc}") from None
    out = Scrape(at=time.monotonic())
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.samples[(s.name, frozenset(s.labels.items()))] = s.value
    return out


@dataclass(frozen=True)
class Row:
    model: str
    samples_per_s: float
    batches_per_s: float
    cross_entropy: float
    perplexity: float
    accuracy: float
    window_samples: float


def rows(before: Scrape, after: Scrape, window: str) -> list[Row]:
    dt = max(after.at - before.at, 1e-9)
    samples0, samples1 = before.by_model("xentd_samples_total"), after.by_model("xentd_samples_total")
    batches0, batches1 = before.by_model("xentd_batches_total"), after.by_model("xentd_batches_total")
    ce = after.by_model("xentd_window_cross_entropy_nats", window=window)
    acc = after.by_model("xentd_window_accuracy_ratio", window=window)
    n = after.by_model("xentd_window_samples", window=window)
    out = []
    for model in sorted(samples1):
        loss = ce.get(model, math.nan)
        out.append(
            Row(
                model=model,
                samples_per_s=max(0.0, samples1[model] - samples0.get(model, samples1[model])) / dt,
                batches_per_s=max(0.0, batches1.get(model, 0.0) - batches0.get(model, batches1.get(model, 0.0))) / dt,
                cross_entropy=loss,
                perplexity=math.exp(loss) if loss < 700 else math.inf,
                accuracy=acc.get(model, math.nan),
                window_samples=n.get(model, 0.0),
            )
        )
    return out


SORTS = {
    "name": lambda r: r.model,
    "rate": lambda r: -r.samples_per_s,
    "loss": lambda r: -(r.cross_entropy if not math.isnan(r.cross_entropy) else -math.inf),
}


def render(before: Scrape, after: Scrape, *, url: str, window: str, sort: str = "name", limit: int = 50) -> str:
    dt = max(after.at - before.at, 1e-9)
    table = sorted(rows(before, after, window), key=SORTS[sort])
    received = after.total("xentd_messages_received_total").get("", 0.0)
    received0 = before.total("xentd_messages_received_total").get("", received)
    rejected = after.total("xentd_rejected_batches_total")
    rejected0 = before.total("xentd_rejected_batches_total")
    reject_rates = {r: (v - rejected0.get(r, v)) / dt for r, v in rejected.items()}
    top_reasons = ", ".join(f"{r} {v:.1f}/s" for r, v in sorted(reject_rates.items(), key=lambda kv: -kv[1]) if v > 0)[
        :100
    ]
    backend = next((dict(k).get("backend") for (n, k) in after.samples if n == "xentd_build_info"), "?")
    lines = [
        f"xentd top - {url}   window {window}   {len(table)} model(s)   "
        f"{(received - received0) / dt:,.1f} msg/s in   "
        f"rejected {sum(rejected.values()):,.0f} total ({sum(reject_rates.values()):,.1f}/s"
        f"{': ' + top_reasons if top_reasons else ''})",
        f"duplicates {after.total('xentd_duplicate_batches_total').get('', 0):,.0f}   "
        f"sequence gaps {after.total('xentd_sequence_gaps_total').get('', 0):,.0f}   backend {backend}",
        "",
        f"{'MODEL':32s} {'SAMPLES/S':>11s} {'BATCHES/S':>10s} {'XENT (nats)':>12s} {'PERPLEXITY':>11s} "
        f"{'ACCURACY':>9s} {'IN WINDOW':>10s}",
    ]
    for r in table[:limit]:
        lines.append(
            f"{r.model[:32]:32s} {r.samples_per_s:11,.1f} {r.batches_per_s:10,.1f} "
            f"{_num(r.cross_entropy, '12.4f')} {_num(r.perplexity, '11.3f')} "
            f"{_num(r.accuracy * 100, '8.2f')}% {r.window_samples:10,.0f}"
        )
    if len(table) > limit:
        lines.append(f"... and {len(table) - limit} more (--limit)")
    return "\n".join(lines) + "\n"


def _num(value: float, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{'-':>{width}s}" if math.isnan(value) else format(value, spec)


def run(
    url: str,
    *,
    window: str,
    interval: float,
    once: bool,
    sort: str,
    limit: int,
    auth: str | None = None,
    cafile: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    before = scrape(url, auth=auth, cafile=cafile)
    if not any(n == "xentd_build_info" for n, _ in before.samples):
        raise XentdError(f"{url}/metrics does not look like xentd's (no xentd_build_info)")
    while True:
        time.sleep(interval)
        after = scrape(url, auth=auth, cafile=cafile)
        text = render(before, after, url=url, window=window, sort=sort, limit=limit)
        if once:
            out.write(text)
            return 0
        out.write("\x1b[H\x1b[2J" + text)  # home and clear: a full redraw per interval
        out.flush()
        before = after
