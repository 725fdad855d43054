"""sd_notify over a fake NOTIFY_SOCKET: READY, STATUS, WATCHDOG only while the loop turns, STOPPING."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from xentd import wire
from xentd.config import Config, IngestConfig, MetricsConfig
from xentd.daemon import Daemon
from xentd.notify import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.01)
    yield path, sock
    sock.close()


def _read(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            return out


def test_notifier_protocol(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_interval == 2.0
    n.ready("up")
    assert n.watchdog(now=100.0) and not n.watchdog(now=100.5) and n.watchdog(now=101.0)
    n.stopping("bye")
    n.close()
    got = _read(sock)
    assert got[0].split("\n")[:2] == ["READY=1", "STATUS=up"]
    assert got[1:3] == ["WATCHDOG=1", "WATCHDOG=1"]
    assert got[3] == "STOPPING=1\nSTATUS=bye"


def test_notifier_is_a_no_op_outside_systemd() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    n.ready("x")
    assert not n.watchdog()
    other_pid = Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_interval is None  # the watchdog is meant for another process


def test_watchdog_pings_stop_while_the_loop_is_wedged(
    notify_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ping comes from the scoring loop, so a loop stuck in a 2 s batch sends none."""
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 50 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    d = Daemon(Config(ingest=IngestConfig(address="tcp://127.0.0.1:*"), metrics=MetricsConfig(port=0)))
    d.initialize(install_signals=False)
    assert d.backend is not None
    real_score = d.backend.score
    wedged = threading.Event()

    def stuck(*args: object) -> object:
        wedged.set()
        time.sleep(2.0)
        return real_score(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(d.backend, "score", stuck)
    runner = threading.Thread(target=d.run)
    runner.start()
    try:
        time.sleep(0.4)
        before = _read(sock)
        assert before[0].startswith("READY=1") and before.count("WATCHDOG=1") >= 3
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(d.ingest_endpoint)
        push.send_multipart(wire.encode("m", np.full((1, 2), 0.5), [0]))
        assert wedged.wait(5)
        time.sleep(0.1)
        _read(sock)  # anything sent before the loop entered the batch
        time.sleep(0.7)
        assert "WATCHDOG=1" not in _read(sock)  # wedged: silence, so systemd would restart us
        deadline = time.monotonic() + 10
        while "WATCHDOG=1" not in _read(sock):  # the batch finishes: pings resume
            assert time.monotonic() < deadline
            time.sleep(0.05)
        push.close(linger=0)
    finally:
        d.request_stop("test")
        runner.join(10)
    assert any(m.startswith("STOPPING=1") for m in _read(sock))
