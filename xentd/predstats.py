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

from xentd.jit import cached, kernel_array
from xentd.kernels import cpu
from xentd.kernels.cpu import exp_nonpos64, log64

_CPU_SOURCE = cpu.__file__  # the exp and log these kernels inline live there

PROBS, LOGITS, LOG_PROBS = 0, 1, 2  # xentd.validate.InputKind


# Float64 exp and log written for LLVM to vectorise (fdlibm's algorithms, within 1 ulp, in
# xentd.kernels.cpu): with libm's scalar calls a row of 32,000 logits took ~10 ns a value,
# as long as scoring it. The element-wise pass is compiled exactly (reassociation would break
# exp's rounding step); only the sums over its results may be reassociated, so they vectorise too.
_DBL_MIN = 2.2250738585072014e-308  # log64 wants a normal input; p*log(p) below this is < 1e-305


# Rows are worked on in blocks of about this many values: the scratch stays in L2, and a
# block of many short rows costs two calls, not two per row.
_BLOCK_VALUES = 16_384


@cached(_CPU_SOURCE, error_model="numpy")
def _terms(block, kind, m, a, b):  # type: ignore[no-untyped-def]
    """Per value of rows ``block`` ([r, c]), with m their row maxima: logits a = exp(z - m),
    b = z - m; log_probs a = exp(lp), b = lp; probs a = p, b = log p. One loop per kind, each
    free of branches and indexed by its loop variable, so that it vectorises."""
    r, c = block.shape
    for i in range(r):
        row = block[i]
        ai = a[i * c : i * c + c]
        bi = b[i * c : i * c + c]
        if kind == LOGITS:
            mi = m[i]
            for j in range(c):
                d = np.float64(row[j]) - mi
                ai[j] = exp_nonpos64(d)
                bi[j] = d
        elif kind == LOG_PROBS:
            for j in range(c):
                x = np.float64(row[j])  # finite: validation refused -inf
                ai[j] = exp_nonpos64(x)
                bi[j] = x
        else:
            for j in range(c):
                x = np.float64(row[j])
                ai[j] = x
                bi[j] = log64(max(x, _DBL_MIN))


@cached(fastmath={"reassoc", "nsz"}, error_model="numpy")
def _sums(a, b, r, c, sa, sab):  # type: ignore[no-untyped-def]
    """Per row of the first r rows of a and b ([r * c] each): sum(a) and sum(a * b)."""
    for i in range(r):
        ai = a[i * c : i * c + c]
        bi = b[i * c : i * c + c]
        x = 0.0
        y = 0.0
        for j in range(c):
            x += ai[j]
            y += ai[j] * bi[j]
        sa[i] = x
        sab[i] = y


@cached(_CPU_SOURCE, error_model="numpy")
def _multiclass(pred, kind, entropy, confidence):  # type: ignore[no-untyped-def]
    n, c = pred.shape
    rows = max(1, _BLOCK_VALUES // c)
    a = np.empty(rows * c)
    b = np.empty(rows * c)
    m = np.empty(rows)
    s = np.empty(rows)
    t = np.empty(rows)
    for start in range(0, n, rows):
        r = min(rows, n - start)
        for i in range(r):
            top = -math.inf
            for j in range(c):
                top = max(top, np.float64(pred[start + i, j]))
            m[i] = top
        _terms(pred[start : start + r], kind, m, a, b)
        _sums(a, b, r, c, s, t)
        for i in range(r):
            if kind == LOGITS:
                # H = log s - sum_c p_c (z_c - m), with p_c = exp(z_c - m) / s.
                entropy[start + i] = log64(s[i]) - t[i] / s[i]
                confidence[start + i] = 1.0 / s[i]
            else:
                entropy[start + i] = -t[i]  # -sum p log p (0 log 0 = 0: b is finite)
                confidence[start + i] = exp_nonpos64(m[i]) if kind == LOG_PROBS else m[i]


@cached(_CPU_SOURCE)
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
                h = -(p * math.log(p) if p > 0.0 else 0.0) - (q * math.log(q) if q > 0.0 else 0.0)
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
