"""Prometheus exposition: a custom collector over a state snapshot, and the HTTP server.

The collector builds fresh metric families on every scrape from one
:meth:`~xentd.state.StateStore.snapshot`, so all values in a scrape come from the
same instant and series of models that are gone simply disappear. Metric names
and labels are a contract; docs/metrics.md lists them and must change with them.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hmac
import logging
import math
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
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
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest, make_wsgi_app
from prometheus_client.registry import Collector

from xentd.config import BasicAuthConfig, TlsConfig
from xentd.errors import StartupError
from xentd.state import Counters, ModelSnapshot, Snapshot, WindowStats

log = logging.getLogger("xentd.exporter")

REQUEST_TIMEOUT_SECONDS = 30

_WINDOW_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("xentd_window_cross_entropy_nats", "cross_entropy", "Weighted mean cross-entropy over the window, in nats."),
    ("xentd_window_accuracy_ratio", "accuracy", "Weighted top-1 accuracy over the window."),
    ("xentd_window_focal_loss_nats", "focal_loss", "Weighted mean focal loss over the window, in nats."),
    (
        "xentd_window_balanced_cross_entropy_nats",
        "balanced_cross_entropy",
        "Mean over the classes present of each class's weighted mean cross-entropy, in nats.",
    ),
)


_CE_DOC = (
    "Cross-entropy over all samples: _sum is sum(w*loss), _count is sum(w), "
    "so rate(_sum)/rate(_count) is the weighted mean."
)
_SAMPLES_DOC = "Samples scored (unweighted)."
_CORRECT_DOC = "Sum of weights of samples whose top-1 prediction was right."
_BATCHES_DOC = "Batches scored."
_UNNORM_DOC = "Rows of probs or log_probs whose mass was off 1 by more than the tolerance; scored as sent."
_LAST_DOC = "When the last batch was scored (Unix seconds)."
_LAST_EVENT_DOC = "The ts header of the last batch that had one (Unix seconds)."
_CLASS_DOC = "Cross-entropy by true class: _sum is sum(w*loss), _count sum(w)."
_HIST_DOC = "Per-sample cross-entropy (unweighted)."
_WINDOW_SAMPLES_DOC = "Samples in the window (decayed count for ewma)."


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
        build = GaugeMetricFamily(
            "xentd_build_info", "xentd version and kernel backend; always 1.", labels=["version", "backend"]
        )
        build.add_metric([self._version, self._backend], 1.0)
        yield build
        yield GaugeMetricFamily("xentd_models", "Models with state in this instance.", value=len(snap.models))
        yield CounterMetricFamily(
            "xentd_messages_received",
            "Messages taken off the ingest socket, valid or not.",
            value=snap.counters.messages,
        )
        rejected = CounterMetricFamily("xentd_rejected_batches", "Batches refused, by reason.", labels=["reason"])
        for reason, count in sorted(snap.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        for name, kind, doc, label, values in daemon_families(snap.counters):
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            base = name[: -len("_total")] if kind == "counter" else name
            family = cls(base, doc, labels=[label] if label else None)
            for label_value, value in values:
                family.add_metric([label_value] if label else [], value)
            yield family
        yield from self._model_families(snap)

    def _model_families(self, snap: Snapshot) -> Iterator[Metric]:
        ce = SummaryMetricFamily("xentd_cross_entropy_nats", _CE_DOC, labels=["model"])
        samples = CounterMetricFamily("xentd_samples", _SAMPLES_DOC, labels=["model"])
        correct = CounterMetricFamily("xentd_correct_predictions", _CORRECT_DOC, labels=["model"])
        batches = CounterMetricFamily("xentd_batches", _BATCHES_DOC, labels=["model"])
        unnorm = CounterMetricFamily("xentd_unnormalized_rows", _UNNORM_DOC, labels=["model"])
        last = GaugeMetricFamily("xentd_last_batch_timestamp_seconds", _LAST_DOC, labels=["model"])
        last_event = GaugeMetricFamily("xentd_last_event_timestamp_seconds", _LAST_EVENT_DOC, labels=["model"])
        per_class = SummaryMetricFamily("xentd_class_cross_entropy_nats", _CLASS_DOC, labels=["model", "class"])
        hist = HistogramMetricFamily("xentd_sample_loss_nats", _HIST_DOC, labels=["model"])
        window_samples = GaugeMetricFamily("xentd_window_samples", _WINDOW_SAMPLES_DOC, labels=["model", "window"])
        gauges = [
            (GaugeMetricFamily(name, doc, labels=["model", "window"]), attr) for name, attr, doc in _WINDOW_GAUGES
        ]
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
                per_class.add_metric(
                    [m.name, cls],
                    count_value=float(w),  # type: ignore[arg-type]
                    sum_value=float(wl),
                )
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


def daemon_families(c: Counters) -> list[tuple[str, str, str, str | None, list[tuple[str, float]]]]:
    """Daemon-wide families: (name, type, help, label name, [(label value, value)]).

    A gauge with nothing to report yet (no snapshot written) has no sample."""

    def one(value: float | None) -> list[tuple[str, float]]:
        return [] if value is None else [("", value)]

    return [
        (
            "xentd_duplicate_batches_total",
            "counter",
            "Batches not scored because the same (model, batch_id) was scored recently: producer retries.",
            None,
            one(c.duplicate_batches),
        ),
        (
            "xentd_sequence_gaps_total",
            "counter",
            "Messages missing from producers' seq numbering: sent but never received.",
            None,
            one(c.sequence_gaps),
        ),
        (
            "xentd_models_evicted_total",
            "counter",
            "Models dropped after limits.model_ttl without a batch.",
            None,
            one(c.models_evicted),
        ),
        (
            "xentd_limit_hits_total",
            "counter",
            "Batches a cardinality limit acted on: refused (max_models, "
            'allowed_models) or with samples folded into class "other" (class_limit).',
            "limit",
            sorted(c.limit_hits.items()),
        ),
        (
            "xentd_ingest_disconnects_total",
            "counter",
            "Producer connections that ended: producers going away, "
            "or ZeroMQ dropping one that sent a frame over ingest.max_message_bytes.",
            None,
            one(c.ingest_disconnects),
        ),
        (
            "xentd_ingest_auth_failures_total",
            "counter",
            "CURVE handshakes refused: the client key is not in ingest.curve.authorized_keys.",
            None,
            one(c.ingest_auth_failures),
        ),
        (
            "xentd_snapshots_written_total",
            "counter",
            "State snapshots written by this process.",
            None,
            one(c.snapshots_written),
        ),
        (
            "xentd_snapshot_failures_total",
            "counter",
            "State snapshots that could not be written.",
            None,
            one(c.snapshot_failures),
        ),
        (
            "xentd_last_snapshot_timestamp_seconds",
            "gauge",
            "When the state in the last written snapshot was taken (Unix seconds).",
            None,
            one(c.last_snapshot_time),
        ),
        (
            "xentd_last_snapshot_duration_seconds",
            "gauge",
            "How long writing the last snapshot took.",
            None,
            one(c.last_snapshot_seconds),
        ),
        ("xentd_last_snapshot_bytes", "gauge", "Size of the last snapshot written.", None, one(c.last_snapshot_bytes)),
    ]


# --- direct text exposition -----------------------------------------------------
#
# prometheus-client formats each sample in Python with label-name validation and
# escaping, about 5 us per series: 6 s for 10,000 models. render_text writes the
# same families, from the same snapshot, as plain text format 0.0.4, with each
# model's label fragment built once. tests/test_exporter.py checks that both
# produce the same samples.

_HELP = {
    "xentd_build_info": ("gauge", "xentd version and kernel backend; always 1."),
    "xentd_models": ("gauge", "Models with state in this instance."),
    "xentd_messages_received_total": ("counter", "Messages taken off the ingest socket, valid or not."),
    "xentd_rejected_batches_total": ("counter", "Batches refused, by reason."),
}


_SPECIAL = {"inf": "+Inf", "-inf": "-Inf", "nan": "NaN"}


def _v(value: float) -> str:
    # Values are Python floats and ints (the snapshot uses .tolist()); repr is
    # their shortest exact form, and only inf/nan need Prometheus spellings.
    text = repr(value)
    return _SPECIAL[text] if text[-1] in "nf" else text


def _esc(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    return value


def _family(out: list[str], name: str, kind: str, doc: str) -> None:
    out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")


def render_text(snap: Snapshot, *, version: str, backend: str) -> str:
    """All xentd metric families of one snapshot, in Prometheus text format 0.0.4."""
    out: list[str] = []
    _family(out, "xentd_build_info", *_HELP["xentd_build_info"])
    out.append(f'xentd_build_info{{version="{_esc(version)}",backend="{_esc(backend)}"}} 1.0\n')
    _family(out, "xentd_models", *_HELP["xentd_models"])
    out.append(f"xentd_models {_v(len(snap.models))}\n")
    _family(out, "xentd_messages_received_total", *_HELP["xentd_messages_received_total"])
    out.append(f"xentd_messages_received_total {_v(snap.counters.messages)}\n")
    _family(out, "xentd_rejected_batches_total", *_HELP["xentd_rejected_batches_total"])
    out.extend(
        f'xentd_rejected_batches_total{{reason="{_esc(r)}"}} {_v(c)}\n' for r, c in sorted(snap.rejected.items())
    )
    for name, kind, doc, label, values in daemon_families(snap.counters):
        _family(out, name, kind, doc)
        for label_value, value in values:
            labels = f'{{{label}="{_esc(label_value)}"}}' if label else ""
            out.append(f"{name}{labels} {_v(value)}\n")
    models = [(f'model="{_esc(m.name)}"', m) for m in snap.models]

    def per_model(
        name: str, kind: str, doc: str, value: Callable[[ModelSnapshot], float | None], sample: str | None = None
    ) -> None:
        _family(out, name, kind, doc)
        sample = sample or name
        for lbl, m in models:
            v = value(m)
            if v is not None:
                out.append(f"{sample}{{{lbl}}} {_v(v)}\n")

    _family(out, "xentd_cross_entropy_nats", "summary", _CE_DOC)
    for lbl, m in models:
        out.append(
            f"xentd_cross_entropy_nats_count{{{lbl}}} {_v(m.weight)}\n"
            f"xentd_cross_entropy_nats_sum{{{lbl}}} {_v(m.loss_weighted_sum)}\n"
        )
    per_model("xentd_samples_total", "counter", _SAMPLES_DOC, lambda m: m.samples)
    per_model("xentd_correct_predictions_total", "counter", _CORRECT_DOC, lambda m: m.correct_weighted_sum)
    per_model("xentd_batches_total", "counter", _BATCHES_DOC, lambda m: m.batches)
    per_model("xentd_unnormalized_rows_total", "counter", _UNNORM_DOC, lambda m: m.unnormalized_rows)
    per_model("xentd_last_batch_timestamp_seconds", "gauge", _LAST_DOC, lambda m: m.last_batch_time)
    per_model("xentd_last_event_timestamp_seconds", "gauge", _LAST_EVENT_DOC, lambda m: m.last_event_time)
    _family(out, "xentd_class_cross_entropy_nats", "summary", _CLASS_DOC)
    for lbl, m in models:
        for cls, w, wl in zip(m.class_labels, m.class_weight.tolist(), m.class_loss_weighted_sum.tolist(), strict=True):
            out.append(
                f'xentd_class_cross_entropy_nats_count{{{lbl},class="{cls}"}} {_v(w)}\n'
                f'xentd_class_cross_entropy_nats_sum{{{lbl},class="{cls}"}} {_v(wl)}\n'
            )
    _family(out, "xentd_sample_loss_nats", "histogram", _HIST_DOC)
    for lbl, m in models:
        cumulative = 0
        for bound, count in zip([*map(_le, m.hist_bounds), "+Inf"], m.hist_counts.tolist(), strict=True):
            cumulative += count
            out.append(f'xentd_sample_loss_nats_bucket{{{lbl},le="{bound}"}} {_v(cumulative)}\n')
        out.append(
            f"xentd_sample_loss_nats_count{{{lbl}}} {_v(cumulative)}\n"
            f"xentd_sample_loss_nats_sum{{{lbl}}} {_v(m.loss_sum)}\n"
        )
    _family(out, "xentd_window_samples", "gauge", _WINDOW_SAMPLES_DOC)
    for lbl, m in models:
        for window, stats in m.windows:
            out.append(f'xentd_window_samples{{{lbl},window="{_esc(window)}"}} {_v(stats.samples)}\n')
    for name, attr, doc in _WINDOW_GAUGES:
        _family(out, name, "gauge", doc)
        for lbl, m in models:
            for window, stats in m.windows:
                value = getattr(stats, attr)
                if not math.isnan(value):
                    out.append(f'{name}{{{lbl},window="{_esc(window)}"}} {_v(value)}\n')
    return "".join(out)


def _le(bound: float) -> str:
    return repr(float(bound))


def _add_ratios(gauges: list[tuple[GaugeMetricFamily, str]], labels: list[str], stats: WindowStats) -> None:
    # An empty window has no mean: leave the series out rather than export NaN.
    for family, attr in gauges:
        value = getattr(stats, attr)
        if not math.isnan(value):
            family.add_metric(labels, value)


def build_registry(source: Callable[[], Snapshot], *, version: str, backend: str) -> CollectorRegistry:
    """The full registry: xentd's collector plus prometheus-client's process and platform metrics."""
    registry = CollectorRegistry()
    registry.register(XentdCollector(source, version=version, backend=backend))
    _add_process_collectors(registry)
    return registry


def _add_process_collectors(registry: CollectorRegistry) -> CollectorRegistry:
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class Exposition:
    """What /metrics serves. Text format 0.0.4 (what Prometheus takes by default)
    comes from :func:`render_text`; a client that accepts only OpenMetrics gets
    the collector's output through prometheus-client. Both read one snapshot."""

    def __init__(self, source: Callable[[], Snapshot], *, version: str, backend: str) -> None:
        self._source = source
        self._version = version
        self._backend = backend
        self.registry = build_registry(source, version=version, backend=backend)
        self._process = _add_process_collectors(CollectorRegistry())

    def text(self) -> bytes:
        body = render_text(self._source(), version=self._version, backend=self._backend)
        return body.encode("utf-8") + generate_latest(self._process)


# --- HTTP --------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    # A client that sends nothing for this long is dropped, so idle or slow
    # connections cannot pile up handler threads.
    timeout = REQUEST_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s", format % args)


def _basic_auth_check(cfg: BasicAuthConfig) -> Callable[[str], bool]:
    """A checker for an ``Authorization`` header value. The password file is read once, at start."""
    try:
        password = Path(cfg.password_file).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"metrics.basic_auth.password_file: cannot read {cfg.password_file}: {exc}") from None
    if not password:
        raise StartupError(f"metrics.basic_auth.password_file: {cfg.password_file} is empty")
    expected = f"{cfg.username}:{password}".encode()

    def check(header: str) -> bool:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, expected)

    return check


def make_app(
    exposition: Exposition, health: Callable[[], tuple[bool, str]], basic_auth: BasicAuthConfig | None = None
) -> Callable[..., Any]:
    """/metrics (behind basic auth when configured) and /healthz (always open, for liveness probes)."""
    openmetrics_app = make_wsgi_app(exposition.registry)
    authorized = _basic_auth_check(basic_auth) if basic_auth is not None else None

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            if authorized is not None and not authorized(environ.get("HTTP_AUTHORIZATION", "")):
                start_response(
                    "401 Unauthorized",
                    [
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("WWW-Authenticate", 'Basic realm="xentd", charset="UTF-8"'),
                    ],
                )
                return [b"xentd: unauthorized\n"]
            accept = environ.get("HTTP_ACCEPT", "")
            if "openmetrics" in accept and "text/plain" not in accept:
                return openmetrics_app(environ, start_response)  # type: ignore[no-any-return]
            body = exposition.text()
            headers = [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)]
            if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
                # Level 1: a 50 MB exposition compresses ~8x in a fraction of level 9's time.
                body = gzip.compress(body, compresslevel=1)
                headers.append(("Content-Encoding", "gzip"))
            start_response("200 OK", headers)
            return [body]
        if path == "/healthz":
            ok, text = health()
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")]
            )
            return [text.encode("utf-8") + b"\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"xentd: try /metrics or /healthz\n"]

    return app


def _tls_context(cfg: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        if cfg.client_ca_file:
            ctx.load_verify_locations(cfg.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"metrics.tls: cannot load the certificate, key or CA: {exc}") from None
    return ctx


class _TlsMixIn:
    """The TLS handshake runs on the request's own thread, under the request timeout,
    so a client that stalls mid-handshake cannot block the accept loop."""

    tls_context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(REQUEST_TIMEOUT_SECONDS)
        try:
            tls = self.tls_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            super().finish_request(tls, client_address)  # type: ignore[misc]
        finally:
            tls.close()


class _TlsServer(_TlsMixIn, _Server):
    pass


class _TlsServer6(_TlsMixIn, _Server6):
    pass


class MetricsServer:
    """Serves the WSGI app on a background thread, over HTTPS when ``tls`` is given."""

    def __init__(self, host: str, port: int, app: Callable[..., Any], *, tls: TlsConfig | None = None) -> None:
        context = _tls_context(tls) if tls is not None else None
        if context is not None:
            server_class: type[_Server] = _TlsServer6 if ":" in host else _TlsServer
        else:
            server_class = _Server6 if ":" in host else _Server
        self._httpd = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
        if context is not None:
            self._httpd.tls_context = context  # type: ignore[attr-defined]
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="xentd-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
