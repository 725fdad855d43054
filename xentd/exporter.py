"""Prometheus exposition: one table of metric families, two writers over a state snapshot, and the HTTP server.

:data:`FAMILIES` declares every xentd family once: name, type, labels, help and
where its values come from. :func:`render_text` (text format 0.0.4, the fast path
Prometheus scrapes) and :class:`XentdCollector` (prometheus-client, for
OpenMetrics) both render from it, building fresh families on every scrape from
one :meth:`~xentd.state.StateStore.snapshot`, so all values in a scrape come from
the same instant and series of models that are gone simply disappear. Metric
names and labels are a contract; docs/metrics.md lists them and a test checks
that it lists exactly the table.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gzip
import hmac
import io
import itertools
import logging
import math
import queue
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from xentd.config import BasicAuthConfig, ExportConfig, HttpLimits, TlsConfig
from xentd.errors import StartupError
from xentd.joins import OUTCOMES
from xentd.state import Counters, ModelSnapshot, Snapshot

log = logging.getLogger("xentd.exporter")

Backend = str | Callable[[], str]
"""The kernel backend's name for xentd_build_info, or a function that says it at scrape time
(the daemon serves /metrics while the kernels still compile)."""


def _backend_name(backend: Backend) -> str:
    return backend if isinstance(backend, str) else backend()


# --- the metric families ----------------------------------------------------------
#
# One table says, for every xentd family, its name, type, labels, help text and
# where its values come from. The text writer (render_text) and the collector
# (XentdCollector, for OpenMetrics) both render from it, so they cannot
# disagree; docs/metrics.md lists the same families, and tests/test_exporter.py
# checks all three against each other.

Labels = tuple[str, ...]
Sample = tuple[Labels, Any]
"""(label values, value). The value is a number for a counter or gauge, (count, sum)
for a summary, and (bucket upper bounds, per-bucket counts with +Inf last, sum) for a histogram."""


@dataclass(frozen=True, slots=True)
class Scrape:
    """What one scrape reads: a snapshot, the build facts for xentd_build_info, and
    what [export] lets through (see :func:`_plan`): the models exported, those whose
    per-class series are, and how many per-model series were left out for the budget."""

    snapshot: Snapshot
    version: str
    backend: str
    models: tuple[ModelSnapshot, ...] = ()
    per_class: frozenset[str] = frozenset()
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family. ``name`` is the text-format name (a counter's ends in
    ``_total``). A per-model family has ``model`` as its first label and reads each
    :class:`ModelSnapshot` through ``per_model``, which yields the other labels'
    values; a daemon-wide family reads the whole scrape through ``per_scrape``.
    A sample whose value does not exist yet is left out, never exported as NaN.
    A ``per_class`` family has a series per class of a model, so [export] gates it per model.
    ``series``, where given, says how many series ``per_model`` yields for a model without
    building its samples (for the max_series budget; a test checks it against the samples)."""

    name: str
    type: Literal["counter", "gauge", "summary", "histogram"]
    labels: Labels
    help: str
    per_scrape: Callable[[Scrape], Iterable[Sample]] | None = None
    per_model: Callable[[ModelSnapshot], Iterable[Sample]] | None = None
    per_class: bool = False
    series: Callable[[ModelSnapshot], int] | None = None


def _one(value: float | None) -> list[Sample]:
    return [] if value is None else [((), value)]


def _counter(name: str, help: str, value: Callable[[Counters], float | None]) -> Family:
    return Family(name, "counter", (), help, per_scrape=lambda s: _one(value(s.snapshot.counters)))


def _gauge(name: str, help: str, value: Callable[[Counters], float | None]) -> Family:
    return Family(name, "gauge", (), help, per_scrape=lambda s: _one(value(s.snapshot.counters)))


def _model(name: str, kind: Literal["counter", "gauge"], help: str, value: Callable[[ModelSnapshot], Any]) -> Family:
    return Family(name, kind, ("model",), help, per_model=lambda m: _one(value(m)))


def _window(
    name: str,
    help: str,
    attr: str,
    windows: Callable[[ModelSnapshot], list[tuple[str, Any]]] = lambda m: m.windows,
    *,
    exact: bool = False,
) -> Family:
    """A gauge per window: ``attr`` of each of ``windows(m)``'s derived figures, absent where
    it is NaN (an empty window has no mean). ``exact``: the series budget counts the samples
    themselves rather than one per window (for figures that many models never have)."""

    def samples(m: ModelSnapshot) -> Iterator[Sample]:
        for window, stats in windows(m):
            value = getattr(stats, attr)
            if not math.isnan(value):
                yield (window,), value

    series = (lambda m: sum(1 for _ in samples(m))) if exact else None
    return Family(name, "gauge", ("model", "window"), help, per_model=samples, series=series)


def _label_free(name: str, help: str, attr: str) -> Family:
    """A summary over every prediction row a model sent (:class:`xentd.state.PredictionSummary`)."""

    def samples(m: ModelSnapshot) -> list[Sample]:
        p = m.predictions
        return [((), (p.weight, getattr(p, attr)))] if p.rows else []

    return Family(name, "summary", ("model",), help, per_model=samples)


def _calibration_bins(name: str, help: str, attr: str) -> Family:
    """A counter per reliability bin (``attr`` of :class:`xentd.state.CalibrationSummary`),
    labelled with the bin's upper edge; every bin is always there."""

    def samples(m: ModelSnapshot) -> list[Sample]:
        c = m.calibration
        return [((b,), v) for b, v in zip(c.bin_labels, getattr(c, attr).tolist(), strict=True)]

    return Family(
        name, "counter", ("model", "bin"), help, per_model=samples, series=lambda m: len(m.calibration.bin_labels)
    )


def _calibration_window(name: str, help: str, attr: str) -> Family:
    """A window gauge from :class:`xentd.calibration.CalibrationWindow`. Counted exactly for
    the series budget: a multiclass model has no decomposition series, and NE is absent
    while the prior's entropy is 0."""
    return _window(name, help, attr, lambda m: m.calibration.windows, exact=True)


FAMILIES: tuple[Family, ...] = (
    Family(
        "xentd_build_info",
        "gauge",
        ("version", "backend"),
        "xentd version and kernel backend; always 1.",
        per_scrape=lambda s: [((s.version, s.backend), 1.0)],
    ),
    Family(
        "xentd_models",
        "gauge",
        (),
        "Models with state in this instance.",
        per_scrape=lambda s: [((), len(s.snapshot.models))],
    ),
    Family(
        "xentd_series_dropped",
        "gauge",
        (),
        "Per-model series left out of this scrape to keep within export.max_series.",
        per_scrape=lambda s: [((), s.dropped)],
    ),
    _counter(
        "xentd_messages_received_total", "Messages taken off the ingest socket, valid or not.", lambda c: c.messages
    ),
    Family(
        "xentd_rejected_batches_total",
        "counter",
        ("reason",),
        "Batches refused, by reason.",
        per_scrape=lambda s: [((r,), n) for r, n in sorted(s.snapshot.rejected.items())],
    ),
    _counter(
        "xentd_duplicate_batches_total",
        "Batches not scored because the same (model, batch_id) was scored recently: producer retries.",
        lambda c: c.duplicate_batches,
    ),
    _counter(
        "xentd_empty_batches_total",
        "Well-formed batches of zero rows: accepted, nothing scored (a producer flushing an empty buffer).",
        lambda c: c.empty_batches,
    ),
    _counter(
        "xentd_sequence_gaps_total",
        "Messages missing from producers' seq numbering: sent but never received.",
        lambda c: c.sequence_gaps,
    ),
    _counter(
        "xentd_models_evicted_total",
        "Models dropped after limits.model_ttl without a batch.",
        lambda c: c.models_evicted,
    ),
    Family(
        "xentd_limit_hits_total",
        "counter",
        ("limit",),
        "Batches a cardinality limit acted on: refused (max_models, "
        'allowed_models) or with samples folded into class "other" (class_limit).',
        per_scrape=lambda s: [((k,), n) for k, n in sorted(s.snapshot.counters.limit_hits.items())],
    ),
    _counter(
        "xentd_ingest_disconnects_total",
        "Producer connections that ended: producers going away, "
        "or ZeroMQ dropping one that sent a frame over ingest.max_message_bytes.",
        lambda c: c.ingest_disconnects,
    ),
    _counter(
        "xentd_ingest_auth_failures_total",
        "CURVE handshakes refused: the client key is not in ingest.curve.authorized_keys.",
        lambda c: c.ingest_auth_failures,
    ),
    _counter(
        "xentd_snapshots_written_total", "State snapshots written by this process.", lambda c: c.snapshots_written
    ),
    _counter(
        "xentd_snapshot_failures_total", "State snapshots that could not be written.", lambda c: c.snapshot_failures
    ),
    _gauge(
        "xentd_last_snapshot_timestamp_seconds",
        "When the state in the last written snapshot was taken (Unix seconds).",
        lambda c: c.last_snapshot_time,
    ),
    _gauge(
        "xentd_last_snapshot_duration_seconds",
        "How long writing the last snapshot took.",
        lambda c: c.last_snapshot_seconds,
    ),
    _gauge("xentd_last_snapshot_bytes", "Size of the last snapshot written.", lambda c: c.last_snapshot_bytes),
    Family(
        "xentd_cross_entropy_nats",
        "summary",
        ("model",),
        "Cross-entropy over all samples: _sum is sum(w*loss), _count is sum(w), "
        "so rate(_sum)/rate(_count) is the weighted mean.",
        per_model=lambda m: [((), (m.weight, m.loss_weighted_sum))],
    ),
    _model("xentd_samples_total", "counter", "Samples scored (unweighted).", lambda m: m.samples),
    _model(
        "xentd_correct_predictions_total",
        "counter",
        "Sum of weights of samples whose top-1 prediction was right.",
        lambda m: m.correct_weighted_sum,
    ),
    _model("xentd_batches_total", "counter", "Batches scored.", lambda m: m.batches),
    _model(
        "xentd_unnormalized_rows_total",
        "counter",
        "Rows of probs or log_probs whose mass was off 1 by more than the tolerance; scored as sent.",
        lambda m: m.unnormalized_rows,
    ),
    _model(
        "xentd_unnormalized_targets_total",
        "counter",
        "Target rows that are not a distribution (soft rows off 1 by more than the tolerance, "
        "integer rows that are not one-hot); scored as sent.",
        lambda m: m.unnormalized_targets,
    ),
    Family(
        "xentd_model_rejected_batches_total",
        "counter",
        ("model", "reason"),
        "Batches of this model refused, by reason; only models that already have state.",
        per_model=lambda m: [((r,), n) for r, n in sorted(m.rejected.items())],
    ),
    _model(
        "xentd_last_batch_timestamp_seconds",
        "gauge",
        "When the last batch was scored (Unix seconds).",
        lambda m: m.last_batch_time,
    ),
    _model(
        "xentd_last_event_timestamp_seconds",
        "gauge",
        "The ts header of the last batch that had one (Unix seconds).",
        lambda m: m.last_event_time,
    ),
    Family(
        "xentd_class_cross_entropy_nats",
        "summary",
        ("model", "class"),
        "Cross-entropy by true class: _sum is sum(w*loss), _count sum(w).",
        per_model=lambda m: [
            ((c,), (w, wl))
            for c, w, wl in zip(
                m.class_labels, m.class_weight.tolist(), m.class_loss_weighted_sum.tolist(), strict=True
            )
        ],
        per_class=True,
        series=lambda m: 2 * len(m.class_labels),
    ),
    Family(
        "xentd_sample_loss_nats",
        "histogram",
        ("model",),
        "Per-sample cross-entropy (unweighted).",
        per_model=lambda m: [((), (m.hist_bounds.tolist(), m.hist_counts.tolist(), m.loss_sum))],
        series=lambda m: len(m.hist_counts) + 2,
    ),
    Family(
        "xentd_window_samples",
        "gauge",
        ("model", "window"),
        "Samples in the window (decayed count for ewma).",
        per_model=lambda m: [((window,), stats.samples) for window, stats in m.windows],
    ),
    _window(
        "xentd_window_cross_entropy_nats", "Weighted mean cross-entropy over the window, in nats.", "cross_entropy"
    ),
    _window("xentd_window_accuracy_ratio", "Weighted top-1 accuracy over the window.", "accuracy"),
    _window("xentd_window_focal_loss_nats", "Weighted mean focal loss over the window, in nats.", "focal_loss"),
    _window(
        "xentd_window_balanced_cross_entropy_nats",
        "Mean over the classes present of each class's weighted mean cross-entropy, in nats.",
        "balanced_cross_entropy",
    ),
    # --- delayed labels and label-free statistics (xentd.joins, xentd.predstats) ---
    Family(
        "xentd_pending_bytes",
        "gauge",
        (),
        "Bytes the join store holds for predictions waiting for labels, against labels.max_pending_bytes.",
        per_scrape=lambda s: [((), s.snapshot.pending_bytes)],
    ),
    Family(
        "xentd_pending_bytes_limit",
        "gauge",
        (),
        "labels.max_pending_bytes: past it the oldest waiting predictions are evicted.",
        per_scrape=lambda s: [((), s.snapshot.pending_bytes_limit)],
    ),
    Family(
        "xentd_label_joins_total",
        "counter",
        ("model", "outcome"),
        "Delayed labels and waiting predictions by outcome: matched, unmatched (a label whose id does not wait), "
        "duplicate (a prediction whose id already waits), expired (past labels.ttl), evicted (over the budget).",
        per_model=lambda m: [] if m.joins is None else [((o,), n) for o, n in m.joins.outcomes.items()],
    ),
    Family(
        "xentd_pending_predictions",
        "gauge",
        ("model",),
        "Predictions waiting for their labels.",
        per_model=lambda m: [] if m.joins is None else [((), m.joins.pending)],
    ),
    Family(
        "xentd_label_delay_seconds",
        "histogram",
        ("model",),
        "Label arrival minus prediction arrival, one per matched join.",
        per_model=lambda m: (
            []
            if m.joins is None
            else [((), (m.joins.delay_bounds.tolist(), m.joins.delay_counts.tolist(), m.joins.delay_sum))]
        ),
        series=lambda m: 0 if m.joins is None else len(m.joins.delay_counts) + 2,
    ),
    _label_free(
        "xentd_prediction_entropy_nats",
        "Entropy of every predicted distribution received, labelled or not: _sum is sum(w*H), _count sum(w).",
        "entropy_weighted_sum",
    ),
    _label_free(
        "xentd_prediction_confidence",
        "Top-class probability of every prediction received: _sum is sum(w*max p), _count sum(w).",
        "confidence_weighted_sum",
    ),
    Family(
        "xentd_window_prediction_entropy_nats",
        "gauge",
        ("model", "window"),
        "Weighted mean entropy of the predictions received in the window, in nats.",
        per_model=lambda m: [((w,), h) for w, h in m.predictions.window_entropy if not math.isnan(h)],
    ),
    # --- calibration and normalized entropy (xentd.calibration) ---
    _calibration_bins(
        "xentd_calibration_weight_total",
        "Reliability bins: sum of weights W_b of the samples whose confidence falls in the bin "
        "(bin is its upper edge).",
        "weight",
    ),
    _calibration_bins(
        "xentd_calibration_confidence_total",
        "Reliability bins: sum of w*confidence C_b. ECE = sum_b |O_b - C_b| / sum_b W_b.",
        "confidence",
    ),
    _calibration_bins(
        "xentd_calibration_outcome_total",
        "Reliability bins: sum of w*outcome O_b (the target for binary models, top-1 right for multiclass).",
        "outcome",
    ),
    Family(
        "xentd_brier_score",
        "summary",
        ("model",),
        "Brier score over all samples: _sum is sum(w*brier), _count sum(w).",
        per_model=lambda m: [((), (m.calibration.brier_weight, m.calibration.brier_weighted_sum))],
    ),
    _calibration_window(
        "xentd_window_calibration_error", "Expected calibration error (ECE) over the window.", "calibration_error"
    ),
    _calibration_window(
        "xentd_window_max_calibration_error",
        "Maximum calibration error (MCE) over the window: the largest |O_b - C_b| / W_b.",
        "max_calibration_error",
    ),
    _calibration_window("xentd_window_brier_score", "Weighted mean Brier score over the window.", "brier_score"),
    _calibration_window(
        "xentd_window_brier_reliability",
        "Reliability term of the Brier score's Murphy decomposition over the window (binary models).",
        "brier_reliability",
    ),
    _calibration_window(
        "xentd_window_brier_resolution",
        "Resolution term of the Brier score's Murphy decomposition over the window (binary models).",
        "brier_resolution",
    ),
    _calibration_window(
        "xentd_window_brier_uncertainty",
        "Uncertainty term of the Brier score's Murphy decomposition over the window (binary models).",
        "brier_uncertainty",
    ),
    _calibration_window(
        "xentd_window_normalized_entropy",
        "Normalized entropy: the window's mean cross-entropy over the entropy of its target prior; "
        "below 1 is better than predicting the prior. Absent while that entropy is 0.",
        "normalized_entropy",
    ),
)


# --- cardinality: which per-model series a scrape carries (docs/metrics.md, "Cardinality") ---

# A warning about series left out goes to the log at most this often; the gauge says it every scrape.
_DROP_WARNING_SECONDS = 60.0


def _series(family: Family, value: Any) -> int:
    """How many series one sample is: a summary is _count and _sum, a histogram its buckets, _count and _sum."""
    if family.type == "summary":
        return 2
    if family.type == "histogram":
        return len(value[1]) + 2
    return 1


def _family_series(family: Family, m: ModelSnapshot) -> int:
    """How many series a per-model family has for ``m``."""
    if family.series is not None:
        return family.series(m)
    assert family.per_model is not None
    return sum(_series(family, v) for _, v in family.per_model(m))


def _cost(m: ModelSnapshot, per_class: bool) -> int:
    return sum(_family_series(f, m) for f in FAMILIES if f.per_model is not None and f.per_class == per_class)


def _upper_bound(models: tuple[ModelSnapshot, ...], wanted: frozenset[str]) -> int:
    """At least as many per-model series as the scrape would carry, counted without building a
    sample: a family with one series per model counts 1 (2 for a summary), one per window counts
    the windows, one per reason the reasons, and the others say theirs through ``series``.
    Exact counting builds every sample of every model; under the budget, this is enough."""
    fixed = per_window = 0
    outcome = reasons = 0
    counted: list[Family] = []
    for f in FAMILIES:
        if f.per_model is None:
            continue
        if f.series is not None:
            counted.append(f)
        elif f.labels == ("model",):
            fixed += 2 if f.type == "summary" else 1
        elif f.labels == ("model", "window"):
            per_window += 1
        elif f.labels == ("model", "outcome"):
            outcome += 1
        elif f.labels == ("model", "reason"):
            reasons += 1
        else:
            raise AssertionError(f"no series bound for {f.name}")  # a new family shape: teach this function
    total = 0
    for m in models:
        total += fixed + per_window * len(m.windows) + reasons * len(m.rejected)
        total += outcome * len(OUTCOMES) if m.joins is not None else 0
        total += sum(f.series(m) for f in counted if not f.per_class or m.name in wanted)  # type: ignore[misc]
    return total


def _plan(snap: Snapshot, export: ExportConfig) -> tuple[tuple[ModelSnapshot, ...], frozenset[str], int]:
    """(models exported, models whose per-class series are exported, per-model series left out).

    Per-class series are wanted for every model ("all"), none ("none"), or models with at
    most ``per_class_max_classes`` classes ("auto"). Past ``max_series``, whole models
    come first: in name order, each model's other series while they fit; then, in
    name order, per-class series while they fit. Both stop at the first that does not."""
    wanted = frozenset(
        m.name
        for m in snap.models
        if export.per_class == "all"
        or (export.per_class == "auto" and len(m.class_labels) <= export.per_class_max_classes)
    )
    models = tuple(snap.models)
    if export.max_series == 0 or _upper_bound(models, wanted) <= export.max_series:
        return models, wanted, 0
    ordered = sorted(models, key=lambda m: m.name)
    base = {m.name: _cost(m, per_class=False) for m in ordered}
    classes = {m.name: _cost(m, per_class=True) for m in ordered if m.name in wanted}
    total = sum(base.values()) + sum(classes.values())
    if total <= export.max_series:
        return models, wanted, 0
    budget = export.max_series
    kept: set[str] = set()
    for m in ordered:
        if base[m.name] > budget:
            break
        kept.add(m.name)
        budget -= base[m.name]
    detailed: set[str] = set()
    for m in ordered:
        if m.name not in kept or m.name not in wanted:
            continue
        if classes[m.name] > budget:
            break
        detailed.add(m.name)
        budget -= classes[m.name]
    exported = sum(base[n] for n in kept) + sum(classes[n] for n in detailed)
    return tuple(m for m in models if m.name in kept), frozenset(detailed), total - exported


class _DropWarning:
    """Logs series left out of a scrape, at most once per :data:`_DROP_WARNING_SECONDS`
    (both writers share one, so a scrape in either format counts)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: float | None = None

    def note(self, dropped: int, export: ExportConfig) -> None:
        if not dropped:
            return
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < _DROP_WARNING_SECONDS:
                return
            self._last = now
        log.warning(
            "export: %d per-model series left out of /metrics to stay within export.max_series = %d "
            "(xentd_series_dropped; docs/metrics.md, Cardinality)",
            dropped,
            export.max_series,
        )


def _scrape(
    snap: Snapshot, version: str, backend: Backend, export: ExportConfig, warning: _DropWarning | None
) -> Scrape:
    models, per_class, dropped = _plan(snap, export)
    if warning is not None:
        warning.note(dropped, export)
    return Scrape(snap, version, _backend_name(backend), models, per_class, dropped)


def _samples(family: Family, scrape: Scrape) -> Iterator[Sample]:
    """Every sample of a family with all its label values (the model's first)."""
    if family.per_scrape is not None:
        yield from family.per_scrape(scrape)
    if family.per_model is not None:
        for m in scrape.models:
            if family.per_class and m.name not in scrape.per_class:
                continue
            for labels, value in family.per_model(m):
                yield (m.name, *labels), value


# --- the collector (OpenMetrics, and the reference for the text writer) -------------------


class _WeightedSummary:
    """A summary whose ``_count`` is a sum of weights, so possibly fractional.

    Text format 0.0.4 takes that. OpenMetrics requires a summary's count to be an
    integer, so there the pair is written as two gauge families whose samples
    have the same names and values: ``<name>_sum`` and ``<name>_count``. Queries
    read the same series either way."""

    def __init__(self, name: str, doc: str, labels: list[str], *, openmetrics: bool) -> None:
        self._summary: SummaryMetricFamily | None = None
        self._pair: tuple[GaugeMetricFamily, GaugeMetricFamily] | None = None
        if openmetrics:
            self._pair = (
                GaugeMetricFamily(f"{name}_sum", f"{doc} (summary _sum)", labels=labels),
                GaugeMetricFamily(f"{name}_count", f"{doc} (summary _count)", labels=labels),
            )
        else:
            self._summary = SummaryMetricFamily(name, doc, labels=labels)

    def add(self, labels: list[str], count: float, total: float) -> None:
        if self._summary is not None:
            self._summary.add_metric(labels, count_value=count, sum_value=total)  # type: ignore[arg-type]
        else:
            assert self._pair is not None
            self._pair[0].add_metric(labels, total)
            self._pair[1].add_metric(labels, count)

    def families(self) -> tuple[Metric, ...]:
        return (self._summary,) if self._summary is not None else self._pair  # type: ignore[return-value]


class XentdCollector(Collector):
    """Renders :data:`FAMILIES` from a snapshot read from ``source`` on every scrape.

    With ``openmetrics=True`` the weighted summaries are written as gauge pairs
    (see :class:`_WeightedSummary`), for the OpenMetrics exposition. ``export``
    says which per-model series go out (:func:`_plan`)."""

    def __init__(
        self,
        source: Callable[[], Snapshot],
        *,
        version: str,
        backend: Backend,
        openmetrics: bool = False,
        export: ExportConfig | None = None,
        warning: _DropWarning | None = None,
    ) -> None:
        self._source = source
        self._version = version
        self._backend = backend
        self._openmetrics = openmetrics
        self._export = export if export is not None else ExportConfig()
        self._warning = warning

    def describe(self) -> Iterable[Metric]:
        # Registering must not scrape: the state may not exist yet.
        return []

    def collect(self) -> Iterator[Metric]:
        scrape = _scrape(self._source(), self._version, self._backend, self._export, self._warning)
        for family in FAMILIES:
            yield from self._family(family, scrape)

    def _family(self, family: Family, scrape: Scrape) -> Iterable[Metric]:
        labels = list(family.labels)
        if family.type == "summary":
            summary = _WeightedSummary(family.name, family.help, labels, openmetrics=self._openmetrics)
            for values, (count, total) in _samples(family, scrape):
                summary.add(list(values), count, total)
            return summary.families()
        if family.type == "histogram":
            hist = HistogramMetricFamily(family.name, family.help, labels=labels)
            for values, (bounds, counts, total) in _samples(family, scrape):
                hist.add_metric(list(values), list(zip(_les(bounds), itertools.accumulate(counts), strict=True)), total)
            return (hist,)
        if family.type == "counter":
            metric: Metric = CounterMetricFamily(family.name.removesuffix("_total"), family.help, labels=labels)
        else:
            metric = GaugeMetricFamily(family.name, family.help, labels=labels)
        for values, value in _samples(family, scrape):
            metric.add_metric(list(values), value)  # type: ignore[attr-defined]
        return (metric,)


# --- direct text exposition -----------------------------------------------------
#
# prometheus-client formats each sample in Python with label-name validation and
# escaping, about 5 us per series: 6 s for 10,000 models. render_text writes the
# same families, from the same snapshot, as plain text format 0.0.4, with each
# model's label fragment built once. tests/test_exporter.py checks that both
# produce the same samples.

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


def _les(bounds: list[float]) -> list[str]:
    return [*(repr(float(b)) for b in bounds), "+Inf"]


def _pairs(names: Labels, values: Labels) -> str:
    return ",".join(f'{k}="{_esc(v)}"' for k, v in zip(names, values, strict=True))


def _write(out: list[str], family: Family, labels: str, value: Any) -> None:
    """One sample's lines; ``labels`` is the inside of the braces, possibly empty."""
    name = family.name
    braces = f"{{{labels}}}" if labels else ""
    if family.type == "summary":
        count, total = value
        out.append(f"{name}_count{braces} {_v(count)}\n{name}_sum{braces} {_v(total)}\n")
    elif family.type == "histogram":
        bounds, counts, total = value
        sep = "," if labels else ""
        cumulative = 0
        for le, count in zip(_les(bounds), counts, strict=True):
            cumulative += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {_v(cumulative)}\n')
        out.append(f"{name}_count{braces} {_v(cumulative)}\n{name}_sum{braces} {_v(total)}\n")
    else:
        out.append(f"{name}{braces} {_v(value)}\n")


def render_text(
    snap: Snapshot,
    *,
    version: str,
    backend: Backend,
    export: ExportConfig | None = None,
    warning: _DropWarning | None = None,
) -> str:
    """All xentd metric families of one snapshot, in Prometheus text format 0.0.4,
    with the per-model series ``export`` lets through (:func:`_plan`)."""
    scrape = _scrape(snap, version, backend, export if export is not None else ExportConfig(), warning)
    out: list[str] = []
    every_model = [(f'model="{_esc(m.name)}"', m) for m in scrape.models]
    detailed = [(lbl, m) for lbl, m in every_model if m.name in scrape.per_class]
    for family in FAMILIES:
        name = family.name
        out.append(f"# HELP {name} {family.help}\n# TYPE {name} {family.type}\n")
        if family.per_scrape is not None:
            for values, value in family.per_scrape(scrape):
                _write(out, family, _pairs(family.labels, values), value)
        per_model = family.per_model
        if per_model is None:
            continue
        extra = family.labels[1:]
        models = detailed if family.per_class else every_model
        # The loops below are the hot path (a few hundred thousand samples for
        # 10,000 models): the common shapes are spelled out rather than going
        # through _write and _pairs for every sample.
        if family.type in ("counter", "gauge") and len(extra) <= 1:
            if extra:
                key = extra[0]
                out.extend(
                    f'{name}{{{lbl},{key}="{_esc(x)}"}} {_v(v)}\n' for lbl, m in models for (x,), v in per_model(m)
                )
            else:
                out.extend(f"{name}{{{lbl}}} {_v(v)}\n" for lbl, m in models for _, v in per_model(m))
        elif family.type == "summary" and len(extra) == 1:
            key = extra[0]
            for lbl, m in models:
                for (x,), (count, total) in per_model(m):
                    labels = f'{lbl},{key}="{_esc(x)}"'
                    out.append(f"{name}_count{{{labels}}} {_v(count)}\n{name}_sum{{{labels}}} {_v(total)}\n")
        else:
            for lbl, m in models:
                for values, value in per_model(m):
                    _write(out, family, f"{lbl},{_pairs(extra, values)}" if extra else lbl, value)
    return "".join(out)


def build_registry(
    source: Callable[[], Snapshot],
    *,
    version: str,
    backend: Backend,
    openmetrics: bool = False,
    export: ExportConfig | None = None,
    warning: _DropWarning | None = None,
) -> CollectorRegistry:
    """The full registry: xentd's collector plus prometheus-client's process and platform metrics."""
    registry = CollectorRegistry()
    registry.register(
        XentdCollector(
            source, version=version, backend=backend, openmetrics=openmetrics, export=export, warning=warning
        )
    )
    _add_process_collectors(registry)
    return registry


def _add_process_collectors(registry: CollectorRegistry) -> CollectorRegistry:
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class Exposition:
    """What /metrics serves. Text format 0.0.4 (what Prometheus takes by default)
    comes from :func:`render_text`; a client that accepts only OpenMetrics gets
    the collector's output through prometheus-client. Each scrape reads one snapshot.

    ``backend`` may be a function: xentd_build_info then asks it on every scrape.
    ``export`` (the config's [export]) says which per-model series go out."""

    def __init__(
        self,
        source: Callable[[], Snapshot],
        *,
        version: str,
        backend: Backend,
        export: ExportConfig | None = None,
    ) -> None:
        self._source = source
        self._version = version
        self._backend = backend
        self._export = export if export is not None else ExportConfig()
        self._warning = _DropWarning()
        self.registry = build_registry(
            source, version=version, backend=backend, openmetrics=True, export=self._export, warning=self._warning
        )
        self._process = _add_process_collectors(CollectorRegistry())

    def text(self) -> bytes:
        body = render_text(
            self._source(), version=self._version, backend=self._backend, export=self._export, warning=self._warning
        )
        return body.encode("utf-8") + generate_latest(self._process)

    def openmetrics(self) -> bytes:
        body: bytes = generate_openmetrics(self.registry)  # type: ignore[no-untyped-call]
        return body


# --- HTTP --------------------------------------------------------------------
#
# One thread ("xentd-http") accepts connections and reads every connection's
# request without blocking; a fixed pool of workers answers complete requests.
# A client that dribbles its request therefore holds a socket and a small
# buffer, never a thread, and is closed when its request deadline passes,
# however often it sends a byte. The TLS handshake is part of the request and
# runs on the same non-blocking thread.
#
# Every limit is a [metrics] config key (config.HttpLimits; docs/metrics.md).

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(\d+)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_TEXT = "text/plain; charset=utf-8"
_ALLOWED = ("GET", "HEAD")


class _Pending:
    """A connection whose request has not fully arrived."""

    __slots__ = (
        "sock",
        "address",
        "deadline",
        "max_bytes",
        "data",
        "scanned",
        "head_end",
        "need",
        "handshaken",
        "events",
    )

    def __init__(self, sock: socket.socket, address: Any, deadline: float, *, max_bytes: int, tls: bool) -> None:
        self.sock = sock
        self.max_bytes = max_bytes
        self.address = address
        self.deadline = deadline
        self.data = bytearray()
        self.scanned = 0  # the head's end is searched for only in what arrived since
        self.head_end = -1
        self.need = -1  # bytes of the whole request, once the head is in
        self.handshaken = not tls
        self.events = selectors.EVENT_READ

    def complete(self) -> bool | None:
        """True when the whole request is in, None when it is over ``max_bytes``."""
        if self.head_end < 0:
            match = _HEAD_END.search(self.data, max(0, self.scanned - 3))
            self.scanned = len(self.data)
            if match is None:
                return None if len(self.data) > self.max_bytes else False
            self.head_end = match.end()
            length = _CONTENT_LENGTH.search(self.data, 0, self.head_end)
            self.need = self.head_end + (int(length.group(1)) if length else 0)
        if self.need > self.max_bytes:
            return None
        return len(self.data) >= self.need


class _DeadlineWriter(io.BufferedIOBase):
    """The response side of a connection: all of it must be sent within
    ``seconds`` of the first write. (A socket timeout alone applies
    to each send, so a client reading a byte at a time could hold a worker indefinitely.)"""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        super().__init__()
        self._sock = sock
        self._seconds = seconds
        self._deadline: float | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        sent = 0
        if self._deadline is None:
            self._deadline = time.monotonic() + self._seconds
        while sent < len(view):
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the client did not take the response in time")
            self._sock.settimeout(remaining)
            sent += self._sock.send(view[sent : sent + (1 << 20)])
        return sent


class _ServerHandler(ServerHandler):
    def log_exception(self, exc_info: Any) -> None:
        if isinstance(exc_info[1], TimeoutError):
            log.info("http: a client did not take its response in time")
        else:
            log.error("http: error while answering a request", exc_info=exc_info)


class _Handler(WSGIRequestHandler):
    """Answers one request whose bytes the I/O thread has already read."""

    def __init__(
        self, request: socket.socket, client_address: Any, server: WSGIServer, data: bytes, response_seconds: float
    ) -> None:
        self._data = data
        self._response_seconds = response_seconds
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(self._data)
        self.wfile = _DeadlineWriter(self.request, self._response_seconds)

    def handle(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)
        if not self.parse_request():  # it has answered 400 or the like
            return
        handler = _ServerHandler(
            self.rfile,
            self.wfile,  # type: ignore[arg-type]  # typeshed wants IO[bytes]; write() is all it uses
            self.get_stderr(),
            self.get_environ(),
            multithread=True,
        )
        handler.request_handler = self  # type: ignore[attr-defined]  # the stdlib's back pointer for logging
        handler.run(self.server.get_app())  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s", format % args)


class _HttpServer(WSGIServer):
    # Binds, listens and holds the WSGI environment; MetricsServer runs the loop.
    allow_reuse_address = True


class _HttpServer6(_HttpServer):
    address_family = socket.AF_INET6


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
    """/metrics (behind basic auth when configured) and /healthz (always open, for liveness probes).

    Both answer GET and HEAD (the same headers, no body); other methods get 405."""
    authorized = _basic_auth_check(basic_auth) if basic_auth is not None else None

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        status = "200 OK"
        headers = [("Content-Type", _TEXT)]
        if path not in ("/metrics", "/healthz"):
            status, body = "404 Not Found", b"xentd: try /metrics or /healthz\n"
        elif method not in _ALLOWED:
            status, body = "405 Method Not Allowed", f"xentd: {path} answers GET and HEAD\n".encode()
            headers.append(("Allow", ", ".join(_ALLOWED)))
        elif path == "/healthz":
            ok, text = health()
            status = "200 OK" if ok else "503 Service Unavailable"
            body = text.encode("utf-8") + b"\n"
        elif authorized is not None and not authorized(environ.get("HTTP_AUTHORIZATION", "")):
            status, body = "401 Unauthorized", b"xentd: unauthorized\n"
            headers.append(("WWW-Authenticate", 'Basic realm="xentd", charset="UTF-8"'))
        else:
            accept = environ.get("HTTP_ACCEPT", "")
            if "openmetrics" in accept and "text/plain" not in accept:
                body, headers = exposition.openmetrics(), [("Content-Type", OPENMETRICS_CONTENT_TYPE)]
            else:
                body, headers = exposition.text(), [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)]
            if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
                # Level 1: a 50 MB exposition compresses ~8x in a fraction of level 9's time.
                body = gzip.compress(body, compresslevel=1)
                headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [] if method == "HEAD" else [body]

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


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _answer_and_close(sock: socket.socket, status: str, *, handshaken: bool) -> None:
    """A short answer from the I/O thread, best effort and without blocking, then close.
    A TLS connection still in its handshake is just closed."""
    if handshaken:
        body = f"xentd: {status}\n".encode()
        head = f"HTTP/1.0 {status}\r\nContent-Type: {_TEXT}\r\nContent-Length: {len(body)}\r\n"
        with contextlib.suppress(OSError):
            sock.send(head.encode() + b"Connection: close\r\n\r\n" + body)
    _close(sock)


class MetricsServer:
    """Serves the WSGI app, over HTTPS when ``tls`` is given: one I/O thread that
    accepts and reads requests without blocking, and ``limits.workers`` threads that answer them."""

    def __init__(
        self,
        host: str,
        port: int,
        app: Callable[..., Any],
        *,
        tls: TlsConfig | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        self.limits = limits = limits if limits is not None else HttpLimits()
        self._tls = _tls_context(tls) if tls is not None else None
        server_class = _HttpServer6 if ":" in host else _HttpServer
        # The handler class is unused: workers build a _Handler for each request.
        self._httpd = server_class((host, port), WSGIRequestHandler, bind_and_activate=False)
        try:
            self._httpd.request_queue_size = limits.listen_backlog  # listen()'s backlog
            self._httpd.server_bind()
            self._httpd.server_activate()
        except BaseException:
            self._httpd.server_close()
            raise
        self._httpd.set_app(app)
        self.port = int(self._httpd.server_address[1])
        # Insertion order is accept order, which is deadline order.
        self._pending: dict[_Pending, None] = {}
        self._queue: queue.Queue[tuple[socket.socket, Any, bytes] | None] = queue.Queue(limits.max_queued_requests)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._started = False
        self._thread = threading.Thread(target=self._serve, name="xentd-http", daemon=True)
        self._workers = [
            threading.Thread(target=self._work, name=f"xentd-http-worker-{i}", daemon=True)
            for i in range(limits.workers)
        ]

    def start(self) -> None:
        self._started = True
        for worker in self._workers:
            worker.start()
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._started:
            self._thread.join(timeout=5)
            while True:  # requests not yet answered are dropped
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    _close(item[0])
            for _ in self._workers:
                self._queue.put(None)
            for worker in self._workers:
                worker.join(timeout=5)
        self._httpd.server_close()
        for s in (self._wake_r, self._wake_w):
            _close(s)

    # --- the I/O thread ---------------------------------------------------------

    def _serve(self) -> None:
        listener = self._httpd.socket
        listener.setblocking(False)
        sel = self._selector
        sel.register(listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                timeout = None
                if self._pending:
                    timeout = max(0.0, next(iter(self._pending)).deadline - time.monotonic())
                for key, _ in sel.select(timeout):
                    if key.fileobj is listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    elif key.data in self._pending:  # not closed earlier in this round
                        self._receive(key.data)
                self._expire()
        except Exception:
            log.exception("http: the server loop failed; /metrics is no longer served")
            raise
        finally:
            for p in list(self._pending):
                self._drop(p)
            sel.close()

    def _accept(self) -> None:
        for _ in range(64):  # a burst at a time, then back to the readers
            try:
                sock, address = self._httpd.socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors, say: free one rather than spin
                log.warning("http: accept failed: %s", exc)
                if self._pending:
                    self._drop(next(iter(self._pending)))
                else:
                    time.sleep(0.05)
                return
            if len(self._pending) >= self.limits.max_connections:
                self._drop(next(iter(self._pending)))
            sock.setblocking(False)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (ssl.SSLError, OSError) as exc:
                    log.debug("http: TLS setup for %s failed: %s", address, exc)
                    _close(sock)
                    continue
            p = _Pending(
                sock,
                address,
                time.monotonic() + self.limits.request_deadline_seconds,
                max_bytes=self.limits.max_request_bytes,
                tls=self._tls is not None,
            )
            self._pending[p] = None
            self._selector.register(sock, selectors.EVENT_READ, p)

    def _receive(self, p: _Pending) -> None:
        try:
            if not p.handshaken:
                p.sock.do_handshake()  # type: ignore[attr-defined]
                p.handshaken = True
            while True:  # until the kernel (or TLS) buffer is empty
                chunk = p.sock.recv(65536)
                if not chunk:
                    self._drop(p)
                    return
                p.data += chunk
                done = p.complete()
                if done is None:
                    self._refuse(p, "413 Content Too Large")
                    return
                if done:
                    self._dispatch(p)
                    return
        except (BlockingIOError, ssl.SSLWantReadError):
            self._want(p, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self._want(p, selectors.EVENT_WRITE)
        except OSError as exc:  # a reset, or a failed TLS handshake
            log.debug("http: connection from %s: %s", p.address, exc)
            self._drop(p)

    def _want(self, p: _Pending, events: int) -> None:
        if p.events != events:
            self._selector.modify(p.sock, events, p)
            p.events = events

    def _forget(self, p: _Pending) -> None:
        del self._pending[p]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(p.sock)

    def _drop(self, p: _Pending) -> None:
        self._forget(p)
        _close(p.sock)

    def _refuse(self, p: _Pending, status: str) -> None:
        self._forget(p)
        _answer_and_close(p.sock, status, handshaken=p.handshaken)

    def _dispatch(self, p: _Pending) -> None:
        self._forget(p)
        try:
            self._queue.put_nowait((p.sock, p.address, bytes(p.data)))
        except queue.Full:
            _answer_and_close(p.sock, "503 Service Unavailable", handshaken=True)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            p = next(iter(self._pending))
            if p.deadline > now:
                return
            self._refuse(p, "408 Request Timeout")

    # --- the workers --------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            sock, address, data = item
            try:
                _Handler(sock, address, self._httpd, data, self.limits.response_deadline_seconds)
            except Exception:
                log.exception("http: error while answering %s", address)
            finally:
                _close(sock)
