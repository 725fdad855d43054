"""Entropy and confidence of prediction rows against a float64 SciPy oracle."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import entr, expit, log_softmax, softmax

from xentd.jit import kernel_array
from xentd.predstats import LOG_PROBS, LOGITS, PROBS, row_stats


def _oracle(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """H and max p of rows of a distribution (binary: the positive class's probability)."""
    if p.ndim == 1:
        p = np.stack([p, 1.0 - p], axis=1)
    return entr(p).sum(axis=1), p.max(axis=1)


@pytest.mark.parametrize("classes", [7, 100])  # short rows (transposed blocks) and wide ones
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_multiclass_rows_equal_scipy(dtype: type, classes: int) -> None:
    rng = np.random.default_rng(3)
    z = (rng.normal(size=(500, classes)) * rng.uniform(0.1, 30, (500, 1))).astype(dtype)
    z[0] = 0.0  # uniform: H = log C
    z[1, 0] = 1e4  # one-hot in the limit: H = 0
    z64 = z.astype(np.float64)
    probs = softmax(z64, axis=1)
    cases = [
        (z, LOGITS, softmax(z64, axis=1)),
        (lp := log_softmax(z64, axis=1).astype(dtype), LOG_PROBS, np.exp(lp.astype(np.float64))),
        (probs.astype(dtype), PROBS, probs.astype(dtype).astype(np.float64)),
    ]
    for values, kind, p in cases:
        h, conf = row_stats(kernel_array(values), kind)
        want_h, want_conf = _oracle(p.astype(np.float64))
        # Float32 logits take the scoring kernel's float32 exp (docs/metrics.md): relative 1e-5.
        fast = kind == LOGITS and dtype == np.float32
        np.testing.assert_allclose(h, want_h, rtol=1e-5 if fast else 1e-9, atol=1e-7 if fast else 1e-12)
        np.testing.assert_allclose(conf, want_conf, rtol=1e-5 if fast else 1e-12)
    h, _ = row_stats(kernel_array(np.zeros((1, classes), dtype)), LOGITS)
    assert h[0] == pytest.approx(np.log(classes), rel=1e-6 if dtype == np.float32 else 1e-12)


def test_binary_rows_equal_scipy_in_both_tails() -> None:
    z = np.array([-800.0, -40.0, -3.0, -1e-9, 0.0, 2.5, 40.0, 800.0])
    p = expit(z)
    h, conf = row_stats(kernel_array(z), LOGITS)
    want_h, want_conf = _oracle(p)
    # entr(p) + entr(1 - p) loses the small tail in 1 - p; compare with the exact series there.
    exact = np.where(np.abs(z) > 30, np.exp(-np.abs(z)) * (1 + np.abs(z)), want_h)
    np.testing.assert_allclose(h, exact, rtol=1e-9, atol=0)
    np.testing.assert_allclose(conf, want_conf, rtol=1e-15)
    probs = np.array([0.0, 1e-12, 0.3, 0.5, 1.0])
    h, conf = row_stats(kernel_array(probs), PROBS)
    np.testing.assert_allclose(h, _oracle(probs)[0], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(conf, [1.0, 1 - 1e-12, 0.7, 0.5, 1.0])
    lp = np.log(np.array([1e-300, 0.2, 0.5, 0.999999, 1.0]))
    h, conf = row_stats(kernel_array(lp), LOG_PROBS)
    np.testing.assert_allclose(h, _oracle(np.exp(lp))[0], rtol=1e-6, atol=1e-290)


def test_warmup_compiles_every_signature_row_stats_reaches() -> None:
    """Predictions-only messages are scored by row_stats on the hot path: after warm-up, no
    prediction dtype, shape or kind compiles anything more."""
    from xentd import predstats

    predstats.warmup()
    dispatchers = [predstats._binary, predstats._multiclass, predstats._logits32]
    before = [len(d.signatures) for d in dispatchers]
    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        for shape in ((7,), (7, 4), (7, 60)):
            for kind in (PROBS, LOGITS, LOG_PROBS):
                values = rng.uniform(0.01, 0.99, shape)
                values = np.log(values) if kind == LOG_PROBS else values
                row_stats(kernel_array(values.astype(dtype)), kind)
    assert [len(d.signatures) for d in dispatchers] == before
