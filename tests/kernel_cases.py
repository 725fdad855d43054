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
