"""The collector: metric names, labels and values from a known state."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.clock import FakeClock
from tests.conftest import random_scores
from xentd.config import ExportConfig, LimitsConfig, WindowsConfig
from xentd.errors import Reason
from xentd.exporter import build_registry
from xentd.joins import PoolKey
from xentd.kernels import SampleScores
from xentd.state import StateStore


@pytest.fixture
def store() -> StateStore:
    clock = FakeClock(1_700_000_000.0)
    s = StateStore(WindowsConfig(), LimitsConfig(class_limit=2), clock)
    m = s.model("clf", 3)
    loss = np.array([0.5, 1.5, 50.0, 0.0])
    m.fold(
        SampleScores(
            loss=loss,
            focal=loss / 2,
            correct=np.array([1, 0, 0, 1], np.uint8),
            true_class=np.array([0, 1, 2, 2]),
            unnormalized_rows=1,
            confidence=np.full(len(loss), 0.75),
            brier=np.full(len(loss), 0.25),
        ),
        np.array([1.0, 2.0, 1.0, 0.0]),
        clock(),
        1_699_999_999.0,
    )
    m.unnormalized_targets = 2
    m.fold_predictions(np.array([0.5, 1.0]), np.array([0.9, 0.6]), None, clock())
    rows = np.array([[0.2, 0.3, 0.5]] * 3, np.float32)
    s.joins.put("clf", PoolKey(0, "FP32", 3, False), np.arange(3, dtype=np.uint64), rows, None, clock())
    s.joins.record("clf", s.joins.take("clf", np.array([0, 9], np.uint64), clock() + 2.0))
    s.reject(Reason.NON_FINITE, "clf")
    s.counters.messages = 2
    return s


def _add_binary_model(s: StateStore) -> None:
    """A binary model: its Brier score's decomposition exists (a multiclass model's does not)."""
    ctr = s.model("ctr", 2)
    p = np.array([0.9, 0.2, 0.55])
    t = np.array([1.0, 0.0, 0.3])
    ctr.fold(
        SampleScores(
            loss=-(t * np.log(p) + (1 - t) * np.log1p(-p)),
            focal=np.zeros(3),
            correct=np.array([1, 1, 0], np.uint8),
            true_class=np.array([1, 0, 0]),
            unnormalized_rows=0,
            confidence=p,
            brier=(p - t) ** 2,
        ),
        None,
        s.clock(),
        None,
        targets=t,
        binary=True,
    )


def test_metric_values(store: StateStore) -> None:
    reg = build_registry(store.snapshot, version="9.9.9", backend="cpu")
    g = reg.get_sample_value
    m = {"model": "clf"}
    assert g("xentd_build_info", {"version": "9.9.9", "backend": "cpu"}) == 1.0
    assert g("xentd_models") == 1.0
    assert g("xentd_messages_received_total") == 2.0
    assert g("xentd_rejected_batches_total", {"reason": "non_finite"}) == 1.0
    assert g("xentd_rejected_batches_total", {"reason": "too_many_models"}) == 0.0  # every reason exists
    assert g("xentd_cross_entropy_nats_sum", m) == 0.5 + 3.0 + 50.0
    # Calibration (15 bins, every bin present): confidence 0.75 falls in bin 11, (0.7333, 0.8].
    edge = "0.8"
    assert g("xentd_calibration_weight_total", {**m, "bin": edge}) == 4.0
    assert g("xentd_calibration_confidence_total", {**m, "bin": edge}) == 3.0
    assert g("xentd_calibration_outcome_total", {**m, "bin": edge}) == 1.0  # weight of the correct rows
    assert g("xentd_calibration_weight_total", {**m, "bin": "1.0"}) == 0.0
    assert g("xentd_brier_score_sum", m) == 0.25 * 4.0
    assert g("xentd_brier_score_count", m) == 4.0
    assert g("xentd_window_calibration_error", {**m, "window": "1m"}) == pytest.approx(abs(1.0 - 3.0) / 4.0)
    _add_binary_model(store)
    g = build_registry(store.snapshot, version="9.9.9", backend="cpu").get_sample_value
    ctr = {"model": "ctr"}
    assert g("xentd_calibration_outcome_total", {**ctr, "bin": "0.6"}) == pytest.approx(0.3)  # soft target of p 0.55
    assert g("xentd_window_brier_uncertainty", {**ctr, "window": "1m"}) == pytest.approx(1.3 / 3 * (1 - 1.3 / 3))
    assert g("xentd_cross_entropy_nats_count", m) == 4.0
    assert g("xentd_samples_total", m) == 4.0
    assert g("xentd_correct_predictions_total", m) == 1.0
    assert g("xentd_batches_total", m) == 1.0
    assert g("xentd_unnormalized_rows_total", m) == 1.0
    assert g("xentd_unnormalized_targets_total", m) == 2.0
    assert g("xentd_model_rejected_batches_total", {**m, "reason": "non_finite"}) == 1.0
    assert g("xentd_model_rejected_batches_total", {**m, "reason": "too_many_models"}) is None  # only what happened
    assert g("xentd_last_batch_timestamp_seconds", m) == 1_700_000_000.0
    assert g("xentd_last_event_timestamp_seconds", m) == 1_699_999_999.0
    # class_limit=2 with 3 classes: class 2 is reported as "other".
    assert g("xentd_class_cross_entropy_nats_sum", {**m, "class": "0"}) == 0.5
    assert g("xentd_class_cross_entropy_nats_count", {**m, "class": "1"}) == 2.0
    assert g("xentd_class_cross_entropy_nats_sum", {**m, "class": "other"}) == 50.0
    assert g("xentd_sample_loss_nats_bucket", {**m, "le": "0.001"}) == 1.0
    assert g("xentd_sample_loss_nats_bucket", {**m, "le": "2.0"}) == 3.0
    assert g("xentd_sample_loss_nats_bucket", {**m, "le": "100.0"}) == 4.0
    assert g("xentd_sample_loss_nats_bucket", {**m, "le": "+Inf"}) == 4.0
    assert g("xentd_sample_loss_nats_sum", m) == 52.0
    for window in ("1m", "5m", "1h", "last_1000", "last_10000", "ewma"):
        w = {**m, "window": window}
        assert g("xentd_window_samples", w) == 4.0
        assert g("xentd_window_cross_entropy_nats", w) == pytest.approx(53.5 / 4)
        assert g("xentd_window_accuracy_ratio", w) == pytest.approx(1 / 4)
        assert g("xentd_window_focal_loss_nats", w) == pytest.approx(53.5 / 8)
        assert g("xentd_window_balanced_cross_entropy_nats", w) == pytest.approx((0.5 + 1.5 + 50.0) / 3)
    assert g("process_resident_memory_bytes") is not None


def test_empty_windows_export_no_ratio(store: StateStore) -> None:
    store.clock.t += 7200  # type: ignore[attr-defined]
    reg = build_registry(store.snapshot, version="x", backend="cpu")
    w = {"model": "clf", "window": "1h"}
    assert reg.get_sample_value("xentd_window_samples", w) == 0.0
    assert reg.get_sample_value("xentd_window_cross_entropy_nats", w) is None
    assert reg.get_sample_value("xentd_window_cross_entropy_nats", {**w, "window": "last_1000"}) is not None


def test_exposition_parses_and_has_no_nan(store: StateStore) -> None:
    text = generate_latest(build_registry(store.snapshot, version="x", backend="cpu")).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "xentd_cross_entropy_nats",
        "xentd_window_cross_entropy_nats",
        "xentd_sample_loss_nats",
        "xentd_class_cross_entropy_nats",
        "xentd_rejected_batches",
        "xentd_build_info",
    ):
        assert name in families, name
    assert families["xentd_sample_loss_nats"].type == "histogram"
    assert families["xentd_cross_entropy_nats"].type == "summary"
    for f in families.values():
        for sample in f.samples:
            assert not math.isnan(sample.value), sample


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _types(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_direct_text_equals_the_collector(store: StateStore) -> None:
    """render_text is a fast path: it must say exactly what the collector says."""
    from xentd.exporter import Exposition, XentdCollector

    for name in ("other-model", "weird:name.v2", "third"):  # several models, one with no traffic in windows
        m = store.model(name, 2)
        loss = np.array([0.1, 3.0])
        m.fold(
            SampleScores(
                loss=loss,
                focal=loss,
                correct=np.array([1, 0], np.uint8),
                true_class=np.array([0, 1]),
                unnormalized_rows=0,
                confidence=np.full(len(loss), 0.75),
                brier=np.full(len(loss), 0.25),
            ),
            None,
            store.clock(),
            None,
        )
    store.clock.t += 90  # type: ignore[attr-defined]
    registry = CollectorRegistry()
    registry.register(XentdCollector(store.snapshot, version="1.2.3", backend="cpu"))
    reference = generate_latest(registry).decode()
    fast = Exposition(store.snapshot, version="1.2.3", backend="cpu").text().decode()
    fast_xentd = "\n".join(line for line in fast.splitlines() if "xentd_" in line) + "\n"
    assert _samples(fast_xentd) == _samples(reference)
    assert _types(fast_xentd) == _types(reference)
    assert "process_resident_memory_bytes" in fast


def test_http_serves_text_gzip_and_openmetrics(store: StateStore) -> None:
    import gzip

    from xentd.exporter import Exposition, make_app

    app = make_app(Exposition(store.snapshot, version="x", backend="cpu"), lambda: (True, "ok"))

    def get(**environ: str) -> tuple[str, dict[str, str], bytes]:
        seen: dict[str, object] = {}

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            seen["status"], seen["headers"] = status, dict(headers)

        body = b"".join(
            app({"PATH_INFO": "/metrics", "REQUEST_METHOD": "GET", "QUERY_STRING": "", **environ}, start_response)
        )
        return str(seen["status"]), seen["headers"], body  # type: ignore[return-value]

    status, headers, body = get(
        HTTP_ACCEPT="application/openmetrics-text;version=1.0.0,text/plain;q=0.5", HTTP_ACCEPT_ENCODING="gzip"
    )
    assert status == "200 OK" and headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert _samples(gzip.decompress(body).decode())[("xentd_samples_total", frozenset({("model", "clf")}))] == 4
    status, headers, body = get(HTTP_ACCEPT="application/openmetrics-text;version=1.0.0")
    assert "openmetrics" in headers["Content-Type"] and body.rstrip().endswith(b"# EOF")


def test_one_table_both_writers_render_the_same_families(store: StateStore) -> None:
    """The text writer and the collector both render FAMILIES: same names, types and samples."""
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

    from xentd.exporter import FAMILIES, XentdCollector, render_text

    store.counters.last_snapshot_time = 1.7e9  # every family has at least one sample
    store.counters.last_snapshot_seconds = 0.5
    store.counters.last_snapshot_bytes = 1234
    _add_binary_model(store)
    expected = {f.name.removesuffix("_total") if f.type == "counter" else f.name: f.type for f in FAMILIES}
    assert len(expected) == len(FAMILIES)
    text = render_text(store.snapshot(), version="v", backend="cpu")
    assert _types(text) == expected
    for family in text_string_to_metric_families(text):
        assert family.samples, family.name
    registry = CollectorRegistry()
    registry.register(XentdCollector(store.snapshot, version="v", backend="cpu"))
    assert _types(generate_latest(registry).decode()) == expected
    registry = CollectorRegistry()
    registry.register(XentdCollector(store.snapshot, version="v", backend="cpu", openmetrics=True))
    openmetrics = {f.name: f.type for f in parse_openmetrics(generate_openmetrics(registry).decode())}
    pairs = {f"{n}_{part}": "gauge" for n, t in expected.items() if t == "summary" for part in ("sum", "count")}
    assert openmetrics == {n: t for n, t in expected.items() if t != "summary"} | pairs


def test_docs_list_every_family_with_its_type_and_labels() -> None:
    import re
    from pathlib import Path

    from xentd.exporter import FAMILIES

    documented: dict[str, tuple[str, str]] = {}
    docs = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
    for line in docs.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 4 and cells[1].startswith("`xentd_"):
            for name in re.findall(r"`(xentd_[a-z_]+)`", cells[1]):
                documented[name] = (cells[2], cells[3])
    assert documented == {f.name: (f.type, ", ".join(f.labels)) for f in FAMILIES}


# --- the text writer against a line-by-line reference ------------------------------------


def _rich_store() -> StateStore:
    """Models of every layout and state the exposition writes: class slots past the class
    limit ("other"), binary and multiclass calibration, joins, rejections, label-free rows
    only, no traffic at all, time windows emptied by time (NaN means) next to count windows
    that are not, an int clock and event time, weights near float64's ends, and names that
    need escaping or are not ASCII."""
    clock = FakeClock(1_700_000_000.0)
    s = StateStore(WindowsConfig(), LimitsConfig(class_limit=4), clock)
    rng = np.random.default_rng(14)
    for name, classes in (("old", 3), ("wide", 9), ("four", 4)):
        m = s.model(name, classes)
        for _ in range(3):
            m.fold(
                random_scores(rng, 40, classes, unnormalized_rows=int(rng.integers(0, 3))),
                rng.uniform(0.0, 2.0, 40),
                clock(),
                clock() - 5.0,
            )
            m.fold_predictions(rng.uniform(0, 2, 8), rng.uniform(0, 1, 8), None, clock())
            clock.t += 7.0
    clock.t += 7200.0  # their time windows are empty now; the count windows are not
    ctr = s.model("ctr", 2)
    p = rng.uniform(0.01, 0.99, 30)
    t = rng.uniform(0.0, 1.0, 30)
    ctr.fold(
        SampleScores(
            loss=-(t * np.log(p) + (1 - t) * np.log1p(-p)),
            focal=np.zeros(30),
            correct=(p > 0.5).astype(np.uint8),
            true_class=(t > 0.5).astype(np.int64),
            unnormalized_rows=0,
            confidence=p,
            brier=(p - t) ** 2,
        ),
        None,
        clock(),
        None,
        targets=t,
        binary=True,
    )
    for name in ('we"ird\\na\nme', "modèle-é"):
        m = s.model(name, 4)
        loss = np.array([0.1, 3.0, 1e-7, 123456.789])
        m.fold(
            SampleScores(
                loss=loss,
                focal=loss,
                correct=np.array([1, 0, 1, 0], np.uint8),
                true_class=np.array([0, 1, 2, 3]),
                unnormalized_rows=0,
                confidence=np.array([0.75, 1.0, 0.0, 0.5]),
                brier=np.full(4, 0.25),
            ),
            np.array([1e-300, 1e300, 0.5, 3.0]),
            1_700_010_000,  # an int clock and event time are written as ints
            1_700_009_999,
        )
    s.model("predictions-only", 5).fold_predictions(np.array([0.5, 1.0]), np.array([0.9, 0.6]), None, clock())
    s.model("quiet", 7)
    rows = np.array([[0.2, 0.3, 0.5]] * 3, np.float32)
    s.joins.put("old", PoolKey(0, "FP32", 3, False), np.arange(3, dtype=np.uint64), rows, None, clock())
    s.joins.record("old", s.joins.take("old", np.array([0, 9], np.uint64), clock() + 2.0))
    s.reject(Reason.NON_FINITE, "wide")
    s.reject(Reason.TARGET_OUT_OF_RANGE, "wide")
    s.reject(Reason.NON_FINITE, "ghost")
    s.counters.messages = 31
    s.counters.last_snapshot_time = 1_700_000_000.25
    s.counters.last_snapshot_seconds = 0.5
    s.counters.last_snapshot_bytes = 1234
    clock.t += 30.0
    return s


EXPORTS = [
    ExportConfig(),
    ExportConfig(max_series=0),
    ExportConfig(per_class="all", max_series=0),
    ExportConfig(per_class="none"),
    # "wide" has 9 classes and 5 class series (4 and "other"): auto counts the series.
    ExportConfig(per_class="auto", per_class_max_classes=5),
    # Budgets (everything is 955 series): every model, and per-class series while they fit
    # in name order; every model, one's classes; a model left out; two; nothing per model.
    ExportConfig(per_class="all", max_series=940),
    ExportConfig(max_series=900),
    ExportConfig(per_class="all", max_series=850),
    ExportConfig(per_class="all", max_series=700),
    ExportConfig(max_series=5),
]


@pytest.mark.parametrize("export", EXPORTS, ids=repr)
def test_text_is_byte_for_byte_the_line_by_line_reference(export: ExportConfig) -> None:
    """The columnar writer says exactly what formatting every sample in Python says: the same
    lines in the same order, the same label escaping, the same float and int spellings."""
    from tests import exposition_reference
    from xentd.exporter import render_text

    snap = _rich_store().snapshot()
    text = render_text(snap, version="1.2.3", backend="cpu", export=export)
    assert text == exposition_reference.render(snap, version="1.2.3", backend="cpu", export=export)
    assert list(text_string_to_metric_families(text))  # and Prometheus' parser takes it
    if export.max_series in (0, 1_000_000):
        assert _samples(text)[("xentd_series_dropped", frozenset())] == 0
    else:
        assert _samples(text)[("xentd_series_dropped", frozenset())] > 0  # the budget bites


def test_an_empty_store_exports_the_daemon_wide_families() -> None:
    from xentd.exporter import render_text

    s = StateStore(WindowsConfig(), LimitsConfig(), FakeClock(1.0))
    text = render_text(s.snapshot(), version="v", backend="cpu")
    assert _samples(text)[("xentd_models", frozenset())] == 0
    assert 'model="' not in text
