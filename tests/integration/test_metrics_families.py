"""The metric families over HTTP: OpenMetrics that a strict parser accepts with fractional weights,
the same series in both formats, the per-model rejection and target-normalisation counters,
and xentd_build_info's backend read at scrape time."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tests.integration.harness import DaemonProcess
from xentd.client import Publisher
from xentd.config import LimitsConfig, WindowsConfig
from xentd.errors import Reason
from xentd.exporter import Backend, Exposition, MetricsServer, make_app
from xentd.kernels import SampleScores
from xentd.state import StateStore

OPENMETRICS = "application/openmetrics-text;version=1.0.0"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _store() -> StateStore:
    """One model with fractional weights (Σw = 1.75), two rejections of it, one of a model without state."""
    store = StateStore(WindowsConfig(), LimitsConfig(), lambda: 1_700_000_000.0)
    with store.lock:
        m = store.model("clf", 3)
        loss = np.array([0.5, 1.5, 3.0])
        m.fold(
            SampleScores(
                loss=loss,
                focal=loss,
                correct=np.array([1, 0, 0], np.uint8),
                true_class=np.array([0, 1, 1]),
                unnormalized_rows=0,
                confidence=np.full(len(loss), 0.75),
                brier=np.full(len(loss), 0.25),
            ),
            np.array([0.5, 1.0, 0.25]),
            1_700_000_000.0,
            None,
        )
        m.unnormalized_targets = 3
        store.reject(Reason.TARGET_OUT_OF_RANGE, "clf")
        store.reject(Reason.TARGET_OUT_OF_RANGE, "clf")
        store.reject(Reason.NEGATIVE_WEIGHT, "clf")
        store.reject(Reason.NON_FINITE, "ghost")
    return store


@pytest.fixture
def serve() -> Iterator[Callable[[StateStore, Backend], MetricsServer]]:
    started: list[MetricsServer] = []

    def start(store: StateStore, backend: Backend = "cpu") -> MetricsServer:
        server = MetricsServer(
            "127.0.0.1", 0, make_app(Exposition(store.snapshot, version="t", backend=backend), lambda: (True, "ok"))
        )
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _get(url: str, accept: str | None = None) -> tuple[str, str]:
    request = urllib.request.Request(url)
    if accept is not None:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=30) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def _samples(families: Iterable[Any]) -> Samples:
    out: Samples = {}
    for family in families:
        for s in family.samples:
            if s.name.startswith("xentd_"):
                out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def test_openmetrics_with_fractional_weights_passes_the_strict_parser(
    serve: Callable[[StateStore, Backend], MetricsServer],
) -> None:
    server = serve(_store(), "cpu")
    content_type, text = _get(f"http://127.0.0.1:{server.port}/metrics", OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(text)}  # raises on any violation
    m = frozenset({("model", "clf")})
    samples = _samples(iter(families.values()))
    assert samples[("xentd_cross_entropy_nats_count", m)] == 1.75
    assert samples[("xentd_cross_entropy_nats_sum", m)] == 0.5 * 0.5 + 1.5 + 0.25 * 3.0
    assert samples[("xentd_class_cross_entropy_nats_count", m | {("class", "1")})] == 1.25
    assert families["xentd_cross_entropy_nats_count"].type == "gauge"
    assert families["xentd_class_cross_entropy_nats_sum"].type == "gauge"
    assert "xentd_cross_entropy_nats" not in families  # no summary with a fractional count
    assert families["xentd_sample_loss_nats"].type == "histogram"


def test_text_and_openmetrics_carry_the_same_series(serve: Callable[[StateStore, Backend], MetricsServer]) -> None:
    server = serve(_store(), "cpu")
    url = f"http://127.0.0.1:{server.port}/metrics"
    content_type, text = _get(url)
    assert content_type.startswith("text/plain; version=0.0.4")
    _, om = _get(url, OPENMETRICS)
    assert _samples(parse_text(text)) == _samples(parse_openmetrics(om))
    text_types = {f.name: f.type for f in parse_text(text)}
    assert text_types["xentd_cross_entropy_nats"] == "summary"  # text 0.0.4 keeps the summary


def test_per_model_rejections_and_unnormalized_targets(serve: Callable[[StateStore, Backend], MetricsServer]) -> None:
    server = serve(_store(), "cpu")
    url = f"http://127.0.0.1:{server.port}/metrics"
    for accept, parse in ((None, parse_text), (OPENMETRICS, parse_openmetrics)):
        _, text = _get(url, accept)
        families = {f.name: f for f in parse(text)}
        assert families["xentd_model_rejected_batches"].type == "counter"
        assert families["xentd_unnormalized_targets"].type == "counter"
        samples = _samples(iter(families.values()))
        rejected = {k: v for k, v in samples.items() if k[0] == "xentd_model_rejected_batches_total"}
        assert rejected == {
            ("xentd_model_rejected_batches_total", frozenset({("model", "clf"), ("reason", "target_out_of_range")})): 2,
            ("xentd_model_rejected_batches_total", frozenset({("model", "clf"), ("reason", "negative_weight")})): 1,
        }
        assert samples[("xentd_unnormalized_targets_total", frozenset({("model", "clf")}))] == 3
        assert samples[("xentd_rejected_batches_total", frozenset({("reason", "non_finite")}))] == 1  # the ghost's


def test_build_info_reads_a_callable_backend_at_scrape_time(
    serve: Callable[[StateStore, Backend], MetricsServer],
) -> None:
    backend = ["none"]
    server = serve(_store(), lambda: backend[0])
    url = f"http://127.0.0.1:{server.port}/metrics"

    def build_info(accept: str | None) -> set[str]:
        _, text = _get(url, accept)
        parse = parse_openmetrics if accept else parse_text
        return {dict(k[1])["backend"] for k in _samples(parse(text)) if k[0] == "xentd_build_info"}

    assert build_info(None) == build_info(OPENMETRICS) == {"none"}
    backend[0] = "auto:cpu"
    assert build_info(None) == build_info(OPENMETRICS) == {"auto:cpu"}


# --- the real daemon ----------------------------------------------------------------------


def test_the_daemon_exports_the_new_families_in_both_formats(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("[state]\n")
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), 20)
    y = rng.integers(0, 3, 20)
    with Publisher(d.ingest) as pub:
        pub.send("w", p, y, weights=np.full(20, 0.125))  # Σw = 2.5
        pub.send("w", p, np.full(20, 7))  # class 7 of 3
        pub.send("ghost", p, np.full(20, 7))  # a model without state gets no per-model series
    d.wait_for("xentd_rejected_batches_total", 2.0, reason="target_out_of_range")
    d.wait_for("xentd_model_rejected_batches_total", 1.0, model="w", reason="target_out_of_range")
    samples = d.samples()
    assert not any(dict(labels).get("model") == "ghost" for _, labels in samples)
    assert samples[("xentd_unnormalized_targets_total", frozenset({("model", "w")}))] >= 0
    assert samples[("xentd_cross_entropy_nats_count", frozenset({("model", "w")}))] == 2.5
    _, om = _get(d.http + "/metrics", OPENMETRICS)
    strict = _samples(parse_openmetrics(om))
    assert strict[("xentd_cross_entropy_nats_count", frozenset({("model", "w")}))] == 2.5
    rejected = frozenset({("model", "w"), ("reason", "target_out_of_range")})
    assert strict[("xentd_model_rejected_batches_total", rejected)] == 1
    if shutil.which("promtool") is not None:
        _, text = d.get("/metrics")
        out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


def test_the_daemon_applies_the_export_section(start_daemon: Callable[..., DaemonProcess]) -> None:
    """[export] in the config file reaches the real daemon's /metrics: per-class series off, and a
    series budget too small for the second model leaves it out and says so."""
    # A 3-class model is 125 series without its per-class ones: 160 holds the first model, not the second.
    d = start_daemon('[export]\nper_class = "none"\nmax_series = 160\n')
    rng = np.random.default_rng(9)
    with Publisher(d.ingest, connect_timeout=60) as pub:
        for model in ("a-first", "b-second"):
            p = rng.dirichlet(np.ones(3), 20)
            pub.send(model, p, rng.integers(0, 3, 20))
    d.wait_for("xentd_messages_received_total", 2.0)
    names = {(name, dict(labels).get("model")) for name, labels in d.samples()}
    assert not any(name.startswith("xentd_class_cross_entropy_nats") for name, _ in names)
    assert ("xentd_samples_total", "a-first") in names
    assert ("xentd_samples_total", "b-second") not in names
    assert (d.value("xentd_series_dropped") or 0) > 0
