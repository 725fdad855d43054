"""Read the ingest socket on a thread of its own, and hand drains to the scoring loop.

pyzmq releases the GIL while it waits and while it copies frames, so a thread
that only receives can overlap the socket's work with the scoring loop's Python.
The hand-off is bounded: at most ``depth`` drains of at most ``drain_max``
messages wait between the two. When the scoring loop falls behind, the queue is
full, the receive thread stops reading, ZeroMQ's own queue fills to its
high-water mark and producers block, exactly as without the thread
(docs/reliability.md, back-pressure). Nothing is dropped: after :meth:`stop`
the thread queues the drain in hand and ends, and :meth:`take` still returns
every queued drain, in arrival order, until :attr:`finished`.

The socket belongs to the thread from :meth:`start` until :attr:`finished`;
ZeroMQ sockets must not be used from two threads at once. An owner stops like this::

    receiver.stop()
    while not receiver.finished:
        handle_many(receiver.take(timeout=0.05))
    # the socket is the owner's again: drain what is left in it, close it
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import zmq

log = logging.getLogger("xentd")

# How often the thread looks at its stop flag while it waits for messages or for room.
WAKE_SECONDS = 0.05


class Receiver:
    """A receive thread with a bounded hand-off of drains (lists of multipart messages)."""

    def __init__(self, socket: zmq.Socket[Any], *, drain_max: int, depth: int = 2) -> None:
        self.socket = socket
        self.drain_max = drain_max
        self._queue: queue.Queue[list[list[Any]]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xentd-receive", daemon=True)
        self.error: Exception | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop reading; the thread ends once the drain in hand is queued (keep calling :meth:`take`)."""
        self._stop.set()

    @property
    def finished(self) -> bool:
        """The thread has ended and every drain it read has been taken."""
        return not self._thread.is_alive() and self._queue.empty()

    def take(self, timeout: float) -> list[list[Any]]:
        """The next drain, in arrival order; [] when none arrives within ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return []

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        wake_ms = int(WAKE_SECONDS * 1000)
        try:
            while not self._stop.is_set():
                if not poller.poll(wake_ms):
                    continue
                drain: list[list[Any]] = []
                for _ in range(self.drain_max):
                    try:
                        drain.append(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
                # Wait for room however long it takes: a drain in hand is never dropped.
                while drain:
                    try:
                        self._queue.put(drain, timeout=WAKE_SECONDS)
                        drain = []
                    except queue.Full:
                        continue
        except Exception as exc:
            # Recorded for the owner (its health check), which decides what to do.
            log.exception("receive thread failed")
            self.error = exc
