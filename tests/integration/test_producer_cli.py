"""What a producer sees from `xentd send`, `xentd replay` and the Publisher, against the real daemon.

No daemon: a clear error naming the address, within --timeout. --wait: what the
daemon did with the batches (scored, duplicate, rejected and why), read from its
/metrics.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq

from tests.conftest import softmax
from tests.integration.harness import DaemonProcess
from xentd import Publisher, XentdError


def _xentd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xentd", *args], capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    """A loopback port nothing listens on (bound once by the OS, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "val.npz"
    np.savez(path, predictions=softmax(rng.normal(0, 2, (100, 4))), targets=rng.integers(0, 4, 100))
    return path


# --- no daemon ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["send", "replay"])
def test_no_daemon_is_an_error_naming_the_address(command: str, npz: Path) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    # The subprocess timeout is a hang guard only; --timeout 1 is what ends it.
    out = _xentd(command, str(npz), "--model", "m", "--to", address, "--timeout", "1", timeout=60)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    assert f"no daemon accepted the connection to {address} within 1 s" in out.stderr
    assert "sent " not in out.stdout and "replayed" not in out.stderr


@pytest.mark.parametrize("command", ["send", "replay"])
def test_an_address_without_transport_gets_a_hint(command: str, npz: Path) -> None:
    out = _xentd(command, str(npz), "--model", "m", "--to", "127.0.0.1:5557")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "did you mean `tcp://127.0.0.1:5557`?" in out.stderr


def test_publisher_connect_timeout_against_the_real_daemon(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon()
    p = softmax(np.random.default_rng(2).normal(0, 1, (10, 3)))
    with Publisher(d.ingest, connect_timeout=30) as pub:
        pub.send("pub-check", p, np.arange(10) % 3)
    d.wait_for("xentd_samples_total", 10.0, model="pub-check")
    nowhere = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(XentdError, match=f"no daemon accepted the connection to {nowhere} within 0.5 s"):
        Publisher([d.ingest, nowhere], connect_timeout=0.5)


def test_pub_waits_for_a_subscribing_daemon(start_daemon: Callable[..., DaemonProcess], npz: Path) -> None:
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    d = start_daemon('[ingest]\nsocket = "sub"\nconnect = true\n', ingest=address)
    # The daemon connects to us: the check waits for its subscription, so the batch is not
    # dropped by a PUB socket that has no subscriber yet.
    out = _xentd("send", str(npz), "--model", "via-pub", "--to", address, "--pub", "--timeout", "60")
    assert out.returncode == 0, out.stderr
    d.wait_for("xentd_samples_total", 100.0, model="via-pub")
    with Publisher(address, socket="pub", connect_timeout=60) as pub:
        pub.send("via-pub-binary", np.array([0.9, 0.2]), np.array([1, 0]))
    d.wait_for("xentd_samples_total", 2.0, model="via-pub-binary")


def test_a_daemon_subscribed_to_some_models_sees_no_false_gaps(start_daemon: Callable[..., DaemonProcess]) -> None:
    """The Publisher numbers each model's messages apart, so a topic-sharded daemon that
    takes one model of two counts no gap for the messages of the other."""
    address = f"tcp://127.0.0.1:{_free_port()}"
    d = start_daemon('[ingest]\nsocket = "sub"\nconnect = true\nsubscribe = ["alpha"]\n', ingest=address)
    with Publisher(address, socket="pub", connect_timeout=60) as pub:
        for _ in range(20):
            for model in ("alpha", "beta"):
                pub.send(model, np.array([0.9, 0.2]), np.array([1, 0]))
    d.wait_for("xentd_batches_total", 20.0, model="alpha")
    assert d.value("xentd_sequence_gaps_total") == 0
    assert d.value("xentd_batches_total", model="beta") is None


def test_pub_without_a_subscriber_is_an_error(npz: Path) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    out = _xentd("send", str(npz), "--model", "m", "--to", address, "--pub", "--timeout", "0.5", timeout=60)
    assert out.returncode == 2 and f"no daemon subscribed to {address} within 0.5 s" in out.stderr, out.stderr


# --- --wait ---------------------------------------------------------------------------------


def test_send_wait_reports_scored_samples(start_daemon: Callable[..., DaemonProcess], npz: Path) -> None:
    d = start_daemon()
    out = _xentd("send", str(npz), "--model", "w", "--to", d.ingest, "--wait", d.http + "/metrics")
    assert out.returncode == 0, out.stderr
    assert "the daemon accounted for 1 batch(es) sent as model 'w':" in out.stdout
    assert "  1 scored (100 samples)" in out.stdout
    assert "duplicate" not in out.stdout and "rejected" not in out.stdout and "note:" not in out.stdout
    assert d.value("xentd_samples_total", model="w") == 100.0


def test_send_wait_reports_an_empty_batch(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    """A zero-row batch is accepted and not scored; --wait says so instead of waiting for a score."""
    d = start_daemon()
    path = tmp_path / "empty.npz"
    np.savez(path, predictions=np.zeros((0, 4), np.float32), targets=np.zeros(0, np.int64))
    out = _xentd("send", str(path), "--model", "w0", "--to", d.ingest, "--wait", d.http + "/metrics")
    assert out.returncode == 0, out.stderr
    assert "  1 empty (no rows: nothing to score)" in out.stdout, out.stdout
    assert d.value("xentd_empty_batches_total") == 1.0


def test_replay_wait_reports_duplicates_on_a_repeat(start_daemon: Callable[..., DaemonProcess], npz: Path) -> None:
    d = start_daemon()
    args = ("replay", str(npz), "--model", "r", "--to", d.ingest, "--batch-size", "30", "--wait", d.http)
    first = _xentd(*args)
    assert first.returncode == 0, first.stderr
    assert "accounted for 4 batch(es)" in first.stdout and "  4 scored (100 samples)" in first.stdout
    again = _xentd(*args)
    assert again.returncode == 0, again.stderr
    assert "  4 duplicate (already scored: batch ids seen before)" in again.stdout
    assert "scored" not in again.stdout.replace("already scored", "")
    assert d.value("xentd_batches_total", model="r") == 4.0


def test_wait_reports_rejections_with_their_reason(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    d = start_daemon()
    bad = tmp_path / "bad.csv"
    bad.write_text("target,pred\n1,0.9\n0,1.5\n")  # 1.5 is no probability
    out = _xentd("send", str(bad), "--model", "rej", "--to", d.ingest, "--wait", d.http)
    assert out.returncode == 1, out  # delivered, but refused: scripts can tell
    assert "  1 rejected (probability_out_of_range 1; the daemon's log has the details)" in out.stdout
    replayed = _xentd("replay", str(bad), "--model", "rej", "--to", d.ingest, "--batch-size", "1", "--wait", d.http)
    assert replayed.returncode == 1, replayed
    assert "  1 scored (1 samples)" in replayed.stdout
    assert "  1 rejected (probability_out_of_range 1;" in replayed.stdout


def test_wait_notes_other_traffic(start_daemon: Callable[..., DaemonProcess], npz: Path, tmp_path: Path) -> None:
    d = start_daemon()
    stop = threading.Event()

    def other_producer() -> None:  # good and bad batches of another model, as fast as they go
        with Publisher(d.ingest, linger_ms=0, send_timeout_ms=100) as pub:
            while not stop.is_set():
                with contextlib.suppress(zmq.Again):  # queue full: the daemon is busy; try again
                    pub.send("other", np.array([0.5]), np.array([1]))
                    pub.send("other", np.array([1.5]), np.array([1]))

    thread = threading.Thread(target=other_producer)
    thread.start()
    try:
        d.wait_for_at_least("xentd_batches_total", 1.0, model="other")
        out = _xentd("send", str(npz), "--model", "mine", "--to", d.ingest, "--wait", d.http)
        bad = tmp_path / "bad.csv"
        bad.write_text("target,pred_0,pred_1,pred_2,pred_3\n1,0.1,1.5,0.1,0.1\n")
        rejected = _xentd("send", str(bad), "--model", "mine", "--to", d.ingest, "--wait", d.http)
    finally:
        stop.set()
        thread.join(30)
    assert out.returncode == 0, out.stderr
    assert "  1 scored (100 samples)" in out.stdout  # per model: the other model's batches are not ours
    assert "note: the daemon accounted for" in out.stdout and "another producer was sending" in out.stdout
    # The other model's rejections are left out: the report reads this model's own rejection counts.
    assert rejected.returncode == 1, rejected
    assert "  1 rejected (probability_out_of_range 1;" in rejected.stdout and "note:" in rejected.stdout


def test_wait_times_out_when_the_batches_go_elsewhere(
    start_daemon: Callable[..., DaemonProcess], npz: Path, tmp_path: Path
) -> None:
    watched, other = start_daemon(), start_daemon()
    out = _xentd("send", str(npz), "--model", "x", "--to", other.ingest, "--wait", watched.http, "--timeout", "1")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out
    assert "sent 100 samples" in out.stdout
    assert f"{watched.http}/metrics: the daemon accounted for 0 of the 1 batch(es) sent" in out.stderr
    assert "and nothing more for 1 s" in out.stderr


def test_wait_url_must_answer_before_anything_is_sent(start_daemon: Callable[..., DaemonProcess], npz: Path) -> None:
    d = start_daemon()
    out = _xentd("send", str(npz), "--model", "never", "--to", d.ingest, "--wait", f"http://127.0.0.1:{_free_port()}")
    assert out.returncode == 2 and "cannot read http://127.0.0.1:" in out.stderr, out
    assert d.value("xentd_samples_total", model="never") is None
