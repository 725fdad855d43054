"""Delayed labels through the real daemon over real sockets: pairs scored as if sent together,
every join outcome exact, waiting predictions across a SIGTERM restart, and the label-free
entropy and confidence against a SciPy oracle."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy.special import entr, softmax

from tests.integration.harness import DaemonProcess
from xentd import Publisher, wire


def _families(d: DaemonProcess, model: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of one model, keyed without the model label."""
    return {
        (name, frozenset(kv for kv in labels if kv[0] != "model")): v
        for (name, labels), v in d.samples().items()
        if ("model", model) in labels
    }


# Series that describe how samples arrived, not what they scored.
_ARRIVAL = (
    "xentd_label",
    "xentd_pending",
    "xentd_batches_total",
    "xentd_last_",
    "xentd_prediction_",
    "xentd_window_prediction",
)


def test_joined_pairs_score_exactly_as_the_same_pairs_sent_together(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    n, c = 400, 6
    logits = (rng.normal(0, 3, (n, c))).astype(np.float32)
    bf16 = wire.BF16.from_float32(logits)
    y = rng.integers(0, c, n)
    w = rng.uniform(0, 2, n)
    ids = rng.permutation(2**64 - 1 - np.arange(n, dtype=np.uint64))  # the top of the uint64 range
    d = DaemonProcess(tmp_path, '[windows]\ncount = [100, 1000]\ntime = ["1h"]\n')
    try:
        with Publisher(d.ingest, connect_timeout=30) as pub:
            pub.send("together", bf16, y, input="logits", weights=w)
            for part in np.array_split(np.arange(n), 5):
                pub.send_predictions("joined", wire.BF16(bf16.bits[part]), ids[part], input="logits", weights=w[part])
            d.wait_for("xentd_pending_predictions", float(n), model="joined")
            order = rng.permutation(n)
            for part in np.array_split(order, 9):
                pub.send_labels("joined", y[part], ids[part])
        d.wait_for("xentd_label_joins_total", float(n), model="joined", outcome="matched")
        together, joined = _families(d, "together"), _families(d, "joined")
        # Every scored figure, in every window, equals the pairs sent together; only the order of the
        # float sums differs (labels came shuffled), and the ewma, which decays by arrival time.
        scored = {
            k: v
            for k, v in together.items()
            if not k[0].startswith(_ARRIVAL) and not {("window", "ewma"), ("window", "last_100")} & k[1]
        }
        assert len(scored) > 20
        assert {k: joined.get(k) for k in scored} == pytest.approx(scored, rel=1e-12)
        # And both equal an independent float64 oracle (BF16 widened exactly).
        lp = np.log(softmax(bf16.bits.astype(np.uint32).__lshift__(16).view(np.float32).astype(np.float64), axis=1))
        loss = -lp[np.arange(n), y]
        assert joined[("xentd_cross_entropy_nats_sum", frozenset())] == pytest.approx(float(w @ loss), rel=2e-5)
        # A count window holds the pairs in the order their labels came.
        last = order[-100:]
        window = joined[("xentd_window_cross_entropy_nats", frozenset({("window", "last_100")}))]
        assert window == pytest.approx(float(w[last] @ loss[last] / w[last].sum()), rel=2e-5)
    finally:
        d.stop()


def test_every_outcome_is_counted_exactly(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path, '[labels]\nttl = "2s"\n')
    try:
        with Publisher(d.ingest, connect_timeout=30) as pub:
            p = np.full(10, 0.25)
            pub.send_predictions("o", p, np.arange(10))  # waits: 0..9
            pub.send_predictions("o", p[:4], np.array([8, 9, 10, 10]))  # 8, 9 wait already; 10 twice
            d.wait_for("xentd_pending_predictions", 11.0, model="o")
            pub.send_labels("o", np.array([1, 0, 1, 1]), np.array([0, 1, 1, 99]))  # 0, 1 match; 1 again, 99: unmatched
            d.wait_for("xentd_label_joins_total", 2.0, model="o", outcome="matched")
            time.sleep(3.5)  # past the TTL: a housekeeping pass (every second) expires the other 9
            d.wait_for("xentd_label_joins_total", 9.0, model="o", outcome="expired")
            pub.send_labels("o", np.array([1]), np.array([5]))  # expired: no longer waiting
        d.wait_for("xentd_label_joins_total", 3.0, model="o", outcome="unmatched")
        counts = {o: d.value("xentd_label_joins_total", model="o", outcome=o) for o in ("duplicate", "evicted")}
        assert counts == {"duplicate": 3.0, "evicted": 0.0}
        assert d.value("xentd_pending_predictions", model="o") == 0.0
        assert d.value("xentd_samples_total", model="o") == 2.0
        assert d.value("xentd_label_delay_seconds_count", model="o") == 2.0
    finally:
        d.stop()


def test_a_small_budget_evicts_the_oldest_and_counts_them(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path, "[labels]\nmax_pending_bytes = 8192\n")
    try:
        sent = 0
        with Publisher(d.ingest, connect_timeout=30) as pub:
            for _ in range(20):
                pub.send_predictions("e", np.full(100, 0.5), np.arange(sent, sent + 100))
                sent += 100
                time.sleep(0.02)  # distinct arrival ticks, so "oldest" is well defined
            d.wait_for("xentd_messages_received_total", 20.0)
            pending = d.value("xentd_pending_predictions", model="e")
            evicted = d.value("xentd_label_joins_total", model="e", outcome="evicted")
            assert pending is not None and evicted is not None and pending + evicted == sent and evicted > 0
            assert 0 < d.value("xentd_pending_bytes") <= 8192  # type: ignore[operator]
            assert d.value("xentd_pending_bytes_limit") == 8192.0
            pub.send_labels("e", np.ones(2), np.array([0, sent - 1]))  # the oldest went, the newest waits
        d.wait_for("xentd_label_joins_total", 1.0, model="e", outcome="matched")
        assert d.value("xentd_label_joins_total", model="e", outcome="unmatched") == 1.0
        assert "join store reached labels.max_pending_bytes=8192" in d.log
    finally:
        d.stop()


def test_waiting_predictions_survive_a_restart_and_their_ttl_keeps_counting(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = f'[state]\ndirectory = "{state}"\n[labels]\nttl = "8s"\n'
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float64)
    d = DaemonProcess(tmp_path, config)
    try:
        with Publisher(d.ingest, connect_timeout=30) as pub:
            pub.send_predictions("r", p, np.array([2**63 + 1, 7], np.uint64), weights=np.array([2.0, 0.5]))
        d.wait_for("xentd_pending_predictions", 2.0, model="r")
        started = time.monotonic()
    finally:
        assert d.stop() == 0
    d = DaemonProcess(tmp_path, config)
    try:
        assert d.value("xentd_pending_predictions", model="r") == 2.0
        with Publisher(d.ingest, connect_timeout=30) as pub:
            pub.send_labels("r", np.array([0]), np.array([2**63 + 1], np.uint64))
            d.wait_for("xentd_label_joins_total", 1.0, model="r", outcome="matched")
            assert d.value("xentd_cross_entropy_nats_sum", model="r") == pytest.approx(2.0 * -np.log(0.7), rel=1e-12)
            time.sleep(max(0.0, 9.5 - (time.monotonic() - started)))  # 8 s after the first daemon saw it
            d.wait_for("xentd_label_joins_total", 1.0, model="r", outcome="expired")
    finally:
        d.stop()


def test_entropy_and_confidence_of_prediction_only_traffic_equal_scipy(daemon: DaemonProcess) -> None:
    rng = np.random.default_rng(11)
    z = rng.normal(0, 2, (500, 5))
    w = rng.uniform(0, 3, 500)
    pb = rng.uniform(0, 1, 300)
    with Publisher(daemon.ingest, connect_timeout=30) as pub:
        pub.send_predictions("ent", z, np.arange(500), input="logits", weights=w)
        pub.send_predictions("ent-b", pb, np.arange(300), input="probs")
    daemon.wait_for("xentd_pending_predictions", 500.0, model="ent")
    daemon.wait_for("xentd_pending_predictions", 300.0, model="ent-b")
    p = softmax(z, axis=1)
    h, conf = entr(p).sum(axis=1), p.max(axis=1)
    assert daemon.value("xentd_prediction_entropy_nats_sum", model="ent") == pytest.approx(float(w @ h), rel=1e-9)
    assert daemon.value("xentd_prediction_entropy_nats_count", model="ent") == pytest.approx(float(w.sum()), rel=1e-12)
    assert daemon.value("xentd_prediction_confidence_sum", model="ent") == pytest.approx(float(w @ conf), rel=1e-9)
    window = daemon.value("xentd_window_prediction_entropy_nats", model="ent", window="1h")
    assert window == pytest.approx(float(w @ h / w.sum()), rel=1e-9)
    hb = entr(pb) + entr(1 - pb)
    assert daemon.value("xentd_prediction_entropy_nats_sum", model="ent-b") == pytest.approx(float(hb.sum()), rel=1e-9)
    assert daemon.value("xentd_prediction_confidence_sum", model="ent-b") == pytest.approx(
        float(np.maximum(pb, 1 - pb).sum()), rel=1e-12
    )
    assert (
        daemon.value("xentd_samples_total", model="ent") is None
        or daemon.value("xentd_samples_total", model="ent") == 0
    )


def test_bad_labels_are_rejected_alone_with_their_reason(daemon: DaemonProcess) -> None:
    with Publisher(daemon.ingest, connect_timeout=30) as pub:
        pub.send_labels("never-predicted", np.array([1]), np.array([1]))
        pub.send_predictions("bad-labels", np.full((3, 4), 0.25), np.arange(3))
        daemon.wait_for("xentd_pending_predictions", 3.0, model="bad-labels")
        pub.send_labels("bad-labels", np.array([0, 4]), np.array([0, 1]))  # class 4 of 4: out of range
        pub.send_labels("bad-labels", np.array([3]), np.array([2]))
    daemon.wait_for("xentd_label_joins_total", 1.0, model="bad-labels", outcome="matched")
    assert daemon.value("xentd_model_rejected_batches_total", model="bad-labels", reason="target_out_of_range") == 1.0
    assert daemon.value("xentd_rejected_batches_total", reason="unknown_model") == 1.0
    assert daemon.value("xentd_pending_predictions", model="bad-labels") == 2.0
    assert daemon.value("xentd_cross_entropy_nats_sum", model="bad-labels") == pytest.approx(np.log(4), rel=1e-12)
