"""The metrics HTTP server against slow, many, large and odd clients, over real sockets.

Most tests run a MetricsServer on port 0 in this process, so the deadlines and
limits can be made small; the last ones run the real daemon."""

from __future__ import annotations

import base64
import contextlib
import http.client
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.harness import DaemonProcess
from xentd.config import BasicAuthConfig, HttpLimits, LimitsConfig, TlsConfig, WindowsConfig
from xentd.exporter import Exposition, MetricsServer, make_app
from xentd.kernels import SampleScores
from xentd.state import StateStore

SLOW_CLIENTS = 500


def _store() -> StateStore:
    store = StateStore(WindowsConfig(), LimitsConfig(), lambda: 1_700_000_000.0)
    with store.lock:
        m = store.model("clf", 3)
        loss = np.array([0.5, 1.5])
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
            1_700_000_000.0,
            None,
        )
    return store


@pytest.fixture
def serve() -> Iterator[Callable[..., MetricsServer]]:
    started: list[MetricsServer] = []

    def start(app: Callable[..., Any] | None = None, **kwargs: Any) -> MetricsServer:
        if app is None:
            app = make_app(Exposition(_store().snapshot, version="t", backend="cpu"), lambda: (True, "ok"))
        server = MetricsServer("127.0.0.1", 0, app, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _slow_clients(port: int, n: int) -> list[socket.socket]:
    """n connections that each sent a request line and one header, and no more yet."""
    clients = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: xentd\r\n")
        clients.append(s)
    return clients


def _open(s: socket.socket) -> bool:
    """Whether the server still holds this connection open (it has neither closed nor answered it)."""
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)  # an answer, or b"" for a close
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def _dribble(clients: list[socket.socket]) -> None:
    for s in clients:
        with contextlib.suppress(OSError):
            s.send(b"X-Slow: 1\r\n")


def _scrape(url: str | urllib.request.Request, deadline_s: float = 120.0, **kwargs: Any) -> tuple[int, bytes]:
    """GET, retried until it answers (the tests assert that it answers, not how fast)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30, **kwargs) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _close_all(clients: list[socket.socket]) -> None:
    for s in clients:
        s.close()


def test_slow_clients_hold_no_threads_and_a_scrape_still_answers(serve: Callable[..., MetricsServer]) -> None:
    server = serve(limits=HttpLimits(request_deadline_seconds=600.0))  # they stay for the whole test
    threads = threading.active_count()
    clients = _slow_clients(server.port, SLOW_CLIENTS)
    try:
        _dribble(clients)
        status, body = _scrape(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200 and b'xentd_samples_total{model="clf"} 2' in body
        # Still connected: all but those the connection cap closed to make room (the oldest first).
        still_open = [_open(s) for s in clients]
        assert sum(still_open) >= min(SLOW_CLIENTS, HttpLimits().max_connections) - 2, sum(still_open)
        assert all(still_open[-(HttpLimits().max_connections // 2) :])  # the newest stay
        assert threading.active_count() <= threads
        _dribble(clients)
        status, _ = _scrape(f"http://127.0.0.1:{server.port}/healthz")
        assert status == 200
        assert threading.active_count() <= threads
    finally:
        _close_all(clients)


def test_a_dribbling_client_is_closed_at_its_request_deadline(serve: Callable[..., MetricsServer]) -> None:
    """The deadline covers the whole request, not each read: sending a line every 0.1 s does not extend it."""
    server = serve(limits=HttpLimits(request_deadline_seconds=1.0))
    (client,) = _slow_clients(server.port, 1)
    sent = 0
    answer = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                client.sendall(b"X-Slow: 1\r\n")
                sent += 1
            except OSError:
                break
            client.settimeout(0.1)
            try:
                chunk = client.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
        else:
            raise AssertionError("the server kept a dribbling client past its deadline")
    finally:
        client.close()
    assert sent > 5  # it kept sending after the deadline had begun
    assert answer == b"" or answer.startswith(b"HTTP/1.0 408"), answer


def test_past_the_connection_cap_the_oldest_incomplete_request_is_closed(serve: Callable[..., MetricsServer]) -> None:
    server = serve(limits=HttpLimits(request_deadline_seconds=600.0, max_connections=8))
    clients = _slow_clients(server.port, 20)
    try:
        deadline = time.monotonic() + 60
        while any(_open(s) for s in clients[:12]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [_open(s) for s in clients] == [False] * 12 + [True] * 8
        status, _ = _scrape(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200
    finally:
        _close_all(clients)


def test_when_every_worker_is_busy_and_the_queue_full_a_request_gets_503(serve: Callable[..., MetricsServer]) -> None:
    entered, release = threading.Event(), threading.Event()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        entered.set()
        release.wait(120)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done\n"]

    server = serve(app, limits=HttpLimits(workers=1, max_queued_requests=1))

    def send() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        return s

    def answer(s: socket.socket) -> bytes:
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        s.close()
        return data

    busy = send()
    assert entered.wait(60)  # the only worker is taken
    queued = send()
    deadline = time.monotonic() + 60
    while not server._queue.full() and time.monotonic() < deadline:  # the queue's one place is taken
        time.sleep(0.01)
    refused = answer(send())
    release.set()
    assert refused.startswith(b"HTTP/1.0 503") and refused.endswith(b"xentd: 503 Service Unavailable\n")
    for s in (busy, queued):
        reply = answer(s)
        assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"done\n"), reply


def test_a_request_over_the_size_limit_gets_413(serve: Callable[..., MetricsServer]) -> None:
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.0 413")


def _request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=b"x=1" if method in ("POST", "PUT") else None)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_only_get_and_head_are_answered(serve: Callable[..., MetricsServer]) -> None:
    health = (True, "ok")
    app = make_app(Exposition(_store().snapshot, version="t", backend="cpu"), lambda: health)
    server = serve(app)
    for path in ("/metrics", "/healthz"):
        status, headers, body = _request(server.port, "GET", path)
        assert status == 200 and body and headers["Content-Length"] == str(len(body))
        status, headers, body = _request(server.port, "HEAD", path)
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
        assert headers["Content-Type"].startswith("text/plain")
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"):
            status, headers, body = _request(server.port, method, path)
            assert status == 405, (method, path)
            assert headers["Allow"] == "GET, HEAD"
            assert b"xentd_" not in body
    assert _request(server.port, "HEAD", "/healthz")[1]["Content-Length"] == "3"
    assert _request(server.port, "POST", "/nowhere")[0] == 404


def test_healthz_answers_with_the_daemons_health_text(serve: Callable[..., MetricsServer]) -> None:
    health = [(True, "ok")]
    server = serve(make_app(Exposition(_store().snapshot, version="t", backend="cpu"), lambda: health[0]))
    assert _request(server.port, "GET", "/healthz")[::2] == (200, b"ok\n")
    health[0] = (False, "ok; 3 snapshots failed, the last: [Errno 28] No space left on device")
    status, _, body = _request(server.port, "GET", "/healthz")
    assert status == 503 and body == b"ok; 3 snapshots failed, the last: [Errno 28] No space left on device\n"


def test_tls_and_basic_auth_with_stalled_handshakes(serve: Callable[..., MetricsServer], tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "password").write_text("s3cret\n")
    app = make_app(
        Exposition(_store().snapshot, version="t", backend="cpu"),
        lambda: (True, "ok"),
        BasicAuthConfig("prom", str(tmp_path / "password")),
    )
    threads = threading.active_count()
    server = serve(app, tls=TlsConfig(str(tmp_path / "server.pem"), str(tmp_path / "server.pem")))
    # Connections that never start their handshake, one that starts it and stalls, one that sends plain HTTP.
    stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(50)]
    stalled[0].sendall(b"\x16\x03\x01\x00\xc8\x01")
    stalled[1].sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    url = f"https://127.0.0.1:{server.port}"
    try:
        request = urllib.request.Request(url + "/metrics")
        request.add_header("Authorization", "Basic " + base64.b64encode(b"prom:s3cret").decode())
        status, body = _scrape(request, context=client)
        assert status == 200 and b"xentd_build_info" in body
        assert _scrape(url + "/metrics", context=client)[0] == 401
        assert _scrape(url + "/healthz", context=client) == (200, b"ok\n")
        head = urllib.request.Request(url + "/healthz", method="HEAD")
        assert _scrape(head, context=client) == (200, b"")
        post = urllib.request.Request(url + "/metrics", data=b"x", method="POST")
        assert _scrape(post, context=client)[0] == 405
        assert threading.active_count() <= threads + 1 + HttpLimits().workers
    finally:
        _close_all(stalled)


# --- the real daemon ----------------------------------------------------------------------


def _proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_the_daemon_under_slow_clients(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon()
    pid = d.proc.pid
    assert d.get("/healthz")[0] == 200
    # A little slack for threads the daemon may start on its own; a thread per connection would add hundreds.
    threads = _proc_status(pid, "Threads") + 2
    port = int(d.http.rsplit(":", 1)[1])
    clients = _slow_clients(port, SLOW_CLIENTS)
    try:
        _dribble(clients)
        status, body = _scrape(d.http + "/metrics")
        assert status == 200 and b"xentd_build_info" in body
        assert _proc_status(pid, "Threads") <= threads
        _dribble(clients)
        assert _proc_status(pid, "Threads") <= threads
        # The daemon closes every one of them by its request deadline, although they keep sending.
        deadline = time.monotonic() + 120
        while any(_open(s) for s in clients) and time.monotonic() < deadline:
            _dribble(clients)
            time.sleep(0.5)
        assert not any(_open(s) for s in clients)
    finally:
        _close_all(clients)
    assert d.get("/metrics")[0] == 200
    assert _proc_status(pid, "Threads") <= threads


def test_a_client_that_stops_reading_frees_its_worker_at_the_response_deadline(
    serve: Callable[..., MetricsServer],
) -> None:
    big = b"x" * (64 << 20)  # more than the socket buffers hold

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [big if environ["PATH_INFO"] == "/big" else b"small\n"]

    server = serve(app, limits=HttpLimits(workers=1, response_deadline_seconds=1.0))
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /big HTTP/1.0\r\n\r\n")  # and never read
        # The only worker is stuck sending to it until the deadline; then this is answered.
        assert _scrape(f"http://127.0.0.1:{server.port}/small") == (200, b"small\n")
    finally:
        stalled.close()
