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


# --- coalescing (batch_rows / linger) ---------------------------------------------------------


def _pull(ctx: zmq.Context[zmq.Socket[bytes]]) -> tuple[zmq.Socket[bytes], str]:
    pull = ctx.socket(zmq.PULL)
    return pull, f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"


def _received(pull: zmq.Socket[bytes], count: int) -> list[wire.Message]:
    """``count`` whole messages, decoded with the daemon's own decoder."""
    got: list[wire.Message] = []
    while len(got) < count:
        assert pull.poll(10_000), f"only {len(got)} of {count} messages arrived"
        got.append(wire.decode(pull.recv_multipart(), max_message_bytes=1 << 24, max_header_bytes=1 << 16))
    return got


def _nothing_more(pull: zmq.Socket[bytes]) -> bool:
    return not pull.poll(200)


def _rows_of(m: wire.Message, name: str) -> list[object]:
    return np.asarray(m.tensors[name].array).tolist()  # type: ignore[no-any-return]


def _probs(i: int) -> np.ndarray:
    return np.array([[i / 100, 1 - i / 100]])


def test_coalescing_is_off_by_default(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull, address = _pull(ctx)
    with Publisher(address, connect_timeout=30) as pub:
        for i in range(3):
            pub.send("m", _probs(i), np.array([i % 2]))
        assert pub.pending_rows == 0
    assert [len(_rows_of(m, "targets")) for m in _received(pull, 3)] == [1, 1, 1]
    pull.close(linger=0)


def test_coalescing_flushes_on_size_in_order_with_one_seq_per_message(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull, address = _pull(ctx)
    with Publisher(address, producer="p", connect_timeout=30, batch_rows=4) as pub:
        for i in range(10):
            pub.send("m", _probs(i), np.array([i % 2]), weights=np.array([float(i)]), ts=1000.0 + i)
        got = _received(pull, 2)  # 8 rows sent on size; 2 still held
        assert pub.pending_rows == 2 and _nothing_more(pull)
    got += _received(pull, 1)  # ...and sent on close
    pull.close(linger=0)
    assert [m.seq for m in got] == [0, 1, 2] and {m.producer for m in got} == {"p:m"}
    assert [_rows_of(m, "targets") for m in got] == [[0, 1, 0, 1], [0, 1, 0, 1], [0, 1]]
    assert sum((_rows_of(m, "predictions") for m in got), []) == [_probs(i).tolist()[0] for i in range(10)]
    assert sum((_rows_of(m, "weights") for m in got), []) == [float(i) for i in range(10)]
    assert [m.ts for m in got] == [1003.0, 1007.0, 1009.0]  # the latest ts of its rows
    assert all(m.batch_id is None for m in got)


def test_coalescing_flushes_on_linger_time(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull, address = _pull(ctx)
    with Publisher(address, connect_timeout=30, batch_rows=1000, linger=0.05) as pub:
        pub.send("m", _probs(1), np.array([1]))
        pub.send("m", _probs(2), np.array([0]))
        time.sleep(0.2)  # past linger: the next send sends the two held rows first
        pub.send("m", _probs(3), np.array([1]))
        (first,) = _received(pull, 1)
        assert _rows_of(first, "targets") == [1, 0]
        assert pub.pending_rows == 1
        pub.flush()  # a producer that goes quiet flushes
        (second,) = _received(pull, 1)
        assert _rows_of(second, "targets") == [1] and pub.pending_rows == 0
    pull.close(linger=0)


def test_without_linger_rows_wait_for_size_or_flush(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull, address = _pull(ctx)
    with Publisher(address, connect_timeout=30, batch_rows=1000) as pub:
        pub.send("m", _probs(1), np.array([1]))
        time.sleep(0.1)
        pub.send("m", _probs(2), np.array([0]))
        assert _nothing_more(pull) and pub.pending_rows == 2
        pub.flush()
        assert [_rows_of(m, "targets") for m in _received(pull, 1)] == [[1, 0]]
    pull.close(linger=0)


def test_a_layout_change_or_a_batch_id_sends_the_held_rows_first(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull, address = _pull(ctx)
    with Publisher(address, connect_timeout=30, batch_rows=1000) as pub:
        pub.send("m", _probs(1), np.array([1]))
        pub.send("m", _probs(2), np.array([0]))
        pub.send("other", _probs(3), np.array([1]))  # another model: its own buffer
        pub.send("m", np.log(_probs(4)), np.array([1]), input="log_probs")  # another input kind
        pub.send("m", _probs(5).astype(np.float32), np.array([0]))  # another dtype
        pub.send("m", _probs(6).astype(np.float32), np.array([1]), weights=np.array([2.0]))  # weights now
        pub.send("m", _probs(7).astype(np.float32), np.array([0]), weights=np.array([3.0]))
        pub.send("m", _probs(8), np.array([1]), batch_id="b-8")  # cannot be merged: alone
        pub.send("m", np.array([[0.1, 0.2, 0.7]]), np.array([2]))  # another row shape
    got = _received(pull, 7)
    pull.close(linger=0)
    by_model = [(m.model, m.input, m.tensors["predictions"].datatype, _rows_of(m, "targets"), m.batch_id) for m in got]
    assert by_model == [
        ("m", "probs", "FP64", [1, 0], None),
        ("m", "log_probs", "FP64", [1], None),
        ("m", "probs", "FP32", [0], None),
        ("m", "probs", "FP32", [1, 0], None),
        ("m", "probs", "FP64", [1], "b-8"),
        ("other", "probs", "FP64", [1], None),  # on close, buffers go in the order they were started
        ("m", "probs", "FP64", [2], None),
    ]
    m_only = [(m.seq, _rows_of(m, "targets")) for m in got if m.model == "m"]
    assert m_only == [(0, [1, 0]), (1, [1]), (2, [0]), (3, [1, 0]), (4, [1]), (5, [2])]


def test_coalesced_rows_are_copied_at_send(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull, address = _pull(ctx)
    buf_p, buf_y = np.zeros((1, 2)), np.zeros(1, dtype=np.int64)
    with Publisher(address, connect_timeout=30, batch_rows=3) as pub:
        for i in range(3):
            buf_p[0] = _probs(i)[0]
            buf_y[0] = i % 2
            pub.send("m", buf_p, buf_y)  # the caller reuses its buffers
    (m,) = _received(pull, 1)
    pull.close(linger=0)
    assert _rows_of(m, "predictions") == [_probs(i).tolist()[0] for i in range(3)]
    assert _rows_of(m, "targets") == [0, 1, 0]


def test_coalescing_bf16_and_bool_rows(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull, address = _pull(ctx)
    with Publisher(address, connect_timeout=30, batch_rows=2) as pub:
        for v, y in ((0.25, True), (0.75, False)):
            pub.send("m", wire.BF16.from_float32(np.array([v], dtype=np.float32)), np.array([y]))
    (m,) = _received(pull, 1)
    pull.close(linger=0)
    assert m.tensors["predictions"].datatype == "BF16"
    assert wire.bf16_to_float32(np.asarray(m.tensors["predictions"].array)).tolist() == [0.25, 0.75]
    assert _rows_of(m, "targets") == [1, 0]


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((np.array([[0.5, 0.5]], dtype=np.complex64), np.array([1])), {}, TypeError, "predictions: dtype complex64"),
        ((np.zeros((1, 2, 2, 2)), np.array([1])), {}, ValueError, "predictions: rank 4"),
        ((np.array([[0.5, 0.5]]), np.array([1, 0])), {}, ValueError, "targets: 2 rows for 1 predictions"),
        ((np.array([[0.5, 0.5]]), np.array([1])), {"weights": np.ones(3)}, ValueError, "weights: 3 rows"),
        ((np.array([[0.5, 0.5]]), np.array([1])), {"input": "odds"}, ValueError, "input must be one of"),
        ((np.array([[0.5, 0.5]]), np.array([1])), {"ts": -1.0}, ValueError, "ts must be Unix seconds"),
    ],
)
def test_coalescing_refuses_a_bad_row_at_send(
    args: tuple[object, ...], kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with Publisher(_nothing_listens(), linger_ms=0, batch_rows=10) as pub:
        pub.send("m", np.array([[0.5, 0.5]]), np.array([1]))
        with pytest.raises(error, match=message):
            pub.send("m", *args, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="model name"):
            pub.send("bad name", np.array([[0.5, 0.5]]), np.array([1]))
        assert pub.pending_rows == 1  # the good row is still held


@pytest.mark.parametrize(
    "kwargs, message",
    [({"batch_rows": 0}, "batch_rows"), ({"batch_rows": 2.5}, "batch_rows"), ({"linger": -1}, "linger")],
)
def test_coalescing_options_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Publisher("tcp://127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


def test_coalescing_joins_big_endian_and_strided_rows_as_their_values(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull, address = _pull(ctx)
    wide = np.arange(12.0).reshape(2, 6) / 100
    with Publisher(address, connect_timeout=30, batch_rows=4) as pub:
        pub.send("m", np.array([[0.25, 0.75]], dtype=">f8"), np.array([1], dtype=">i8"))
        pub.send("m", wide[:, ::3], np.array([0, 1]))  # a strided view
        pub.send("m", np.array([[0.5, 0.5]]), np.array([0]))
    (m,) = _received(pull, 1)
    pull.close(linger=0)
    assert m.tensors["predictions"].datatype == "FP64" and m.tensors["targets"].datatype == "INT64"
    assert _rows_of(m, "predictions") == [[0.25, 0.75], [0.0, 0.03], [0.06, 0.09], [0.5, 0.5]]
    assert _rows_of(m, "targets") == [1, 0, 1, 0]


def test_linger_zero_sends_each_send_at_once(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull, address = _pull(ctx)
    with Publisher(address, connect_timeout=30, batch_rows=100, linger=0) as pub:
        pub.send("m", _probs(1), np.array([1]))
        assert pub.pending_rows == 0
        assert [_rows_of(m, "targets") for m in _received(pull, 1)] == [[1]]
    pull.close(linger=0)


# --- delayed labels: send_predictions / send_labels ------------------------------------------


def test_predictions_and_labels_decode_as_sent_in_the_model_seq_stream(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull, address = _pull(ctx)
    p = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]], dtype=np.float32)
    big = np.array([2**64 - 1, 2**63, 7], dtype=np.uint64)  # above 2^63: only UINT64 holds them
    with Publisher(address, producer="p", connect_timeout=30) as pub:
        pub.send("m", p, np.array([1, 0, 1]))
        pub.send_predictions("m", p, big, input="probs", weights=np.array([1.0, 2.0, 0.5]), batch_id="b1", ts=5.0)
        pub.send_labels("m", np.array([1, 0]), np.array([-1, 7], dtype=">i8"))  # big-endian ids: their values
        pub.send_predictions("other", np.array([0.25]), [3])  # a list of ints: int64
    got = _received(pull, 4)
    pull.close(linger=0)
    assert [(m.model, m.producer, m.seq) for m in got] == [
        ("m", "p:m", 0),
        ("m", "p:m", 1),
        ("m", "p:m", 2),
        ("other", "p:other", 0),
    ]
    full, preds, labels, other = got
    assert set(full.tensors) == {"predictions", "targets"}  # send() carries no ids
    assert set(preds.tensors) == {"predictions", "weights", "ids"}
    assert preds.tensors["ids"].datatype == "UINT64" and _rows_of(preds, "ids") == [2**64 - 1, 2**63, 7]
    assert np.array_equal(preds.tensors["predictions"].array, p) and preds.tensors["predictions"].datatype == "FP32"
    assert _rows_of(preds, "weights") == [1.0, 2.0, 0.5]
    assert (preds.batch_id, preds.ts, preds.input) == ("b1", 5.0, "probs")
    assert set(labels.tensors) == {"targets", "ids"}
    assert labels.tensors["ids"].datatype == "INT64" and _rows_of(labels, "ids") == [-1, 7]
    assert _rows_of(labels, "targets") == [1, 0] and labels.batch_id is None
    assert other.tensors["ids"].datatype == "INT64" and _rows_of(other, "ids") == [3]


@pytest.mark.parametrize(
    "method, args, kwargs, error, message",
    [
        ("send_predictions", ([[0.5, 0.5]], np.array([1.0])), {}, TypeError, "ids: dtype float64 is not an id type"),
        (
            "send_predictions",
            ([[0.5, 0.5]], np.array([1], np.int32)),
            {},
            TypeError,
            "ids: dtype int32 .*int64 or uint64",
        ),
        ("send_predictions", ([[0.5, 0.5]], np.array([True])), {}, TypeError, "ids: dtype bool"),
        ("send_predictions", ([[0.5, 0.5]], [2**65]), {}, TypeError, "ids: dtype object"),
        ("send_predictions", ([[0.5, 0.5]], np.array([[1]])), {}, ValueError, r"ids: shape \[1, 1\]; .*\[N\]"),
        ("send_predictions", ([[0.5, 0.5]], np.array(1)), {}, ValueError, r"ids: shape \[\]"),
        ("send_predictions", ([[0.5, 0.5]], np.array([1, 2])), {}, ValueError, "ids: 2 rows for 1 predictions"),
        ("send_predictions", ([0.5, 0.5], np.array([1, 2])), {"weights": [1.0]}, ValueError, "weights: 1 rows for 2"),
        ("send_predictions", (np.array(0.5), np.array([1])), {}, ValueError, "predictions: a scalar has no rows"),
        ("send_predictions", ([[0.5, 0.5]], np.array([1])), {"input": "odds"}, ValueError, "input must be one of"),
        ("send_predictions", ([[0.5, 0.5]], np.array([1])), {"ts": 1.7e12}, ValueError, "ts must be Unix seconds"),
        ("send_labels", (np.array([1, 0]), np.array([1])), {}, ValueError, "ids: 1 rows for 2 targets"),
        ("send_labels", (np.array([1]), np.array([1], np.uint32)), {}, TypeError, "ids: dtype uint32"),
        ("send_labels", (np.array([1], np.uint64), np.array([1])), {}, TypeError, "targets: uint64 is for ids only"),
        ("send_labels", (np.array(1), np.array([1])), {}, ValueError, "targets: a scalar has no rows"),
    ],
)
def test_join_sends_are_checked_before_sending(
    method: str, args: tuple[object, ...], kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with Publisher(_nothing_listens(), linger_ms=0) as pub:
        with pytest.raises(error, match=message):
            getattr(pub, method)("m", *args, **kwargs)
        with pytest.raises(ValueError, match="model name"):
            getattr(pub, method)("bad name", *args[:1], np.array([1] * len(np.atleast_1d(args[0]))), **kwargs)
        assert pub._streams == {}  # nothing was sent: no seq was taken


def test_join_sends_are_refused_by_a_round_robin_publisher() -> None:
    # A label sent to another instance than its prediction could never join it.
    with Publisher(["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], linger_ms=0) as pub:
        with pytest.raises(ValueError, match="round-robining over several PUSH addresses"):
            pub.send_predictions("m", np.array([0.5]), np.array([1]))
        with pytest.raises(ValueError, match="docs/scaling.md"):
            pub.send_labels("m", np.array([1]), np.array([1]))


def test_join_sends_are_never_coalesced_and_keep_the_model_order(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pull, address = _pull(ctx)
    with Publisher(address, producer="p", connect_timeout=30, batch_rows=100) as pub:
        pub.send("m", _probs(1), np.array([1]))
        pub.send("other", _probs(2), np.array([0]))
        pub.send_predictions("m", _probs(3), np.array([30]))  # m's held row goes first, then this at once
        assert pub.pending_rows == 1  # other's row is still held
        pub.send_labels("m", np.array([1]), np.array([30]))
        assert pub.pending_rows == 1
    got = _received(pull, 4)
    pull.close(linger=0)
    m = [(msg.seq, sorted(msg.tensors)) for msg in got if msg.model == "m"]
    assert m == [(0, ["predictions", "targets"]), (1, ["ids", "predictions"]), (2, ["ids", "targets"])]
    assert [msg.model for msg in got] == ["m", "m", "m", "other"]


def test_coalescing_refuses_uint64_targets_at_send() -> None:
    with Publisher(_nothing_listens(), linger_ms=0, batch_rows=10) as pub:
        with pytest.raises(TypeError, match="targets: uint64 is for ids only"):
            pub.send("m", np.array([0.5]), np.array([1], np.uint64))
        assert pub.pending_rows == 0
