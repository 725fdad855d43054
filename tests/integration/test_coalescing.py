"""A Publisher that coalesces single-sample sends, against the real daemon: every sample scored once, exactly."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from sklearn.metrics import log_loss

from tests.conftest import softmax
from tests.integration.harness import DaemonProcess
from xentd import Publisher


def test_single_sample_sends_coalesced_are_all_scored(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon()
    rng = np.random.default_rng(7)
    p = softmax(rng.normal(0, 2, (1000, 3)))
    y = rng.integers(0, 3, 1000)
    with Publisher(d.ingest, connect_timeout=60, batch_rows=64, linger=30.0) as pub:
        for i in range(1000):
            pub.send("coalesced", p[i : i + 1], y[i : i + 1])
    # 15 messages of 64 rows sent on size, the last 40 rows on close.
    d.wait_for("xentd_samples_total", 1000.0, model="coalesced")
    assert d.value("xentd_batches_total", model="coalesced") == 16
    ref = log_loss(y, p, labels=range(3), normalize=False)
    assert d.value("xentd_cross_entropy_nats_sum", model="coalesced") == pytest.approx(ref, rel=1e-9)
    assert d.value("xentd_sequence_gaps_total") == 0
