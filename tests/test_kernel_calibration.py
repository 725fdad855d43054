"""The per-sample confidence and Brier score the CPU kernels compute for calibration
(docs/metrics.md, "Calibration and normalized entropy"), against a float64 NumPy
oracle written from those definitions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy.special import expit, log_softmax, softmax

from tests import calibration_ref
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_confident_predictions_keep_their_brier_digits(any_backend: CpuBackend, dtype: Any) -> None:
    """p within 1e-9 to 1e-16 of 1 (and of 0), against the exact (40-digit) reference: the
    Brier score is made of 1 - p there, which a rounded p does not keep. Every path sums in
    float64 except float32 class-index rows, whose float32 exp2 is within ~1e-7."""
    logits = np.full((5, 20), -5.0)
    for r, (j, v) in enumerate([(3, 20.0), (11, 30.0), (0, 35.0), (19, 1e4), (6, 25.0)]):
        logits[r, j] = v
    index = np.array([3, 11, 0, 19, 9])  # the last row's target is not its maximum
    near = np.eye(20)[[3, 11, 0, 19, 6]] * (1.0 - 1e-6) + 1e-6 / 20  # near-one-hot soft rows
    kinds = {"logits": logits, "probs": softmax(logits, axis=1), "log_probs": log_softmax(logits, axis=1)}
    for kind, pred in kinds.items():
        for y in (index, np.eye(20)[index], near):
            batch = make_batch(pred.astype(dtype), y, kind)
            scores = any_backend.score(batch, default_params(batch))
            conf, brier = calibration_ref.multiclass(batch.predictions, batch.targets, kind)
            rtol = 2e-6 if dtype == np.float32 and y.ndim == 1 else 1e-12
            np.testing.assert_allclose(scores.confidence, conf, rtol=rtol, atol=0, err_msg=f"{kind} {y.ndim}")
            np.testing.assert_allclose(scores.brier, brier, rtol=rtol, atol=0, err_msg=f"{kind} {y.ndim}")
    binary = {
        "logits": ([30.0, -30.0, 40.0, 25.0, 1e-3, -1e4, 1e4], [1.0, 0.0, 1.0, 0.999999, 0.5, 0.0, 1.0]),
        "probs": ([1.0 - 1e-12, 1e-15, 1.0, 0.0, 0.5, 1.0 - 2.0**-40], [1.0, 0.0, 1.0, 0.0, 0.25, 1.0]),
        "log_probs": ([-1e-14, -40.0, 0.0, -1e-9, -0.5], [1.0, 0.0, 1.0, 1.0, 0.999]),
    }
    for kind, (x, t) in binary.items():
        batch = make_batch(np.array(x, dtype), np.array(t), kind)
        scores = any_backend.score(batch, default_params(batch))
        conf, brier = calibration_ref.binary(batch.predictions, batch.targets, kind)
        np.testing.assert_allclose(scores.confidence, conf, rtol=1e-12, atol=0, err_msg=kind)
        np.testing.assert_allclose(scores.brier, brier, rtol=1e-12, atol=0, err_msg=kind)
