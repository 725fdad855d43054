"""The per-sample confidence and Brier score the CPU kernels compute for calibration
(docs/metrics.md, "Calibration and normalized entropy"), against a float64 NumPy
oracle written from those definitions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy.special import expit, softmax

from tests.conftest import default_params, make_batch
from xentd.kernels.cpu import SMALL_C, CpuBackend


def oracle(pred: np.ndarray, targets: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, brier) per sample, in float64, from the definitions.

    1 - p is taken from its own accurate formula (expit(-x), -expm1(x), the other
    classes' sum), not from 1 minus a rounded p: a confident row's score would
    otherwise be the oracle's rounding error."""
    x = pred.astype(np.float64)
    if x.ndim == 1:
        p = {"probs": x, "logits": expit(x), "log_probs": np.exp(x)}[kind]
        q = {"probs": 1.0 - x, "logits": expit(-x), "log_probs": -np.expm1(x)}[kind]
        d = np.where(p < 0.5, p - targets, (1.0 - targets) - q)
        return p, d**2
    p = {"probs": x, "logits": softmax(x, axis=1), "log_probs": np.exp(x)}[kind]
    if targets.ndim == 2:
        return p.max(axis=1), ((p - targets.astype(np.float64)) ** 2).sum(axis=1)
    rows = np.arange(len(targets))
    others = p.copy()
    others[rows, targets] = 0.0
    xt = x[rows, targets]
    q = {"probs": 1.0 - xt, "logits": others.sum(axis=1), "log_probs": -np.expm1(xt)}[kind]
    return p.max(axis=1), (others**2).sum(axis=1) + q**2


def _predictions(rng: np.random.Generator, n: int, c: int, kind: str, dtype: Any) -> np.ndarray:
    z = rng.normal(0.0, 3.0, (n, c) if c else n)
    if c and n > 3:
        z[0, :] = z[0, 0]  # every class tied: the first maximum, p = 1/C
        z[1, 1] = z[1, 0] = z[1].max() + 1.0  # a tie at the top
        z[2, :] = -40.0
        z[2, 0] = 40.0  # a near-certain row: a Brier score near 0 that must keep its digits
    if kind == "logits":
        return z.astype(dtype)
    if not c:
        p = expit(z)
        return (p if kind == "probs" else np.log(p)).astype(dtype)
    p = softmax(z, axis=1)
    return (p if kind == "probs" else np.log(p)).astype(dtype)


# Relative tolerance per sample: float32 predictions are reduced in float32 blocks.
RTOL = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["probs", "logits", "log_probs"])
@pytest.mark.parametrize("classes", [0, 2, 10, SMALL_C + 5, 300])
@pytest.mark.parametrize("soft", [False, True])
def test_confidence_and_brier_match_the_definitions(
    any_backend: CpuBackend, dtype: Any, kind: str, classes: int, soft: bool
) -> None:
    rng = np.random.default_rng(classes * 7 + len(kind) + (3 if soft else 0))
    n = 700
    pred = _predictions(rng, n, classes, kind, dtype)
    if not classes:
        targets: np.ndarray = rng.uniform(0.0, 1.0, n) if soft else rng.integers(0, 2, n).astype(np.float64)
        targets[:3] = [1.0, 0.0, 1.0]
    elif soft:
        targets = softmax(rng.normal(0.0, 2.0, (n, classes)), axis=1)
    else:
        targets = rng.integers(0, classes, n)
        targets[2] = 0
    batch = make_batch(pred, targets, kind)
    scores = any_backend.score(batch, default_params(batch))
    conf, brier = oracle(batch.predictions, targets, kind)
    rtol = RTOL[dtype]
    np.testing.assert_allclose(scores.confidence, conf, rtol=rtol, atol=0)
    # A Brier score is a sum of squares: its absolute error is relative to its terms, so a
    # score near 0 is compared with a floor of the input's own precision squared.
    np.testing.assert_allclose(scores.brier, brier, rtol=rtol, atol=float(np.finfo(dtype).eps) ** 2)
