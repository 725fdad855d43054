"""Batches and checks shared by the CPU and CUDA kernel tests: random cases, their
float64 reference (tests/naive.py) and the tolerances each path is held to."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from scipy.special import expit

from tests import naive
from tests.conftest import make_batch, softmax
from xentd.kernels import SampleScores
from xentd.validate import Batch
from xentd.wire import BF16

DATATYPES = ["FP16", "BF16", "FP32", "FP64"]
KINDS = ["probs", "logits", "log_probs"]
NP_DTYPE = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}

# FP64 predictions are scored in float64 and agree with the reference to rounding.
# Float32 predictions (FP32, and FP16/BF16 widened) with class-index targets use
# a float32 exp2 inside the log-sum-exp on the CPU: documented bound, relative 5e-6
# (the atol only covers the naive reference's own float64 rounding on tiny losses).
EXACT = {"rtol": 1e-12, "atol": 1e-13}
FAST_F32 = {"rtol": 5e-6, "atol": 1e-12}


def encode_dtype(x: np.ndarray, datatype: str) -> np.ndarray | BF16:
    if datatype == "BF16":
        return BF16.from_float32(x.astype(np.float32))
    return x.astype(NP_DTYPE[datatype])


def predictions(rng: np.random.Generator, n: int, c: int | None, kind: str) -> np.ndarray:
    """float64 predictions of the given kind; c=None means binary."""
    if c is None:
        logits = rng.normal(0.0, 3.0, n)
        if kind == "logits":
            return logits
        p = 1.0 / (1.0 + np.exp(-logits))
        return p if kind == "probs" else np.log(p)
    logits = rng.normal(0.0, 3.0, (n, c))
    if kind == "logits":
        return logits
    return softmax(logits) if kind == "probs" else naive.log_softmax(logits)


def reference(batch: Batch, kind: str, gamma: float = 2.0) -> naive.Ref:
    eps = batch.dtype_eps
    if batch.binary:
        return naive.binary(batch.predictions, batch.targets, kind, eps=eps, gamma=gamma)
    return naive.multiclass(batch.predictions, batch.targets, kind, eps=eps, gamma=gamma, tol=math.sqrt(eps))


def cpu_tolerance(batch: Batch) -> dict[str, float]:
    """What the CPU backend is held to: exact, except the float32 class-index path (FAST_F32)."""
    fast = (
        batch.predictions.dtype == np.float32 and not batch.binary and batch.targets.ndim == 1 and int(batch.kind) == 1
    )
    return FAST_F32 if fast else EXACT


def assert_scores(scores: SampleScores, ref: naive.Ref, tol: dict[str, float] = EXACT) -> None:
    np.testing.assert_allclose(scores.loss, ref.loss, **tol)
    np.testing.assert_allclose(scores.focal, ref.focal, **tol)
    np.testing.assert_array_equal(scores.correct, ref.correct)
    np.testing.assert_array_equal(scores.true_class, ref.true_class)
    assert scores.unnormalized_rows == ref.unnormalized


# The label-free entropy (SampleScores.entropy) against naive.entropy. Float64 sums agree to
# rounding; near H = 0 the kernels' log s (as xentd.predstats takes it) is good to an absolute
# ~1e-16, not relatively. The CPU's float32 class-index logits sum it in float32 (relative
# 1e-5, as predstats' own float32 path), whose exp2 is 0 below 2**-126: terms under ~1e-36 go.
ENTROPY_EXACT = {"rtol": 1e-12, "atol": 1e-15}
ENTROPY_F32 = {"rtol": 1e-5, "atol": 1e-30}


def entropy_case(dtype: Any, kind: str, classes: int | None, n: int, targets: str, seed: int) -> Batch:
    """A random batch for the entropy comparisons, with rows at the edges first: uniform,
    one-hot (p = 0 entries, log-probabilities of -1e4), confident (p ~ 1e-35), tied maxima,
    extreme logits (+-1e4) and, for probs, rows with exact zeros."""
    rng = np.random.default_rng(seed)
    y: Any
    if classes is None:
        z = rng.normal(0.0, 1.0, n) * rng.uniform(0.1, 30.0, n)
        z[:10] = [0.0, 1e-9, -1e-9, 40.0, -40.0, 800.0, -800.0, 1e4, -1e4, 3.0]
        p = expit(z)
        x = {"logits": z, "probs": p, "log_probs": -np.logaddexp(0.0, -z)}[kind]
        if kind == "probs":
            x[:5] = [0.0, 1.0, 1e-12, 1.0 - 1e-12, 0.5]
        y = rng.integers(0, 2, n).astype(np.float64) if targets == "index" else rng.random(n)
        return make_batch(x.astype(dtype), y, kind)
    c = classes
    z = rng.normal(0.0, 1.0, (n, c)) * rng.uniform(0.1, 30.0, (n, 1))
    z[0] = 0.0  # uniform: H = log C
    z[1] = 0.0
    z[1, 0] = 1e4  # one-hot: H = 0
    z[2] = -40.0
    z[2, c - 1] = 40.0  # confident: H ~ 81 (C - 1) e^-80
    z[3, 0] = z[3, c - 1] = z[3].max() + 2.0  # tied maxima
    z[4] = -1e4  # extreme and uniform: H = log C
    z[5] = 0.0
    z[5, 0], z[5, 1] = 1e4, -1e4
    if kind == "logits":
        x = z
    elif kind == "probs":
        x = softmax(z)
        x[6, ::2] = 0.0  # exact zeros, renormalised
        x[6] /= x[6].sum()
    else:
        x = naive.log_softmax(z)
    if targets == "index":
        y = rng.integers(0, c, n)
    else:
        y = softmax(rng.normal(0, 2, (n, c))).astype(np.float32)
    return make_batch(x.astype(dtype), y, kind)


def reference_case(datatype: str, kind: str, classes: int | None, n: int, targets: str) -> Batch:
    """A random batch for the reference comparisons."""
    rng = np.random.default_rng(classes or 1)
    x = predictions(rng, n, classes, kind)
    y: Any
    if classes is None:
        y = rng.integers(0, 2, n) if targets == "index" else rng.random(n)
    elif targets == "index":
        y = rng.integers(0, classes, n)
    else:
        y = softmax(rng.normal(0, 2, (n, classes))).astype(np.float32)
    return make_batch(encode_dtype(x, datatype), y, kind)


def reference_cases(datatypes: list[str], sizes: list[tuple[int | None, int]]) -> Any:
    """Parametrize a test over ``reference_case``'s arguments: every datatype, kind,
    (classes, rows) and target layout (class indices, soft)."""
    return pytest.mark.parametrize(
        "datatype,kind,classes,n,targets",
        [(d, k, c, n, t) for d, k, (c, n), t in itertools.product(datatypes, KINDS, sizes, ["index", "soft"])],
    )


# --- value rules and FP16/BF16 bits: batches the kernels check themselves ---------------
#
# Built directly (not through xentd.validate, which refuses what the kernels must flag):
# predictions as the kernels take them (float32, float64, or the wire's FP16/BF16 bits as
# uint16/int16), with NaN, infinities, out-of-range values, class indices and soft targets
# planted in random rows, and valid edge values (zeros of both signs, subnormals) elsewhere.

KIND_CODES = {"probs": 0, "logits": 1, "log_probs": 2}
BITS_DTYPE = {"FP16": np.uint16, "BF16": np.int16}
# Layouts: (classes, target layout); classes None is binary.
LAYOUTS = ["binary", "index", "soft32", "soft64"]


def raw_batch(pred: np.ndarray, targets: np.ndarray, kind: str, datatype: str) -> Batch:
    """A batch of these arrays as they are: no value checks, no widening."""
    from xentd.jit import kernel_array
    from xentd.validate import InputKind, TargetKind

    return Batch(
        model="m",
        kind=InputKind(KIND_CODES[kind]),
        predictions=kernel_array(pred),
        targets=kernel_array(targets),
        target_kind=TargetKind.INDEX if targets.dtype == np.int64 else TargetKind.SOFT,
        weights=None,
        num_classes=2 if pred.ndim == 1 else int(pred.shape[1]),
        prediction_datatype=datatype,
        batch_id=None,
        ts=None,
    )


def encode_bits(x: np.ndarray, datatype: str) -> np.ndarray:
    """float64 values as the kernels take them on ``datatype``: FP16 as its bits (uint16),
    BF16 as its bits (int16, rounded to nearest even), FP32/FP64 as floats."""
    if datatype == "FP16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).view(np.uint16)
    if datatype == "BF16":
        return BF16.from_float32(x.astype(np.float32)).bits.view(np.int16)
    return x.astype(NP_DTYPE[datatype])


def widen_on_host(pred: np.ndarray) -> np.ndarray:
    """What validation hands the kernels today: FP16 and BF16 bits widened to float32 on the
    host (NumPy's float16 conversion; BF16 as the top half of a float32); floats as they are."""
    if pred.dtype == np.uint16:
        with np.errstate(invalid="ignore"):  # signalling NaNs are quieted, with a warning
            return pred.view(np.float16).astype(np.float32)
    if pred.dtype == np.int16:
        return (pred.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return pred


# Bit patterns planted in predictions, per kernel dtype: those that break every kind's
# rule (NaN, quiet and signalling, of both signs; infinities) and, per kind, those that
# break its range. The float64 pool's own are below.
_NONFINITE_BITS = {
    "FP16": [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE00, 0xFFFF],
    "BF16": [0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFC0, 0xFFFF],
    "FP32": [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFC00000, 0xFFFFFFFF],
    "FP64": [0x7FF0 << 48, 0xFFF0 << 48, 0x7FF8 << 48, (0x7FF0 << 48) + 1, 0xFFF8 << 48, (1 << 64) - 1],
}
_BIT_VIEW = {"FP16": np.uint16, "BF16": np.uint16, "FP32": np.uint32, "FP64": np.uint64}


def _from_bits(patterns: list[int], datatype: str) -> np.ndarray:
    """Bit patterns as the kernel dtype of ``datatype``."""
    bits = np.array(patterns, dtype=_BIT_VIEW[datatype])
    return bits.view(BITS_DTYPE[datatype] if datatype in BITS_DTYPE else NP_DTYPE[datatype])


def _tiny(datatype: str) -> float:
    """The smallest positive subnormal of the datatype, as a float64."""
    return {"FP16": 2.0**-24, "BF16": 2.0**-133, "FP32": 2.0**-149, "FP64": 5e-324}[datatype]


def bad_prediction_values(datatype: str, kind: str) -> np.ndarray:
    """Values (in the kernel dtype) that break ``kind``'s rule."""
    pool = list(_from_bits(_NONFINITE_BITS[datatype], datatype))
    out_of_range = {
        "probs": [-_tiny(datatype), -0.5, 1.5, 2.0, -1e4],
        "log_probs": [_tiny(datatype), 0.5, 3.0],
        "logits": [],
    }
    return np.concatenate([np.array(pool), encode_bits(np.array(out_of_range[kind], np.float64), datatype)])


def edge_prediction_values(datatype: str, kind: str) -> np.ndarray:
    """Valid values at the edges of ``kind``'s range (in the kernel dtype): signed zeros, subnormals, 1."""
    t = _tiny(datatype)
    edges = {
        "probs": [0.0, -0.0, t, 1.0, 4 * t],
        "log_probs": [0.0, -0.0, -t, -4 * t, -60.0],
        "logits": [0.0, -0.0, t, -t, 60.0, -60.0],
    }
    return encode_bits(np.array(edges[kind], np.float64), datatype)


def oracle_invalid(pred: np.ndarray, targets: np.ndarray, kind: str) -> np.ndarray:
    """The value rules in float64 NumPy, per row (xentd.validate's words: finite predictions,
    probabilities in [0, 1], log-probabilities <= 0, class indices in [0, C - 1], soft
    targets finite in [0, 1])."""
    with np.errstate(invalid="ignore"):
        x = widen_on_host(pred).astype(np.float64)
        x = x.reshape(len(x), -1)
        bad = ~np.isfinite(x)
        if kind == "probs":
            bad |= (x < 0.0) | (x > 1.0)
        elif kind == "log_probs":
            bad |= x > 0.0
        rows = bad.any(axis=1)
        if targets.dtype == np.int64:
            c = pred.shape[1]
            rows |= (targets < 0) | (targets > c - 1)
        else:
            t = targets.astype(np.float64).reshape(len(targets), -1)
            rows |= (~np.isfinite(t) | (t < 0.0) | (t > 1.0)).any(axis=1)
    return rows


def planted_case(
    datatype: str, kind: str, classes: int | None, n: int, layout: str, seed: int
) -> tuple[Batch, np.ndarray]:
    """(a batch with broken values planted in about a third of its rows and valid edge values
    in others, the rows an oracle finds invalid). Binary batches have float64 targets."""
    rng = np.random.default_rng(seed)
    x = predictions(rng, n, classes, kind)
    if kind == "log_probs":
        x = np.minimum(x, 0.0)  # the reference's rounding may leave +1e-17
    pred = encode_bits(x, datatype).copy()
    flat = pred.reshape(n, -1)
    cols = flat.shape[1]
    edge = edge_prediction_values(datatype, kind)
    for r in rng.choice(n, n // 4, replace=False):
        flat[r, rng.integers(0, cols, 2)] = rng.choice(edge, 2)
    bad_rows = rng.random(n) < 0.35
    bad_rows[0], bad_rows[-1] = True, False  # at least one of each, however few the rows
    bad = bad_prediction_values(datatype, kind)
    targets: np.ndarray
    if classes is None:
        targets = np.where(rng.random(n) < 0.5, rng.integers(0, 2, n), rng.random(n)).astype(np.float64)
    elif layout == "index":
        targets = rng.integers(0, classes, n).astype(np.int64)
    else:
        targets = softmax(rng.normal(0, 2, (n, classes))).astype(np.float32 if layout == "soft32" else np.float64)
    tflat = targets.reshape(n, -1)
    for r in np.flatnonzero(bad_rows):
        what = rng.integers(0, 3)
        if what == 0:
            flat[r, rng.integers(0, cols)] = rng.choice(bad)
        elif what == 1:
            flat[r, rng.integers(0, cols, 3)] = rng.choice(bad, 3)
        elif targets.dtype == np.int64:
            tflat[r, 0] = rng.choice([-1, classes, classes + 7, 2**62, -(2**63), 2**63 - 1])
        else:
            tflat[r, rng.integers(0, tflat.shape[1])] = rng.choice([np.nan, np.inf, -np.inf, -0.1, 1.5, -1e-300])
    # Valid edge targets elsewhere: exact 0, 1 and -0.
    if targets.dtype != np.int64:
        for r in rng.choice(n, n // 5, replace=False):
            tflat[r, rng.integers(0, tflat.shape[1])] = rng.choice([0.0, -0.0, 1.0])
    return raw_batch(pred, targets, kind, datatype), oracle_invalid(pred, targets, kind)


def rows_of(batch: Batch, rows: np.ndarray) -> Batch:
    """The batch of only these rows (a boolean mask), in order."""
    return raw_batch(
        batch.predictions[rows],
        batch.targets[rows],
        ("probs", "logits", "log_probs")[int(batch.kind)],
        batch.prediction_datatype,
    )


SCORED_ARRAYS = ("loss", "focal", "correct", "true_class", "confidence", "brier", "entropy", "unnormalized")


def copy_scores(scores: SampleScores) -> dict[str, Any]:
    """Every per-row array and the count, copied out of the backend's buffers."""
    out: dict[str, Any] = {name: np.array(getattr(scores, name), copy=True) for name in (*SCORED_ARRAYS, "invalid")}
    out["unnormalized_rows"] = scores.unnormalized_rows
    return out


def select(scores: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """These rows (a boolean mask) of copy_scores' arrays."""
    return {name: value[rows] if isinstance(value, np.ndarray) else value for name, value in scores.items()}


def assert_same_rows(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Bit for bit, every scored array of ``got`` against ``want``'s (copy_scores records)."""
    for name in SCORED_ARRAYS:
        a, b = got[name], want[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        bits = f"u{a.itemsize}"
        differ = np.flatnonzero(a.view(bits) != b.view(bits))
        assert differ.size == 0, f"{name} differs in rows {differ[:10]}: {a[differ[:3]]} against {b[differ[:3]]}"
