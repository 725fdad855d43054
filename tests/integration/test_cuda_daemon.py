"""The backend setting on the real daemon: cuda without a GPU fails clearly, auto falls back, cuda runs (simulated)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss

from tests.conftest import softmax
from tests.integration.harness import DaemonProcess
from xentd import __version__
from xentd.client import Publisher

NO_GPU = {"NUMBA_ENABLE_CUDASIM": "0", "CUDA_VISIBLE_DEVICES": ""}


def test_cuda_without_a_gpu_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "x.toml").write_text('[engine]\nbackend = "cuda"\n')
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "xentd",
            "run",
            "--config",
            str(tmp_path / "x.toml"),
            "--metrics",
            "127.0.0.1:0",
            "--ingest",
            "tcp://127.0.0.1:*",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **NO_GPU},
    )
    assert out.returncode == 2, out.stderr
    assert 'engine.backend = "cuda", but the cuda backend needs a CUDA GPU' in out.stderr
    assert "Traceback" not in out.stderr


def test_auto_without_a_gpu_falls_back_and_says_so(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon('[engine]\nbackend = "auto"\n', env=NO_GPU)
    assert "backend auto: no usable CUDA device" in d.log
    assert d.value("xentd_build_info", version=__version__, backend="auto:cpu") == 1.0


def test_cuda_backend_end_to_end_on_the_simulator(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon('[engine]\nbackend = "cuda"\ncuda_threads_per_block = 8\n', env={"NUMBA_ENABLE_CUDASIM": "1"})
    assert "CUDA backend ready on simulator" in d.log
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, (6, 12))
    y = rng.integers(0, 12, 6)
    with Publisher(d.ingest) as pub:
        pub.send("lm", x.astype(np.float32), y, input="logits")
    d.wait_for("xentd_samples_total", 6.0, model="lm", timeout=120)
    s = d.samples()
    m = frozenset({("model", "lm")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = log_loss(y, softmax(x.astype(np.float32).astype(np.float64)), labels=range(12))
    assert s[("xentd_cross_entropy_nats_sum", m)] / s[("xentd_cross_entropy_nats_count", m)] == pytest.approx(
        ref, rel=1e-9
    )
    assert d.value("xentd_build_info", version=__version__, backend="cuda") == 1.0
