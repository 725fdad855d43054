"""Label-free statistics of each prediction row: the entropy of the predicted distribution
and the confidence (the largest class probability).

They move when the inputs drift, before any label arrives, so they are what a dashboard
shows for a model whose labels come a day later (docs/metrics.md). Definitions, in nats:

- multiclass: H = -sum_c p_c log p_c (0 log 0 = 0), confidence = max_c p_c. ``probs`` are
  taken as sent; ``logits`` go through the softmax (H = log s - sum_c p_c (z_c - m) with
  m = max z, s = sum_c exp(z_c - m), which never overflows); ``log_probs`` through exp.
- binary: the distribution (p, 1 - p); ``logits`` through the sigmoid, written in |z| so that
  neither tail loses precision.

Computed in float64, one pass over the rows; wide float32 logits rows (FP32, FP16, BF16 on
the wire) use the scoring kernel's float32 exp, within a relative 1e-5, as their loss does.
"""

from __future__ import annotations

import math

import numpy as np

from xentd.jit import cached, fmax, kernel_array
from xentd.kernels import SampleScores, cpu
from xentd.kernels.cpu import BLOCK, LOG2E32, SMALL_C, SMALL_ROWS, _max_span, exp2_neg, exp_nonpos64, log1p64, log64

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


@cached(_CPU_SOURCE, fastmath=True)
def _exp_moments32(row, m):  # type: ignore[no-untyped-def]
    """(sum of e_j, sum of e_j * d_j) with d_j = row[j] - m and e_j = exp(d_j), for a float32
    row: the scoring kernel's float32 exp2 (about 1 ulp), summed in float32 blocks of
    BLOCK values and across blocks in float64, as the scoring kernel sums its rows."""
    others = 0.0
    ties = 0.0
    t = 0.0
    for j0 in range(0, row.shape[0], BLOCK):
        span = row[j0 : j0 + BLOCK]
        bs = np.float32(0.0)
        bties = np.float32(0.0)
        bt = np.float32(0.0)
        for j in range(span.shape[0]):
            d = span[j] - m  # exact near the maximum (Sterbenz)
            e = exp2_neg(d * LOG2E32)
            # Maxima are counted, not added, as in the scoring kernel: the sum of the other
            # terms then keeps its relative accuracy, which a confident row's entropy needs.
            is_max = d == np.float32(0.0)
            bs += np.float32(0.0) if is_max else e
            bties += np.float32(1.0) if is_max else np.float32(0.0)
            bt += e * d
        others += np.float64(bs)
        ties += np.float64(bties)
        t += np.float64(bt)
    return others, ties, t


@cached(_CPU_SOURCE, fastmath=True)
def _small_moments32(pred, r0, rows, cols, m, s, ties, t):  # type: ignore[no-untyped-def]
    """_exp_moments32 for ``rows`` short rows from row r0, transposed so that every loop runs
    across rows (a row of 10 is too short to vectorise), as the scoring kernel's small-C path."""
    c = pred.shape[1]
    for r in range(rows):
        for j in range(c):
            cols[j, r] = pred[r0 + r, j]
    for r in range(rows):
        m[r] = cols[0, r]
        s[r] = 0.0
        ties[r] = 0.0
        t[r] = 0.0
    for j in range(1, c):
        for r in range(rows):
            m[r] = fmax(m[r], cols[j, r])
    for j in range(c):
        for r in range(rows):
            d = cols[j, r] - m[r]
            e = exp2_neg(d * LOG2E32)
            is_max = d == np.float32(0.0)
            s[r] += np.float32(0.0) if is_max else e
            ties[r] += np.float32(1.0) if is_max else np.float32(0.0)
            t[r] += e * d


@cached(_CPU_SOURCE, error_model="numpy")
def _logits32(pred, entropy, confidence):  # type: ignore[no-untyped-def]
    """Float32 logits rows at the scoring kernel's float32 speed (relative 1e-5)."""
    n, c = pred.shape
    if c > SMALL_C:
        for i in range(n):
            row = pred[i]
            m = _max_span(row, 0, c)
            others, ties, t = _exp_moments32(row, m)
            entropy[i], confidence[i] = _finish(others, ties, t)
        return
    cols = np.empty((c, SMALL_ROWS), np.float32)
    m32 = np.empty(SMALL_ROWS, np.float32)
    s32 = np.empty(SMALL_ROWS, np.float32)
    ties32 = np.empty(SMALL_ROWS, np.float32)
    t32 = np.empty(SMALL_ROWS, np.float32)
    for r0 in range(0, n, SMALL_ROWS):
        rows = min(SMALL_ROWS, n - r0)
        _small_moments32(pred, r0, rows, cols, m32, s32, ties32, t32)
        for r in range(rows):
            entropy[r0 + r], confidence[r0 + r] = _finish(np.float64(s32[r]), np.float64(ties32[r]), np.float64(t32[r]))


@cached(_CPU_SOURCE, inline="always", error_model="numpy")
def _finish(others, ties, t):  # type: ignore[no-untyped-def]
    """(H, max p) from sum exp(d) split into the maxima's count and the others' sum, and sum e*d:
    H = log(ties + others) - t / s, with the log as log(ties) + log1p(others / ties)."""
    s = ties + others
    return log64(ties) + log1p64(others / ties) - t / s, 1.0 / s


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


def from_scores(scores: SampleScores, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """(entropy, confidence) per row of scored predictions, from what the scoring kernel
    wrote in the same pass (:class:`xentd.kernels.SampleScores`): its entropy, and its
    confidence, which for binary rows is p, so the label-free one is max(p, 1 - p)."""
    if scores.entropy is None:
        raise ValueError("these scores carry no entropy (only scores built by hand lack it)")
    confidence = np.maximum(scores.confidence, 1.0 - scores.confidence) if binary else scores.confidence
    return scores.entropy, confidence


def row_stats(predictions: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray]:
    """(entropy, confidence) per row of validated predictions ([N] binary or [N, C], float32/64)."""
    n = predictions.shape[0]
    entropy = np.empty(n)
    confidence = np.empty(n)
    if predictions.ndim == 1:
        _binary(predictions, int(kind), entropy, confidence)
    elif kind == LOGITS and predictions.dtype == np.float32:
        _logits32(predictions, entropy, confidence)
    else:
        _multiclass(predictions, int(kind), entropy, confidence)
    return entropy, confidence


def warmup() -> None:
    """Compile every signature the daemon can reach (float32 and float64, [N] and [N, C], wide
    rows; float32 logits take their own kernel, so probabilities are compiled apart)."""
    for dtype in (np.float32, np.float64):
        for shape in ((2,), (2, 3), (2, SMALL_C + 1)):
            for kind in (LOGITS, PROBS):
                row_stats(kernel_array(np.full(shape, 0.5, dtype)), kind)
