"""Per-sample confidence and Brier score, written out from their definitions
(docs/metrics.md, issue 14) and evaluated in 40-digit decimal arithmetic.

Why not float64: on a confident row the Brier score is made of 1 - p with p
close to 1, and float64 evaluation of (p - t)^2 from a rounded p keeps little
of it (p = 1 - 1e-9 leaves ~1e-7 relative). Held to a relative 1e-12, a float64
reference would be testing itself. Inputs are converted exactly (Decimal of a
float is exact), so the only rounding that matters is the final one to float64.

Nothing here imports xentd.
"""

from __future__ import annotations

from decimal import Decimal, localcontext

import numpy as np

PRECISION = 40


def binary(pred: np.ndarray, targets: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, brier) per sample: p the positive-class probability, unclipped
    (probs as sent, sigmoid(x) for logits, exp(x) for log_probs); brier (p - t)^2."""
    conf, brier = [], []
    with localcontext() as ctx:
        ctx.prec = PRECISION
        for x, t in zip(np.asarray(pred, np.float64).tolist(), np.asarray(targets, np.float64).tolist(), strict=True):
            xd = Decimal(x)
            if kind == "probs":
                p = xd
            elif kind == "logits":
                p = 1 / (1 + (-xd).exp())
            else:
                p = xd.exp()
            conf.append(float(p))
            brier.append(float((p - Decimal(t)) ** 2))
    return np.array(conf), np.array(brier)


def multiclass(pred: np.ndarray, targets: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, brier) per row: confidence max_c p_c, brier sum_c (p_c - t_c)^2, with
    p the row as sent (probs), its softmax (logits) or exp (log_probs), and t one-hot
    (class-index targets [N]) or the soft row (targets [N, C])."""
    x = np.asarray(pred, np.float64)
    conf, brier = [], []
    with localcontext() as ctx:
        ctx.prec = PRECISION
        for i in range(x.shape[0]):
            row = [Decimal(v) for v in x[i].tolist()]
            if kind == "probs":
                p = row
            elif kind == "logits":
                m = max(row)
                e = [(v - m).exp() for v in row]
                total = sum(e, Decimal(0))
                p = [v / total for v in e]
            else:
                p = [v.exp() for v in row]
            if targets.ndim == 1:
                t = [Decimal(1 if c == int(targets[i]) else 0) for c in range(len(row))]
            else:
                t = [Decimal(v) for v in np.asarray(targets[i], np.float64).tolist()]
            conf.append(float(max(p)))
            brier.append(float(sum(((pc - tc) ** 2 for pc, tc in zip(p, t, strict=True)), Decimal(0))))
    return np.array(conf), np.array(brier)
