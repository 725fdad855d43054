"""Publisher misuse fails at once with a clear error, and leaves nothing open behind it."""

from __future__ import annotations

import pytest
import zmq

from xentd.client import Publisher


@pytest.mark.parametrize(
    "address, kwargs, error, message",
    [
        ("nonsense", {}, zmq.ZMQError, "Invalid argument"),
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
