"""``xentd top``: a live terminal view of the models in a running daemon, read from its /metrics.

Rates come from the difference between two scrapes; the loss, perplexity,
accuracy, balanced cross-entropy, normalized entropy (``NE``) and expected
calibration error (``ECE``) columns are the daemon's own window gauges for the
chosen window, and the worst class is the true class with the highest mean
loss since the daemon started (``xentd_class_cross_entropy_nats``).
A model whose window holds no samples shows ``-`` there, and so does ``NE``
while the window's targets are all of one class (the daemon exports no NE then). For delayed labels
(docs/protocol.md), ``PENDING`` is the model's predictions waiting for a label
and ``COVERAGE`` the share of its waiting predictions that found their label
since the daemon started: matched / (matched + expired + evicted), ``-`` while
none has left the store; both are blank for a model with no join traffic. It reads only /metrics,
so it works against any instance Prometheus can scrape. On a terminal, ``q``
quits.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import select
import ssl
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from collections.abc import Iterator
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


def metrics_url(url: str) -> str:
    """``url``'s /metrics page: the daemon's address, or the /metrics URL itself."""
    base = url.rstrip("/")
    return base if base.endswith("/metrics") else base + "/metrics"


def _get(url: str, *, auth: str | None, cafile: str | None, timeout: float) -> tuple[int, str]:
    """(status, body) of a GET; an error status is an answer too. Unreachable: XentdError."""
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            return int(resp.status), resp.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode("utf-8", "replace")
    except OSError as exc:
        raise XentdError(f"cannot read {url}: {exc}") from None


def health(url: str, *, cafile: str | None = None, timeout: float = 10.0) -> tuple[bool, str]:
    """The daemon's /healthz (``url`` as for :func:`scrape`): (healthy, its one-line body)."""
    base = metrics_url(url).removesuffix("/metrics")
    status, body = _get(base + "/healthz", auth=None, cafile=cafile, timeout=timeout)
    return status == 200, body.strip()


def scrape(url: str, *, auth: str | None = None, cafile: str | None = None, timeout: float = 10.0) -> Scrape:
    url = metrics_url(url)
    status, text = _get(url, auth=auth, cafile=cafile, timeout=timeout)
    if status != 200:
        raise XentdError(f"cannot read {url}: HTTP {status}: {text.strip()[:200]}")
    return parse(text, at=time.monotonic())


def parse(text: str, *, at: float) -> Scrape:
    """A /metrics page (Prometheus text format), read at ``at`` (``time.monotonic()`` seconds)."""
    out = Scrape(at=at)
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
    balanced_cross_entropy: float = math.nan
    normalized_entropy: float = math.nan  # nan: absent (empty window, or all targets of one class)
    calibration_error: float = math.nan
    worst_class: str | None = None  # the true class with the highest mean loss since start
    worst_class_loss: float = math.nan
    # Delayed labels; None: the model has no join traffic (no xentd_label_joins_total series).
    pending: float | None = None
    coverage: float | None = None  # nan: no prediction has left the store yet


# The outcomes of a waiting prediction that leave the store; coverage is the matched share.
_LEFT_STORE = ("matched", "expired", "evicted")


def join_coverage(s: Scrape) -> dict[str, float]:
    """Per model with join traffic: matched / (matched + expired + evicted) since start (nan: 0 / 0)."""
    left: dict[str, dict[str, float]] = {}
    for (name, labels), v in s.samples.items():
        lbl = dict(labels)
        if name == "xentd_label_joins_total" and "model" in lbl:
            left.setdefault(lbl["model"], {})[lbl.get("outcome", "")] = v
    out = {}
    for model, by_outcome in left.items():
        total = sum(by_outcome.get(o, 0.0) for o in _LEFT_STORE)
        out[model] = by_outcome.get("matched", 0.0) / total if total > 0 else math.nan
    return out


def windows(s: Scrape) -> list[str]:
    """The window labels the daemon exports, in its order."""
    return list(dict.fromkeys(dict(labels)["window"] for name, labels in s.samples if name == "xentd_window_samples"))


def _worst_classes(s: Scrape) -> dict[str, tuple[str, float]]:
    """Per model, the class with the highest weighted mean loss (``_sum / _count``) since start."""
    sums: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], float] = {}
    for (name, labels), v in s.samples.items():
        lbl = dict(labels)
        if "model" not in lbl or "class" not in lbl:
            continue
        if name == "xentd_class_cross_entropy_nats_sum":
            sums[(lbl["model"], lbl["class"])] = v
        elif name == "xentd_class_cross_entropy_nats_count":
            counts[(lbl["model"], lbl["class"])] = v
    out: dict[str, tuple[str, float]] = {}
    for key, total in sorted(sums.items()):
        weight = counts.get(key, 0.0)
        if weight > 0:
            model, cls = key
            mean = total / weight
            if model not in out or mean > out[model][1]:
                out[model] = (cls, mean)
    return out


def _perplexity(loss: float) -> float:
    if math.isnan(loss):
        return math.nan  # no samples in the window: no loss, so no perplexity either
    return math.exp(loss) if loss < 700 else math.inf


def rows(before: Scrape, after: Scrape, window: str) -> list[Row]:
    dt = max(after.at - before.at, 1e-9)
    samples0, samples1 = before.by_model("xentd_samples_total"), after.by_model("xentd_samples_total")
    batches0, batches1 = before.by_model("xentd_batches_total"), after.by_model("xentd_batches_total")
    ce = after.by_model("xentd_window_cross_entropy_nats", window=window)
    acc = after.by_model("xentd_window_accuracy_ratio", window=window)
    balanced = after.by_model("xentd_window_balanced_cross_entropy_nats", window=window)
    ne = after.by_model("xentd_window_normalized_entropy", window=window)
    ece = after.by_model("xentd_window_calibration_error", window=window)
    n = after.by_model("xentd_window_samples", window=window)
    worst = _worst_classes(after)
    coverage = join_coverage(after)
    pending = after.by_model("xentd_pending_predictions")
    out = []
    # A model whose predictions all wait for labels has scored nothing yet, but is shown.
    for model in sorted(set(samples1) | set(coverage) | set(pending)):
        loss = ce.get(model, math.nan)
        worst_class, worst_loss = worst.get(model, (None, math.nan))
        out.append(
            Row(
                model=model,
                samples_per_s=max(0.0, samples1.get(model, 0.0) - samples0.get(model, samples1.get(model, 0.0))) / dt,
                batches_per_s=max(0.0, batches1.get(model, 0.0) - batches0.get(model, batches1.get(model, 0.0))) / dt,
                cross_entropy=loss,
                perplexity=_perplexity(loss),
                accuracy=acc.get(model, math.nan),
                window_samples=n.get(model, 0.0),
                balanced_cross_entropy=balanced.get(model, math.nan),
                normalized_entropy=ne.get(model, math.nan),
                calibration_error=ece.get(model, math.nan),
                worst_class=worst_class,
                worst_class_loss=worst_loss,
                pending=pending.get(model),
                coverage=coverage.get(model),
            )
        )
    return out


SORTS = {
    "name": lambda r: r.model,
    "rate": lambda r: -r.samples_per_s,
    "loss": lambda r: -(r.cross_entropy if not math.isnan(r.cross_entropy) else -math.inf),
}


def check_window(s: Scrape, window: str) -> None:
    """Refuse a ``--window`` the daemon does not export (once it exports any: a daemon with no model has none)."""
    present = windows(s)
    if present and window not in present:
        raise XentdError(f"--window {window!r}: this daemon has no such window; its windows are {', '.join(present)}")


def render(before: Scrape, after: Scrape, *, url: str, window: str, sort: str = "name", limit: int = 50) -> str:
    check_window(after, window)
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
    store = _pending_store(after)
    lines = [
        f"xentd top - {url}   window {window}   {len(table)} model(s)   "
        f"{(received - received0) / dt:,.1f} msg/s in   "
        f"rejected {sum(rejected.values()):,.0f} total ({sum(reject_rates.values()):,.1f}/s"
        f"{': ' + top_reasons if top_reasons else ''})",
        f"duplicates {after.total('xentd_duplicate_batches_total').get('', 0):,.0f}   "
        f"sequence gaps {after.total('xentd_sequence_gaps_total').get('', 0):,.0f}   backend {backend}{store}",
        "",
        f"{'MODEL':32s} {'SAMPLES/S':>11s} {'BATCHES/S':>10s} {'XENT (nats)':>12s} {'PERPLEXITY':>11s} "
        f"{'ACCURACY':>9s} {'IN WINDOW':>10s} {'BALANCED':>9s} {'NE':>7s} {'ECE':>7s} "
        f"{'WORST CLASS (since start)':>25s} {'PENDING':>9s} {'COVERAGE':>8s}",
    ]
    for r in table[:limit]:
        worst = "-" if r.worst_class is None else f"{r.worst_class[:12]} {r.worst_class_loss:.4f}"
        lines.append(
            f"{r.model[:32]:32s} {r.samples_per_s:11,.1f} {r.batches_per_s:10,.1f} "
            f"{_num(r.cross_entropy, '12.4f')} {_num(r.perplexity, '11.3f')} "
            f"{_num(r.accuracy * 100, '8.2f')}{' ' if math.isnan(r.accuracy) else '%'} {r.window_samples:10,.0f} "
            f"{_num(r.balanced_cross_entropy, '9.4f')} {_num(r.normalized_entropy, '7.4f')} "
            f"{_num(r.calibration_error, '7.4f')} {worst:>25s} {_join_columns(r)}".rstrip()
        )
    if len(table) > limit:
        lines.append(f"... and {len(table) - limit} more (--limit)")
    return "\n".join(lines) + "\n"


def _join_columns(r: Row) -> str:
    """PENDING and COVERAGE: blank for a model without join traffic, ``-`` for a coverage of 0 / 0."""
    pending = " " * 9 if r.pending is None else f"{r.pending:9,.0f}"
    coverage = (
        " " * 8 if r.coverage is None else _num(r.coverage * 100, "7.2f") + (" " if math.isnan(r.coverage) else "%")
    )
    return f"{pending} {coverage}"


def _pending_store(s: Scrape) -> str:
    """The header's "join store 1.2 MiB of 256.0 MiB (0.5%)": the bytes of the predictions waiting for
    labels against ``labels.max_pending_bytes``; "" for a daemon that exports no join store."""
    used = s.total("xentd_pending_bytes").get("")
    limit = s.total("xentd_pending_bytes_limit").get("")
    if used is None or limit is None:
        return ""
    share = f" ({used / limit * 100:.1f}%)" if limit > 0 else ""
    return f"   join store {_mib(used)} of {_mib(limit)}{share}"


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def _num(value: float, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{'-':>{width}s}" if math.isnan(value) else format(value, spec)


@contextlib.contextmanager
def _keys(stream: TextIO) -> Iterator[int | None]:
    """The terminal's file descriptor in cbreak mode (keys arrive unbuffered, unechoed), or None off a terminal.

    The terminal's settings are restored on the way out, however that happens."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        yield None
        return
    if not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(fd: int | None, seconds: float) -> bool:
    """Sleep ``seconds``, or less if ``q`` is pressed; True when it was."""
    if fd is None:
        time.sleep(seconds)
        return False
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            key = os.read(fd, 32)
            if not key or key[:1] in (b"q", b"Q"):  # q, or end of input
                return True
    return False


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
    out: TextIO | None = None,
    keys: TextIO | None = None,
) -> int:
    """Show the view every ``interval`` seconds until ``q`` (read from ``keys``, stdin by default) or Ctrl-C."""
    out = out or sys.stdout
    before = scrape(url, auth=auth, cafile=cafile)
    if not any(n == "xentd_build_info" for n, _ in before.samples):
        raise XentdError(f"{metrics_url(url)} does not look like xentd's (no xentd_build_info)")
    check_window(before, window)
    if once:
        time.sleep(interval)
        out.write(render(before, scrape(url, auth=auth, cafile=cafile), url=url, window=window, sort=sort, limit=limit))
        return 0
    with _keys(keys or sys.stdin) as fd:
        while not _wait_for_quit(fd, interval):
            after = scrape(url, auth=auth, cafile=cafile)
            text = render(before, after, url=url, window=window, sort=sort, limit=limit)
            footer = "q: quit\n" if fd is not None else ""
            out.write("\x1b[H\x1b[2J" + text + footer)  # home and clear: a full redraw per interval
            out.flush()
            before = after
    return 0
