"""The public surface: what `import xentd` offers, and the daemon's log discipline."""

from __future__ import annotations

import logging

import pytest

import xentd
from xentd.errors import Reason, RejectedBatch, XentdError
from xentd.pipeline import _RejectionLog


def test_all_is_complete_and_importable() -> None:
    public = {n for n in dir(xentd) if not n.startswith("_")} - {
        "client",
        "config",
        "errors",
        "wire",
        "kernels",
        "validate",
        "state",
        "accumulate",
        "exporter",
        "scan",
        "daemon",
        "pipeline",
        "preflight",
        "segments",
        "receiver",
        "cli",
        "jit",
        "persist",
        "notify",
        "ingest",
        "delivery",
        "top",
        "replay",
        "names",
        "joins",
        "predstats",
        "calibration",
        "fold",
        "heap",
        "textformat",
    }
    assert public <= set(xentd.__all__)
    for name in xentd.__all__:
        assert getattr(xentd, name) is not None


def test_every_error_is_a_xentd_error() -> None:
    for name in xentd.__all__:
        obj = getattr(xentd, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, XentdError)
    exc = RejectedBatch(Reason.NON_FINITE, "predictions contains NaN")
    assert str(exc) == "non_finite: predictions contains NaN" and exc.reason is Reason.NON_FINITE


def test_rejection_log_is_rate_limited_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = _RejectionLog(interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="xentd"):
        for _ in range(5):
            log(Reason.NON_FINITE, "nan", "m")
        log(Reason.BAD_HEADER, "junk", None)
        now[0] = 11.0
        log(Reason.NON_FINITE, "nan again", "m")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "rejected batch for model 'm': nan",
        "rejected batch: junk",
        "rejected batch for model 'm': nan again (4 more since last report)",
    ]
