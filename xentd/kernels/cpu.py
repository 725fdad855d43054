"""CPU backend: Numba kernels that score every sample in one pass over its row.

Each kernel family exists twice, compiled from the same Python source: a serial
build for small batches and a ``parallel=True`` build (see :mod:`xentd.jit`).

Shapes and dtypes are :mod:`xentd.validate`'s to guarantee; values are the
kernels' to check. Each kernel flags the rows that break a value rule
(``SampleScores.invalid``) in a pass it makes anyway, with bit tests that
fast-math cannot drop, and clamps a class index into range, so that no input
makes it read out of bounds (an invalid row's scores are garbage, not an error).

FP16 and BF16 predictions arrive as their wire bits (uint16, int16) and are
widened to float32 as they are loaded (:func:`xentd.jit.load`): each kernel is
compiled for those dtypes too and computes exactly what it computes for the
widened float32 values.

Precision: FP64 predictions are scored in float64 throughout and match
float64 references to the last digits. FP32 (and FP16/BF16, widened to
float32) predictions with class-index targets take
``_multiclass_index_f32``, whose log-sum-exp uses a float32 exp2 that is
within ~1e-7 relative, below the input's own precision, while every sum is
carried in float64 (tested bound: 2e-6 nats). Rows of at most SMALL_C
classes are summed in float32 within the row, as one block of the wide path
is. Loads widen with ``np.float64(x)``: in Numba, ``float(x)`` of a float32
stays float32.

Speed: binary predictions and small-C rows are bound by per-sample work, so
those paths avoid libm (one call per value): binary logits and probabilities
(any dtype) and FP32 small-C rows use float64 exp/log/log1p written as plain
arithmetic (fdlibm's algorithms, within 1 ulp), which the loop vectoriser
turns into AVX code, and small-C rows are transposed into blocks so that every
loop runs across rows (FP64 probs rows of at most SMALL_C classes for their
entropy and value checks only: _plogp_rows). The float64 multiclass,
soft-target and binary log_probs paths keep libm's functions.

Calibration: every kernel also writes each sample's confidence and Brier score
(docs/metrics.md, "Calibration and normalized entropy") from the sums it
already makes: the largest probability is 1 / sum exp(x - max) for logits, and
the Brier score's squares are summed in the same loops as the exponentials. The
classes other than the target are summed apart, never as a total minus the
target's term, so that a confident row's score keeps its relative accuracy.

Entropy: every kernel also writes each row's label-free entropy H = -sum_c p_c
log p_c, as :func:`xentd.predstats.row_stats` defines it, so that a full message
needs no second pass over its rows. For logits it is one more sum in the loops
that sum the exponentials, of e_c (x_c - m) (H = log s - that sum / s); for
probs one log per value, for log_probs the exp those loops already take. Binary
probabilities share the loss's two logs in the vectorised loop (gamma 2; the libm
loop takes two more). Float64 everywhere except the float32
class-index path (FP32, FP16 and BF16 rows), which takes each term in float32
with the rest of its row: for logits and log_probs the float32 exponentials'
moments, for probs a float32 log (log32) per value, mapped into a block and
summed in float64 (within a relative 1e-5, as predstats' own float32 path for
logits; the probabilities' per-row log would otherwise cost more than the loss).

docs/metrics.md gives every formula computed here.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange
from numba import types as nbtypes
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload

from xentd.jit import (
    bits_to_float32,
    cached,
    exceeds,
    fmax,
    key_bounds,
    key_offset,
    load,
    outside,
    serial_and_parallel,
)
from xentd.kernels.base import WARMUP_PARAMS, OutputBuffers, SampleScores, ScoringParams, warmup_batches
from xentd.scan import warmup as scan_warmup
from xentd.scan import widen_bits
from xentd.validate import Batch, InputKind, Scratch, TargetKind

# --- vectorisable building blocks ----------------------------------------------
#
# math.exp lowers to a libm call, one element at a time. exp2_neg is a float32
# exp2 from a range reduction, a polynomial and an exponent built with an
# integer bitcast: plain arithmetic, which the loop vectoriser turns into 8-wide
# AVX code. Max loops use xentd.jit.fmax, which the vectoriser recognises as a
# reduction. Both assume finite inputs (validated upstream): under fast-math an
# infinite operand is poison in LLVM, so reductions start from LOWEST32, never -inf.

F32 = np.float32
LOWEST32 = F32(np.finfo(np.float32).min)
LOG2E32 = F32(1.4426950408889634)

# 2^f on [-0.5, 0.5], degree 6, fitted for relative error: 2.6e-9 in exact
# arithmetic, 1.0e-7 (about 1 ulp) when evaluated in float32.
_P0 = F32(1.0)
_P1 = F32(0.693147205737616)
_P2 = F32(0.24022646889961993)
_P3 = F32(0.055503287760515795)
_P4 = F32(0.009618489025060425)
_P5 = F32(0.0013399931626512306)
_P6 = F32(0.00015345794996712958)


@cached(inline="always", fastmath=True)
def exp2_neg(t):  # type: ignore[no-untyped-def]
    """2**t for float32 t <= 0, and exactly 0 below 2**-126 (float32's smallest normal)."""
    underflow = t < F32(-126.0)
    t = max(t, F32(-126.0))
    n = np.rint(t)
    f = t - n
    p = _P6 * f + _P5
    p = p * f + _P4
    p = p * f + _P3
    p = p * f + _P2
    p = p * f + _P1
    p = p * f + _P0
    scaled = p * bits_to_float32((np.int32(n) + np.int32(127)) << np.int32(23))
    return F32(0.0) if underflow else scaled


# Float64 exp and log that vectorise, for the per-sample work of binary and
# small-C rows (libm's exp/log1p are one call per value). They are fdlibm's
# algorithms (the same reductions and coefficients as glibc's and musl's
# scalar code), with the exponent handled by integer bit operations instead of
# frexp/ldexp and every branch a select: within 1 ulp of the correctly rounded
# result, tested against NumPy. They are compiled strictly (no fast-math), and
# vectorise because the kernels use error_model="numpy" (see xentd.jit).

F64 = np.float64
I64 = np.int64
_SHIFT = 6755399441055744.0  # 1.5 * 2**52: x + _SHIFT - _SHIFT rounds x to an integer
_TWO52 = 4503599627370496.0
_INV_LN2 = 1.44269504088896338700e00
_LN2_HI = 6.93147180369123816490e-01  # trailing zeros: k * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_E1 = 1.66666666666666019037e-01
_E2 = -2.77777777770155933842e-03
_E3 = 6.61375632143793436117e-05
_E4 = -1.65339022054652515390e-06
_E5 = 4.13813679705723846039e-08
_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_SQRT_HALF_HI = 0x3FE6A09E  # high word of sqrt(1/2): log64 reduces to [sqrt(1/2), sqrt(2))


@cached(inline="always", error_model="numpy")
def exp_nonpos64(x):  # type: ignore[no-untyped-def]
    """exp(x) for float64 x <= 0 (fdlibm's reduction and rational approximation)."""
    x = max(x, -746.0)  # exp(-746) rounds to 0; keeps k in range
    kfs = x * _INV_LN2 + _SHIFT
    k = kfs - _SHIFT
    ki = F64(kfs).view(I64) - F64(_SHIFT).view(I64)
    hi = x - k * _LN2_HI
    lo = k * _LN2_LO
    r = hi - lo
    t = r * r
    c = r - t * (_E1 + t * (_E2 + t * (_E3 + t * (_E4 + t * _E5))))
    y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
    # 2**k for k < -1022 is subnormal: scale in two normal steps there.
    tiny = ki < -1000
    ki = ki + 600 if tiny else ki
    return y * I64((ki + 1023) << 52).view(F64) * (2.0**-600 if tiny else 1.0)


@cached(inline="always", error_model="numpy")
def log64(x):  # type: ignore[no-untyped-def]
    """log(x) for finite, normal float64 x > 0 (fdlibm's reduction and polynomial)."""
    u = F64(x).view(I64) + I64((0x3FF00000 - _SQRT_HALF_HI) << 32)
    # (u >> 52) & 0x7FF is a logical shift: AVX2 has no 64-bit arithmetic one.
    k = I64(((u >> 52) & 0x7FF) | I64(0x4330000000000000)).view(F64) - (_TWO52 + 1023.0)
    f = I64((u & I64(0x000FFFFFFFFFFFFF)) + I64(_SQRT_HALF_HI << 32)).view(F64) - 1.0
    hfsq = 0.5 * f * f
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
    return s * (hfsq + r) + k * _LN2_LO - hfsq + f + k * _LN2_HI


@cached(inline="always", error_model="numpy")
def log1p64(x):  # type: ignore[no-untyped-def]
    """log(1 + x) for float64 x > -1 with 1 + x normal: log64 of the rounded 1 + x,
    plus the first-order correction for that rounding (exact: x - (u - 1) is).
    Written with 1 / u so that a caller that also needs 1 / (1 + x) shares the division."""
    u = 1.0 + x
    return log64(u) + (x - (u - 1.0)) * (1.0 / u)


@cached(inline="always")
def _focal_weight(q, gamma):  # type: ignore[no-untyped-def]
    """q ** gamma, by multiplication for small integer gamma (2 is the default): pow costs
    more than the rest of a 10-class row."""
    if gamma == 2.0:
        return q * q
    if gamma == 1.0:
        return q
    if gamma == 0.0:
        return 1.0
    return q**gamma


PROBS = int(InputKind.PROBS)
LOGITS = int(InputKind.LOGITS)
LOG_PROBS = int(InputKind.LOG_PROBS)
LOG_HALF = math.log(0.5)

# The loss formulas below are the definitions both backends use: xentd/kernels/cuda.py
# compiles their ``py_func`` as CUDA device functions. They live in this file because
# Numba invalidates a cached CPU kernel only when its own source file changes.


@cached(inline="always")
def _index_terms(kind, xt, m, s, mass, eps):  # type: ignore[no-untyped-def]
    """(log p_t, 1 - p_t, mass) of a class-index row from its reductions: the target's
    value ``xt``, the row maximum ``m``, for logits ``s`` = sum exp(x - m), and the
    summed probability mass (exp-summed for log_probs)."""
    if kind == LOGITS:
        lpt = xt - m - math.log(s)
        return lpt, -math.expm1(lpt), 1.0
    if kind == PROBS:
        pt = max(xt, eps)
        return math.log(pt), 1.0 - pt, mass
    return xt, -math.expm1(xt), mass


@cached(inline="always")
def _index_calibration(kind, m, s, squares, rest, xt):  # type: ignore[no-untyped-def]
    """(confidence, Brier score) of a class-index row in float64 from its reductions: the
    row maximum ``m``, for logits ``s`` = sum exp(x - m) and ``rest`` = that sum without
    the target's term, the non-target squares ``squares`` (of exp(x - m) for logits, of
    p_c otherwise) and the target's value ``xt``. 1 - p_t is never 1 minus a rounded p_t."""
    confidence = _row_confidence(kind, m, 1.0 / s if kind == LOGITS else 0.0)
    if kind == LOGITS:
        return confidence, (squares + rest * rest) / (s * s)
    if kind == PROBS:
        return confidence, squares + (1.0 - xt) * (1.0 - xt)
    qt = math.expm1(xt)  # -(1 - p_t)
    return confidence, squares + qt * qt


@cached(inline="always")
def _soft_brier_term(kind, x, tj, at_top, m, rest, inv_s):  # type: ignore[no-untyped-def]
    """(p_j - t_j)**2 of one class of a soft-target row. For logits, ``m`` is the row
    maximum, ``rest`` the sum of exp(x - m) over the classes other than the first
    maximum (``at_top``: this is it) and ``inv_s`` = 1 / (1 + rest). Above 1/2, p_j is
    taken as 1 - (1 - p_j), the complement at full relative accuracy: p_j itself, rounded
    near 1, would leave little of p_j - 1 for a confident row."""
    if kind == PROBS:
        d = x - tj
    elif kind == LOGITS:
        d = (1.0 - tj) - rest * inv_s if at_top and rest < 1.0 else math.exp(x - m) * inv_s - tj
    else:
        d = (1.0 - tj) + math.expm1(x) if x > LOG_HALF else math.exp(x) - tj
    return d * d


@cached(inline="always")
def _soft_terms(kind, x, lse, eps):  # type: ignore[no-untyped-def]
    """(log p_j, 1 - p_j) of one class of a soft-target row; ``lse`` is the row's log-sum-exp (logits)."""
    if kind == PROBS:
        pj = max(x, eps)
        return math.log(pj), 1.0 - pj
    lp = x - lse if kind == LOGITS else x
    return lp, -math.expm1(lp)


@cached(inline="always")
def _binary_prob_terms(x, p, lp, lq):  # type: ignore[no-untyped-def]
    """(log p, log(1 - p), p, 1 - p, predicted positive) of a probability ``x``, from
    p = x clipped to [eps, 1 - eps], lp = log(p) and lq = log1p(-p)."""
    return lp, lq, p, 1.0 - p, x > 0.5


@cached(inline="always")
def _binary_logit_terms(x, e, l1):  # type: ignore[no-untyped-def]
    """(log p, log(1 - p), p, 1 - p, predicted positive) of a logit ``x``, from
    e = exp(-|x|) and l1 = log1p(e): log sigmoid(x) = -l1 for x >= 0, and
    log(1 - sigmoid(x)) = log sigmoid(x) - x. No cancellation, no overflow."""
    d = 1.0 / (1.0 + e)
    if x >= 0.0:
        return -l1, -x - l1, d, e * d, x > 0.0
    return x - l1, -l1, e * d, d, x > 0.0


@cached(inline="always")
def _binary_terms(kind, x, eps, log_eps):  # type: ignore[no-untyped-def]
    """(log p, log(1 - p), p, 1 - p, predicted positive) of one binary prediction, with libm."""
    if kind == PROBS:
        p = min(max(x, eps), 1.0 - eps)
        return _binary_prob_terms(x, p, math.log(p), math.log1p(-p))
    if kind == LOGITS:
        e = math.exp(-abs(x))
        return _binary_logit_terms(x, e, math.log1p(e))
    # log(1 - p) is derived, so p rounding to 1 would make it -inf:
    # floor 1 - p at eps, as the probs path does.
    q = max(-math.expm1(x), eps) if x < 0.0 else eps
    lq = math.log(q) if x < 0.0 else log_eps
    return x, lq, math.exp(x), q, x > LOG_HALF


@cached(inline="always")
def _binary_calibration(kind, x, p, q, t):  # type: ignore[no-untyped-def]
    """(confidence, Brier score) of one binary prediction ``x`` with target ``t``, from
    _binary_terms' p and q = 1 - p. The probability is unclipped: ``x`` itself for
    probs; for log_probs 1 - p is taken again, by expm1, since _binary_terms floors it
    at eps for the loss. Of p and 1 - p the smaller is the accurate one
    (p - t = (1 - t) - q), so that a confident row's tiny score keeps its digits."""
    if kind == PROBS:
        return x, (x - t) * (x - t)
    if kind == LOG_PROBS:
        q = -math.expm1(x)
    d = p - t if p < 0.5 else (1.0 - t) - q
    return p, d * d


@cached(inline="always")
def _row_confidence(kind, m, inv_s):  # type: ignore[no-untyped-def]
    """A multiclass row's largest probability from its maximum ``m`` (and, for logits,
    ``inv_s`` = 1 / sum exp(x - m)): as sent for probs, exp(m) for log_probs."""
    if kind == LOGITS:
        return inv_s
    return m if kind == PROBS else math.exp(m)


# log64 wants a normal input; below the smallest normal, p log p is under 1e-305.
_DBL_MIN = 2.2250738585072014e-308


@cached(inline="always", error_model="numpy")
def _plogp(p):  # type: ignore[no-untyped-def]
    """p log p of a probability as sent, 0 at p = 0 (0 log 0 = 0). Without a branch, so that
    a loop over values vectorises with log64 (the CUDA build takes libdevice's log)."""
    return p * log64(max(p, _DBL_MIN))


# The largest float64 below 1: log1p(-x) is finite for every probability x up to it.
_BELOW_ONE = 1.0 - 2.0**-53


@cached(inline="always", error_model="numpy")
def _prob_logs(x):  # type: ignore[no-untyped-def]
    """(log x, log(1 - x)) of a binary probability as sent, finite on [0, 1]: at x = 0 and
    x = 1 the log that would be -inf is a finite one, which the entropy multiplies by 0.
    log(1 - x) is log1p(-x), exact to the last bits where 1 - x itself would round."""
    return log64(max(x, _DBL_MIN)), log1p64(-min(x, _BELOW_ONE))


# A float32 log that vectorises, for the entropy of float32 probabilities: one log per
# value, where the loss takes one per row, so a float64 log (log64) would cost more than
# the rest of the row. musl's logf: the reduction of log64 on float32 bits, with a
# shorter polynomial (within 1 ulp, tested against NumPy over float32's positive range).
I32 = np.int32
_FLT_MIN = F32(np.finfo(np.float32).tiny)
_FLT_TRUE_MIN = F32(np.finfo(np.float32).smallest_subnormal)
_LG1F = F32(0.66666662693)
_LG2F = F32(0.40000972152)
_LG3F = F32(0.28498786688)
_LG4F = F32(0.24279078841)
_LN2_HI_F = F32(6.9313812256e-01)  # trailing zeros: k * _LN2_HI_F is exact
_LN2_LO_F = F32(9.0580006145e-06)


@cached(inline="always", error_model="numpy")
def log32(x):  # type: ignore[no-untyped-def]
    """log(x) for finite float32 x > 0, subnormals included (scaled by 2**25 first)."""
    sub = x < _FLT_MIN
    x = x * F32(33554432.0) if sub else x
    ix = F32(x).view(I32) + I32(0x3F800000 - 0x3F3504F3)
    k = F32((ix >> I32(23)) - I32(0x7F) - (I32(25) if sub else I32(0)))
    f = I32((ix & I32(0x007FFFFF)) + I32(0x3F3504F3)).view(F32) - F32(1.0)
    s = f / (F32(2.0) + f)
    z = s * s
    w = z * z
    r = z * (_LG1F + w * _LG3F) + w * (_LG2F + w * _LG4F)
    hfsq = F32(0.5) * f * f
    return s * (hfsq + r) + k * _LN2_LO_F - hfsq + f + k * _LN2_HI_F


@cached(inline="always", error_model="numpy")
def _plogp32(p):  # type: ignore[no-untyped-def]
    """p log p of a float32 probability, in float32, 0 at p = 0: within about 2 ulp, except
    where the product is subnormal (p below ~1e-37, a term under 1e-35 nats)."""
    return p * log32(max(p, _FLT_TRUE_MIN))


@cached(inline="always")
def _row_entropy(kind, log_s, t, s):  # type: ignore[no-untyped-def]
    """The entropy H = -sum_c p_c log p_c of a multiclass row from one sum ``t`` over its classes.
    Logits: t = sum_c e_c (x_c - m), with m the row maximum, e_c = exp(x_c - m), ``s`` = sum_c e_c
    and ``log_s`` = log s; H = log s - t / s, two terms >= 0 (no cancellation, no overflow).
    Probs: t = sum_c _plogp(p_c); log_probs: t = sum_c exp(x_c) x_c; H = -t (``log_s``, ``s`` unused)."""
    if kind == LOGITS:
        return log_s - t / s
    return -t


LN2 = math.log(2.0)


@cached(inline="always", error_model="numpy")
def _binary_entropy(kind, x, lp, lq, p, q):  # type: ignore[no-untyped-def]
    """H = -(p log p + (1 - p) log(1 - p)) of one binary prediction ``x``. For logits from the
    values of _binary_logit_terms (log p, log(1 - p), p, 1 - p, each to full relative accuracy
    in both tails: H = log1p(e^-|x|) + |x| sigmoid(-|x|), all terms >= 0). For probs and
    log_probs from ``x`` itself, since _binary_terms clips those at eps for the loss: p as
    sent, with _prob_logs' log x and log1p(-x), or p = exp(x) (``p``, unclipped) with
    1 - p = -expm1(x) and log(1 - p) the
    accurate log1mexp: log1p(-exp(x)) below -ln 2, where log(1 - p) of the rounded 1 - p
    would lose p's digits (x = -40: 1 - p rounds to 1, and the term p would vanish);
    log(-expm1(x)) above, where 1 - p is the small one (0 log 0 = 0 at x = 0)."""
    if kind == LOGITS:
        return -(p * lp + q * lq)
    if kind == PROBS:
        # The vectorised probs loop takes the loss's logs from the same _prob_logs(x), clipped
        # afterwards: inlined into one function, the two calls are one computation (LLVM's CSE).
        log_p, log_q = _prob_logs(x)
        return -(x * log_p + (1.0 - x) * log_q)
    q = -math.expm1(x)
    log_q = log1p64(-p) if x < -LN2 else log64(max(q, _DBL_MIN))
    return -(p * x) - q * log_q


# Every kernel takes (pred, tgt, kind, *ScoringParams.kernel_args, *Outputs), as
# positional arguments (xentd.kernels.base says why). The output arrays may be
# longer than the batch: kernels write their first n elements.
#
# Each also checks the row's values in a pass it makes anyway (the one that finds the
# maximum, whose result no order of evaluation changes): the largest of the values' key
# offsets (xentd.jit.key_offset, integer operations on the float's bits) against the
# rule's span, one flag per row; binary rows test each value (xentd.jit.outside). A
# class index outside [0, C - 1] is flagged and clamped into it, so that an invalid row
# is scored from in-bounds values (whatever the result) and a valid row exactly as before.


@cached(inline="always")
def _class_index(t, c):  # type: ignore[no-untyped-def]
    """(t clamped into [0, c - 1], whether it had to be): one unsigned comparison flags both sides."""
    return min(max(t, 0), c - 1), np.uint64(t) > np.uint64(c - 1)


def _multiclass_index(pred, tgt, kind, eps, gamma, tol, loss, focal, correct, tcls, unnorm, conf, brier, ent, inv):  # type: ignore[no-untyped-def]
    n, c = pred.shape
    lo, span = key_bounds(kind, pred)
    # The probabilities' sum of p log p costs a log per value, and a row's sum is a strict
    # reduction, which stays scalar (_plogp_sum says why): short rows take it across rows
    # beforehand (_plogp_rows, which checks their values as well), long rows map it into
    # ``terms`` and sum it with a fast-math span.
    short = kind == PROBS and c <= SMALL_C
    # Rows in at most WIDE_CHUNKS work items, their scratch allocated once per chunk, not per
    # row (see _multiclass_index_f32).
    rows = max(1, (n + WIDE_CHUNKS - 1) // WIDE_CHUNKS)
    for b in prange((n + rows - 1) // rows):
        first = b * rows
        last = min(n, first + rows)
        sums = np.empty(last - first if short else 0, np.float64)
        flags = np.empty(last - first if short else 0, np.bool_)
        terms = np.empty(c if kind == PROBS and not short else 0, np.float64)
        out = (loss, focal, correct, tcls, unnorm, conf, brier, ent, inv)
        # The kind as a constant in each loop, so that the branches on it fold away (a loop
        # over all three kinds measured 1.5x slower: LLVM does not unswitch it).
        if kind == LOGITS:
            _index_rows(pred, tgt, LOGITS, eps, gamma, tol, lo, span, terms, sums, flags, False, first, last, out)
        elif short:
            _plogp_rows(pred[first:last], sums, flags, lo, span)
            _index_rows(pred, tgt, PROBS, eps, gamma, tol, lo, span, terms, sums, flags, True, first, last, out)
        elif kind == PROBS:
            _index_rows(pred, tgt, PROBS, eps, gamma, tol, lo, span, terms, sums, flags, False, first, last, out)
        else:
            _index_rows(pred, tgt, LOG_PROBS, eps, gamma, tol, lo, span, terms, sums, flags, False, first, last, out)


@cached(inline="always", error_model="numpy")
def _plogp_rows(pred, sums, flags, key_lo, key_span):  # type: ignore[no-untyped-def]
    """sums[r] = sum_c _plogp(p_c) of each row of float64 probabilities, and flags[r] whether
    any of its values is outside the key range (key_lo, key_span) (xentd.jit.outside), for
    rows of at most SMALL_C classes: transposed in blocks of SMALL_ROWS rows, so that the log
    and the check run across rows (a 10-class row is too short for a vector loop of its own;
    the check in the row's own scalar loop measured 2.6 ns a value). Each row's terms are
    added in class order, as a loop along the row would add them."""
    n, c = pred.shape
    cols = np.empty((c, SMALL_ROWS + 8), np.float64)  # padded by a cache line (_small_index_block)
    worst = np.empty(SMALL_ROWS, np.uint64)  # each row's largest key offset (xentd.jit.key_offset)
    for r0 in range(0, n, SMALL_ROWS):
        block = pred[r0 : min(r0 + SMALL_ROWS, n)]
        out = sums[r0 : min(r0 + SMALL_ROWS, n)]
        for r in range(block.shape[0]):
            for j in range(c):
                cols[j, r] = np.float64(load(block[r, j]))
            out[r] = 0.0
            worst[r] = 0
        for j in range(c):
            col = cols[j]
            for r in range(block.shape[0]):
                out[r] += _plogp(col[r])
                worst[r] = max(worst[r], key_offset(col[r], key_lo))
        flagged = flags[r0 : min(r0 + SMALL_ROWS, n)]
        for r in range(block.shape[0]):
            flagged[r] = exceeds(worst[r], key_span)


@cached(inline="always", error_model="numpy")
def _index_rows(pred, tgt, kind, eps, gamma, tol, lo, span, terms, sums, flags, checked, first, last, out):  # type: ignore[no-untyped-def]
    """Rows [first, last) of _multiclass_index (float64 predictions, class-index targets) into
    ``out``, its nine output arrays; each row indexed in place (a view of the row would cost a
    reference count per row). With ``checked`` (a constant), _plogp_rows gave the probs rows'
    p log p sums in ``sums`` and their value checks in ``flags``; without it, a probs row maps
    its p log p into ``terms`` and sums it with a fast-math span."""
    loss, focal, correct, tcls, unnorm, conf, brier, ent, inv = out
    c = pred.shape[1]
    for i in range(first, last):
        t, bad = _class_index(tgt[i], c)
        best = load(pred[i, 0])
        worst = key_offset(best, lo)  # the row's largest key offset (xentd.jit.key_offset)
        arg = 0
        for j in range(1, c):
            v = load(pred[i, j])
            if not checked:
                worst = max(worst, key_offset(v, lo))
            if v > best:
                best = v
                arg = j
        bad |= flags[i - first] if checked else exceeds(worst, span)
        m = np.float64(best)
        mass = 0.0
        s = 0.0
        # Brier = sum over c != t of p_c**2, plus (1 - p_t)**2: the non-target
        # squares are summed apart, so that a confident row's score does not
        # come from 1 - 2 p_t + sum p_c**2, a cancellation.
        sq = 0.0
        rest = 0.0  # logits: the other classes' exponentials, so that 1 - p_t = rest / s exactly
        h = 0.0  # the entropy's sum (_row_entropy)
        if kind == LOGITS:
            for j in range(c):
                d = np.float64(load(pred[i, j])) - m
                e = math.exp(d)
                s += e
                sq += 0.0 if j == t else e * e
                rest += 0.0 if j == t else e
                h += e * d
        elif kind == PROBS:
            for j in range(c):
                x = np.float64(load(pred[i, j]))
                mass += x
                sq += 0.0 if j == t else x * x
            if checked:
                h = sums[i - first]
            else:
                for j in range(c):
                    terms[j] = _plogp(np.float64(load(pred[i, j])))
                h = _total_span(terms, c)
        else:
            for j in range(c):
                x = np.float64(load(pred[i, j]))
                e = math.exp(x)
                mass += e
                sq += 0.0 if j == t else e * e
                h += e * x
        xt = np.float64(load(pred[i, t]))
        lpt, q, mass = _index_terms(kind, xt, m, s, mass, eps)
        conf[i], brier[i] = _index_calibration(kind, m, s, sq, rest, xt)
        ent[i] = _row_entropy(kind, math.log(s) if kind == LOGITS else 0.0, h, s)
        loss[i] = -lpt
        focal[i] = -_focal_weight(q, gamma) * lpt
        correct[i] = 1 if arg == t else 0
        tcls[i] = t
        unnorm[i] = 1 if abs(mass - 1.0) > tol else 0
        inv[i] = bad


# Elements summed in float32 before each float64 accumulation: short enough
# that float32 rounding stays near 1 ulp, long enough to amortise the widening.
BLOCK = 512

# The span loops below are the only fast-math code here. They are not
# inlined, and the kernel that calls them is compiled strictly: Numba compiles
# a callee with its *caller's* fast-math flags, so a strict helper called from
# a fast-math kernel would be silently reassociated (and cached that way).


# Each loop runs over a slice from index 0, not over range(lo, hi): with a
# runtime lo, Numba's negative-index wraparound cannot be proven dead, and the
# loads become scalar loads and inserts (measured 8x slower).


@cached(fastmath=True)
def _max_span(row, lo, hi):  # type: ignore[no-untyped-def]
    span = row[lo:hi]
    m = LOWEST32
    for j in range(span.shape[0]):
        m = fmax(m, span[j])
    return m


@cached(fastmath=True)
def _max_check_span(row, lo, hi, key_lo, key_span):  # type: ignore[no-untyped-def]
    """(_max_span of row[lo:hi] (float32), whether any of its values is outside the key range
    (key_lo, key_span) of xentd.jit.outside). The maximum is exact in any order; the check is
    an unsigned max of key offsets (xentd.jit.key_offset), vectorised beside it: integer
    operations on the float's bits, which fast-math cannot drop."""
    span = row[lo:hi]
    m = LOWEST32
    worst = np.uint32(0)  # the largest key offset (xentd.jit.key_offset): float32 keys
    for j in range(span.shape[0]):
        m = fmax(m, span[j])
        worst = max(worst, key_offset(span[j], key_lo))
    return m, exceeds(worst, key_span)


@intrinsic
def _readonly(typingctx, array):  # type: ignore[no-untyped-def]
    """The same array, typed read-only (the two types share one data model)."""
    if not isinstance(array, nbtypes.Array):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return impl_ret_borrowed(context, builder, signature.return_type, args[0])

    return array.copy(readonly=True)(array), codegen


def widen_row(row, scratch):  # type: ignore[no-untyped-def]
    """A prediction row as float32 values: a float32 row itself; FP16 or BF16 bits widened
    (xentd.jit.load) into ``scratch`` (exactly as long), which is returned. Typed read-only,
    as a float32 row of a batch is: the span functions then run the very builds that
    float32 rows run (a writable row is another signature, compiled apart, and fast-math
    code compiled apart need not round alike)."""
    if row.dtype == np.float32:
        return row
    for j in range(row.shape[0]):
        scratch[j] = load(row[j])
    return scratch


@overload(widen_row, inline="always")
def _widen_row(row, scratch):  # type: ignore[no-untyped-def]
    if row.dtype == nbtypes.float32:
        return lambda row, scratch: row

    def impl(row, scratch):  # type: ignore[no-untyped-def]
        for j in range(row.shape[0]):
            scratch[j] = load(row[j])
        return _readonly(scratch)

    return impl


# Floats of padding before the exponentials' scratch of _sum_exp_span. Its loop stores
# into that scratch while it loads the row, so LLVM vectorises it behind a runtime check
# that the two are far enough apart, and runs the scalar loop (which rounds otherwise)
# when they are not: as when the scratch was allocated right after the batch's array,
# and the row was its last (measured before the padding: 16 to 64 calls in 3,000 gave
# the last row's Brier score one float32 ulp apart, with other allocations in between).
# The padding keeps every row at least 512 bytes away, more than the checks' reach
# (vector width times interleave: 256 bytes with AVX-512).
SCRATCH_PAD = 128


def _wide_scratch(pred):  # type: ignore[no-untyped-def]
    """(BLOCK floats for _sum_exp_span, the row that widen_row widens into: none for float32),
    from one allocation, the row after the exponentials, both SCRATCH_PAD floats in."""
    c = 0 if pred.dtype == np.float32 else pred.shape[1]
    scratch = np.empty(SCRATCH_PAD + BLOCK + c, np.float32)
    return scratch[SCRATCH_PAD : SCRATCH_PAD + BLOCK], scratch[SCRATCH_PAD + BLOCK :]


@overload(_wide_scratch, inline="always")
def _wide_scratch_impl(pred):  # type: ignore[no-untyped-def]
    widened = pred.dtype != nbtypes.float32

    def impl(pred):  # type: ignore[no-untyped-def]
        c = pred.shape[1] if widened else 0
        scratch = np.empty(SCRATCH_PAD + BLOCK + c, np.float32)
        return scratch[SCRATCH_PAD : SCRATCH_PAD + BLOCK], scratch[SCRATCH_PAD + BLOCK :]

    return impl


@cached(fastmath=True)
def _sum_exp_span(row, hi, m, scratch):  # type: ignore[no-untyped-def]
    """(sum of exp(row[j] - m) over the j where row[j] != m, count of row[j] == m,
    sum of the squares of those exponentials, sum of exp(row[j] - m) (row[j] - m) over
    the same j), in float64; the squares are the Brier score's (a maximum's square is 1, so
    the count serves for those too), the last sum the entropy's (_row_entropy; a maximum's
    term is 0). ``scratch`` holds BLOCK float32 values.

    The entropy's sum runs in a second loop over each block, from its exponentials kept
    in ``scratch``: a fourth sum in the first loop changes how LLVM interleaves the other
    three (measured on AVX2 and AVX-512 targets), and with it their rounding, which must
    stay what it was.

    Every maximum contributes exactly exp2(0) = 1, so it is counted rather than
    added: the float32 block sums then hold only the other terms, and a loss
    of 1e-18 keeps its relative accuracy instead of vanishing in 1 + 1e-18.
    ``(row[j] - m)`` is exact near the maximum (Sterbenz), unlike a fused
    ``row[j]*log2e - m*log2e``.
    """
    others = 0.0
    ties = 0.0
    squares = 0.0
    moment = 0.0
    for j0 in range(0, hi, BLOCK):
        block = F32(0.0)
        block_ties = F32(0.0)
        block_squares = F32(0.0)
        block_moment = F32(0.0)
        span = row[j0 : min(j0 + BLOCK, hi)]
        for j in range(span.shape[0]):
            # A select, not "exp - is_max": reassociation would turn a subtraction
            # back into (sum of exp) - (sum of is_max) and cancel the small terms.
            is_max = span[j] == m
            e = F32(0.0) if is_max else exp2_neg((span[j] - m) * LOG2E32)
            block += e
            block_squares += e * e
            block_ties += F32(1.0) if is_max else F32(0.0)
            scratch[j] = e
        for j in range(span.shape[0]):
            block_moment += scratch[j] * (span[j] - m)  # 0 at a maximum (e is 0 there, and so is d)
        others += np.float64(block)
        ties += np.float64(block_ties)
        squares += np.float64(block_squares)
        moment += np.float64(block_moment)
    return others, ties, squares, moment


@cached(inline="always", error_model="numpy")
def _plogp_sum(row, scratch):  # type: ignore[no-untyped-def]
    """_row_entropy's sum of a float32 probs row: _plogp32 of each value, mapped into
    ``scratch`` (BLOCK floats) a block at a time and summed by _total_span. Inlined into a
    strictly compiled kernel, so that log32 is never reassociated; the map is an elementwise
    loop, which vectorises as it is, where a strict sum would stay scalar (LLVM may not
    reorder one: measured 5.7 ns a value with log64, 1.3 mapped and summed apart)."""
    t = 0.0
    n = row.shape[0]
    for j0 in range(0, n, BLOCK):
        span = row[j0 : min(j0 + BLOCK, n)]
        for j in range(span.shape[0]):
            scratch[j] = _plogp32(span[j])
        t += _total_span(scratch, span.shape[0])
    return t


@cached(fastmath=True)
def _total_span(row, hi):  # type: ignore[no-untyped-def]
    """Sum of row[:hi], in float64."""
    s = 0.0
    for j in range(hi):
        s += np.float64(row[j])
    return s


@cached(fastmath=True)
def _sum_span(row, hi):  # type: ignore[no-untyped-def]
    """(sum, sum of squares) of row[:hi], in float64."""
    s = 0.0
    squares = 0.0
    for j in range(hi):
        x = np.float64(row[j])
        s += x
        squares += x * x
    return s, squares


# Rows of at most SMALL_C classes are scored in blocks of SMALL_ROWS rows,
# transposed so that every loop runs across rows: a 10-class row is too short
# for a vector loop of its own (one 8-wide step, a scalar remainder and a
# horizontal reduction per pass), and a per-row libm log1p cost more than the
# rest of the row.
SMALL_C = 48
SMALL_ROWS = 512
# The most work items the float32 wide path (see _multiclass_index_f32) and the FP64
# class-index kernel split a batch into.
WIDE_CHUNKS = 64


@cached(inline="always", error_model="numpy")
def _small_index_block(pred, tgt, kind, eps, loss, focal, correct, tcls, conf, brier, ent, inv):  # type: ignore[no-untyped-def]
    """Rows of a block (views) with class-index targets, float32 logits or
    probabilities (or FP16/BF16 bits, widened as they are transposed): loss, 1 - p_t in
    ``focal`` (the caller applies the focal weight), top-1, the true class, confidence,
    Brier score, entropy and the invalid flag. Returns the block's
    summed probability mass per row in a float64 array (1 for logits), for the
    normalisation check."""
    rows, c = pred.shape
    key_lo, key_span = key_bounds(kind, pred)
    # Columns padded by a cache line: at a 2 KB stride (512 rows) the transposing
    # stores all fall into the same few L1 sets and evict each other.
    cols = np.empty((c, rows + 16), np.float32)
    targets = np.empty(rows, np.float32)
    tcol = np.empty(rows, np.int32)
    for r in range(rows):
        for j in range(c):
            cols[j, r] = load(pred[r, j])
        t, bad = _class_index(tgt[r], c)
        # Gathered here: a gather in the last loop would keep it from vectorising.
        targets[r] = cols[t, r]
        tcol[r] = np.int32(t)
        inv[r] = bad
    # First maximum: a strict > keeps the lowest index of tied values. The values are
    # checked in the same loops, across rows as they are: each row's largest key offset
    # (xentd.jit.key_offset, float32 keys, as wide as the values so that lanes match).
    m = np.empty(rows, np.float32)
    worst = np.empty(rows, np.uint32)
    for r in range(rows):
        m[r] = cols[0, r]
        worst[r] = key_offset(cols[0, r], key_lo)
    arg = np.zeros(rows, np.int32)
    for j in range(1, c):
        jj = np.int32(j)
        for r in range(rows):
            v = cols[j, r]
            mr = m[r]
            arg[r] = jj if v > mr else arg[r]
            m[r] = max(v, mr)
            worst[r] = max(worst[r], key_offset(v, key_lo))
    for r in range(rows):
        inv[r] |= exceeds(worst[r], key_span)
    mass = np.zeros(rows, np.float64)
    if kind == LOGITS:
        # As in _sum_exp_span: maxima are counted, not added, so that the sum of
        # the other terms keeps its relative accuracy; a row (at most SMALL_C
        # terms) is summed in float32, as one of _sum_exp_span's blocks is.
        others = np.zeros(rows, np.float32)
        ties = np.zeros(rows, np.float32)
        # The Brier score's squares of the classes other than the maxima (whose
        # squares are 1, counted in ties); the target's is taken out below.
        squares = np.zeros(rows, np.float32)
        # The entropy's sum of e * d (_row_entropy), in float32 as the rest of the row.
        moments = np.zeros(rows, np.float32)
        for j in range(c):
            for r in range(rows):
                d = cols[j, r] - m[r]
                # Computed before the select, not inside it: a call in a conditional
                # expression is a branch, and the loop would not vectorise.
                e = exp2_neg(d * LOG2E32)
                is_max = d == F32(0.0)
                others[r] += F32(0.0) if is_max else e
                ties[r] += F32(1.0) if is_max else F32(0.0)
                squares[r] += F32(0.0) if is_max else e * e
                moments[r] += e * d
        for r in range(rows):
            t = tcol[r]
            xt = targets[r]
            ex = np.float64(others[r])
            tr = np.float64(ties[r])
            excess = ex if tr == 1.0 else ex + (tr - 1.0)
            # 1 / (1 + excess) is also log1p64's: one division serves both.
            inv_total = 1.0 / (1.0 + excess)
            log_total = log1p64(excess)
            loss[r] = log_total - (np.float64(xt) - np.float64(m[r]))
            ent[r] = _row_entropy(LOGITS, log_total, np.float64(moments[r]), 1.0 + excess)
            # 1 - p_t, as in _multiclass_index_f32.
            at_max = excess * inv_total
            et = np.float64(exp2_neg((xt - m[r]) * LOG2E32))
            away = 1.0 - et * inv_total
            q = at_max if xt == m[r] else away
            focal[r] = q
            correct[r] = 1 if arg[r] == t else 0
            tcls[r] = t
            mass[r] = 1.0
            conf[r] = inv_total
            # As in the wide path: when the target is not a maximum, the other classes'
            # squares sum to at least 1, so taking the target's out cancels nothing.
            others_squared = np.float64(squares[r]) + (tr - 1.0 if xt == m[r] else tr - et * et)
            brier[r] = others_squared * inv_total * inv_total + q * q
    else:
        squares64 = np.zeros(rows, np.float64)
        plogp = np.zeros(rows, np.float64)
        for j in range(c):
            jj = np.int32(j)
            for r in range(rows):
                x = np.float64(cols[j, r])
                mass[r] += x  # float64, as _sum_span
                squares64[r] += 0.0 if jj == tcol[r] else x * x
                plogp[r] += np.float64(_plogp32(cols[j, r]))
        for r in range(rows):
            ent[r] = _row_entropy(PROBS, 0.0, plogp[r], 0.0)
            t = tcol[r]
            xt = np.float64(targets[r])
            pt = max(xt, eps)
            loss[r] = -log64(pt)
            focal[r] = 1.0 - pt
            correct[r] = 1 if arg[r] == t else 0
            tcls[r] = t
            conf[r] = np.float64(m[r])
            brier[r] = squares64[r] + (1.0 - xt) * (1.0 - xt)
    return mass


@cached(inline="always")
def _apply_focal(focal, loss, gamma):  # type: ignore[no-untyped-def]
    """focal = w(1 - p_t) * loss, where ``focal`` holds 1 - p_t on entry and
    loss = -log p_t. Callers pass common gammas as constants (see _binary_span)."""
    for r in range(focal.shape[0]):
        focal[r] = _focal_weight(focal[r], gamma) * loss[r]


def _multiclass_index_f32(pred, tgt, kind, eps, gamma, tol, loss, focal, correct, tcls, unnorm, conf, brier, ent, inv):  # type: ignore[no-untyped-def]
    """Class-index targets on float32 predictions (FP16 and BF16 bits too): the high-throughput path.

    Three vectorised sweeps over each row (max and the value check, then exp-sum or
    sum; for probs a fourth, a float32 log per value, for the entropy); the
    float32 exp2 is within ~1e-7 relative, below the precision of a float32
    input, and every sum is carried in float64. Top-1 correctness needs no
    argmax: the target is the first maximum iff it equals the row max and
    exceeds every value before it.

    A row of FP16 or BF16 bits is first widened into a float32 row (widen_row, in
    L2 at 32,000 classes) and then takes the float32 code itself: the fast-math sums'
    order depends on how LLVM vectorises their loops, and a loop that widened as it
    summed could be vectorised otherwise, and round otherwise. Short rows are widened
    as they are transposed (_small_index_block), where every operation is exact.
    """
    n, c = pred.shape
    key_lo, key_span = key_bounds(kind, pred)
    if c <= SMALL_C and kind != LOG_PROBS:
        for b in prange((n + SMALL_ROWS - 1) // SMALL_ROWS):
            lo = b * SMALL_ROWS
            hi = min(lo + SMALL_ROWS, n)
            lossb, focalb, confb, brierb, entb = loss[lo:hi], focal[lo:hi], conf[lo:hi], brier[lo:hi], ent[lo:hi]
            if kind == LOGITS:
                mass = _small_index_block(
                    pred[lo:hi],
                    tgt[lo:hi],
                    LOGITS,
                    eps,
                    lossb,
                    focalb,
                    correct[lo:hi],
                    tcls[lo:hi],
                    confb,
                    brierb,
                    entb,
                    inv[lo:hi],
                )
            else:
                mass = _small_index_block(
                    pred[lo:hi],
                    tgt[lo:hi],
                    PROBS,
                    eps,
                    lossb,
                    focalb,
                    correct[lo:hi],
                    tcls[lo:hi],
                    confb,
                    brierb,
                    entb,
                    inv[lo:hi],
                )
            if gamma == 2.0:
                _apply_focal(focalb, lossb, 2.0)
            elif gamma == 0.0:
                _apply_focal(focalb, lossb, 0.0)
            else:
                _apply_focal(focalb, lossb, gamma)
            unnormb = unnorm[lo:hi]
            for r in range(hi - lo):
                unnormb[r] = 1 if abs(mass[r] - 1.0) > tol else 0
        return
    # Rows in at most WIDE_CHUNKS work items, each with its own block of exponentials for
    # _sum_exp_span: one allocation per chunk, not per row (numba.get_thread_id would
    # index one per thread, but a kernel that calls get_num_threads cannot be cached).
    rows = max(1, (n + WIDE_CHUNKS - 1) // WIDE_CHUNKS)
    for b in prange((n + rows - 1) // rows):
        buf, wide = _wide_scratch(pred)
        for i in range(b * rows, min(n, b * rows + rows)):
            row = widen_row(pred[i], wide)
            t, bad = _class_index(tgt[i], c)
            before, bad_before = _max_check_span(row, 0, t, key_lo, key_span)
            after, bad_after = _max_check_span(row, t, c, key_lo, key_span)
            m = max(before, after)
            inv[i] = bad | bad_before | bad_after
            xt = np.float64(row[t])
            mass = 1.0
            if kind == LOGITS:
                others, ties, squares, moment = _sum_exp_span(row, c, m, buf)
                # log(sum of exp(row - m)) = log1p(others + ties - 1), without ever forming 1 + tiny.
                excess = others if ties == 1.0 else others + (ties - 1.0)
                log_total = math.log1p(excess)
                lpt = (xt - np.float64(m)) - log_total
                # 1 - p_t from the same sums, without expm1: exact when the target is
                # a maximum (p_t = 1/S), and free of cancellation otherwise (p_t <= 1/2).
                total = 1.0 + excess
                # The Brier score's sum of squares over the classes other than the target:
                # a maximum's square is 1 (counted in ties). When the target is not a
                # maximum, another class is, so that sum is at least 1 and taking the
                # target's square out of it cancels nothing.
                if row[t] == m:
                    q = excess / total
                    others_squared = squares + (ties - 1.0)
                else:
                    et = np.float64(exp2_neg((row[t] - m) * LOG2E32))
                    q = 1.0 - et / total
                    others_squared = squares + ties - et * et
                # The other classes' exponentials sum to q * total: 1 - p_t = rest / S.
                conf[i], brier[i] = _index_calibration(LOGITS, np.float64(m), total, others_squared, q * total, xt)
                ent[i] = _row_entropy(LOGITS, log_total, moment, total)
            elif kind == PROBS:
                # Probabilities are summed before and after the target apart: a confident
                # row's other squares would vanish in (sum of squares) - p_t**2.
                s1, sq1 = _sum_span(row[:t], t)
                s2, sq2 = _sum_span(row[t + 1 :], c - t - 1)
                mass = s1 + s2 + xt
                pt = max(xt, eps)
                lpt = math.log(pt)
                q = 1.0 - pt
                conf[i], brier[i] = _index_calibration(PROBS, np.float64(m), 0.0, sq1 + sq2, 0.0, xt)
                ent[i] = _row_entropy(PROBS, 0.0, _plogp_sum(row, buf), 0.0)
            else:
                # As for probabilities: the classes before and after the target apart.
                o1, t1, sq1, h1 = _sum_exp_span(row[:t], t, F32(0.0), buf)
                o2, t2, sq2, h2 = _sum_exp_span(row[t + 1 :], c - t - 1, F32(0.0), buf)
                pt = math.exp(xt)
                mass = o1 + o2 + t1 + t2 + pt
                lpt = xt
                q = -math.expm1(lpt)
                # A class at log-probability 0 has probability 1 and square 1: counted in t1, t2.
                conf[i], brier[i] = _index_calibration(LOG_PROBS, np.float64(m), 0.0, sq1 + sq2 + t1 + t2, 0.0, xt)
                # With m = 0, the spans' moments are the other classes' sums of exp(x) x, in
                # float32 blocks as for logits; the target's term is taken in float64.
                ent[i] = _row_entropy(LOG_PROBS, 0.0, h1 + h2 + pt * xt, 0.0)
            loss[i] = -lpt
            focal[i] = -_focal_weight(q, gamma) * lpt
            correct[i] = 1 if row[t] == m and (t == 0 or row[t] > before) else 0
            tcls[i] = t
            unnorm[i] = 1 if abs(mass - 1.0) > tol else 0


def _multiclass_soft(pred, tgt, kind, eps, gamma, tol, loss, focal, correct, tcls, unnorm, conf, brier, ent, inv):  # type: ignore[no-untyped-def]
    n, c = pred.shape
    key_lo, key_span = key_bounds(kind, pred)
    target_lo, target_span = key_bounds(PROBS, tgt)  # soft targets: probabilities
    for i in prange(n):
        # Both first maxima in one pass over the two rows: two passes (one helper
        # shared with _multiclass_index) measured up to 1.4x slower. Both rows are checked in it.
        best = load(pred[i, 0])
        arg = 0
        tbest = tgt[i, 0]
        targ = 0
        # Each row's largest key offset (xentd.jit.key_offset), of the predictions and the targets.
        worst = key_offset(best, key_lo)
        target_worst = key_offset(tbest, target_lo)
        for j in range(1, c):
            v = load(pred[i, j])
            tj = tgt[i, j]
            worst = max(worst, key_offset(v, key_lo))
            target_worst = max(target_worst, key_offset(tj, target_lo))
            if v > best:
                best = v
                arg = j
            if tj > tbest:
                tbest = tj
                targ = j
        m = np.float64(best)
        lse = 0.0
        mass = 0.0
        s = 0.0
        rest = 0.0  # logits: sum of exp(x - m) but for the first maximum's (exactly 1)
        h = 0.0  # the entropy's sum (_row_entropy)
        log_s = 0.0
        if kind == LOGITS:
            for j in range(c):
                d = np.float64(load(pred[i, j])) - m
                e = math.exp(d)
                s += e
                rest += 0.0 if j == arg else e
                h += e * d
            log_s = math.log(s)
            lse = m + log_s
            mass = 1.0
        inv_s = 1.0 / (1.0 + rest)
        total = 0.0
        ftotal = 0.0
        sq = 0.0
        for j in range(c):
            x = np.float64(load(pred[i, j]))
            if kind == PROBS:
                mass += x
                h += _plogp(x)
            elif kind == LOG_PROBS:
                e = math.exp(x)
                mass += e
                h += e * x
            tj = np.float64(tgt[i, j])
            sq += _soft_brier_term(kind, x, tj, j == arg, m, rest, inv_s)
            if tj != 0.0:  # 0 * log(0) is 0, as in xlogy
                lp, q = _soft_terms(kind, x, lse, eps)
                total -= tj * lp
                ftotal -= tj * _focal_weight(q, gamma) * lp
        loss[i] = total
        focal[i] = ftotal
        conf[i] = _row_confidence(kind, m, inv_s)
        brier[i] = sq
        ent[i] = _row_entropy(kind, log_s, h, s)
        correct[i] = 1 if arg == targ else 0
        tcls[i] = targ
        unnorm[i] = 1 if kind != LOGITS and abs(mass - 1.0) > tol else 0
        inv[i] = exceeds(worst, key_span) | exceeds(target_worst, target_span)


# Rows per work item of the blocked kernels: the parallel builds split the
# batch into blocks, and each block's inner loops are what vectorises.
ROW_BLOCK = 2048


@cached(inline="always", error_model="numpy")
def _binary_span(  # type: ignore[no-untyped-def]
    pred, tgt, libm, kind, eps, log_eps, gamma, bounds, loss, focal, correct, tcls, unnorm, conf, brier, ent, inv
):
    """One block of samples (views, so that indices are known non-negative and
    need no wraparound: a loop over ``range(lo, hi)`` with a runtime ``lo``
    vectorised into gathers, 3x slower). With ``libm`` false, callers pass
    ``kind`` (logits or probs) and ``gamma`` as constants: inlined, the branches
    on them fold away and the loop vectorises. With ``libm`` true, any kind and
    gamma, one sample at a time through _binary_terms. ``bounds`` is (key_lo, key_span)
    of the prediction's rule and of the target's (xentd.jit.outside)."""
    key_lo, key_span, target_lo, target_span = bounds
    # The vectorised probs loop's clipping bounds, as logs: log p and log(1 - p) at p = eps and 1 - eps.
    log_lo, log_hi = log64(eps), log64(1.0 - eps)
    log1m_lo, log1m_hi = log1p64(-(1.0 - eps)), log1p64(-eps)
    for i in range(pred.shape[0]):
        v = load(pred[i])
        x = np.float64(v)
        if libm:
            lp, lq, p, q, positive = _binary_terms(kind, x, eps, log_eps)
        elif kind == LOGITS:
            e = exp_nonpos64(-abs(x))
            lp, lq, p, q, positive = _binary_logit_terms(x, e, log1p64(e))
        else:  # probs
            # Where x is not clipped, the logs of the clipped p are those of x, so the loss and
            # the entropy (_binary_entropy) share the two logs of _prob_logs(x): two logs a
            # sample, not four. Where it is, the logs at the bounds: chosen on x, so that they
            # are log64(pc) and log1p64(-pc) exactly, whatever the eps (any in (0, 0.5)).
            log_x, log_1mx = _prob_logs(x)
            pc = min(max(x, eps), 1.0 - eps)
            lp = log_lo if x < eps else (log_hi if x > 1.0 - eps else log_x)
            lq = log1m_hi if x < eps else (log1m_lo if x > 1.0 - eps else log_1mx)
            lp, lq, p, q, positive = _binary_prob_terms(x, pc, lp, lq)
        t = tgt[i]
        conf[i], brier[i] = _binary_calibration(kind, x, p, q, t)
        ent[i] = _binary_entropy(kind, x, lp, lq, p, q)
        loss[i] = -(t * lp + (1.0 - t) * lq)
        focal[i] = -(t * _focal_weight(q, gamma) * lp + (1.0 - t) * _focal_weight(p, gamma) * lq)
        truth = t > 0.5
        correct[i] = 1 if positive == truth else 0
        tcls[i] = 1 if truth else 0
        unnorm[i] = 0
        inv[i] = outside(v, key_lo, key_span) | outside(t, target_lo, target_span)


def _binary(pred, tgt, kind, eps, gamma, tol, loss, focal, correct, tcls, unnorm, conf, brier, ent, inv):  # type: ignore[no-untyped-def]
    n = pred.shape[0]
    log_eps = math.log(eps)
    bounds = key_bounds(kind, pred) + key_bounds(PROBS, tgt)  # binary targets are probabilities
    for b in prange((n + ROW_BLOCK - 1) // ROW_BLOCK):
        lo = b * ROW_BLOCK
        hi = min(lo + ROW_BLOCK, n)
        x, t = pred[lo:hi], tgt[lo:hi]
        out = (
            loss[lo:hi],
            focal[lo:hi],
            correct[lo:hi],
            tcls[lo:hi],
            unnorm[lo:hi],
            conf[lo:hi],
            brier[lo:hi],
            ent[lo:hi],
            inv[lo:hi],
        )
        # The default gamma gets loops of its own (see _binary_span); any other
        # gamma, and log_probs, share one loop with libm's functions. Each
        # specialised loop costs compile time (5 to 10 s per build).
        if kind == LOGITS and gamma == 2.0:
            _binary_span(
                x,
                t,
                False,
                LOGITS,
                eps,
                log_eps,
                2.0,
                bounds,
                out[0],
                out[1],
                out[2],
                out[3],
                out[4],
                out[5],
                out[6],
                out[7],
                out[8],
            )
        elif kind == PROBS and gamma == 2.0:
            _binary_span(
                x,
                t,
                False,
                PROBS,
                eps,
                log_eps,
                2.0,
                bounds,
                out[0],
                out[1],
                out[2],
                out[3],
                out[4],
                out[5],
                out[6],
                out[7],
                out[8],
            )
        else:
            _binary_span(
                x,
                t,
                True,
                kind,
                eps,
                log_eps,
                gamma,
                bounds,
                out[0],
                out[1],
                out[2],
                out[3],
                out[4],
                out[5],
                out[6],
                out[7],
                out[8],
            )


# Prediction dtypes whose values load as float32: float32 itself, FP16 bits (uint16), BF16 bits (int16).
FLOAT32_LOADS = (np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.int16))
HALF_LOADS = (np.dtype(np.uint16), np.dtype(np.int16))  # FP16 and BF16 bits

KERNELS = {
    "binary": serial_and_parallel(_binary),
    "index": serial_and_parallel(_multiclass_index),
    "index_f32": serial_and_parallel(_multiclass_index_f32),
    "soft": serial_and_parallel(_multiclass_soft),
}


class CpuBackend:
    """Scores batches with the Numba CPU kernels above."""

    name = "cpu"

    def __init__(self, *, parallel_threshold: int = 1 << 15) -> None:
        self.parallel_threshold = parallel_threshold
        # False between warmup(parallel=False) and warmup_parallel(): large batches then take
        # the serial builds (the same results, on one core) instead of compiling on the hot path.
        self._parallel_ready = True
        # False until warmup_parallel() has compiled the builds that load FP16/BF16 bits: until
        # then those are widened on the host into _widened and take the float32 builds (the
        # same results: the widening is exact, and the kernel checks the widened values).
        self._half_ready = True
        self._widened = Scratch()
        self._out = OutputBuffers()

    def new_outputs(self) -> OutputBuffers:
        return OutputBuffers()

    def score(self, batch: Batch, params: ScoringParams, out: OutputBuffers | None = None) -> SampleScores:
        """Score a batch into ``out``, or into this backend's own buffers (see ``Backend.score``)."""
        if batch.binary:
            family = "binary"
        elif batch.target_kind is TargetKind.INDEX:
            family = "index_f32" if batch.predictions.dtype in FLOAT32_LOADS else "index"
        else:
            family = "soft"
        serial, parallel = KERNELS[family]
        pred = batch.predictions
        if not self._half_ready and pred.dtype in HALF_LOADS:
            pred = self._widen(pred)
        large = pred.size >= self.parallel_threshold
        kernel = parallel if large and self._parallel_ready else serial
        n = batch.size
        if out is None:
            out = self._out
        if n > out.capacity:
            out.reserve(n)
        kernel(pred, batch.targets, int(batch.kind), *params.kernel_args, *out.arrays)
        return out.scores(n)

    def _widen(self, bits: np.ndarray) -> np.ndarray:
        """FP16 (uint16) or BF16 (int16) bits as float32, in a buffer reused until the next call."""
        values = self._widened.float32(bits.shape)
        widen_bits(bits.view(np.uint16), values, half=bits.dtype == np.uint16)
        return values

    def warmup(self, *, parallel: bool = True) -> None:
        """Compile (or load from the on-disk cache) every signature ``score`` can use.

        With ``parallel=False`` only the serial builds: enough to score everything, in
        about half the compile time; :meth:`warmup_parallel` adds the others later.
        """
        self._parallel_ready = False
        self._half_ready = False
        scan_warmup()  # the host widening that 16-bit batches take meanwhile
        self._compile(0, half=False)
        if parallel:
            self.warmup_parallel()

    def warmup_parallel(self) -> None:
        """Compile what ``warmup(parallel=False)`` left out: the serial builds that load FP16/BF16
        bits (16-bit predictions use them from then on), then the ``prange`` builds (large
        batches use them from then on). Together about as long as the first step: a cold
        start is ready in the time it took before the kernels widened 16-bit values themselves."""
        self._compile(0, half=True)
        self._half_ready = True
        self._compile(1)
        self._parallel_ready = True

    def _compile(self, build: int, *, half: bool | None = None) -> None:
        """Compile one build (0 serial, 1 ``prange``) for every warm-up batch, or only those
        whose predictions are 16-bit bits (``half``) or are not (``not half``)."""
        # Through a backend that takes only this build: the compiled kernels are
        # shared (KERNELS), and this backend's own state is left alone, since
        # warmup_parallel() runs while it scores.
        only = CpuBackend(parallel_threshold=0 if build else 1 << 62)
        for batch in warmup_batches():
            if half is None or half == (batch.predictions.dtype in HALF_LOADS):
                only.score(batch, WARMUP_PARAMS)
