"""xentd: cross-entropy monitoring for models in production.

Producers publish predictions and labels over ZeroMQ (:class:`Publisher`); the
daemon (``xentd run``) scores them with Numba kernels and serves rolling
statistics to Prometheus.
"""

from xentd._version import __version__
from xentd.client import Publisher
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
from xentd.wire import BF16

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
