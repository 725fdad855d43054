"""The real daemon, end to end: publish with the client, scrape /metrics, check the numbers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq
from sklearn.metrics import log_loss

from tests import naive
from tests.conftest import softmax
from tests.integration.harness import DaemonProcess
from xentd import wire
from xentd.client import Publisher
from xentd.errors import Reason


def _push(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(address)
    return sock


def test_tcp_end_to_end_matches_sklearn(daemon: DaemonProcess) -> None:
    rng = np.random.default_rng(0)
    ps, ys, ws = [], [], []
    with Publisher(daemon.ingest) as pub:
        for i in range(5):
            p = softmax(rng.normal(0, 2, (300, 4))).astype(np.float32)
            y = rng.integers(0, 4, 300)
            w = rng.random(300) + 0.5
            pub.send("clf", p, y, weights=w, batch_id=f"b{i}", ts=1_700_000_000 + i)
            ps.append(p)
            ys.append(y)
            ws.append(w)
    daemon.wait_for("xentd_samples_total", 1500.0, model="clf")
    p, y, w = np.concatenate(ps), np.concatenate(ys), np.concatenate(ws)
    s = daemon.samples()
    m = frozenset({("model", "clf")})
    mean = s[("xentd_cross_entropy_nats_sum", m)] / s[("xentd_cross_entropy_nats_count", m)]
    # Same float32 values in float64, clipped at float32's eps, as xentd does; no row here is near eps.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # float32 rows do not sum to 1 at float64 precision
        ref = log_loss(y, p.astype(np.float64), sample_weight=w, labels=range(4))
    assert mean == pytest.approx(ref, rel=1e-12)
    assert s[("xentd_cross_entropy_nats_count", m)] == pytest.approx(w.sum(), rel=1e-12)
    assert s[("xentd_batches_total", m)] == 5
    assert s[("xentd_last_event_timestamp_seconds", m)] == 1_700_000_004
    for window in ("1m", "5m", "1h", "last_10000"):
        wl = frozenset({("model", "clf"), ("window", window)})
        assert s[("xentd_window_cross_entropy_nats", wl)] == pytest.approx(mean, rel=1e-12)
        assert s[("xentd_window_samples", wl)] == 1500
    last = frozenset({("model", "clf"), ("window", "last_1000")})
    tail = naive.multiclass(p[-1000:], y[-1000:], "probs", eps=float(np.finfo(np.float32).eps))
    assert s[("xentd_window_cross_entropy_nats", last)] == pytest.approx(
        naive.weighted_mean(tail.loss, w[-1000:]), rel=1e-12
    )
    accuracy = naive.weighted_mean((p.argmax(1) == y).astype(float), w)
    assert s[("xentd_window_accuracy_ratio", frozenset({("model", "clf"), ("window", "1h")}))] == pytest.approx(
        accuracy, rel=1e-12
    )
    assert s[("xentd_sample_loss_nats_count", m)] == 1500
    assert s[("xentd_models", frozenset())] >= 1


def test_binary_logits_over_ipc(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    d = start_daemon(ingest=f"ipc://{tmp_path}/ingest.sock")
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, 1000)
    y = rng.integers(0, 2, 1000)
    with Publisher(d.ingest) as pub:
        pub.send("bin", x, y, input="logits")
    d.wait_for("xentd_samples_total", 1000.0, model="bin")
    ref = naive.binary(x, y, "logits", eps=2.2e-16).loss.sum()
    assert d.value("xentd_cross_entropy_nats_sum", model="bin") == pytest.approx(ref, rel=1e-12)
    assert d.stop() == 0


def _bad_messages() -> list[tuple[Reason, list[bytes]]]:
    def msg(header: dict, *tensors: np.ndarray) -> list[bytes]:
        return [json.dumps(header).encode(), *(t.tobytes() for t in tensors)]

    def header(
        model: str = "bad-src",
        input: str = "probs",
        pred: tuple = ("FP32", [2, 2]),
        tgt: tuple = ("INT64", [2]),
        **extra: object,
    ) -> dict:
        return {
            "v": 1,
            "model": model,
            "input": input,
            **extra,
            "tensors": [
                {"name": "predictions", "datatype": pred[0], "shape": pred[1]},
                {"name": "targets", "datatype": tgt[0], "shape": tgt[1]},
            ],
        }

    p = np.array([[0.5, 0.5], [0.25, 0.75]], "<f4")
    y = np.array([0, 1], "<i8")
    return [
        (Reason.BAD_FRAMING, [json.dumps(header()).encode(), p.tobytes()]),
        (Reason.BAD_HEADER, [b"\xc3\x28 not utf-8", p.tobytes(), y.tobytes()]),
        (Reason.UNSUPPORTED_VERSION, msg({**header(), "v": 9}, p, y)),
        (Reason.UNKNOWN_DATATYPE, msg(header(pred=("FP8", [2, 2])), p, y)),
        (Reason.BAD_SHAPE, msg(header(pred=("FP32", [2, 2, 1])), p, y)),
        (Reason.SIZE_MISMATCH, msg(header(pred=("FP32", [3, 2])), p, y)),
        (
            Reason.MESSAGE_TOO_LARGE,
            msg(
                header(pred=("FP32", [80_000, 2]), tgt=("INT64", [80_000])),
                np.zeros((80_000, 2), "<f4"),
                np.zeros(80_000, "<i8"),
            ),
        ),
        (Reason.BAD_MODEL_NAME, msg(header(model="no spaces"), p, y)),
        (Reason.BAD_INPUT_KIND, msg(header(input="softmax"), p, y)),
        (Reason.MISSING_TENSOR, [json.dumps({**header(), "tensors": header()["tensors"][:1]}).encode(), p.tobytes()]),
        (Reason.BAD_DATATYPE, msg(header(pred=("INT32", [2, 2])), p.view("<i4"), y)),
        (Reason.SHAPE_MISMATCH, msg(header(tgt=("INT64", [1])), p, y[:1])),
        (Reason.NON_FINITE, msg(header(), np.array([[np.nan, 0.5], [0.5, 0.5]], "<f4"), y)),
        (Reason.PROBABILITY_OUT_OF_RANGE, msg(header(), np.array([[1.5, -0.5], [0.5, 0.5]], "<f4"), y)),
        (Reason.TARGET_OUT_OF_RANGE, msg(header(), p, np.array([0, 7], "<i8"))),
        (
            Reason.NEGATIVE_WEIGHT,
            [
                *msg(
                    {
                        **header(),
                        "tensors": [*header()["tensors"], {"name": "weights", "datatype": "FP64", "shape": [2]}],
                    },
                    p,
                    y,
                ),
                np.array([1.0, -1.0]).tobytes(),
            ],
        ),
        (
            Reason.CLASS_COUNT_CHANGED,
            msg(
                header(model="fixed-c", pred=("FP32", [1, 4]), tgt=("INT64", [1])),
                np.full((1, 4), 0.25, "<f4"),
                np.array([0], "<i8"),
            ),
        ),
        (Reason.TOO_MANY_MODELS, msg(header(model="one-too-many"), p, y)),
    ]


def test_every_rejection_is_counted_and_valid_batches_between_are_not_lost(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    d = start_daemon("[limits]\nmax_models = 2\n[ingest]\nmax_message_bytes = 1000000\n")
    push = _push(d.ingest)
    good = [
        json.dumps(
            {
                "v": 1,
                "model": "fixed-c",
                "input": "probs",
                "tensors": [
                    {"name": "predictions", "datatype": "FP32", "shape": [3, 3]},
                    {"name": "targets", "datatype": "INT64", "shape": [3]},
                ],
            }
        ).encode(),
        np.full((3, 3), 1 / 3, "<f4").tobytes(),
        np.array([0, 1, 2], "<i8").tobytes(),
    ]
    filler = [
        json.dumps(
            {
                "v": 1,
                "model": "filler",
                "input": "logits",
                "tensors": [
                    {"name": "predictions", "datatype": "FP64", "shape": [1]},
                    {"name": "targets", "datatype": "INT64", "shape": [1]},
                ],
            }
        ).encode(),
        np.zeros(1).tobytes(),
        np.zeros(1, "<i8").tobytes(),
    ]
    push.send_multipart(good)
    push.send_multipart(filler)  # now at max_models = 2
    bad = _bad_messages()
    for _reason, frames in bad:
        push.send_multipart(frames)
        push.send_multipart(good)
    push.close()
    d.wait_for("xentd_samples_total", 3.0 * (len(bad) + 1), model="fixed-c")
    for reason, _ in bad:
        assert d.value("xentd_rejected_batches_total", reason=reason.value) == 1, (reason, d.log)
    assert d.value("xentd_rejected_batches_total", reason="internal_error") == 0
    assert d.value("xentd_messages_received_total") == 2 * len(bad) + 2
    assert d.value("xentd_cross_entropy_nats_sum", model="fixed-c") == pytest.approx(
        3 * (len(bad) + 1) * np.log(3), rel=1e-6
    )
    assert d.get("/healthz") == (200, "ok\n")
    assert "rejected batch" in d.log
    assert d.stop() == 0


def test_sub_mode_filters_by_topic_prefix(start_daemon: Callable[..., DaemonProcess]) -> None:
    with Publisher("tcp://127.0.0.1:*", socket="pub") as pub:
        d = start_daemon(
            f'[ingest]\nsocket = "sub"\nconnect = true\naddress = "{pub.address}"\nsubscribe = ["keep-"]\n', ingest=None
        )
        probe = (np.array([0.9]), np.array([1]))
        # PUB/SUB drops everything until the subscription reaches the publisher.
        for _ in range(400):
            pub.send("keep-probe", *probe)
            if d.value("xentd_batches_total", model="keep-probe"):
                break
            zmq.select([], [], [], 0.05)
        pub.send("keep-a", np.array([0.8, 0.3]), np.array([1, 0]))
        pub.send("drop-b", np.array([0.8, 0.3]), np.array([1, 0]))
        # A topic frame that disagrees with the header's model.
        pub._socket.send_multipart([b"keep-x", *wire.encode("keep-y", np.array([0.5]), np.array([1]))])
        d.wait_for("xentd_samples_total", 2.0, model="keep-a")
        d.wait_for("xentd_rejected_batches_total", 1.0, reason="topic_mismatch")
        assert d.value("xentd_samples_total", model="drop-b") is None
        assert d.stop() == 0


def test_sigterm_and_sigint_exit_zero_after_draining(start_daemon: Callable[..., DaemonProcess]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        d = start_daemon()
        with Publisher(d.ingest) as pub:
            for _ in range(50):
                pub.send("m", np.full((64, 10), 0.1, np.float32), np.zeros(64, np.int64))
        assert d.stop(sig) == 0, d.log
        assert "drained" in d.log and "stopped" in d.log


def test_send_command_publishes_an_npz(daemon: DaemonProcess, tmp_path: Path) -> None:
    path = tmp_path / "batch.npz"
    np.savez(
        path,
        predictions=np.array([[2.0, 0.0], [0.0, 2.0]], np.float32),
        targets=np.array([0, 0]),
        weights=np.array([1.0, 3.0]),
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "xentd",
            "send",
            str(path),
            "--model",
            "from-npz",
            "--to",
            daemon.ingest,
            "--input",
            "logits",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "sent 2 samples" in out.stdout
    daemon.wait_for("xentd_samples_total", 2.0, model="from-npz")
    lse = np.log1p(np.exp(-2.0))
    expected = (1.0 * lse + 3.0 * (2.0 + lse)) / 4.0
    s = daemon.value("xentd_cross_entropy_nats_sum", model="from-npz")
    assert s is not None and s / 4.0 == pytest.approx(expected, rel=1e-6)


def test_send_command_explains_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, preds=np.zeros(2))
    out = subprocess.run(
        [sys.executable, "-m", "xentd", "send", str(path), "--model", "m", "--to", "tcp://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "missing array(s) predictions, targets" in out.stderr


def test_healthz_and_unknown_paths(daemon: DaemonProcess) -> None:
    assert daemon.get("/healthz") == (200, "ok\n")
    assert daemon.get("/nope")[0] == 404


def test_startup_errors_are_one_clear_line(tmp_path: Path, daemon: DaemonProcess) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest]\nadress = 'tcp://127.0.0.1:1'\n")
    out = subprocess.run(
        [sys.executable, "-m", "xentd", "run", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "ingest.adress: unknown key (did you mean 'address'?)" in out.stderr
    taken = daemon.http.removeprefix("http://")
    out = subprocess.run(
        [sys.executable, "-m", "xentd", "run", "--metrics", taken, "--ingest", "tcp://127.0.0.1:*"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and f"cannot serve metrics on {taken}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
