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

from xentd import scan, wire
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


def _initialize(d: Daemon, sock: socket.socket) -> list[str]:
    """``d.initialize()``, reading the notify socket meanwhile as systemd does: while the
    kernels compile the daemon keeps sending, and a full datagram queue blocks the sender."""
    got: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            got.extend(_read(sock))

    collecting = threading.Thread(target=reader)
    collecting.start()
    try:
        d.initialize(install_signals=False)
    except BaseException:
        d.close()
        raise
    finally:
        done.set()
        collecting.join()
    return got + _read(sock)


def test_notifier_protocol(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_interval == 2.0
    n.extend("compiling", 30.0)
    n.ready("up")
    assert n.watchdog(now=100.0) and not n.watchdog(now=100.5) and n.watchdog(now=101.0)
    n.stopping("bye")
    n.close()
    got = _read(sock)
    assert got[0] == "EXTEND_TIMEOUT_USEC=30000000\nSTATUS=compiling"
    assert got[1].split("\n")[:2] == ["READY=1", "STATUS=up"]
    assert got[2:4] == ["WATCHDOG=1", "WATCHDOG=1"]
    assert got[4] == "STOPPING=1\nSTATUS=bye"


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
    started = _initialize(d, sock)
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
        after_ready = started[next(i for i, m in enumerate(started) if m.startswith("READY=1")) :]
        deadline = time.monotonic() + 10
        while after_ready.count("WATCHDOG=1") < 3:  # the loop pings
            assert time.monotonic() < deadline, after_ready
            after_ready += _read(sock)
            time.sleep(0.05)
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


def test_a_long_compile_keeps_systemd_informed_until_ready(
    notify_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before READY=1 the main thread is in the compiler; a helper sends STATUS, WATCHDOG=1
    and EXTEND_TIMEOUT_USEC meanwhile, so neither WatchdogSec= nor TimeoutStartSec= fires."""
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a tick every 100 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    real_warmup = scan.warmup

    def slow_warmup() -> None:  # a cold cache, made long and certain
        time.sleep(1.0)
        real_warmup()

    monkeypatch.setattr(scan, "warmup", slow_warmup)
    d = Daemon(Config(ingest=IngestConfig(address="tcp://127.0.0.1:*"), metrics=MetricsConfig(port=0)))
    got = _initialize(d, sock)
    d.close()
    ready = next(i for i, m in enumerate(got) if m.startswith("READY=1"))
    starting = got[:ready]
    assert starting.count("WATCHDOG=1") >= 5, got
    extensions = [m for m in starting if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert len(extensions) >= 5 and all("STATUS=starting: compiling kernels" in m for m in extensions), got
    assert not any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in got[ready:])  # the helper stopped
