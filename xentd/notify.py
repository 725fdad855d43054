"""systemd's notify protocol (sd_notify), without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

The daemon sends ``READY=1`` once it scores, ``STATUS=...`` lines for
``systemctl status``, ``WATCHDOG=1`` from the scoring loop itself, and
``STOPPING=1`` when it starts to shut down. Because the watchdog ping comes
from the loop, a wedged loop stops pinging and systemd restarts the service
(``WatchdogSec=`` in the unit). While the kernels compile, before ``READY=1``,
a helper thread sends ``STATUS``, ``WATCHDOG=1`` and ``EXTEND_TIMEOUT_USEC``
(see :meth:`Notifier.extend`). Outside systemd every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("xentd.notify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket; its name starts with a NUL byte
            address = "\0" + address[1:]
        self._address = address if address.startswith(("/", "\0")) else ""
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval = _watchdog_interval(env)
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *fields: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode("utf-8"), self._address)
        except OSError as exc:  # systemd gone or the socket full: never fatal
            log.debug("sd_notify %s failed: %s", fields, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def extend(self, status: str, seconds: float) -> None:
        """Ask for ``seconds`` more before systemd's start (or stop) timeout may fire.

        systemd only counts this once the state has outlasted ``TimeoutStartSec=``,
        and expects the next message within ``seconds``: a sender that goes quiet
        still times out."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self, now: float | None = None) -> bool:
        """Ping if half the watchdog interval has passed since the last ping. Returns whether it pinged."""
        if self.watchdog_interval is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_ping < self.watchdog_interval / 2:
            return False
        self._last_ping = now
        self.send("WATCHDOG=1")
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(env: os._Environ[str] | dict[str, str]) -> float | None:
    """``WATCHDOG_USEC`` in seconds, if the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6
