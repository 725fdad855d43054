"""Checks that run before the daemon's heavy imports.

Importing the daemon loads NumPy and Numba, a second or more (several on a
loaded machine). An operator who starts xentd on a busy port should hear so
at once, so ``xentd run`` probes its listening ports first. The probe binds
and releases each port the way the daemon will (SO_REUSEADDR, as libzmq and
the metrics server set it); the daemon's own bind stays the authority, and
reports the same error if the port is taken between the two.
"""

from __future__ import annotations

import re
import socket

from xentd.config import Config
from xentd.errors import StartupError

# tcp://HOST:PORT with a fixed port; `*` or `!` (any port) and interface names are not probed.
_TCP_RE = re.compile(r"^tcp://(\[[^\]]+\]|[^:/\[\]]+):(\d+)$")


def check_ports(cfg: Config) -> None:
    """Raise :class:`StartupError` for a listening port that is already taken."""
    ingest = cfg.ingest
    match = _TCP_RE.match(ingest.address)
    if match and not ingest.connect:
        host = match.group(1).strip("[]")
        problem = _bind_problem("" if host == "*" else host, int(match.group(2)))
        if problem:
            raise StartupError(f"cannot bind ingest endpoint {ingest.address}: {problem}")
    metrics = cfg.metrics
    if metrics.port:
        problem = _bind_problem(metrics.host, metrics.port)
        if problem:
            raise StartupError(f"cannot serve metrics on {metrics.host}:{metrics.port}: {problem}")


def _bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now, or None (also when the host does not resolve:
    an interface name, say, which the real bind judges)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return None
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror:
            return None
        except OSError as exc:
            return exc.strerror or str(exc)
    return None
