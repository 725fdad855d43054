"""xentd: cross-entropy monitoring for models in production.

Producers publish predictions and labels over ZeroMQ (:class:`Publisher`); the
daemon (``xentd run``) scores them with Numba kernels and serves rolling
statistics to Prometheus.

:class:`Publisher` and :class:`BF16` are imported on first use (PEP 562), so that
``import xentd.config`` or the CLI's argument parsing loads neither pyzmq nor NumPy.
"""

import typing as _typing

from xentd._version import __version__
from xentd.errors import (
    BackendUnavailable,
    ConfigError,
    ConnectError,
    DecodeError,
    Reason,
    RejectedBatch,
    SnapshotError,
    StartupError,
    ValidationError,
    XentdError,
)

if _typing.TYPE_CHECKING:
    from xentd.client import Publisher
    from xentd.wire import BF16

_LAZY = {"Publisher": "xentd.client", "BF16": "xentd.wire"}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xentd' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "BF16",
    "BackendUnavailable",
    "ConfigError",
    "ConnectError",
    "DecodeError",
    "Publisher",
    "Reason",
    "RejectedBatch",
    "SnapshotError",
    "StartupError",
    "ValidationError",
    "XentdError",
    "__version__",
]
