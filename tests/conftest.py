from __future__ import annotations

import os

# The CUDA kernels run under Numba's CUDA simulator unless a real GPU is asked
# for (XENTD_REAL_GPU=1, tests marked `gpu`). Numba reads this when it is first
# imported, so it is set before anything imports it.
if os.environ.get("XENTD_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import gc
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from xentd import wire
from xentd.kernels import SampleScores, ScoringParams
from xentd.kernels.cpu import CpuBackend
from xentd.validate import Batch, validate

LIMITS = {"max_message_bytes": 1 << 31, "max_header_bytes": 1 << 16}


def make_batch(pred: Any, targets: Any, kind: str = "probs", weights: Any = None, model: str = "m", **kw: Any) -> Batch:
    """A batch through the real codec and validator, as the daemon would see it."""
    frames = wire.encode(model, pred, targets, input=kind, weights=weights, **kw)
    return validate(wire.decode([bytes(f) for f in frames], **LIMITS))


def default_params(batch: Batch, gamma: float = 2.0) -> ScoringParams:
    return ScoringParams(eps=batch.dtype_eps, focal_gamma=gamma, normalization_tolerance=math.sqrt(batch.dtype_eps))


def random_scores(rng: np.random.Generator, n: int, classes: int, *, unnormalized_rows: int = 0) -> SampleScores:
    """Per-sample scores with plausible values, for state and export tests that need no kernel."""
    loss = rng.exponential(2.0, n)
    return SampleScores(
        loss=loss,
        focal=loss * rng.random(n),
        correct=rng.integers(0, 2, n).astype(np.uint8),
        true_class=rng.integers(0, classes, n),
        unnormalized_rows=unnormalized_rows,
        confidence=rng.uniform(0.0, 1.0, n),
        brier=rng.random(n),
    )


@pytest.fixture(autouse=True)
def _collector_unfrozen() -> Iterator[None]:
    """A daemon started in process freezes the heap (xentd.heap); give the next test the
    collector back, so that no test's garbage outlives it unwalked."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def backend() -> CpuBackend:
    b = CpuBackend(parallel_threshold=1 << 15)
    b.warmup()
    return b


@pytest.fixture(params=["serial", "parallel"])
def any_backend(request: pytest.FixtureRequest, backend: CpuBackend) -> CpuBackend:
    """The same backend forced onto each kernel build, so both are tested."""
    return CpuBackend(parallel_threshold=0 if request.param == "parallel" else 1 << 62)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
