"""Prometheus exposition: one table of metric families, two writers over a state snapshot, and the HTTP server.

:data:`FAMILIES` declares every xentd family once: name, type, labels, help and
where its values come from. :func:`render` (text format 0.0.4, the fast path
Prometheus scrapes) and :class:`XentdCollector` (prometheus-client, for
OpenMetrics) both render from it, building fresh families on every scrape from
one :meth:`~xentd.state.StateStore.snapshot`, so all values in a scrape come from
the same instant and series of models that are gone simply disappear. Metric
names and labels are a contract; docs/metrics.md lists them and a test checks
that it lists exactly the table.

A per-model family reads the snapshot's :class:`~xentd.state.ModelColumns` (one
array per figure, a row per model) and gives its samples of every model at once as
:class:`Cells`: arrays of values, each of a :class:`Column` (one kind of sample:
``_bucket`` with ``le="0.5"``, a window, a class). The text writer hands those arrays
to a Numba kernel (:mod:`xentd.textformat`) that writes every line; the collector walks
the same cells into prometheus-client metrics. 10,000 models are ~1.5 M series.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gzip
import hmac
import io
import logging
import queue
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from xentd import textformat
from xentd.calibration import CalibrationWindow
from xentd.config import BasicAuthConfig, ExportConfig, HttpLimits, TlsConfig
from xentd.errors import StartupError
from xentd.joins import OUTCOMES
from xentd.state import Counters, ModelColumns, Snapshot, WindowStats

log = logging.getLogger("xentd.exporter")

Backend = str | Callable[[], str]
"""The kernel backend's name for xentd_build_info, or a function that says it at scrape time
(the daemon serves /metrics while the kernels still compile)."""


def _backend_name(backend: Backend) -> str:
    return backend if isinstance(backend, str) else backend()


# --- cells: a family's samples of every model, as arrays ------------------------------------

Labels = tuple[str, ...]
Sample = tuple[Labels, Any]
"""(label values, value) of a daemon-wide family. The value is a number for a counter or gauge,
(count, sum) for a summary, and (bucket upper bounds, per-bucket counts with +Inf last, sum) for a histogram."""


@dataclass(frozen=True, slots=True)
class Column:
    """One kind of sample of a family: the suffix of its name (``_count``, ``_bucket``, or
    none), the labels it has beyond ``model`` as (name, value) pairs, and whether its values
    are integers (written as ``repr`` writes an int: ``3``, not ``3.0``)."""

    suffix: str
    labels: tuple[tuple[str, str], ...] = ()
    integer: bool = False


@dataclass(frozen=True, slots=True)
class Cells:
    """A family's samples of every row (a model; a daemon-wide family has one row).

    Row r's samples are cells ``offsets[r]:offsets[r + 1]``, in the order they are written;
    cell c is a sample of ``columns[column[c]]`` with value ``values[c]``. An integer
    column's values are int64 held as their bit patterns (``values.view(np.int64)``),
    so counts above 2**53 stay exact. A sample that does not exist (a mean of an empty
    window) has no cell: it is left out, never exported as NaN."""

    columns: tuple[Column, ...]
    offsets: np.ndarray  # (rows + 1,) int64
    column: np.ndarray  # (cells,) int32
    values: np.ndarray  # (cells,) float64

    def series(self) -> np.ndarray:
        """How many series each row has."""
        return np.diff(self.offsets)


def _bits(a: Any) -> np.ndarray:
    """Integers as float64 cells: their int64 bit patterns."""
    return np.ascontiguousarray(a, np.int64).view(np.float64)


def _cells(columns: tuple[Column, ...], values: np.ndarray, present: np.ndarray | None = None) -> Cells:
    """Cells of a (rows, columns) matrix of float64 cell values, row by row; ``present``
    (same shape) says which exist (all, when None)."""
    rows, k = values.shape
    column = np.tile(np.arange(k, dtype=np.int32), rows)
    flat = np.ascontiguousarray(values).ravel()
    if present is None:
        return Cells(columns, np.arange(rows + 1, dtype=np.int64) * k, column, flat)
    offsets = np.zeros(rows + 1, np.int64)
    np.cumsum(present.sum(axis=1), out=offsets[1:])
    keep = present.ravel()
    return Cells(columns, offsets, column[keep], flat[keep])


def _one(value: np.ndarray, *, integer: bool = False, present: np.ndarray | None = None) -> Cells:
    """One sample per model (where ``present``)."""
    cells = _bits(value) if integer else np.asarray(value, np.float64)
    return _cells((Column("", (), integer),), cells[:, None], None if present is None else present[:, None])


def _summary(count: np.ndarray, total: np.ndarray, present: np.ndarray | None = None) -> Cells:
    """A summary per model (where ``present``): ``_count``, then ``_sum``."""
    columns = (Column("_count"), Column("_sum"))
    mask = None if present is None else np.repeat(present[:, None], 2, axis=1)
    return _cells(columns, np.stack([count, total], axis=1), mask)


def _histogram(bounds: np.ndarray, counts: np.ndarray, total: np.ndarray, present: np.ndarray | None = None) -> Cells:
    """A histogram per model from per-bucket ``counts`` (+Inf last): cumulative buckets, ``_count``, ``_sum``."""
    les = [*(repr(float(b)) for b in bounds), "+Inf"]
    columns = (
        *(Column("_bucket", (("le", le),), integer=True) for le in les),
        Column("_count", (), integer=True),
        Column("_sum"),
    )
    raw = np.empty((counts.shape[0], len(columns)), np.int64)
    np.cumsum(counts, axis=1, out=raw[:, : len(les)])
    raw[:, len(les)] = raw[:, len(les) - 1]
    raw[:, -1] = np.ascontiguousarray(total, np.float64).view(np.int64)
    mask = None if present is None else np.repeat(present[:, None], len(columns), axis=1)
    return _cells(columns, raw.view(np.float64), mask)


def _by_label(label: str, names: Iterable[str], values: np.ndarray, *, nan: bool = False) -> Cells:
    """A sample per model and label value (``values``: (models, labels)); NaN left out unless ``nan``."""
    columns = tuple(Column("", ((label, n),)) for n in names)
    values = np.asarray(values, np.float64)
    return _cells(columns, values, None if nan else ~np.isnan(values))


def _rejected(t: ModelColumns) -> Cells:
    """Each model's refused batches by reason, in reason order; only the reasons that happened."""
    reasons = sorted({r for counts in t.rejected for r in counts})
    at = {r: k for k, r in enumerate(reasons)}
    offsets = np.zeros(len(t) + 1, np.int64)
    column: list[int] = []
    values: list[int] = []
    for i, counts in enumerate(t.rejected):
        for r, n in sorted(counts.items()):
            column.append(at[r])
            values.append(n)
        offsets[i + 1] = len(values)
    columns = tuple(Column("", (("reason", r),), integer=True) for r in reasons)
    return Cells(columns, offsets, np.array(column, np.int32), _bits(np.array(values, np.int64)))


def _per_class(t: ModelColumns) -> Cells:
    """Each model's class summaries: ``_count`` and ``_sum`` of class 0, 1, ... ("other" last
    past the class limit). Models have different numbers of classes."""
    slots = np.diff(t.class_offsets)
    width = int(slots.max(initial=0))
    columns = tuple(
        Column(part, (("class", "other" if j == t.class_limit else str(j)),))
        for j in range(width)
        for part in ("_count", "_sum")
    )
    slot = np.arange(t.class_offsets[-1], dtype=np.int32) - np.repeat(t.class_offsets[:-1], slots).astype(np.int32)
    column = np.empty(2 * slot.shape[0], np.int32)
    column[0::2] = 2 * slot
    column[1::2] = 2 * slot + 1
    values = np.empty(2 * slot.shape[0])
    values[0::2] = t.class_weight
    values[1::2] = t.class_loss_weighted_sum
    return Cells(columns, 2 * t.class_offsets, column, values)


def _scrape_cells(family: Family, samples: Iterable[Sample]) -> Cells:
    """A daemon-wide family's samples as the cells of one row, a column each."""
    columns: list[Column] = []
    values: list[Any] = []

    def add(suffix: str, labels: tuple[tuple[str, str], ...], value: Any) -> None:
        columns.append(Column(suffix, labels, isinstance(value, int) and not isinstance(value, bool)))
        values.append(value)

    for label_values, value in samples:
        labels = tuple(zip(family.labels, label_values, strict=True))
        if family.type == "summary":
            add("_count", labels, value[0])
            add("_sum", labels, value[1])
        elif family.type == "histogram":
            bounds, counts, total = value
            cumulative = 0
            for b, n in zip([*(repr(float(b)) for b in bounds), "+Inf"], counts, strict=True):
                cumulative += n
                add("_bucket", (*labels, ("le", b)), cumulative)
            add("_count", labels, cumulative)
            add("_sum", labels, total)
        else:
            add("", labels, value)
    n = len(values)
    cells = np.empty(n)
    for k, (col, value) in enumerate(zip(columns, values, strict=True)):
        if col.integer:
            cells.view(np.int64)[k] = value
        else:
            cells[k] = value
    return Cells(tuple(columns), np.array([0, n], np.int64), np.arange(n, dtype=np.int32), cells)


# --- the metric families ----------------------------------------------------------
#
# One table says, for every xentd family, its name, type, labels, help text and
# where its values come from. The text writer (render) and the collector
# (XentdCollector, for OpenMetrics) both render from it, so they cannot
# disagree; docs/metrics.md lists the same families, and tests/test_exporter.py
# checks all three against each other.


@dataclass(frozen=True, slots=True)
class Scrape:
    """What one scrape reads: a snapshot, the build facts for xentd_build_info, and
    what [export] lets through (see :func:`_plan`): the rows of the models exported
    (in snapshot order), of those whose per-class series are, and how many per-model
    series were left out for the budget; and every per-model family's cells."""

    snapshot: Snapshot
    version: str
    backend: str
    rows: np.ndarray
    detailed: np.ndarray
    dropped: int
    cells: dict[str, Cells]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family. ``name`` is the text-format name (a counter's ends in
    ``_total``). A per-model family has ``model`` as its first label and reads every
    model at once through ``per_model``, which gives its samples as :class:`Cells` (their
    columns hold the other labels' values); a daemon-wide family reads the whole scrape
    through ``per_scrape``. A ``per_class`` family has a series per class of a model, so
    [export] gates it per model."""

    name: str
    type: Literal["counter", "gauge", "summary", "histogram"]
    labels: Labels
    help: str
    per_scrape: Callable[[Scrape], Iterable[Sample]] | None = None
    per_model: Callable[[ModelColumns], Cells] | None = None
    per_class: bool = False


def _maybe(value: float | None) -> list[Sample]:
    return [] if value is None else [((), value)]


def _counter(name: str, help: str, value: Callable[[Counters], float | None]) -> Family:
    return Family(name, "counter", (), help, per_scrape=lambda s: _maybe(value(s.snapshot.counters)))


def _gauge(name: str, help: str, value: Callable[[Counters], float | None]) -> Family:
    return Family(name, "gauge", (), help, per_scrape=lambda s: _maybe(value(s.snapshot.counters)))


def _model(name: str, kind: Literal["counter", "gauge"], help: str, value: Callable[[ModelColumns], Cells]) -> Family:
    return Family(name, kind, ("model",), help, per_model=value)


def _window(name: str, help: str, attr: str, *, nan: bool = False) -> Family:
    """A gauge per window: ``attr`` of :class:`xentd.state.WindowStats`, absent where it is
    NaN (an empty window has no mean) unless ``nan``."""
    field = WindowStats.__slots__.index(attr)
    return Family(
        name,
        "gauge",
        ("model", "window"),
        help,
        per_model=lambda t: _by_label("window", t.window_labels, t.windows[:, :, field], nan=nan),
    )


def _label_free(name: str, help: str, attr: str) -> Family:
    """A summary over every prediction row a model sent (:class:`xentd.state.PredictionSummary`),
    for models that sent any."""

    def cells(t: ModelColumns) -> Cells:
        p = t.predictions
        return _summary(p.weight, getattr(p, attr), present=p.rows != 0)

    return Family(name, "summary", ("model",), help, per_model=cells)


def _calibration_bins(name: str, help: str, attr: str) -> Family:
    """A counter per reliability bin (``attr`` of :class:`xentd.state.CalibrationColumns`),
    labelled with the bin's upper edge; every bin is always there."""

    def cells(t: ModelColumns) -> Cells:
        c = t.calibration
        return _cells(tuple(Column("", (("bin", b),)) for b in c.bin_labels), getattr(c, attr))

    return Family(name, "counter", ("model", "bin"), help, per_model=cells)


def _calibration_window(name: str, help: str, attr: str) -> Family:
    """A window gauge: ``attr`` of :class:`xentd.calibration.CalibrationWindow`, absent where
    NaN (a multiclass model has no decomposition; NE is absent while the prior's entropy is 0)."""
    field = CalibrationWindow.__slots__.index(attr)

    def cells(t: ModelColumns) -> Cells:
        c = t.calibration
        return _by_label("window", c.window_labels, c.windows[:, :, field])

    return Family(name, "gauge", ("model", "window"), help, per_model=cells)


def _scalars(values: Sequence[float | None]) -> Cells:
    """One sample per model of a value kept as Python gave it: a float, an int (written
    as one), or None (no sample)."""
    integer = np.array([isinstance(v, int) for v in values], np.bool_)
    cells = np.array([0.0 if v is None or isinstance(v, int) else v for v in values], np.float64)
    cells.view(np.int64)[integer] = np.array([v for v in values if isinstance(v, int)], np.int64)
    present = np.array([v is not None for v in values], np.bool_)
    columns = (Column("", (), False), Column("", (), True))
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum(present, out=offsets[1:])
    return Cells(columns, offsets, integer[present].astype(np.int32), cells[present])


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
        per_scrape=lambda s: [((), len(s.snapshot.table))],
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
        per_model=lambda t: _summary(t.weight, t.loss_weighted_sum),
    ),
    _model("xentd_samples_total", "counter", "Samples scored (unweighted).", lambda t: _one(t.samples)),
    _model(
        "xentd_correct_predictions_total",
        "counter",
        "Sum of weights of samples whose top-1 prediction was right.",
        lambda t: _one(t.correct_weighted_sum),
    ),
    _model("xentd_batches_total", "counter", "Batches scored.", lambda t: _one(t.batches, integer=True)),
    _model(
        "xentd_unnormalized_rows_total",
        "counter",
        "Rows of probs or log_probs whose mass was off 1 by more than the tolerance; scored as sent.",
        lambda t: _one(t.unnormalized_rows, integer=True),
    ),
    _model(
        "xentd_unnormalized_targets_total",
        "counter",
        "Target rows that are not a distribution (soft rows off 1 by more than the tolerance, "
        "integer rows that are not one-hot); scored as sent.",
        lambda t: _one(t.unnormalized_targets, integer=True),
    ),
    Family(
        "xentd_model_rejected_batches_total",
        "counter",
        ("model", "reason"),
        "Batches of this model refused, by reason; only models that already have state.",
        per_model=_rejected,
    ),
    _model(
        "xentd_last_batch_timestamp_seconds",
        "gauge",
        "When the last batch was scored (Unix seconds).",
        lambda t: _scalars(t.last_batch_time),
    ),
    _model(
        "xentd_last_event_timestamp_seconds",
        "gauge",
        "The ts header of the last batch that had one (Unix seconds).",
        lambda t: _scalars(t.last_event_time),
    ),
    Family(
        "xentd_class_cross_entropy_nats",
        "summary",
        ("model", "class"),
        "Cross-entropy by true class: _sum is sum(w*loss), _count sum(w).",
        per_model=_per_class,
        per_class=True,
    ),
    Family(
        "xentd_sample_loss_nats",
        "histogram",
        ("model",),
        "Per-sample cross-entropy (unweighted).",
        per_model=lambda t: _histogram(t.hist_bounds, t.hist_counts, t.loss_sum),
    ),
    _window("xentd_window_samples", "Samples in the window (decayed count for ewma).", "samples", nan=True),
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
        per_model=lambda t: _cells(
            tuple(Column("", (("outcome", o),), integer=True) for o in OUTCOMES),
            _bits(t.joins.outcomes),
            np.repeat(t.joins.joined[:, None], len(OUTCOMES), axis=1),
        ),
    ),
    Family(
        "xentd_pending_predictions",
        "gauge",
        ("model",),
        "Predictions waiting for their labels.",
        per_model=lambda t: _one(t.joins.pending, integer=True, present=t.joins.joined),
    ),
    Family(
        "xentd_label_delay_seconds",
        "histogram",
        ("model",),
        "Label arrival minus prediction arrival, one per matched join.",
        per_model=lambda t: _histogram(
            t.joins.delay_bounds, t.joins.delay_counts, t.joins.delay_sum, present=t.joins.joined
        ),
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
        per_model=lambda t: _by_label("window", t.predictions.window_labels, t.predictions.window_entropy),
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
        per_model=lambda t: _summary(t.calibration.brier_weight, t.calibration.brier_weighted_sum),
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


def _plan(t: ModelColumns, cells: dict[str, Cells], export: ExportConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows of the models exported, rows of those whose per-class series are, per-model
    series left out), rows in snapshot order.

    Per-class series are wanted for every model ("all"), none ("none"), or models with at
    most ``per_class_max_classes`` classes ("auto"). Past ``max_series``, whole models
    come first: in name order, each model's other series while they fit; then, in
    name order, per-class series while they fit. Both stop at the first that does not.
    Every family's series are counted from its cells, exactly."""
    n = len(t)
    if export.per_class == "all":
        wanted = np.ones(n, np.bool_)
    elif export.per_class == "auto":  # by the class series a model has: "other" counts as one
        wanted = np.diff(t.class_offsets) <= export.per_class_max_classes
    else:
        wanted = np.zeros(n, np.bool_)
    base = np.zeros(n, np.int64)
    classes = np.zeros(n, np.int64)
    for f in FAMILIES:
        if f.per_model is not None:
            if f.per_class:
                classes += cells[f.name].series()
            else:
                base += cells[f.name].series()
    classes *= wanted
    everything = np.arange(n)
    total = int(base.sum() + classes.sum())
    if export.max_series == 0 or total <= export.max_series:
        return everything, np.flatnonzero(wanted), 0
    # Name order; a model that does not fit ends each pass (cumulative sums only grow).
    order = np.array(sorted(range(n), key=t.names.__getitem__), np.int64)
    kept = np.zeros(n, np.bool_)
    kept[order[np.cumsum(base[order]) <= export.max_series]] = True
    budget = export.max_series - int(base[kept].sum())
    candidates = order[kept[order] & wanted[order]]
    detailed = np.zeros(n, np.bool_)
    detailed[candidates[np.cumsum(classes[candidates]) <= budget]] = True
    exported = int(base[kept].sum() + classes[detailed].sum())
    return np.flatnonzero(kept), np.flatnonzero(detailed), total - exported


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
    t = snap.table
    cells = {f.name: f.per_model(t) for f in FAMILIES if f.per_model is not None}
    rows, detailed, dropped = _plan(t, cells, export)
    if warning is not None:
        warning.note(dropped, export)
    return Scrape(snap, version, _backend_name(backend), rows, detailed, dropped, cells)


def _family_cells(family: Family, scrape: Scrape) -> tuple[Cells, np.ndarray]:
    """The family's cells and the rows of them this scrape exports."""
    if family.per_scrape is not None:
        return _scrape_cells(family, family.per_scrape(scrape)), np.zeros(1, np.int64)
    return scrape.cells[family.name], scrape.detailed if family.per_class else scrape.rows


# --- the collector (OpenMetrics) --------------------------------------------------------


class XentdCollector(Collector):
    """Renders :data:`FAMILIES` from a snapshot read from ``source`` on every scrape.

    A summary's ``_count`` is a sum of weights, so possibly fractional. Text format 0.0.4
    takes that; OpenMetrics requires a summary's count to be an integer, so with
    ``openmetrics=True`` each summary is written as two gauge families whose samples have
    the same names and values: ``<name>_sum`` and ``<name>_count``. Queries read the same
    series either way. ``export`` says which per-model series go out (:func:`_plan`)."""

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

    def _family(self, family: Family, scrape: Scrape) -> tuple[Metric, ...]:
        name = family.name
        if family.type == "summary" and self._openmetrics:
            parts = {
                part: Metric(f"{name}{part}", f"{family.help} (summary {part})", "gauge") for part in ("_sum", "_count")
            }
            metrics: tuple[Metric, ...] = (parts["_sum"], parts["_count"])
        else:
            metric = Metric(name.removesuffix("_total") if family.type == "counter" else name, family.help, family.type)
            parts = {}
            metrics = (metric,)
        cells, rows = _family_cells(family, scrape)
        names = scrape.snapshot.table.names
        bits = cells.values.view(np.int64)
        for r in rows.tolist():
            model = {"model": names[r]} if family.per_model is not None else {}
            for c in range(cells.offsets[r], cells.offsets[r + 1]):
                col = cells.columns[cells.column[c]]
                value = int(bits[c]) if col.integer else float(cells.values[c])
                metric = parts.get(col.suffix, metrics[0])
                metric.add_sample(f"{name}{col.suffix}", {**model, **dict(col.labels)}, value)
        return metrics


# --- direct text exposition -----------------------------------------------------
#
# prometheus-client formats each sample in Python with label-name validation and
# escaping, about 5 us per series: 6 s for 10,000 models. render writes the same
# families, from the same cells, as plain text format 0.0.4, every family's lines in
# one kernel call (xentd.textformat.write_lines). tests/test_exporter.py checks that both
# produce the same samples, and that the text is, byte for byte, what the exporter
# wrote when it formatted each line in Python.


def _esc(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    return value


def _pairs(labels: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f'{k}="{_esc(v)}"' for k, v in labels)


@dataclass(frozen=True, slots=True)
class _Lines:
    """What :func:`xentd.textformat.write_lines` needs of one family besides its cells: each
    column's line head and tail (in ``text``), and the rows' labels."""

    text: np.ndarray
    head: np.ndarray
    tail: np.ndarray
    integer: np.ndarray
    labels: np.ndarray
    label_at: np.ndarray
    bound: int  # most bytes the lines take

    @staticmethod
    def of(family: Family, cells: Cells, rows: np.ndarray, labels: tuple[np.ndarray, np.ndarray]) -> _Lines:
        heads: list[bytes] = []
        tails: list[bytes] = []
        for col in cells.columns:
            name = f"{family.name}{col.suffix}"
            if family.per_model is not None:  # name{model="m",window="5m"} 1.5
                heads.append(f"{name}{{".encode())
                tails.append(f"{''.join(',' + _pairs((p,)) for p in col.labels)}}} ".encode())
            elif col.labels:  # name{reason="x"} 1
                heads.append(f"{name}{{".encode())
                tails.append(f"{_pairs(col.labels)}}} ".encode())
            else:  # name 1
                heads.append(name.encode())
                tails.append(b" ")
        text = np.frombuffer(b"".join(heads) + b"".join(tails), np.uint8)
        head = np.zeros(len(heads) + 1, np.int64)
        np.cumsum([len(h) for h in heads], out=head[1:])
        tail = np.zeros(len(tails) + 1, np.int64)
        np.cumsum([len(t) for t in tails], out=tail[1:])
        tail += head[-1]
        label_text, label_at = labels if family.per_model is not None else (_NO_LABEL, _NO_LABEL_AT)
        series = cells.series()[rows]
        widest = max((len(h) + len(t) for h, t in zip(heads, tails, strict=True)), default=0)
        bound = int(series.sum()) * (widest + textformat.VALUE_BYTES + 1) + int(series @ np.diff(label_at)[rows])
        return _Lines(
            text,
            head,
            tail,
            np.array([c.integer for c in cells.columns], np.bool_),
            label_text,
            label_at,
            bound,
        )


# Read-only, as the model labels (np.frombuffer) are: write_lines has one signature, the one warmed.
_NO_LABEL = np.frombuffer(b"", np.uint8)
_NO_LABEL_AT = np.zeros(2, np.int64)


def _model_labels(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every model's ``model="name"`` as bytes, and where each starts."""
    encoded = [f'model="{_esc(n)}"'.encode() for n in names]
    at = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=at[1:])
    return np.frombuffer(b"".join(encoded), np.uint8), at


def render(
    snap: Snapshot,
    *,
    version: str,
    backend: Backend,
    export: ExportConfig | None = None,
    warning: _DropWarning | None = None,
    tail: bytes = b"",
) -> memoryview:
    """All xentd metric families of one snapshot, in Prometheus text format 0.0.4 (UTF-8),
    with the per-model series ``export`` lets through (:func:`_plan`), then ``tail``: a view
    of the buffer they were written into (a copy of 100 MB into a bytes object cost ~0.1 s)."""
    scrape = _scrape(snap, version, backend, export if export is not None else ExportConfig(), warning)
    labels = _model_labels(snap.table.names)
    work = []
    size = len(tail)
    for family in FAMILIES:
        cells, rows = _family_cells(family, scrape)
        header = f"# HELP {family.name} {family.help}\n# TYPE {family.name} {family.type}\n".encode()
        lines = _Lines.of(family, cells, rows, labels)
        work.append((family, header, cells, rows, lines))
        size += len(header) + lines.bound
    out = np.empty(size, np.uint8)
    pos = 0
    for family, header, cells, rows, lines in work:
        out[pos : pos + len(header)] = np.frombuffer(header, np.uint8)
        pos += len(header)
        end = textformat.write_lines(
            out,
            pos,
            rows,
            cells.offsets,
            cells.column,
            cells.values,
            lines.text,
            lines.head,
            lines.tail,
            lines.integer,
            lines.labels,
            lines.label_at,
            textformat.POW5_INV,
            textformat.POW5,
        )
        if end < 0:
            raise AssertionError(f"{family.name}: its lines are longer than _Lines.of's bound")
        pos = end
    out[pos : pos + len(tail)] = np.frombuffer(tail, np.uint8)
    return out[: pos + len(tail)].data


def render_text(
    snap: Snapshot,
    *,
    version: str,
    backend: Backend,
    export: ExportConfig | None = None,
    warning: _DropWarning | None = None,
) -> str:
    """:func:`render` as a str."""
    return str(render(snap, version=version, backend=backend, export=export, warning=warning), "utf-8")


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
    comes from :func:`render`; a client that accepts only OpenMetrics gets
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
        """The text exposition: xentd's families, then the process collector's."""
        return bytes(self.text_view())

    def text_view(self) -> memoryview:
        """:meth:`text` without copying it out of the buffer it was written into (what /metrics sends)."""
        return render(
            self._source(),
            version=self._version,
            backend=self._backend,
            export=self._export,
            warning=self._warning,
            tail=generate_latest(self._process),
        )

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
    def write(self, data: Any) -> None:
        """The stdlib's ``write``, which takes only ``bytes``, taking any bytes-like body too:
        /metrics answers with a view of the buffer its text was written into."""
        if type(data) is bytes:
            super().write(data)
            return
        if not self.status:  # type: ignore[attr-defined]  # set by start_response
            raise AssertionError("write() before start_response()")
        if not self.headers_sent:  # type: ignore[attr-defined]
            self.bytes_sent = len(data)
            self.send_headers()
        else:
            self.bytes_sent += len(data)
        self._write(data)
        self._flush()

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

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes | memoryview]:
        path = environ.get("PATH_INFO", "")
        body: bytes | memoryview
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
                body, headers = exposition.text_view(), [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)]
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
