"""An oracle for xentd.exporter.render: the text exposition written the slow, obvious way.

Every line is formatted in Python, one sample at a time, from the per-model records
(:attr:`xentd.state.Snapshot.models`), with each value written by ``repr`` (Prometheus'
NaN, +Inf, -Inf): how the exporter wrote /metrics before it rendered every model of a
family at once from arrays. Each per-model family's samples are spelled out here again,
and the [export] plan is the loop over models it was, so nothing of the fast path
(xentd.exporter's cells and plan, xentd.textformat's kernels) is shared with it. The
daemon-wide families come from the exporter's own table (they are a few lines of
Python either way).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from xentd.config import ExportConfig
from xentd.exporter import FAMILIES, Scrape
from xentd.state import ModelSnapshot, Snapshot

Sample = tuple[tuple[str, ...], Any]


def _v(value: float) -> str:
    text = repr(value)
    return {"inf": "+Inf", "-inf": "-Inf", "nan": "NaN"}.get(text, text)


def _esc(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _window(attr: str, of: Callable[[ModelSnapshot], list[tuple[str, Any]]] = lambda m: m.windows) -> Any:
    return lambda m: [((w,), getattr(s, attr)) for w, s in of(m) if not math.isnan(getattr(s, attr))]


def _calibration(attr: str) -> Any:
    return _window(attr, lambda m: m.calibration.windows)


def _bins(attr: str) -> Any:
    def samples(m: ModelSnapshot) -> list[Sample]:
        c = m.calibration
        return [((b,), v) for b, v in zip(c.bin_labels, getattr(c, attr).tolist(), strict=True)]

    return samples


def _label_free(attr: str) -> Any:
    return lambda m: [((), (m.predictions.weight, getattr(m.predictions, attr)))] if m.predictions.rows else []


# Each per-model family's samples of one model: (label values after model, value); a
# summary's value is (count, sum), a histogram's (bounds, per-bucket counts, sum).
PER_MODEL: dict[str, Callable[[ModelSnapshot], list[Sample]]] = {
    "xentd_cross_entropy_nats": lambda m: [((), (m.weight, m.loss_weighted_sum))],
    "xentd_samples_total": lambda m: [((), m.samples)],
    "xentd_correct_predictions_total": lambda m: [((), m.correct_weighted_sum)],
    "xentd_batches_total": lambda m: [((), m.batches)],
    "xentd_unnormalized_rows_total": lambda m: [((), m.unnormalized_rows)],
    "xentd_unnormalized_targets_total": lambda m: [((), m.unnormalized_targets)],
    "xentd_model_rejected_batches_total": lambda m: [((r,), n) for r, n in sorted(m.rejected.items())],
    "xentd_last_batch_timestamp_seconds": lambda m: [((), m.last_batch_time)],
    "xentd_last_event_timestamp_seconds": lambda m: [] if m.last_event_time is None else [((), m.last_event_time)],
    "xentd_class_cross_entropy_nats": lambda m: [
        ((c,), (w, wl))
        for c, w, wl in zip(m.class_labels, m.class_weight.tolist(), m.class_loss_weighted_sum.tolist(), strict=True)
    ],
    "xentd_sample_loss_nats": lambda m: [((), (m.hist_bounds.tolist(), m.hist_counts.tolist(), m.loss_sum))],
    "xentd_window_samples": lambda m: [((w,), s.samples) for w, s in m.windows],
    "xentd_window_cross_entropy_nats": _window("cross_entropy"),
    "xentd_window_accuracy_ratio": _window("accuracy"),
    "xentd_window_focal_loss_nats": _window("focal_loss"),
    "xentd_window_balanced_cross_entropy_nats": _window("balanced_cross_entropy"),
    "xentd_label_joins_total": lambda m: [] if m.joins is None else [((o,), n) for o, n in m.joins.outcomes.items()],
    "xentd_pending_predictions": lambda m: [] if m.joins is None else [((), m.joins.pending)],
    "xentd_label_delay_seconds": lambda m: (
        []
        if m.joins is None
        else [((), (m.joins.delay_bounds.tolist(), m.joins.delay_counts.tolist(), m.joins.delay_sum))]
    ),
    "xentd_prediction_entropy_nats": _label_free("entropy_weighted_sum"),
    "xentd_prediction_confidence": _label_free("confidence_weighted_sum"),
    "xentd_window_prediction_entropy_nats": lambda m: [
        ((w,), h) for w, h in m.predictions.window_entropy if not math.isnan(h)
    ],
    "xentd_calibration_weight_total": _bins("weight"),
    "xentd_calibration_confidence_total": _bins("confidence"),
    "xentd_calibration_outcome_total": _bins("outcome"),
    "xentd_brier_score": lambda m: [((), (m.calibration.brier_weight, m.calibration.brier_weighted_sum))],
    "xentd_window_calibration_error": _calibration("calibration_error"),
    "xentd_window_max_calibration_error": _calibration("max_calibration_error"),
    "xentd_window_brier_score": _calibration("brier_score"),
    "xentd_window_brier_reliability": _calibration("brier_reliability"),
    "xentd_window_brier_resolution": _calibration("brier_resolution"),
    "xentd_window_brier_uncertainty": _calibration("brier_uncertainty"),
    "xentd_window_normalized_entropy": _calibration("normalized_entropy"),
}
PER_CLASS = {"xentd_class_cross_entropy_nats"}


def _lines(name: str, kind: str, labels: list[tuple[str, str]], value: Any) -> list[str]:
    def line(sample: str, pairs: list[tuple[str, str]], v: Any) -> str:
        inside = ",".join(f'{k}="{_esc(x)}"' for k, x in pairs)
        return f"{sample}{{{inside}}} {_v(v)}" if pairs else f"{sample} {_v(v)}"

    if kind == "summary":
        count, total = value
        return [line(f"{name}_count", labels, count), line(f"{name}_sum", labels, total)]
    if kind == "histogram":
        bounds, counts, total = value
        out = []
        cumulative = 0
        for le, n in zip([*(repr(float(b)) for b in bounds), "+Inf"], counts, strict=True):
            cumulative += n
            out.append(line(f"{name}_bucket", [*labels, ("le", le)], cumulative))
        return [*out, line(f"{name}_count", labels, cumulative), line(f"{name}_sum", labels, total)]
    return [line(name, labels, value)]


def _series(name: str, kind: str, m: ModelSnapshot) -> int:
    return sum(len(_lines(name, kind, [], v)) for _, v in PER_MODEL[name](m))


def plan(snap: Snapshot, export: ExportConfig) -> tuple[list[ModelSnapshot], set[str], int]:
    """(models exported, in snapshot order; names of those whose per-class series are; series left out)."""
    models = snap.models
    wanted = {
        m.name
        for m in models
        if export.per_class == "all"
        or (export.per_class == "auto" and len(m.class_labels) <= export.per_class_max_classes)
    }
    kinds = {f.name: f.type for f in FAMILIES}
    base = {m.name: sum(_series(n, kinds[n], m) for n in PER_MODEL if n not in PER_CLASS) for m in models}
    classes = {m.name: sum(_series(n, kinds[n], m) for n in PER_CLASS) if m.name in wanted else 0 for m in models}
    total = sum(base.values()) + sum(classes.values())
    if export.max_series == 0 or total <= export.max_series:
        return models, wanted, 0
    budget = export.max_series
    kept: set[str] = set()
    for m in sorted(models, key=lambda m: m.name):
        if base[m.name] > budget:
            break
        kept.add(m.name)
        budget -= base[m.name]
    detailed: set[str] = set()
    for m in sorted(models, key=lambda m: m.name):
        if m.name not in kept or m.name not in wanted:
            continue
        if classes[m.name] > budget:
            break
        detailed.add(m.name)
        budget -= classes[m.name]
    exported = sum(base[n] for n in kept) + sum(classes[n] for n in detailed)
    return [m for m in models if m.name in kept], detailed, total - exported


def render(snap: Snapshot, *, version: str, backend: str, export: ExportConfig) -> str:
    """The text exposition of ``snap``, line by line in Python."""
    models, detailed, dropped = plan(snap, export)
    scrape = Scrape(snap, version, backend, rows=None, detailed=None, dropped=dropped, cells={})  # type: ignore[arg-type]
    out: list[str] = []
    for family in FAMILIES:
        out.append(f"# HELP {family.name} {family.help}")
        out.append(f"# TYPE {family.name} {family.type}")
        if family.per_scrape is not None:
            for values, value in family.per_scrape(scrape):
                out += _lines(family.name, family.type, list(zip(family.labels, values, strict=True)), value)
            continue
        assert set(PER_MODEL) == {f.name for f in FAMILIES if f.per_scrape is None}, "a family the oracle lacks"
        for m in models:
            if family.name in PER_CLASS and m.name not in detailed:
                continue
            for values, value in PER_MODEL[family.name](m):
                pairs = list(zip(family.labels, (m.name, *values), strict=True))
                out += _lines(family.name, family.type, pairs, value)
    return "\n".join(out) + "\n"
