"""Delayed labels through the producer tools, against the real daemon: Publisher.send_predictions and
send_labels, `xentd send` and `xentd replay` with ids in .npz files, `xentd top`'s PENDING and COVERAGE,
and routing two instances by model.

These need the daemon side of issue 13 (the join store). Each test starts by checking that the daemon
exports `xentd_pending_bytes_limit`, and skips, saying so, where it does not: on a branch without that
side they report as skipped, and they run by themselves once main has it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq

from tests.conftest import softmax
from tests.integration.harness import DaemonProcess
from xentd import Publisher, wire


def _xentd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xentd", *args], capture_output=True, text=True, timeout=120)


def _needs_joins(d: DaemonProcess) -> DaemonProcess:
    if d.value("xentd_pending_bytes_limit") is None:
        pytest.skip("this daemon has no join store yet (issue 13's daemon side): no xentd_pending_bytes_limit")
    return d


@pytest.fixture
def joins(daemon: DaemonProcess) -> DaemonProcess:
    """The module's shared daemon, where the join store is there; each test uses its own model names."""
    return _needs_joins(daemon)


def _loss_sum(p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    """The float64 oracle: sum of w * -log p[y]."""
    losses = -np.log(p[np.arange(len(y)), y])
    return float(np.sum(losses if w is None else w * losses))


def _joined(d: DaemonProcess, model: str, outcome: str) -> float | None:
    return d.value("xentd_label_joins_total", model=model, outcome=outcome)


def test_publisher_predictions_then_shuffled_labels_score_as_pairs(joins: DaemonProcess) -> None:
    rng = np.random.default_rng(13)
    n = 300
    p, y, w = softmax(rng.normal(0, 2, (n, 4))), rng.integers(0, 4, n), rng.uniform(0.5, 2.0, n)
    # UINT64 ids above 2^63 for the first half, INT64 for the second; the labels of the first half come as INT64
    # (the same 64 bits), and those of the second as UINT64.
    ids = np.concatenate(
        [np.arange(n // 2, dtype=np.uint64) + np.uint64(2**63 + 7), np.arange(n // 2, dtype=np.uint64)]
    )
    order = rng.permutation(n)
    with Publisher(joins.ingest, connect_timeout=30) as pub:
        pub.send_predictions("pairs", p[: n // 2], ids[: n // 2], weights=w[: n // 2])
        pub.send_predictions("pairs", p[n // 2 :], ids[n // 2 :].view(np.int64), weights=w[n // 2 :])
        joins.wait_for("xentd_pending_predictions", float(n), model="pairs")
        for chunk in np.array_split(order, 7):  # shuffled, and in other batches than the predictions
            as_int64 = ids[chunk] >= np.uint64(2**63)
            pub.send_labels("pairs", y[chunk[as_int64]], ids[chunk[as_int64]].view(np.int64))
            pub.send_labels("pairs", y[chunk[~as_int64]], ids[chunk[~as_int64]])
        pub.send_labels("pairs", np.array([0]), np.array([123456789]))  # never predicted
        pub.send_predictions("pairs", p[:1], ids[:1])  # already joined: waits again, as a new prediction
    joins.wait_for("xentd_label_joins_total", float(n), model="pairs", outcome="matched")
    joins.wait_for("xentd_label_joins_total", 1.0, model="pairs", outcome="unmatched")
    joins.wait_for("xentd_pending_predictions", 1.0, model="pairs")
    assert _joined(joins, "pairs", "duplicate") == 0.0
    assert joins.value("xentd_cross_entropy_nats_sum", model="pairs") == pytest.approx(_loss_sum(p, y, w), rel=1e-9)
    assert joins.value("xentd_cross_entropy_nats_count", model="pairs") == pytest.approx(float(w.sum()), rel=1e-12)
    assert joins.value("xentd_label_delay_seconds_count", model="pairs") == float(n)


def test_send_predictions_then_labels_files_with_wait(joins: DaemonProcess, tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    n = 100
    p, y = softmax(rng.normal(0, 1, (n, 3))), rng.integers(0, 3, n)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    np.savez(tmp_path / "preds.npz", predictions=p, ids=ids)
    labels = np.array([*range(n), 0])  # the last label repeats an id: within one message it is unmatched
    np.savez(tmp_path / "labels.npz", targets=np.append(y, y[0]), ids=ids[labels])
    metrics = joins.http + "/metrics"
    sent = _xentd("send", str(tmp_path / "preds.npz"), "--model", "cli-send", "--to", joins.ingest, "--wait", metrics)
    assert sent.returncode == 0, sent.stderr
    assert f"sent {n} predictions (predictions-only) for model 'cli-send'" in sent.stdout
    assert f"  predictions waiting for their labels: +{n}" in sent.stdout, sent.stdout
    got = _xentd("send", str(tmp_path / "labels.npz"), "--model", "cli-send", "--to", joins.ingest, "--wait", metrics)
    # A label that joined nothing makes --wait exit 1, saying why.
    assert got.returncode == 1, got.stderr
    assert f"  labels: matched {n}, unmatched 1" in got.stdout, got.stdout
    assert "1 label(s) joined no prediction" in got.stdout
    assert _joined(joins, "cli-send", "matched") == float(n)
    assert joins.value("xentd_cross_entropy_nats_sum", model="cli-send") == pytest.approx(_loss_sum(p, y), rel=1e-9)


def test_replay_predictions_then_labels_and_top(joins: DaemonProcess, tmp_path: Path) -> None:
    rng = np.random.default_rng(15)
    n = 500
    p, y = softmax(rng.normal(0, 1, (n, 5))), rng.integers(0, 5, n)
    ids = (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)  # spread over 64 bits
    np.savez(tmp_path / "day1.npz", predictions=p, ids=ids)
    labelled = rng.permutation(n)[:400]  # 100 predictions never get a label
    (tmp_path / "labels").mkdir()
    np.savez(tmp_path / "labels" / "day1.npz", targets=y[labelled], ids=ids[labelled])  # the same stem
    common = ("--model", "replayed", "--to", joins.ingest, "--batch-size", "64", "--wait", joins.http)
    first = _xentd("replay", str(tmp_path / "day1.npz"), *common)
    assert first.returncode == 0, first.stderr
    assert f"replayed {n} predictions (predictions-only) in 8 batches" in first.stderr
    second = _xentd("replay", str(tmp_path / "labels" / "day1.npz"), *common)
    assert second.returncode == 0, second.stderr
    assert "  labels: matched 400" in second.stdout, second.stdout  # not deduplicated against the predictions
    assert joins.value("xentd_pending_predictions", model="replayed") == 100.0
    ref = _loss_sum(p[labelled], y[labelled])
    assert joins.value("xentd_cross_entropy_nats_sum", model="replayed") == pytest.approx(ref, rel=1e-9)

    view = _xentd("top", "--url", joins.http, "--once", "--interval", "0.2", "--limit", "50")
    assert view.returncode == 0, view.stderr
    line = next(ln for ln in view.stdout.splitlines() if ln.startswith("replayed "))
    # Nothing expired or was evicted yet: every prediction that left the store was matched.
    assert line.split()[-2:] == ["100", "100.00%"], line
    assert "join store" in view.stdout.splitlines()[1]


def _stable_instance(model: str, count: int) -> int:
    """docs/scaling.md's choice: a hash of the name's bytes, the same in every process."""
    return int.from_bytes(hashlib.blake2b(model.encode("utf-8"), digest_size=8).digest(), "little") % count


def test_two_instances_routed_by_model_join_and_round_robin_does_not(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    instances = [_needs_joins(start_daemon()), start_daemon()]
    rng = np.random.default_rng(16)
    models = [f"routed-{k}" for k in range(6)]
    p, y, ids = softmax(rng.normal(0, 1, (20, 3))), rng.integers(0, 3, 20), np.arange(20, dtype=np.int64)
    publishers = [Publisher(d.ingest, connect_timeout=30) for d in instances]
    try:
        for model in models:
            publishers[_stable_instance(model, 2)].send_predictions(model, p, ids)
        for model in reversed(models):  # the labels later, maybe from another process: the same choice
            publishers[_stable_instance(model, 2)].send_labels(model, y, ids)
    finally:
        for pub in publishers:
            pub.close()
    for model in models:
        home, other = instances[_stable_instance(model, 2)], instances[1 - _stable_instance(model, 2)]
        home.wait_for("xentd_label_joins_total", 20.0, model=model, outcome="matched")
        assert home.value("xentd_cross_entropy_nats_sum", model=model) == pytest.approx(_loss_sum(p, y), rel=1e-9)
        assert other.value("xentd_samples_total", model=model) is None

    # One PUSH socket connected to both (which Publisher refuses for joins): ZeroMQ alternates between
    # them, so each model's labels land where its predictions are not.
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        for d in instances:
            push.connect(d.ingest)
        time.sleep(0.5)  # both connections up, so that neither gets two messages in a row
        for k in range(4):
            push.send_multipart(wire.encode("round-robin", p, None, ids=ids + 100 * k))
            push.send_multipart(wire.encode("round-robin", None, y, ids=ids + 100 * k))
    finally:
        push.close(linger=5000)
        ctx.term()
    pending = 0.0
    deadline = time.monotonic() + 30
    while pending < 80 and time.monotonic() < deadline:
        pending = sum(d.value("xentd_pending_predictions", model="round-robin") or 0.0 for d in instances)
        time.sleep(0.05)
    assert pending == 80.0  # every prediction still waits: none of its labels reached it
    assert all(not _joined(d, "round-robin", "matched") for d in instances)
