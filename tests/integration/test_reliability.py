"""Reliability guarantees of docs/reliability.md, each checked against the real daemon process."""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import re
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq

from tests.integration.fuzz_daemon import fuzz_real_daemon
from tests.integration.harness import DaemonProcess
from xentd import wire
from xentd.cli import main
from xentd.client import Publisher


def test_fuzz_sample_through_a_real_socket(tmp_path: Path) -> None:
    """Hostile messages interleaved with valid ones: all counted, valid ones exactly, no crash."""
    problems, summary = fuzz_real_daemon(tmp_path, seed=11, messages=3000)
    assert not problems, summary


# --- restarts --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _batch(rng: np.random.Generator, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    return rng.random((n, 3)).astype(np.float32), rng.integers(0, 3, n)


def test_sigterm_mid_stream_then_restart_loses_nothing(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """A producer streams through a restart. With resend on, every batch is counted exactly once."""
    address = f"tcp://127.0.0.1:{_free_port()}"
    config = f'[state]\ndirectory = "{tmp_path / "state"}"\nsnapshot_interval = "1h"\n'
    first = start_daemon(config, ingest=address)
    sent = 0
    stop = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        nonlocal sent
        rng = np.random.default_rng(0)
        try:
            with Publisher(address, resend=5000, send_hwm=5000, send_timeout_ms=60_000) as pub:
                while not stop.is_set():
                    pub.send("stream", *_batch(rng))
                    sent += 1
                    time.sleep(0.002)
                pub.flush(timeout_ms=5000)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        first.wait_for_at_least("xentd_batches_total", 100, model="stream")
        assert first.stop(signal.SIGTERM) == 0, first.log  # mid-stream
        assert "state snapshot written" in first.log
        second = start_daemon(config, ingest=address)
        second.wait_for_at_least("xentd_batches_total", sent + 100, model="stream")
    finally:
        stop.set()
        producer.join(60)
    assert not errors, errors
    second.wait_for("xentd_batches_total", float(sent), model="stream")
    assert second.value("xentd_samples_total", model="stream") == sent * 20
    assert "restored 1 model(s)" in second.log


def test_kill_9_loses_at_most_one_snapshot_interval(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    """The bound: what a written snapshot holds survives a kill; what was scored after it,
    within the last interval, may or may not, and never in part."""
    interval = 1.0
    config = f'[state]\ndirectory = "{tmp_path / "state"}"\nsnapshot_interval = "{interval}s"\n'
    rng = np.random.default_rng(1)
    d = start_daemon(config)
    with Publisher(d.ingest) as pub:
        pub.send("k", *_batch(rng, 100))
    d.wait_for("xentd_samples_total", 100.0, model="k")
    scored = time.time()
    # The next snapshot, due within one interval, holds the first batch.
    d.wait_for_at_least("xentd_last_snapshot_timestamp_seconds", scored, timeout=30)
    with Publisher(d.ingest) as pub:
        pub.send("k", *_batch(rng, 10))
    d.wait_for("xentd_samples_total", 110.0, model="k")
    d.stop(signal.SIGKILL)  # at most one interval after the second batch
    d = start_daemon(config)
    survived = d.value("xentd_samples_total", model="k")
    assert survived in (100.0, 110.0), survived  # never a partial batch, never less than the first
    d.wait_for_at_least("xentd_snapshots_written_total", 1.0, timeout=30)  # idle for an interval
    d.stop(signal.SIGKILL)
    d = start_daemon(config)
    assert d.value("xentd_samples_total", model="k") == survived  # nothing scored since: nothing lost


def test_a_corrupt_snapshot_does_not_stop_the_daemon(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "xentd-state.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    d = start_daemon(f'[state]\ndirectory = "{state}"\n')
    assert "cannot be used" in d.log and d.get("/healthz")[0] == 200
    assert list(state.glob("xentd-state.npz.corrupt-*"))


def test_a_tampered_snapshot_is_set_aside(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    """A well-formed file whose numbers no run could produce (here a negative sample count)."""
    state = tmp_path / "state"
    config = f'[state]\ndirectory = "{state}"\nsnapshot_interval = "1h"\n'
    d = start_daemon(config)
    with Publisher(d.ingest) as pub:
        pub.send("t", np.full((3, 2), 0.5), [0, 1, 0])
    d.wait_for("xentd_samples_total", 3.0, model="t")
    assert d.stop() == 0
    path = state / "xentd-state.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["m0.lifetime"][0] = -3.0
    np.savez(path, **arrays)
    d = start_daemon(config)
    assert "model 't': lifetime[0] is -3.0; expected values >= 0" in d.log
    assert "ERROR" in next(line for line in d.lines if "cannot be used" in line)
    assert d.value("xentd_samples_total", model="t") is None and d.get("/healthz") == (200, "ok\n")
    assert list(state.glob("xentd-state.npz.corrupt-*"))


def test_healthz_names_failing_snapshots_until_one_succeeds(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """A state directory that goes away (like a full disk) fails every snapshot: the process
    still scores, so /healthz stays 200 but says so; the next good snapshot clears it."""
    state = tmp_path / "state"
    d = start_daemon(f'[state]\ndirectory = "{state}"\nsnapshot_interval = 0.2\n')
    d.wait_for_at_least("xentd_snapshots_written_total", 1.0)
    assert d.get("/healthz") == (200, "ok\n")
    for f in state.iterdir():
        f.unlink()
    state.rmdir()
    deadline = time.monotonic() + 30
    failing = re.compile(r"ok; last (\d+) snapshot\(s\) failed: No such file or directory\n")
    while not ((match := failing.fullmatch((health := d.get("/healthz"))[1])) and int(match.group(1)) >= 3):
        assert health[0] == 200 and time.monotonic() < deadline, health
        time.sleep(0.05)
    assert health[0] == 200
    state.mkdir()
    deadline = time.monotonic() + 30
    while (health := d.get("/healthz")) != (200, "ok\n"):
        assert health[0] == 200 and time.monotonic() < deadline, health
        time.sleep(0.05)
    assert "cannot write state snapshot" in d.log and "again, after" in d.log


# --- back-pressure -----------------------------------------------------------------


def test_a_stalled_daemon_pushes_back_and_loses_nothing(start_daemon: Callable[..., DaemonProcess]) -> None:
    """While xentd reads nothing, queues fill and the producer's send fails with EAGAIN.
    Everything the producer managed to send is scored once xentd resumes."""
    d = start_daemon("[ingest]\nreceive_hwm = 10\n")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 10)
    push.setsockopt(zmq.SNDTIMEO, 200)
    push.connect(d.ingest)
    rng = np.random.default_rng(2)
    frames = wire.encode("bp", *_batch(rng, 2000))  # ~30 KB, so socket buffers fill quickly
    push.send_multipart(frames)
    d.wait_for("xentd_batches_total", 1.0, model="bp")
    os.kill(d.proc.pid, signal.SIGSTOP)
    sent, refused = 1, False
    try:
        for _ in range(20_000):
            try:
                push.send_multipart(frames)
                sent += 1
            except zmq.Again:
                refused = True
                break
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    assert refused, "the producer never felt back-pressure"
    d.wait_for("xentd_batches_total", float(sent), model="bp", timeout=60)
    assert d.value("xentd_rejected_batches_total", reason="internal_error") == 0
    push.close(linger=0)
    ctx.term()


def test_sub_mode_counts_what_pub_sub_dropped(start_daemon: Callable[..., DaemonProcess]) -> None:
    """PUB/SUB drops at the high-water mark by design; sequence numbers make the loss visible:
    every message is either scored or counted as a gap."""
    port = _free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 5)
    pub.bind(f"tcp://127.0.0.1:{port}")
    d = start_daemon('[ingest]\nsocket = "sub"\nconnect = true\nreceive_hwm = 5\n', ingest=f"tcp://127.0.0.1:{port}")
    rng = np.random.default_rng(3)
    p, y = _batch(rng, 2000)

    def send(seq: int | None, model: str = "sub") -> None:
        frames = wire.encode(model, p, y, producer="p" if seq is not None else None, seq=seq)
        pub.send_multipart([model.encode(), *frames])

    deadline = time.monotonic() + 30
    while d.value("xentd_batches_total", model="probe") is None:  # until the subscription is live
        assert time.monotonic() < deadline
        send(None, "probe")
        time.sleep(0.05)
    send(0)
    d.wait_for("xentd_batches_total", 1.0, model="sub")
    total = 2000
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        for seq in range(1, total - 1):
            send(seq)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    # Let the daemon empty its queue, so the last message is not dropped too.
    last, steady = -1.0, 0
    while steady < 5:
        now = d.value("xentd_messages_received_total") or 0.0
        steady = steady + 1 if now == last else 0
        last = now
        time.sleep(0.1)
    send(total - 1)
    deadline = time.monotonic() + 30
    while True:
        scored = d.value("xentd_batches_total", model="sub") or 0.0
        gaps = d.value("xentd_sequence_gaps_total") or 0.0
        if scored + gaps == total or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert scored + gaps == total, (scored, gaps)
    assert gaps > 0 and scored >= 2
    pub.close(linger=0)
    ctx.term()


# --- authentication -----------------------------------------------------------------


def test_curve_admits_authorized_keys_only(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    for name in ("server", "client", "intruder"):
        assert main(["keygen", str(keys), "--name", name]) == 0
    assert oct((keys / "server.key_secret").stat().st_mode & 0o777) == "0o600"
    (authorized / "client.key").write_bytes((keys / "client.key").read_bytes())
    d = start_daemon(
        f'[ingest.curve]\nserver_secret_key = "{keys / "server.key_secret"}"\nauthorized_keys = "{authorized}"\n'
    )
    p, y = _batch(np.random.default_rng(4))
    with Publisher(
        d.ingest, curve_server_key=str(keys / "server.key"), curve_secret_key=str(keys / "client.key_secret")
    ) as pub:
        pub.send("curve", p, y)
    d.wait_for("xentd_batches_total", 1.0, model="curve")
    for secret in ("intruder.key_secret", None):
        kwargs = (
            {}
            if secret is None
            else {"curve_server_key": str(keys / "server.key"), "curve_secret_key": str(keys / secret)}
        )
        with Publisher(d.ingest, linger_ms=500, **kwargs) as pub:  # type: ignore[arg-type]
            pub.send("curve", p, y)
            time.sleep(0.5)
    deadline = time.monotonic() + 10
    while (d.value("xentd_ingest_auth_failures_total") or 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.value("xentd_ingest_auth_failures_total") >= 1  # type: ignore[operator]
    assert d.value("xentd_batches_total", model="curve") == 1.0


def test_metrics_over_tls_with_basic_auth(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "password").write_text("s3cret\n")
    d = start_daemon(
        f'[metrics.tls]\ncert_file = "{tmp_path / "server.pem"}"\nkey_file = "{tmp_path / "server.pem"}"\n'
        f'[metrics.basic_auth]\nusername = "prom"\npassword_file = "{tmp_path / "password"}"\n',
        scheme="https",
    )
    assert d.http.startswith("https://127.0.0.1:")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))

    def get(path: str, auth: str | None) -> int:
        req = urllib.request.Request(d.http + path)
        if auth is not None:
            req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(req, context=client, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert get("/metrics", "prom:s3cret") == 200
    assert get("/metrics", "prom:wrong") == 401
    assert get("/metrics", None) == 401
    assert get("/healthz", None) == 200  # liveness probes need no credentials
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(d.http.replace("https", "http") + "/metrics", timeout=5).read()


def test_metrics_mutual_tls(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    d = start_daemon(
        f'[metrics.tls]\ncert_file = "{tmp_path / "server.pem"}"\nkey_file = "{tmp_path / "server.pem"}"\n'
        f'client_ca_file = "{tmp_path / "ca.pem"}"\n',
        scheme="https",
    )
    anonymous = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        urllib.request.urlopen(d.http + "/metrics", context=anonymous, timeout=5).read()
    ca.issue_cert("prometheus").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    known = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    known.load_cert_chain(str(tmp_path / "client.pem"))
    with urllib.request.urlopen(d.http + "/metrics", context=known, timeout=10) as resp:
        assert resp.status == 200 and b"xentd_build_info" in resp.read()


# --- systemd ----------------------------------------------------------------------------


def test_sd_notify_from_the_real_daemon(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    messages: list[str] = []
    done = threading.Event()

    def read() -> None:  # as systemd does, all along: the daemon talks while it compiles, before READY
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                messages.append(sock.recv(4096).decode())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        d = start_daemon(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        deadline = time.monotonic() + 20
        while not any(m.startswith("READY=1") for m in messages):
            assert time.monotonic() < deadline, messages
            time.sleep(0.05)
        ready = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
        while "WATCHDOG=1" not in messages[ready:]:  # from the scoring loop now
            assert time.monotonic() < deadline, messages
            time.sleep(0.05)
        # While compiling (even from a warm cache): progress, and more time asked for.
        first = messages[0]
        assert first.startswith("EXTEND_TIMEOUT_USEC=") and "STATUS=starting: compiling kernels" in first
        assert messages[ready].startswith("READY=1\nSTATUS=") and f"MAINPID={d.proc.pid}" in messages[ready]
        assert d.stop(signal.SIGTERM) == 0
        time.sleep(0.5)
        assert any(m.startswith("STOPPING=1") for m in messages[ready:])
    finally:
        done.set()
        reader.join()
        sock.close()


def test_soak_sample(tmp_path: Path) -> None:
    """A few seconds of scripts/soak.py: exact counts under steady load with scrapes and snapshots."""
    from tests.integration.soak import run_soak

    result = run_soak(tmp_path, seconds=6.0, rate=300.0, sample_every=1.0)
    assert not result.problems, result.problems
    assert result.messages >= 1000 and len(result.rss) >= 6


def test_a_frame_over_the_size_limit_is_cut_off_by_zeromq(start_daemon: Callable[..., DaemonProcess]) -> None:
    """ZMQ_MAXMSGSIZE drops the connection before xentd allocates the frame; the daemon carries on."""
    d = start_daemon("[ingest]\nmax_message_bytes = 65536\n")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(d.ingest)
    push.send_multipart([b"{}", b"\0" * (1 << 20)])
    deadline = time.monotonic() + 10
    while not d.value("xentd_ingest_disconnects_total") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.value("xentd_ingest_disconnects_total") == 1
    push.close(linger=0)
    with Publisher(d.ingest) as pub:  # a new connection is served as usual
        pub.send("after", *_batch(np.random.default_rng(5)))
    d.wait_for("xentd_batches_total", 1.0, model="after")
    assert d.value("xentd_messages_received_total") == 1  # the oversize frame never reached the decoder
    ctx.term()
