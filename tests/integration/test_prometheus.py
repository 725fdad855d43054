"""xentd under a real Prometheus: lint, queries, recording rules, and three instances merged."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from sklearn.metrics import log_loss

from tests.conftest import softmax
from tests.integration.harness import DaemonProcess
from tests.integration.prometheus import PrometheusProcess, needs_prometheus
from xentd import wire
from xentd.client import Publisher

pytestmark = needs_prometheus


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], PrometheusProcess]]:
    started: list[PrometheusProcess] = []

    def start(targets: list[str]) -> PrometheusProcess:
        p = PrometheusProcess(tmp_path, targets)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def _data(seed: int, n: int, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return softmax(rng.normal(0, 2, (n, classes))), rng.integers(0, classes, n)


def _reference(p: np.ndarray, y: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(log_loss(y, p, labels=range(p.shape[1])))


def _target(d: DaemonProcess) -> str:
    return d.http.removeprefix("http://")


def test_promtool_check_metrics_passes(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("[state]\n")
    with Publisher(d.ingest) as pub:
        p, y = _data(0, 200, classes=120)  # past class_limit: the "other" class too
        pub.send("lint", p, y, weights=np.ones(200), batch_id="b1", ts=1.7e9)
        pub.send("lint-bin", p[:, 0], (y > 60).astype(np.uint8))
    d.wait_for("xentd_batches_total", 1.0, model="lint-bin")
    _, text = d.get("/metrics")
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


def test_queries_and_recording_rules_through_prometheus(
    start_daemon: Callable[..., DaemonProcess], prometheus: Callable[[list[str]], PrometheusProcess]
) -> None:
    d = start_daemon()
    prom = prometheus([_target(d)])
    warm_p, warm_y = _data(1, 50)
    with Publisher(d.ingest) as pub:
        pub.send("m", warm_p, warm_y)
    # The series must exist in Prometheus before the measured batch, so rate() sees its increase.
    prom.wait_until('xentd_samples_total{model="m"}', lambda r: list(r.values()) == [50.0])
    prom.wait_until('count_over_time(xentd_samples_total{model="m"}[1m])', lambda r: r and min(r.values()) >= 3)
    p, y = _data(2, 400)
    with Publisher(d.ingest) as pub:
        pub.send("m", p, y)
    d.wait_for("xentd_samples_total", 450.0, model="m")
    prom.wait_until('xentd_samples_total{model="m"}', lambda r: list(r.values()) == [450.0])

    everything = _reference(np.concatenate([warm_p, p]), np.concatenate([warm_y, y]))
    lifetime = prom.query('xentd_cross_entropy_nats_sum{model="m"} / xentd_cross_entropy_nats_count{model="m"}')
    assert list(lifetime.values()) == [pytest.approx(everything, rel=1e-12)]
    window = prom.query('xentd_window_cross_entropy_nats{model="m", window="5m"}')
    assert list(window.values()) == [pytest.approx(everything, rel=1e-12)]
    # The recording rule sees only the increase inside its 5m range: the measured batch.
    rule = prom.wait_until(
        'model:xentd_cross_entropy_nats:mean5m{model="m"}',
        lambda r: r and abs(list(r.values())[0] - _reference(p, y)) < 1e-9 * _reference(p, y),
    )
    assert list(rule.values()) == [pytest.approx(_reference(p, y), rel=1e-9)]
    up = prom.query('up{job="xentd"}')
    assert list(up.values()) == [1.0]


def test_three_instances_merge_to_the_single_instance_reference(
    start_daemon: Callable[..., DaemonProcess], prometheus: Callable[[list[str]], PrometheusProcess]
) -> None:
    """Producers PUSH round-robin to three instances; Prometheus merges sums and counts.
    The merged mean equals one instance that saw everything, and sklearn."""
    shards = [start_daemon() for _ in range(3)]
    reference = start_daemon()
    prom = prometheus([_target(d) for d in shards])
    ctx = zmq.Context()
    fanout = Publisher([d.ingest for d in shards], context=ctx)
    single = ctx.socket(zmq.PUSH)
    single.connect(reference.ingest)
    # A connecting PUSH socket has a pipe per endpoint from connect() on, so
    # round-robin covers all three even before their TCP connections are up.
    rng = np.random.default_rng(3)
    ps, ys, ws = [], [], []
    for i in range(60):
        n = int(rng.integers(10, 100))
        p, y = _data(100 + i, n)
        w = rng.random(n) + 0.5
        fanout.send("shared", p, y, weights=w)
        single.send_multipart(wire.encode("shared", p, y, weights=w))
        ps.append(p)
        ys.append(y)
        ws.append(w)
    total = float(sum(len(y) for y in ys))
    reference.wait_for("xentd_samples_total", total, model="shared")
    merged = prom.wait_until('sum(xentd_samples_total{model="shared"})', lambda r: list(r.values()) == [total])
    assert merged
    per_instance = prom.query('xentd_batches_total{model="shared"}')
    assert len(per_instance) == 3 and all(v >= 1 for v in per_instance.values())  # all three took part
    mean = prom.query(
        'sum(xentd_cross_entropy_nats_sum{model="shared"}) / sum(xentd_cross_entropy_nats_count{model="shared"})'
    )
    ref_sum = reference.value("xentd_cross_entropy_nats_sum", model="shared")
    ref_count = reference.value("xentd_cross_entropy_nats_count", model="shared")
    assert ref_sum is not None and ref_count is not None
    assert list(mean.values()) == [pytest.approx(ref_sum / ref_count, rel=1e-12)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sk = log_loss(np.concatenate(ys), np.concatenate(ps), sample_weight=np.concatenate(ws), labels=range(4))
    assert list(mean.values()) == [pytest.approx(sk, rel=1e-12)]
    # Averaging the instances' own means is what docs/scaling.md warns against: it differs.
    naive = prom.query(
        'avg(xentd_cross_entropy_nats_sum{model="shared"} / xentd_cross_entropy_nats_count{model="shared"})'
    )
    assert list(naive.values())[0] != pytest.approx(sk, rel=1e-9)
    fanout.close()
    single.close(linger=0)
    ctx.term()


def test_sub_instances_shard_models_by_topic_prefix(
    start_daemon: Callable[..., DaemonProcess], prometheus: Callable[[list[str]], PrometheusProcess]
) -> None:
    """Three instances SUB to one PUB stream, each subscribed to its own model-name prefix."""
    import time

    with Publisher("tcp://127.0.0.1:*", socket="pub") as pub:
        shards = [
            start_daemon(
                f'[ingest]\nsocket = "sub"\nconnect = true\naddress = "{pub.address}"\nsubscribe = ["{prefix}-"]\n',
                ingest=None,
            )
            for prefix in ("a", "b", "c")
        ]
        prom = prometheus([_target(d) for d in shards])
        probe_p, probe_y = _data(4, 1)
        deadline = time.monotonic() + 30
        while not all(d.value("xentd_batches_total", model=f"{x}-probe") for d, x in zip(shards, "abc", strict=True)):
            assert time.monotonic() < deadline, "subscriptions never reached the publisher"
            for x in "abc":
                pub.send(f"{x}-probe", probe_p, probe_y)
            time.sleep(0.05)
        sent: dict[str, int] = {}
        for i, model in enumerate(["a-fraud", "b-ranker", "c-lm", "b-ads"] * 5):
            p, y = _data(200 + i, 30)
            pub.send(model, p, y)
            sent[model] = sent.get(model, 0) + 30
    for model, n in sent.items():
        prom.wait_until(f'sum(xentd_samples_total{{model="{model}"}})', lambda r, n=n: list(r.values()) == [n])
        owners = prom.query(f'xentd_samples_total{{model="{model}"}}')
        assert len(owners) == 1  # exactly one instance holds each model
        (labels,) = owners
        instance = dict(labels)["instance"]
        assert instance == _target(shards["abc".index(model[0])])
