"""An independent float64 NumPy oracle for calibration, Brier and normalized entropy (issue 14).

Written from the definitions in the issue (and docs/metrics.md), not from xentd's code, so
that the tests compare two implementations. Deliberately naive: every sum is a plain NumPy
sum over the samples of a window, every ratio is taken once at the end.

Per sample (float64):
- binary: confidence p = the positive-class probability (probs as sent, unclipped;
  sigmoid(z) for logits; exp(lp) for log_probs), outcome = the target t, brier = (p - t)^2;
- multiclass: confidence = max_c p_c (probs as sent, softmax of logits, exp of log_probs),
  outcome = 1 when the argmax of the predictions (lowest index on ties) is the true class
  (for soft targets, the argmax of the targets), brier = sum_c (p_c - t_c)^2 with t one-hot
  or the soft row.

The cross-entropy of each sample, which normalized entropy divides, is tests/naive.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from prometheus_client.utils import floatToGoString

from tests import naive

PROBS, LOGITS, LOG_PROBS = naive.PROBS, naive.LOGITS, naive.LOG_PROBS


@dataclass(frozen=True)
class Samples:
    """Per-sample figures of one model's samples, in the order the daemon scored them."""

    confidence: np.ndarray  # [n]
    outcome: np.ndarray  # [n], in [0, 1]
    brier: np.ndarray  # [n]
    loss: np.ndarray  # [n] cross-entropy in nats (tests/naive.py)
    prior: np.ndarray  # [n, slots] target mass of each sample, per class slot (unweighted)
    binary: bool

    def take(self, rows: np.ndarray | slice) -> Samples:
        """The samples at ``rows``, e.g. the last K for a count window."""
        return Samples(
            self.confidence[rows], self.outcome[rows], self.brier[rows], self.loss[rows], self.prior[rows], self.binary
        )

    def __len__(self) -> int:
        return len(self.confidence)


def concat(parts: list[Samples]) -> Samples:
    """Samples of several messages, in the order given."""
    return Samples(
        np.concatenate([p.confidence for p in parts]),
        np.concatenate([p.outcome for p in parts]),
        np.concatenate([p.brier for p in parts]),
        np.concatenate([p.loss for p in parts]),
        np.concatenate([p.prior for p in parts]),
        parts[0].binary,
    )


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) without overflow for either sign."""
    z = np.asarray(z, np.float64)
    e = np.exp(-np.abs(z))
    p: np.ndarray = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return p


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return p


def binary(pred: np.ndarray, targets: np.ndarray, kind: str, *, eps: float) -> Samples:
    """Binary predictions [n] (probs, logits or log_probs) and hard or soft targets [n]."""
    x = np.asarray(pred, np.float64)
    t = np.asarray(targets, np.float64)
    if kind == PROBS:
        p = x.copy()  # unclipped, as sent
    elif kind == LOGITS:
        p = sigmoid(x)
    elif kind == LOG_PROBS:
        p = np.exp(x)
    else:
        raise ValueError(kind)
    loss = naive.binary(x, t, kind, eps=eps).loss
    return Samples(p, t.copy(), (p - t) ** 2, loss, np.stack([1.0 - t, t], axis=1), True)


def class_probabilities(pred: np.ndarray, kind: str) -> np.ndarray:
    """p_c of each row as the definitions use them: as sent, softmax, or exp."""
    x = np.asarray(pred, np.float64)
    if kind == PROBS:
        return x.copy()
    if kind == LOGITS:
        return softmax(x)
    if kind == LOG_PROBS:
        return np.exp(x)
    raise ValueError(kind)


def fold_slots(mass: np.ndarray, class_limit: int) -> np.ndarray:
    """Per-class mass [n, C] into the model's slots: classes >= class_limit share one "other" slot."""
    if mass.shape[1] <= class_limit:
        return mass
    return np.concatenate([mass[:, :class_limit], mass[:, class_limit:].sum(axis=1, keepdims=True)], axis=1)


def multiclass(pred: np.ndarray, targets: np.ndarray, kind: str, *, eps: float, class_limit: int = 100) -> Samples:
    """Multiclass predictions [n, C] and class-index targets [n] or soft targets [n, C]."""
    x = np.asarray(pred, np.float64)
    n, c = x.shape
    p = class_probabilities(x, kind)
    if targets.ndim == 1:
        t = np.zeros((n, c))
        t[np.arange(n), np.asarray(targets, np.int64)] = 1.0
        true_class = np.asarray(targets, np.int64)
    else:
        t = np.asarray(targets, np.float64)
        true_class = t.argmax(axis=1)  # lowest index on ties
    confidence = p.max(axis=1)
    outcome = (x.argmax(axis=1) == true_class).astype(np.float64)  # argmax of z, p and lp agree
    brier = ((p - t) ** 2).sum(axis=1)
    loss = naive.multiclass(x, np.asarray(targets), kind, eps=eps).loss
    return Samples(confidence, outcome, brier, loss, fold_slots(t, class_limit), False)


def bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """min(floor(confidence * B), B - 1), clamped to [0, B - 1]."""
    return np.clip(np.floor(np.asarray(confidence, np.float64) * bins), 0, bins - 1).astype(np.int64)


def bin_labels(bins: int) -> list[str]:
    """Each bin's upper edge as Prometheus writes ``le``: "0.2", ..., "1.0"."""
    return [str(floatToGoString((b + 1) / bins)) for b in range(bins)]  # type: ignore[no-untyped-call]


def near_bin_edge(confidence: np.ndarray, bins: int, margin: float) -> np.ndarray:
    """Rows whose confidence lies within ``margin`` of an inner bin edge, where a float32
    path may legitimately put the sample in the neighbouring bin."""
    scaled = np.asarray(confidence, np.float64) * bins
    return np.abs(scaled - np.round(scaled)) < margin * bins


@dataclass(frozen=True)
class Bins:
    """W_b = sum w, C_b = sum w * confidence, O_b = sum w * outcome, per bin."""

    weight: np.ndarray
    confidence: np.ndarray
    outcome: np.ndarray


def reliability_bins(s: Samples, weights: np.ndarray | None, bins: int) -> Bins:
    w = _weights(s, weights)
    b = bin_index(s.confidence, bins)
    return Bins(
        np.bincount(b, weights=w, minlength=bins),
        np.bincount(b, weights=w * s.confidence, minlength=bins),
        np.bincount(b, weights=w * s.outcome, minlength=bins),
    )


@dataclass(frozen=True)
class Figures:
    """The derived figures of one window. None where the definitions leave a figure out:
    the Murphy terms for multiclass models, NE while the prior's entropy is 0."""

    ece: float
    mce: float
    brier: float
    reliability: float | None
    resolution: float | None
    uncertainty: float | None
    normalized_entropy: float | None
    mean_cross_entropy: float
    prior_entropy: float


def entropy(mass: np.ndarray) -> float:
    """Entropy in nats of the distribution proportional to ``mass`` (0 log 0 = 0)."""
    pi = mass / mass.sum()
    nz = pi[pi > 0]
    return float(-(nz * np.log(nz)).sum())


def figures(s: Samples, weights: np.ndarray | None, bins: int) -> Figures:
    """ECE, MCE, Brier, the Murphy decomposition (binary) and NE over the samples ``s``."""
    w = _weights(s, weights)
    total = float(w.sum())
    if not total > 0:
        raise ValueError("an empty window has no figures")
    rb = reliability_bins(s, w, bins)
    gap = np.abs(rb.outcome - rb.confidence)
    filled = rb.weight > 0
    ece = float(gap.sum() / rb.weight.sum())
    mce = float((gap[filled] / rb.weight[filled]).max())
    brier = float((w * s.brier).sum() / total)
    rel = res = unc = None
    if s.binary:
        obar = float(rb.outcome.sum() / rb.weight.sum())
        wf = rb.weight[filled]
        cf, of = rb.confidence[filled] / wf, rb.outcome[filled] / wf
        rel = float((wf * (cf - of) ** 2).sum() / rb.weight.sum())
        res = float((wf * (of - obar) ** 2).sum() / rb.weight.sum())
        unc = obar * (1.0 - obar)
    mean_ce = float((w * s.loss).sum() / total)
    if s.binary:  # H(pbar), pbar = sum w t / sum w
        h = binary_entropy(float((w * s.outcome).sum() / total))
    else:  # H(pi), pi_c = the window's target mass in slot c over all of it
        h = entropy((w[:, None] * s.prior).sum(axis=0))
    ne = mean_ce / h if h > 0 else None
    return Figures(ece, mce, brier, rel, res, unc, ne, mean_ce, h)


def binary_entropy(pbar: float) -> float:
    """H(p) in nats, for the binary prior (a cross-check of ``entropy`` on two slots)."""
    if pbar in (0.0, 1.0):
        return 0.0
    return -(pbar * math.log(pbar) + (1.0 - pbar) * math.log1p(-pbar))


def _weights(s: Samples, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        return np.ones(len(s))
    w = np.asarray(weights, np.float64)
    if w.shape != (len(s),):
        raise ValueError(f"weights {w.shape} for {len(s)} samples")
    return w
