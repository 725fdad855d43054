"""Label-free statistics of each prediction row: the entropy of the predicted distribution
and the confidence (the largest class probability).

They move when the inputs drift, before any label arrives, so they are what a dashboard
shows for a model whose labels come a day later (docs/metrics.md). Definitions, in nats:

- multiclass: H = -sum_c p_c log p_c (0 log 0 = 0), confidence = max_c p_c. ``probs`` are
  taken as sent; ``logits`` go through the softmax (H = log s - sum_c p_c (z_c - m) with
  m = max z, s = sum_c exp(z_c - m), which never overflows); ``log_probs`` through exp.
- binary: the distribution (p, 1 - p); ``logits`` through the sigmoid, written in |z| so that
  neither tail loses precision.

Computed in float64 whatever the wire datatype; one pass over the rows.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from xentd.jit import kernel_array

PROBS, LOGITS, LOG_PROBS = 0, 1, 2  # xentd.validate.InputKind


@njit(cache=True)
def _xlogx(p):  # type: ignore[no-untyped-def]
    return p * math.log(p) if p > 0.0 else 0.0


@njit(cache=True)
def _multiclass(pred, kind, entropy, confidence):  # type: ignore[no-untyped-def]
    n, c = pred.shape
    for i in range(n):
        row = pred[i]
        if kind == LOGITS:
            m = -math.inf
            for j in range(c):
                m = max(m, np.float64(row[j]))
            s = 0.0
            t = 0.0
            for j in range(c):
                d = np.float64(row[j]) - m
                e = math.exp(d)
                s += e
                t += e * d
            entropy[i] = math.log(s) - t / s
            confidence[i] = 1.0 / s
        elif kind == LOG_PROBS:
            h = 0.0
            top = -math.inf
            for j in range(c):
                lp = np.float64(row[j])
                h -= math.exp(lp) * lp if lp > -math.inf else 0.0
                top = max(top, lp)
            entropy[i] = h
            confidence[i] = math.exp(top)
        else:
            h = 0.0
            top = 0.0
            for j in range(c):
                p = np.float64(row[j])
                h -= _xlogx(p)
                top = max(top, p)
            entropy[i] = h
            confidence[i] = top


@njit(cache=True)
def _binary(pred, kind, entropy, confidence):  # type: ignore[no-untyped-def]
    for i in range(pred.shape[0]):
        x = np.float64(pred[i])
        if kind == LOGITS:
            a = abs(x)
            e = math.exp(-a)
            # H(sigmoid(z)) = log1p(e^-|z|) + |z| sigmoid(-|z|); the confidence is sigmoid(|z|).
            entropy[i] = math.log1p(e) + a * e / (1.0 + e)
            confidence[i] = 1.0 / (1.0 + e)
        else:
            if kind == LOG_PROBS:
                p = math.exp(x)
                # log(1 - p) without cancellation near p = 1.
                lq = math.log(-math.expm1(x)) if x > -0.6931471805599453 else math.log1p(-p)
                h = -(p * x if p > 0.0 else 0.0)
                q = -math.expm1(x)  # 1 - p without cancellation near p = 1
                h -= q * lq if q > 0.0 else 0.0
            else:
                p = x
                q = 1.0 - p
                h = -_xlogx(p) - _xlogx(q)
            entropy[i] = h
            confidence[i] = max(p, 1.0 - p)


def row_stats(predictions: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray]:
    """(entropy, confidence) per row of validated predictions ([N] binary or [N, C], float32/64)."""
    n = predictions.shape[0]
    entropy = np.empty(n)
    confidence = np.empty(n)
    if predictions.ndim == 1:
        _binary(predictions, int(kind), entropy, confidence)
    else:
        _multiclass(predictions, int(kind), entropy, confidence)
    return entropy, confidence


def warmup() -> None:
    """Compile every signature the daemon can reach (float32 and float64, [N] and [N, C])."""
    for dtype in (np.float32, np.float64):
        for shape in ((2,), (2, 3)):
            row_stats(kernel_array(np.full(shape, 0.5, dtype)), PROBS)
