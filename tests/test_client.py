"""Publisher misuse fails at once with a clear error, and leaves nothing open behind it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from xentd import wire
from xentd.client import Publisher
from xentd.errors import ConnectError, XentdError


@pytest.mark.parametrize(
    "address, kwargs, error, message",
    [
        ("nonsense", {}, ValueError, "'nonsense' is not a ZeroMQ endpoint: it names no transport; write e.g."),
        ("127.0.0.1:5557", {}, ValueError, "no transport \\(did you mean `tcp://127.0.0.1:5557`\\?\\)"),
        (["tcp://127.0.0.1:1", "[::1]:5557"], {}, ValueError, "did you mean `tcp://\\[::1\\]:5557`"),
        ("tcp://127.0.0.1:1", {"connect_timeout": -1}, ValueError, "connect_timeout"),
        ("bogus://x", {}, zmq.ZMQError, "Protocol not supported"),
        ([], {}, ValueError, "no address"),
        (["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], {"socket": "pub"}, ValueError, "one address"),
        ("tcp://127.0.0.1:1", {"resend": -1}, ValueError, "resend"),
        ("tcp://127.0.0.1:1", {"socket": "dealer"}, ValueError, "'push' or 'pub'"),
        ("tcp://127.0.0.1:1", {"curve_server_key": "x"}, ValueError, "both"),
    ],
)
def test_misuse_is_refused(address: object, kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Publisher(address, **kwargs)  # type: ignore[arg-type]


def test_several_addresses_and_a_clean_close() -> None:
    pub = Publisher(["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], linger_ms=0)
    assert pub.address == "tcp://127.0.0.1:2"
    pub.close()
    pub.close()  # idempotent


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.destroy(linger=0)


def _nothing_listens() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _received_headers(pulls: list[zmq.Socket[bytes]], count: int) -> list[wire.Header]:
    headers: list[wire.Header] = []
    poller = zmq.Poller()
    for p in pulls:
        poller.register(p, zmq.POLLIN)
    while len(headers) < count:
        ready = dict(poller.poll(10_000))
        assert ready, f"only {len(headers)} of {count} messages arrived"
        for p in pulls:
            if p in ready:
                headers.append(wire.read_header(p.recv_multipart()[0], 1 << 16))
    return headers


def test_sequence_numbers_count_per_model(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull = ctx.socket(zmq.PULL)
    address = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    with Publisher(address, producer="p1", connect_timeout=30) as pub:
        for model in ("a", "b", "a", "a", "b"):
            pub.send(model, np.array([0.5]), np.array([1]))
    got = [(h.producer, h.seq) for h in _received_headers([pull], 5)]
    pull.close(linger=0)
    assert got == [("p1:a", 0), ("p1:b", 0), ("p1:a", 1), ("p1:a", 2), ("p1:b", 1)]


def test_round_robin_over_several_daemons_sends_no_sequence_numbers(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    # Each instance would see a share of the stream and count the rest as gaps.
    pulls = [ctx.socket(zmq.PULL) for _ in range(2)]
    addresses = [f"tcp://127.0.0.1:{p.bind_to_random_port('tcp://127.0.0.1')}" for p in pulls]
    with Publisher(addresses, connect_timeout=30) as pub:
        for _ in range(4):
            pub.send("m", np.array([0.5]), np.array([1]))
    got = {(h.producer, h.seq) for h in _received_headers(pulls, 4)}
    for p in pulls:
        p.close(linger=0)
    assert got == {(None, None)}


def test_by_default_nothing_waits_for_a_daemon() -> None:
    # ZeroMQ connects in the background: a producer may start before its daemon.
    with Publisher(_nothing_listens(), linger_ms=0) as pub:
        pub.send("m", np.array([0.5]), np.array([1]))


def test_connect_timeout_names_the_address_nobody_answers(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull = ctx.socket(zmq.PULL)
    live = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    dead = _nothing_listens()
    with pytest.raises(ConnectError) as info:
        Publisher([live, dead], connect_timeout=0.3)
    assert str(info.value) == (
        f"no daemon accepted the connection to {dead} within 0.3 s (is xentd running, and is that its ingest address?)"
    )
    with Publisher(live, connect_timeout=10) as pub:
        pub.send("m", np.array([0.5]), np.array([1]))
    assert pull.poll(10_000) and len(pull.recv_multipart()) == 3
    pull.close(linger=0)


def test_wait_connected_after_construction(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    with Publisher(_nothing_listens(), linger_ms=0) as plain:
        with pytest.raises(XentdError, match="needs a publisher made with connect_timeout"):
            plain.wait_connected(0.1)
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    with Publisher(f"tcp://127.0.0.1:{port}", connect_timeout=10, linger_ms=0) as pub:
        pull.close(linger=0)  # the daemon goes away; the check notices the disconnect
        with pytest.raises(ConnectError, match=f"no daemon accepted the connection to tcp://127.0.0.1:{port}"):
            for _ in range(300):  # the disconnect is reported a moment later
                pub.wait_connected(0.1)
                time.sleep(0.1)


def test_pub_waits_for_a_subscription(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    with pytest.raises(ConnectError, match=r"no daemon subscribed to tcp://127\.0\.0\.1:\d+ within 0.2 s"):
        Publisher("tcp://127.0.0.1:*", socket="pub", connect_timeout=0.2)
    with Publisher("tcp://127.0.0.1:*", socket="pub", linger_ms=0, resend=1) as pub:
        sub = ctx.socket(zmq.SUB)
        sub.connect(pub.address)
        sub.subscribe(b"")
        pub.wait_connected(10)
        pub.send("m", np.array([0.5]), np.array([1]))  # subscribed: not dropped
        assert sub.poll(10_000) and sub.recv_multipart()[0] == b"m"
        sub.close(linger=0)


def test_a_refused_curve_key_is_named(ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path) -> None:
    server_public, server_secret = zmq.auth.create_certificates(str(tmp_path), "server")
    _, client_secret = zmq.auth.create_certificates(str(tmp_path), "client")
    (tmp_path / "authorized").mkdir()  # the client's key is not in it
    auth = ThreadAuthenticator(ctx)
    auth.start()
    try:
        auth.configure_curve(domain="*", location=str(tmp_path / "authorized"))
        pull = ctx.socket(zmq.PULL)
        pull.curve_publickey, pull.curve_secretkey = zmq.auth.load_certificate(server_secret)
        pull.curve_server = True
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        with pytest.raises(
            ConnectError, match=f"127.0.0.1:{port} refused the connection: it did not accept this client's CURVE key"
        ):
            Publisher(
                f"tcp://127.0.0.1:{port}",
                curve_server_key=server_public,
                curve_secret_key=client_secret,
                connect_timeout=10,
            )
        pull.close(linger=0)
    finally:
        auth.stop()
