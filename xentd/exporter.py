"""Prometheus exposition: a custom collector over a state snapshot, and the HTTP server.

The collector builds fresh metric families on every scrape from one
:meth:`~xentd.state.StateStore.snapshot`, so all values in a scrape come from the
same instant and series of models that are gone simply disappear. Metric names
and labels are a contract; docs/metrics.md lists them and must change with them.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector

from xentd.state import Snapshot, WindowStats

log = logging.getLogger("xentd.exporter")

_WINDOW_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("xentd_window_cross_entropy_nats", "cross_entropy",
     "Weighted mean cross-entropy over the window, in nats."),
    ("xentd_window_accuracy_ratio", "accuracy", "Weighted top-1 accuracy over the window."),
    ("xentd_window_focal_loss_nats", "focal_loss", "Weighted mean focal loss over the window, in nats."),
    ("xentd_window_balanced_cross_entropy_nats", "balanced_cross_entropy",
     "Mean over the classes present of each class's weighted mean cross-entropy, in nats."),
)


class XentdCollector(Collector):
    """Reads a snapshot from ``source`` on every scrape."""

    def __init__(self, source: Callable[[], Snapshot], *, version: str, backend: str) -> None:
        self._source = source
        self._version = version
        self._backend = backend

    def describe(self) -> Iterable[Metric]:
        # Registering must not scrape: the state may not exist yet.
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._source()
        build = GaugeMetricFamily("xentd_build_info", "xentd version and kernel backend; always 1.",
                                  labels=["version", "backend"])
        build.add_metric([self._version, self._backend], 1.0)
        yield build
        yield GaugeMetricFamily("xentd_models", "Models with state in this instance.", value=len(snap.models))
        yield CounterMetricFamily("xentd_messages_received", "Messages taken off the ingest socket, "
                                  "valid or not.", value=snap.messages)
        rejected = CounterMetricFamily("xentd_rejected_batches", "Batches refused, by reason.",
                                       labels=["reason"])
        for reason, count in sorted(snap.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield from self._model_families(snap)

    def _model_families(self, snap: Snapshot) -> Iterator[Metric]:
        ce = SummaryMetricFamily("xentd_cross_entropy_nats",
                                 "Cross-entropy over all samples: _sum is sum(w*loss), _count is sum(w), "
                                 "so rate(_sum)/rate(_count) is the weighted mean.", labels=["model"])
        samples = CounterMetricFamily("xentd_samples", "Samples scored (unweighted).", labels=["model"])
        correct = CounterMetricFamily("xentd_correct_predictions",
                                      "Sum of weights of samples whose top-1 prediction was right.",
                                      labels=["model"])
        batches = CounterMetricFamily("xentd_batches", "Batches scored.", labels=["model"])
        unnorm = CounterMetricFamily("xentd_unnormalized_rows",
                                     "Rows of probs or log_probs whose mass was off 1 by more than the "
                                     "tolerance; scored as sent.", labels=["model"])
        last = GaugeMetricFamily("xentd_last_batch_timestamp_seconds",
                                 "When the last batch was scored (Unix seconds).", labels=["model"])
        last_event = GaugeMetricFamily("xentd_last_event_timestamp_seconds",
                                       "The ts header of the last batch that had one (Unix seconds).",
                                       labels=["model"])
        per_class = SummaryMetricFamily("xentd_class_cross_entropy_nats",
                                        "Cross-entropy by true class: _sum is sum(w*loss), _count sum(w).",
                                        labels=["model", "class"])
        hist = HistogramMetricFamily("xentd_sample_loss_nats", "Per-sample cross-entropy (unweighted).",
                                     labels=["model"])
        window_samples = GaugeMetricFamily("xentd_window_samples",
                                           "Samples in the window (decayed count for ewma).",
                                           labels=["model", "window"])
        gauges = [(GaugeMetricFamily(name, doc, labels=["model", "window"]), attr)
                  for name, attr, doc in _WINDOW_GAUGES]
        for m in snap.models:
            label = [m.name]
            # Weighted counts are floats; the exposition format allows them.
            ce.add_metric(label, count_value=m.weight, sum_value=m.loss_weighted_sum)  # type: ignore[arg-type]
            samples.add_metric(label, m.samples)
            correct.add_metric(label, m.correct_weighted_sum)
            batches.add_metric(label, m.batches)
            unnorm.add_metric(label, m.unnormalized_rows)
            last.add_metric(label, m.last_batch_time)
            if m.last_event_time is not None:
                last_event.add_metric(label, m.last_event_time)
            for cls, w, wl in zip(m.class_labels, m.class_weight, m.class_loss_weighted_sum, strict=True):
                per_class.add_metric([m.name, cls], count_value=float(w),  # type: ignore[arg-type]
                                     sum_value=float(wl))
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip([*map(_le, m.hist_bounds), "+Inf"], m.hist_counts, strict=True):
                cumulative += int(count)
                buckets.append((bound, cumulative))
            hist.add_metric(label, buckets, sum_value=m.loss_sum)
            for window, stats in m.windows:
                window_samples.add_metric([m.name, window], stats.samples)
                _add_ratios(gauges, [m.name, window], stats)
        yield from (ce, samples, correct, batches, unnorm, last, last_event, per_class, hist, window_samples)
        yield from (g for g, _ in gauges)


def _le(bound: float) -> str:
    return repr(float(bound))


def _add_ratios(gauges: list[tuple[GaugeMetricFamily, str]], labels: list[str], stats: WindowStats) -> None:
    # An empty window has no mean: leave the series out rather than export NaN.
    for family, attr in gauges:
        value = getattr(stats, attr)
        if not math.isnan(value):
            family.add_metric(labels, value)


def build_registry(source: Callable[[], Snapshot], *, version: str, backend: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(XentdCollector(source, version=version, backend=backend))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


# --- HTTP --------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s", format % args)


def make_app(registry: CollectorRegistry, health: Callable[[], tuple[bool, str]]) -> Callable[..., Any]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            ok, text = health()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [text.encode("utf-8") + b"\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"xentd: try /metrics or /healthz\n"]

    return app


class MetricsServer:
    """Serves the WSGI app on a background thread."""

    def __init__(self, host: str, port: int, app: Callable[..., Any]) -> None:
        server_class = _Server6 if ":" in host else _Server
        self._httpd = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="xentd-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
