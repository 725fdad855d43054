"""Fixtures that start the real daemon (see harness.py)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.harness import DaemonProcess

__all__ = ["DaemonProcess"]


@pytest.fixture
def start_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(config: str = "", ingest: str | None = "tcp://127.0.0.1:*", **kwargs: Any) -> DaemonProcess:
        d = DaemonProcess(tmp_path_factory.mktemp("xentd"), config, ingest, **kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop(signal.SIGKILL if d.proc.poll() is None else signal.SIGTERM, timeout=10)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One shared daemon for tests that only add to distinct models."""
    d = DaemonProcess(tmp_path_factory.mktemp("xentd-shared"), "[limits]\nmax_models = 50\n")
    yield d
    assert d.stop() == 0, d.log
