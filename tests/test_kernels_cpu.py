"""CPU kernels against independent float64 references, scikit-learn and PyTorch."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
from numba import njit
from sklearn.metrics import log_loss

from tests import naive
from tests.conftest import default_params, make_batch, softmax
from tests.kernel_cases import (
    DATATYPES,
    ENTROPY_EXACT,
    ENTROPY_F32,
    FAST_F32,
    KINDS,
    NP_DTYPE,
    assert_scores,
    cpu_tolerance,
    entropy_case,
    predictions,
    reference,
    reference_case,
    reference_cases,
)
from xentd import wire
from xentd.jit import kernel_array
from xentd.kernels import ScoringParams, cpu
from xentd.kernels.cpu import CpuBackend
from xentd.predstats import row_stats
from xentd.validate import DATATYPE_EPS, Batch, InputKind, TargetKind


@reference_cases(DATATYPES, [(None, 400), (2, 300), (3, 300), (10, 200), (257, 40), (50_000, 4)])
def test_matches_float64_reference(
    any_backend: CpuBackend, datatype: str, kind: str, classes: int | None, n: int, targets: str
) -> None:
    batch = reference_case(datatype, kind, classes, n, targets)
    assert_scores(any_backend.score(batch, default_params(batch)), reference(batch, kind), cpu_tolerance(batch))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_focal_gamma(backend: CpuBackend, gamma: float) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(0, 2, (100, 5))
    y = rng.integers(0, 5, 100)
    batch = make_batch(x, y, "logits")
    scores = backend.score(batch, default_params(batch, gamma))
    ref = naive.multiclass(x, y, "logits", eps=batch.dtype_eps, gamma=gamma)
    np.testing.assert_allclose(scores.focal, ref.focal, rtol=1e-12, atol=1e-14)
    if gamma == 0.0:
        np.testing.assert_allclose(scores.focal, scores.loss, rtol=1e-15)


def test_float32_logits_keep_relative_accuracy_for_tiny_losses(backend: CpuBackend) -> None:
    """A confident, correct row must not round its loss to 0 (or to float32's 1e-7 floor)."""
    x = np.zeros((4, 1000), np.float32)
    x[:, 0] = [40.0, 20.0, 10.0, 5.0]
    x[3, 1] = 5.0  # a tie for the maximum; class 0 is still the first maximum, so top-1 correct
    batch = make_batch(x, np.zeros(4, np.int64), "logits")
    scores = backend.score(batch, default_params(batch))
    expected = [
        np.log1p(999 * np.exp(-40.0)),
        np.log1p(999 * np.exp(-20.0)),
        np.log1p(999 * np.exp(-10.0)),
        np.log(2.0 + 998 * np.exp(-5.0)),
    ]
    np.testing.assert_allclose(scores.loss, expected, rtol=5e-6)
    np.testing.assert_array_equal(scores.correct, [1, 1, 1, 1])


def test_serial_and_parallel_builds_agree_bitwise() -> None:
    rng = np.random.default_rng(3)
    batch = make_batch(rng.normal(0, 3, (5000, 37)).astype(np.float32), rng.integers(0, 37, 5000), "logits")
    a = CpuBackend(parallel_threshold=1 << 62).score(batch, default_params(batch))
    a_loss = a.loss.copy()
    b = CpuBackend(parallel_threshold=0).score(batch, default_params(batch))
    np.testing.assert_array_equal(a_loss, b.loss)


# --- label-free entropy ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("classes", [None, 2, 3, 10, 33, 1000])
@pytest.mark.parametrize("targets", ["index", "soft"])
def test_entropy_matches_float64_oracle_and_predstats(
    any_backend: CpuBackend, dtype: Any, kind: str, classes: int | None, targets: str
) -> None:
    """Every kernel path's entropy: binary (the vectorised loops at gamma 2, the libm loop
    otherwise), the small-C transposed blocks (several, and a partial one) and the wide rows
    (two float32 blocks at 1000 classes), class-index and soft targets."""
    n = 40 if classes == 1000 else cpu.SMALL_ROWS + 37
    batch = entropy_case(dtype, kind, classes, n, targets, seed=(classes or 1) * 3 + len(kind))
    # The float32 class-index path takes each term in float32 (xentd.kernels.cpu's docstring).
    fast = batch.predictions.dtype == np.float32 and not batch.binary and targets == "index"
    want = naive.entropy(batch.predictions, kind)
    predstats_h, _ = row_stats(batch.predictions, int(batch.kind))
    for gamma in (2.0, 0.5):
        h = any_backend.score(batch, default_params(batch, gamma)).entropy
        assert h is not None
        # Float32 probs terms are one float32 log and product each, all of one sign: 1e-6.
        near = {**ENTROPY_F32, "rtol": 1e-6} if fast and kind == "probs" else ENTROPY_F32
        np.testing.assert_allclose(h, want, **(near if fast else ENTROPY_EXACT))
        # What the pipeline takes today. Float32 logits rows take predstats' float32 path,
        # and float64's log s (kernels and predstats alike) is good to an absolute ~1e-16;
        # float32 class-index probs and log_probs rows to the kernels' float32 terms.
        f32_logits = batch.predictions.dtype == np.float32 and not batch.binary and kind == "logits"
        near_predstats = {**ENTROPY_F32, "atol": ENTROPY_EXACT["atol"]} if f32_logits or fast else ENTROPY_EXACT
        np.testing.assert_allclose(h, predstats_h, **near_predstats)
    if classes is not None and kind == "logits":  # the uniform row, exactly (a float32 log-probability is not)
        assert h[0] == pytest.approx(math.log(classes), rel=1e-6 if fast else 1e-13)
    assert h[1] == 0.0 or classes is None


def test_fp64_probs_entropy_across_blocks_of_rows(any_backend: CpuBackend) -> None:
    """FP64 probs rows of at most SMALL_C classes sum p log p across rows (cpu._plogp_rows), in
    blocks of SMALL_ROWS within chunks of ceil(n / WIDE_CHUNKS) rows: here two full blocks and
    a partial one in every chunk, against the float64 oracle."""
    n = cpu.WIDE_CHUNKS * (2 * cpu.SMALL_ROWS + 37)
    batch = entropy_case(np.float64, "probs", 3, n, "index", seed=41)
    h = any_backend.score(batch, default_params(batch)).entropy
    assert h is not None
    np.testing.assert_allclose(h, naive.entropy(batch.predictions, "probs"), **ENTROPY_EXACT)


# --- scikit-learn ---------------------------------------------------------------


@pytest.mark.parametrize("classes", [None, 2, 3, 10, 1000])
def test_weighted_mean_equals_sklearn_fp64(backend: CpuBackend, classes: int | None) -> None:
    rng = np.random.default_rng(11)
    n = 2000
    p = predictions(rng, n, classes, "probs")
    y = rng.integers(0, classes or 2, n)
    w = rng.random(n) * 3
    batch = make_batch(p, y, "probs", weights=w)
    ours = naive.weighted_mean(backend.score(batch, default_params(batch)).loss, w)
    labels = None if classes is None else list(range(classes))
    ref = log_loss(y, p, sample_weight=w, labels=labels)
    assert ours == pytest.approx(ref, rel=1e-13)


@pytest.mark.parametrize("classes", [None, 10])
@pytest.mark.parametrize("datatype,rel", [("FP32", 1e-5), ("FP16", 3e-2)])
def test_matches_sklearn_in_lower_precision(
    backend: CpuBackend, classes: int | None, datatype: str, rel: float
) -> None:
    """sklearn computes in the input dtype; we widen and accumulate in float64.

    So against sklearn on the narrow dtype we agree to that dtype's precision, and
    against sklearn on the same values in float64 (with the same eps) to the last digit.
    """
    rng = np.random.default_rng(5)
    n = 1000
    p64 = predictions(rng, n, classes, "probs")
    y = rng.integers(0, classes or 2, n)
    p = p64.astype(NP_DTYPE[datatype])
    if classes is not None:
        p = p / p.sum(axis=1, keepdims=True, dtype=np.float64).astype(p.dtype)
    batch = make_batch(p, y, "probs")
    ours = float(backend.score(batch, default_params(batch)).loss.mean())
    labels = None if classes is None else list(range(classes))
    with warnings.catch_warnings():
        # sklearn warns when narrow-dtype rows do not sum to 1 at its tolerance; not under test here.
        warnings.simplefilter("ignore", UserWarning)
        assert ours == pytest.approx(log_loss(y, p, labels=labels), rel=rel)
    # Same values in float64, clipped with the narrow dtype's eps, as xentd does.
    eps = float(np.finfo(NP_DTYPE[datatype]).eps)
    wide = p.astype(np.float64)
    if classes is None:
        wide = np.clip(wide, eps, 1 - eps)
        ref = -np.mean(y * np.log(wide) + (1 - y) * np.log(1 - wide))
    else:
        ref = -np.mean(np.log(np.maximum(wide[np.arange(n), y], eps)))
    assert ours == pytest.approx(ref, rel=1e-13)


def test_clipping_at_zero_and_one_matches_sklearn(backend: CpuBackend) -> None:
    p = np.array([0.0, 1.0, 0.0, 1.0, 0.5, 1e-300])
    y = np.array([0, 1, 1, 0, 1, 1])
    batch = make_batch(p, y, "probs")
    scores = backend.score(batch, default_params(batch))
    eps = np.finfo(np.float64).eps
    assert scores.loss[2] == pytest.approx(-math.log(eps), rel=1e-15)
    assert scores.loss[3] == pytest.approx(-math.log(eps), rel=1e-15)
    assert scores.loss[5] == pytest.approx(-math.log(eps), rel=1e-15)
    assert float(scores.loss.mean()) == pytest.approx(log_loss(y, p), rel=1e-14)


def test_multiclass_clipping_differs_from_sklearn_by_at_most_eps(backend: CpuBackend) -> None:
    """xentd clips multiclass probabilities below only (max(p, eps)); sklearn also clips
    above at 1 - eps, which adds -log(1 - eps) ~ eps to a perfect prediction."""
    p = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8]])
    y = np.array([0, 0, 1])
    batch = make_batch(p, y, "probs")
    scores = backend.score(batch, default_params(batch))
    eps = np.finfo(np.float64).eps
    np.testing.assert_allclose(scores.loss, [0.0, -math.log(eps), -math.log(eps)], rtol=1e-15)
    assert abs(float(scores.loss.mean()) - log_loss(y, p, labels=[0, 1, 2])) <= eps


# --- edge values ----------------------------------------------------------------


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_extreme_logits(backend: CpuBackend, datatype: str) -> None:
    x = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype=NP_DTYPE[datatype])
    y = np.array([0, 1, 2])
    batch = make_batch(x, y, "logits")
    scores = backend.score(batch, default_params(batch))
    np.testing.assert_allclose(scores.loss, [0.0, 2e4, math.log(3)], rtol=cpu_tolerance(batch)["rtol"], atol=0)
    assert np.isfinite(scores.focal).all()
    xb = np.array([1e4, -1e4, 1e4, -1e4], dtype=NP_DTYPE[datatype])
    yb = np.array([1, 0, 0, 1])
    batch = make_batch(xb, yb, "logits")
    scores = backend.score(batch, default_params(batch))
    np.testing.assert_allclose(scores.loss, [0.0, 0.0, 1e4, 1e4], rtol=1e-15, atol=0)


def test_tiny_and_subnormal_probabilities(backend: CpuBackend) -> None:
    eps32 = float(np.finfo(np.float32).eps)
    p = np.array([[1e-45, 1.0 - 1e-45], [1e-30, 1.0], [0.25, 0.75]], dtype=np.float32)
    y = np.array([0, 0, 0])
    batch = make_batch(p, y, "probs")
    scores = backend.score(batch, default_params(batch))
    np.testing.assert_allclose(scores.loss, [-math.log(eps32), -math.log(eps32), math.log(4)], rtol=1e-7)


def test_log_probs_edges(backend: CpuBackend) -> None:
    x = np.array([[0.0, -1e4], [-1e4, 0.0]])
    batch = make_batch(x, np.array([1, 1]), "log_probs")
    np.testing.assert_array_equal(backend.score(batch, default_params(batch)).loss, [1e4, 0.0])
    # Binary: log p = 0 with label 0 means p == 1; 1 - p is floored at eps, as for probs.
    batch = make_batch(np.array([0.0, -1e-20, -1e4]), np.array([0, 0, 1]), "log_probs")
    loss = backend.score(batch, default_params(batch)).loss
    eps = np.finfo(np.float64).eps
    np.testing.assert_allclose(loss, [-math.log(eps), -math.log(eps), 1e4], rtol=1e-15)


def test_unnormalized_rows_are_scored_as_sent(backend: CpuBackend) -> None:
    p = np.array([[0.5, 0.5], [0.4, 0.4], [0.9, 0.3]])
    batch = make_batch(p, np.array([0, 0, 0]), "probs")
    scores = backend.score(batch, ScoringParams(eps=1e-15, focal_gamma=2.0, normalization_tolerance=1e-3))
    assert scores.unnormalized_rows == 2
    np.testing.assert_allclose(scores.loss, -np.log([0.5, 0.4, 0.9]), rtol=1e-15)


def test_empty_batch(backend: CpuBackend) -> None:
    batch = make_batch(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), "logits")
    scores = backend.score(batch, default_params(batch))
    assert scores.loss.shape == (0,) and scores.unnormalized_rows == 0


# --- PyTorch --------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("classes", [2, 10, 1000, 50_000])
def test_logits_equal_torch_cross_entropy(backend: CpuBackend, classes: int) -> None:
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(classes)
    n = max(4, 200_000 // classes)
    x = rng.normal(0, 4, (n, classes))
    y = rng.integers(0, classes, n)
    batch = make_batch(x, y, "logits")
    ref = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(y), reduction="none").numpy()
    np.testing.assert_allclose(backend.score(batch, default_params(batch)).loss, ref, rtol=1e-13, atol=1e-14)
    # Soft targets: cross_entropy with class probabilities.
    t = softmax(rng.normal(0, 1, (n, classes)))
    batch = make_batch(x, t, "logits")
    ref = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), reduction="none").numpy()
    np.testing.assert_allclose(backend.score(batch, default_params(batch)).loss, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.torch
def test_float32_logits_match_torch_float32(backend: CpuBackend) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.normal(0, 4, (512, 32_000)).astype(np.float32)
    y = rng.integers(0, 32_000, 512)
    batch = make_batch(x, y, "logits")
    ours = backend.score(batch, default_params(batch)).loss
    ref32 = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(y), reduction="none")
    np.testing.assert_allclose(ours, ref32.numpy(), rtol=2e-6)
    ref64 = torch.nn.functional.cross_entropy(torch.from_numpy(x).double(), torch.from_numpy(y), reduction="none")
    # Closer to the float64 truth than torch's own float32 result is.
    np.testing.assert_allclose(ours, ref64.numpy(), **FAST_F32)
    assert np.abs(ours - ref64.numpy()).max() <= np.abs(ref32.numpy() - ref64.numpy()).max()


@pytest.mark.torch
def test_binary_logits_equal_torch_bce_with_logits(backend: CpuBackend) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, 5, 1000), [1e4, -1e4, 0.0, 30.0, -30.0]])
    t = np.concatenate([rng.random(1000), [0.0, 1.0, 0.5, 0.0, 1.0]])
    batch = make_batch(x, t, "logits")
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(x), torch.from_numpy(t), reduction="none"
    ).numpy()
    np.testing.assert_allclose(backend.score(batch, default_params(batch)).loss, ref, rtol=1e-13, atol=1e-15)


# --- the vectorisable float64 exp and log -------------------------------------


def _ulps(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest distance from ``ref`` in units of ``ref``'s last place."""
    return float(np.max(np.abs(got - ref) / np.spacing(np.abs(ref))))


def _elementwise(f: Any) -> Any:
    """A jitted loop that writes f(x[i]) into out[i], for one of cpu's inlined scalar functions."""

    @njit
    def apply(x: np.ndarray, out: np.ndarray) -> None:
        for i in range(x.shape[0]):
            out[i] = f(x[i])

    return apply


_apply_exp = _elementwise(cpu.exp_nonpos64)
_apply_log = _elementwise(cpu.log64)
_apply_log1p = _elementwise(cpu.log1p64)


def test_exp_nonpos64_within_an_ulp_of_numpy() -> None:
    rng = np.random.default_rng(21)
    x = -np.concatenate([rng.random(200_000) * 745, rng.random(100_000), rng.random(10_000) * 1e-9])
    x = np.concatenate([x, [0.0, -1e-300, -708.39, -708.4, -709.0, -744.4, -745.1, -745.2, -746.0, -1e4]])
    got = np.empty_like(x)
    _apply_exp(x, got)
    ref = np.exp(x)
    normal = ref >= np.finfo(np.float64).tiny
    assert _ulps(got[normal], ref[normal]) <= 1.0
    # Subnormal results: off by at most one subnormal step; below exp(-745.13) exactly 0.
    np.testing.assert_allclose(got[~normal], ref[~normal], rtol=0, atol=5e-324)
    assert got[-1] == 0.0 and got[-2] == 0.0


def test_log64_and_log1p64_within_an_ulp_of_numpy() -> None:
    rng = np.random.default_rng(22)
    x = np.exp(rng.uniform(-707, 709, 200_000))
    x = np.concatenate([x, 1 + rng.normal(0, 1e-9, 10_000), [1.0, 2.0, 0.5, np.sqrt(2), np.sqrt(0.5), 2.3e-308]])
    got = np.empty_like(x)
    _apply_log(x, got)
    ref = np.log(x)
    nonzero = ref != 0
    assert _ulps(got[nonzero], ref[nonzero]) <= 1.0
    assert (got[~nonzero] == 0).all()
    y = np.concatenate(
        [rng.random(100_000), -rng.random(100_000), rng.normal(0, 1e-12, 10_000), [0.0, 1e-300, -1 + 2**-52, 1.0]]
    )
    got = np.empty_like(y)
    _apply_log1p(y, got)
    ref = np.log1p(y)
    nonzero = ref != 0
    assert _ulps(got[nonzero], ref[nonzero]) <= 2.0
    assert (got[~nonzero] == 0).all()


_apply_log32 = _elementwise(cpu.log32)


def test_log32_within_an_ulp_of_numpy_over_float32s_positive_range() -> None:
    """Every 61st positive finite float32, subnormals included, and the edges."""
    bits = np.arange(1, 0x7F800000, 61, dtype=np.uint32)
    x = np.concatenate(
        [bits.view(np.float32), np.array([1.0, 2.0, 0.5, 1e-45, 1.1754942e-38, 3.4028235e38], np.float32)]
    )
    got = np.empty_like(x)
    _apply_log32(x, got)
    ref = np.log(x.astype(np.float64))
    nonzero = ref != 0
    ulps = np.abs(got[nonzero].astype(np.float64) - ref[nonzero]) / np.spacing(np.abs(ref[nonzero]).astype(np.float32))
    assert float(ulps.max()) <= 1.0
    assert (got[~nonzero] == 0).all()


@pytest.mark.parametrize("eps", [*sorted(DATATYPE_EPS.values()), 1e-12, 0.25])
def test_binary_probs_losses_are_those_of_the_clipped_p(backend: CpuBackend, eps: float) -> None:
    """The vectorised binary probs loop takes the loss's logs from _prob_logs(x) where x is
    not clipped, and the logs at the bounds where it is: exactly the old log64(pc) and
    log1p64(-pc), checked over the 4,000 floats around each bound, random probabilities and
    the ends, for every datatype's eps and two configured ones (xentd.config allows (0, 0.5))."""
    steps = np.arange(-2000, 2000)
    x = np.concatenate(
        [
            eps + steps * np.spacing(eps),
            (1.0 - eps) + steps * np.spacing(1.0 - eps),
            np.random.default_rng(5).random(100_000),
            [0.0, 1.0, 5e-324, 1.0 - 2.0**-53],
        ]
    )
    x = x[(x >= 0.0) & (x <= 1.0)]
    t = np.where(np.arange(x.size) % 2 == 0, 1.0, 0.0)
    batch = make_batch(x, t, "probs")
    params = ScoringParams(eps=eps, focal_gamma=2.0, normalization_tolerance=1e-3)
    got = backend.score(batch, params).loss
    pc = np.minimum(np.maximum(x, eps), 1.0 - eps)
    want = np.empty((x.size, 2))
    _apply_log(pc, want[:, 0])
    _apply_log1p(-pc, want[:, 1])
    np.testing.assert_array_equal(got, -np.where(t == 1.0, want[:, 0], want[:, 1]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 0.5, 5.0])
def test_binary_focal_gamma(any_backend: CpuBackend, kind: str, gamma: float) -> None:
    """gamma = 2 takes the vectorised loops (logits, probs), any other gamma and log_probs the libm loop:
    all agree with the reference."""
    rng = np.random.default_rng(8)
    x = predictions(rng, 3000, None, kind)
    t = np.where(rng.random(3000) < 0.3, rng.random(3000), rng.integers(0, 2, 3000))
    batch = make_batch(x, t, kind)
    ref = naive.binary(batch.predictions, batch.targets, kind, eps=batch.dtype_eps, gamma=gamma)
    assert_scores(any_backend.score(batch, default_params(batch, gamma)), ref)


# --- small-C rows: scored in transposed blocks ----------------------------------


def _with_tied_maxima(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every third row gets a second maximum, at a random other column."""
    x = x.copy()
    rows = np.arange(0, x.shape[0], 3)
    cols = (x[rows].argmax(axis=1) + 1 + rng.integers(0, x.shape[1] - 1, rows.size)) % x.shape[1]
    x[rows, cols] = x[rows].max(axis=1)
    return x


@pytest.mark.parametrize("classes", [2, 10, 47, 48, 49, 64])
@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_small_class_blocks_match_the_reference(any_backend: CpuBackend, classes: int, kind: str) -> None:
    """Several row blocks and a partial one, tied maxima (top-1 is the first), on both sides of cpu.SMALL_C."""
    rng = np.random.default_rng(classes)
    n = 2 * cpu.SMALL_ROWS + 37
    x = _with_tied_maxima(predictions(rng, n, classes, kind).astype(np.float32), rng)
    # Targets: the first maximum, the tied second one, or anything.
    first = x.argmax(axis=1)
    last = classes - 1 - x[:, ::-1].argmax(axis=1)
    y = np.select([rng.random(n) < 0.3, rng.random(n) < 0.5], [first, last], rng.integers(0, classes, n))
    batch = make_batch(x, y, kind)
    ref = reference(batch, kind)
    assert 0 < ref.correct.sum() < n
    assert_scores(any_backend.score(batch, default_params(batch)), ref, cpu_tolerance(batch))


def test_small_class_logits_keep_relative_accuracy_for_tiny_losses(backend: CpuBackend) -> None:
    x = np.zeros((4, 10), np.float32)
    x[:, 0] = [40.0, 20.0, 10.0, 5.0]
    x[3, 1] = 5.0  # a tie for the maximum; class 0 is still the first maximum
    batch = make_batch(x, np.zeros(4, np.int64), "logits")
    scores = backend.score(batch, default_params(batch))
    expected = [np.log1p(9 * np.exp(-40.0)), np.log1p(9 * np.exp(-20.0)), np.log1p(9 * np.exp(-10.0))]
    expected.append(np.log(2.0 + 8 * np.exp(-5.0)))
    np.testing.assert_allclose(scores.loss, expected, rtol=5e-6)
    np.testing.assert_array_equal(scores.correct, [1, 1, 1, 1])


def test_large_batches_score_on_the_serial_build_until_the_parallel_one_is_compiled() -> None:
    rng = np.random.default_rng(4)
    batch = make_batch(rng.normal(0, 3, (4000, 10)).astype(np.float32), rng.integers(0, 10, 4000), "logits")
    deferred = CpuBackend(parallel_threshold=0)
    deferred.warmup(parallel=False)
    real = cpu.KERNELS["index_f32"]
    serial, parallel = real
    calls: list[str] = []

    def score() -> np.ndarray:
        # Which build runs is recorded by wrapping the two dispatchers for the call.
        cpu.KERNELS["index_f32"] = (
            lambda *a: (calls.append("serial"), serial(*a))[1],
            lambda *a: (calls.append("parallel"), parallel(*a))[1],
        )
        try:
            return deferred.score(batch, default_params(batch)).loss.copy()
        finally:
            cpu.KERNELS["index_f32"] = real

    before = score()
    deferred.warmup_parallel()
    after = score()
    assert calls == ["serial", "parallel"]
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_16_bit_batches_are_widened_on_the_host_until_their_builds_are_compiled(datatype: str) -> None:
    """The first warm-up step leaves out the builds that load 16-bit bits (a cold start is ready
    sooner); meanwhile 16-bit batches are widened on the host and scored by the float32 builds,
    with the same results and the same value flags."""
    rng = np.random.default_rng(9)
    x = rng.normal(0, 3, (300, 10)).astype(np.float32)
    x[7, 3] = np.inf  # a row the kernel flags, either way
    bits = x.astype(np.float16).view(np.uint16) if datatype == "FP16" else wire.BF16.from_float32(x).bits.view(np.int16)
    batch = Batch(
        model="m",
        kind=InputKind.LOGITS,
        predictions=kernel_array(bits),
        targets=kernel_array(rng.integers(0, 10, 300)),
        target_kind=TargetKind.INDEX,
        weights=None,
        num_classes=10,
        prediction_datatype=datatype,
        batch_id=None,
        ts=None,
    )
    params = default_params(batch)
    deferred = CpuBackend(parallel_threshold=1 << 62)
    deferred.warmup(parallel=False)
    widened: list[int] = []
    widen = deferred._widen
    deferred._widen = lambda bits: (widened.append(bits.size), widen(bits))[1]  # type: ignore[method-assign]
    before = deferred.score(batch, params)
    before_loss, before_invalid = before.loss.copy(), before.invalid.copy()  # type: ignore[union-attr]
    assert widened == [3000]
    deferred.warmup_parallel()
    after = deferred.score(batch, params)
    assert widened == [3000]  # the 16-bit builds now load the bits themselves
    np.testing.assert_array_equal(before_invalid, after.invalid)  # type: ignore[arg-type]
    assert before_invalid.tolist() == [int(i == 7) for i in range(300)]
    valid = before_invalid == 0
    np.testing.assert_array_equal(before_loss[valid], after.loss[valid])
