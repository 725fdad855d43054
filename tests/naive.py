"""Independent float64 NumPy references. Deliberately naive: clarity over speed.

Nothing here imports xentd's kernels or state; each formula is written out from
docs/metrics.md so that the tests compare two independent implementations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PROBS, LOGITS, LOG_PROBS = "probs", "logits", "log_probs"


@dataclass
class Ref:
    loss: np.ndarray
    focal: np.ndarray
    correct: np.ndarray
    true_class: np.ndarray
    unnormalized: int


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def multiclass(
    pred: np.ndarray, targets: np.ndarray, kind: str, *, eps: float, gamma: float = 2.0, tol: float = 1e-3
) -> Ref:
    """pred [N, C]; targets int [N] or float [N, C]."""
    x = np.asarray(pred, np.float64)
    n, c = x.shape
    if targets.ndim == 1:
        t = np.zeros((n, c))
        t[np.arange(n), targets] = 1.0
        true_class = np.asarray(targets, np.int64)
    else:
        t = np.asarray(targets, np.float64)
        true_class = t.argmax(axis=1)
    if kind == LOGITS:
        lp = log_softmax(x)
        unnorm = 0
    elif kind == PROBS:
        lp = np.log(np.maximum(x, eps))
        unnorm = int((np.abs(x.sum(axis=1) - 1.0) > tol).sum())
    else:
        lp = x
        unnorm = int((np.abs(np.exp(x).sum(axis=1) - 1.0) > tol).sum())
    p = np.exp(lp)
    if kind == PROBS:
        p = np.maximum(x, eps)
    contrib = np.where(t != 0, t * lp, 0.0)
    loss = -contrib.sum(axis=1)
    focal = -np.where(t != 0, t * (1.0 - p) ** gamma * lp, 0.0).sum(axis=1)
    correct = (x.argmax(axis=1) == true_class).astype(np.uint8)
    return Ref(loss, focal, correct, true_class, unnorm)


def binary(pred: np.ndarray, targets: np.ndarray, kind: str, *, eps: float, gamma: float = 2.0) -> Ref:
    x = np.asarray(pred, np.float64)
    t = np.asarray(targets, np.float64)
    if kind == PROBS:
        p = np.clip(x, eps, 1.0 - eps)
        lp, lq = np.log(p), np.log(1.0 - p)
        positive = x > 0.5
    elif kind == LOGITS:
        # log(sigmoid(x)) and log(1 - sigmoid(x)) without overflow.
        lp = -np.logaddexp(0.0, -x)
        lq = -np.logaddexp(0.0, x)
        positive = x > 0
    else:
        lp = x
        lq = np.log(np.maximum(-np.expm1(x), eps))
        positive = x > math.log(0.5)
    p, q = np.exp(lp), np.exp(lq)
    loss = -(t * lp + (1 - t) * lq)
    focal = -(t * q**gamma * lp + (1 - t) * p**gamma * lq)
    truth = t > 0.5
    return Ref(loss, focal, (positive == truth).astype(np.uint8), truth.astype(np.int64), 0)


def _neg_xlogx(p: np.ndarray) -> np.ndarray:
    """-p log p, elementwise, with 0 log 0 = 0."""
    return np.where(p > 0.0, -p * np.log(np.where(p > 0.0, p, 1.0)), 0.0)


def entropy(pred: np.ndarray, kind: str) -> np.ndarray:
    """The label-free entropy H = -sum_c p_c log p_c of each prediction row, in nats; a binary
    row is the distribution (p, 1 - p). ``probs`` as sent (not renormalised).

    Each p and log p is taken from the input, never as the log of a rounded p near 1, so
    that a confident row's tiny H keeps its digits: multiclass logits through log p_c =
    z_c - m - log1p(rest), with rest the sum of exp(z_c - m) over all but the first maximum;
    binary logits through logaddexp; log_probs as sent, with 1 - p = -expm1(x)."""
    x = np.asarray(pred, np.float64)
    if x.ndim == 1:
        if kind == LOGITS:
            lp = -np.logaddexp(0.0, -x)
            lq = -np.logaddexp(0.0, x)
            return -(np.exp(lp) * lp + np.exp(lq) * lq)
        if kind == PROBS:
            return _neg_xlogx(x) + _neg_xlogx(1.0 - x)
        return -np.exp(x) * x + _neg_xlogx(-np.expm1(x))
    if kind == PROBS:
        return _neg_xlogx(x).sum(axis=1)
    if kind == LOG_PROBS:
        return (-np.exp(x) * x).sum(axis=1)
    d = x - x.max(axis=1, keepdims=True)
    e = np.exp(d)
    e_rest = e.copy()
    e_rest[np.arange(len(x)), x.argmax(axis=1)] = 0.0
    rest = e_rest.sum(axis=1, keepdims=True)
    logp = d - np.log1p(rest)
    return -((e / (1.0 + rest)) * logp).sum(axis=1)


def weighted_mean(values: np.ndarray, weights: np.ndarray | None) -> float:
    w = np.ones_like(values) if weights is None else np.asarray(weights, np.float64)
    return float((w * values).sum() / w.sum())


def balanced(loss: np.ndarray, classes: np.ndarray, weights: np.ndarray) -> float:
    """Mean over classes present (positive weight) of each class's weighted mean loss."""
    means = []
    for c in np.unique(classes):
        sel = classes == c
        if weights[sel].sum() > 0:
            means.append((weights[sel] * loss[sel]).sum() / weights[sel].sum())
    return float(np.mean(means)) if means else math.nan
