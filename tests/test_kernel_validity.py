"""The CPU kernels' own value checks (SampleScores.invalid), their FP16/BF16 loads, their
output buffers, and the binary log_probs entropy's log1mexp.

Every path is covered: binary (the vectorised logits and probs loops at gamma 2, the
libm loop otherwise), class-index rows of at most cpu.SMALL_C classes (transposed
blocks, several and a partial one) and wider (the float32 spans), FP64 class-index
rows, and soft targets of both float types; each on the serial and the parallel build.
"""

from __future__ import annotations

import decimal
import math
from typing import Any

import numpy as np
import pytest

from tests.conftest import default_params
from tests.kernel_cases import (
    BITS_DTYPE,
    DATATYPES,
    KINDS,
    assert_same_rows,
    copy_scores,
    oracle_invalid,
    planted_case,
    raw_batch,
    rows_of,
    select,
    widen_on_host,
)
from xentd.kernels import Router, ScoringParams, cpu
from xentd.kernels.base import OutputBuffers, warmup_batches
from xentd.kernels.cpu import CpuBackend
from xentd.validate import DATATYPE_EPS, Batch

# (classes, target layout, rows): binary; class-index rows on both sides of SMALL_C (two
# row blocks and a partial one) and wide; soft rows of float32 and float64 targets.
SHAPES = [
    (None, "binary", 5000),
    (2, "index", 700),
    (10, "index", 700),
    (48, "index", 700),
    # Enough rows for the FP64 probs rows' transposed blocks (cpu._plogp_rows) to span two full
    # blocks and a partial one in every chunk of ceil(n / WIDE_CHUNKS) rows.
    (3, "index", cpu.WIDE_CHUNKS * (2 * cpu.SMALL_ROWS + 37)),
    (49, "index", 120),
    (300, "index", 60),
    (3, "soft64", 300),
    (10, "soft32", 300),
    (300, "soft64", 40),
]


def _params(datatype: str, gamma: float) -> ScoringParams:
    eps = DATATYPE_EPS[datatype]
    return ScoringParams(eps=eps, focal_gamma=gamma, normalization_tolerance=math.sqrt(eps))


def _seed(*parts: Any) -> int:
    return sum(ord(ch) * (i + 1) for i, ch in enumerate(repr(parts)))


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("classes,layout,n", SHAPES)
def test_invalid_rows_are_flagged_and_valid_rows_score_as_if_alone(
    any_backend: CpuBackend, datatype: str, kind: str, classes: int | None, layout: str, n: int
) -> None:
    """NaN, infinities, out-of-range values, class indices and soft targets planted in random
    rows: ``invalid`` is the float64 oracle's, and every valid row's outputs are, bit for bit,
    those of the same rows scored alone in a batch without the invalid ones."""
    batch, want = planted_case(datatype, kind, classes, n, layout, seed=_seed(datatype, kind, classes, layout))
    assert 0 < want.sum() < n
    for gamma in (2.0, 0.5):
        got = copy_scores(any_backend.score(batch, _params(datatype, gamma)))
        np.testing.assert_array_equal(got["invalid"], want.astype(np.uint8))
        clean = copy_scores(any_backend.score(rows_of(batch, ~want), _params(datatype, gamma)))
        assert not clean["invalid"].any()
        assert_same_rows(select(got, ~want), clean)
        assert got["unnormalized_rows"] == clean["unnormalized_rows"]


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("classes,layout,n", SHAPES)
def test_fp16_and_bf16_bits_score_as_the_host_widened_float32(
    any_backend: CpuBackend, datatype: str, kind: str, classes: int | None, layout: str, n: int
) -> None:
    """The wire's bits (uint16, int16) widened in the kernel give, bit for bit, what the same
    values widened on the host give through the float32 kernels; the flags too."""
    batch, want = planted_case(datatype, kind, classes, n, layout, seed=_seed("bits", datatype, kind, classes))
    assert batch.predictions.dtype == BITS_DTYPE[datatype]
    wide = raw_batch(widen_on_host(batch.predictions), batch.targets, kind, datatype)
    assert wide.predictions.dtype == np.float32
    for gamma in (2.0, 0.5):
        got = copy_scores(any_backend.score(batch, _params(datatype, gamma)))
        ref = copy_scores(any_backend.score(wide, _params(datatype, gamma)))
        np.testing.assert_array_equal(got["invalid"], want.astype(np.uint8))
        np.testing.assert_array_equal(ref["invalid"], want.astype(np.uint8))
        assert_same_rows(select(got, ~want), select(ref, ~want))


def _every_pattern(datatype: str) -> np.ndarray:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    return bits.view(BITS_DTYPE[datatype])


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_16_bit_pattern(any_backend: CpuBackend, datatype: str, kind: str) -> None:
    """All 65,536 bit patterns (zeros of both signs, subnormals, normals, infinities, quiet and
    signalling NaNs): as binary predictions, one a row; as rows of 16 classes (transposed
    blocks) and of 128 (the float32 spans), with class-index targets. Flags against the
    oracle, and the valid rows bit for bit against the host-widened float32 batch."""
    bits = _every_pattern(datatype)
    rng = np.random.default_rng(_seed(datatype, kind))
    for pred in (bits, bits.reshape(-1, 16), rng.permutation(bits).reshape(-1, 128)):
        n = pred.shape[0]
        targets = rng.random(n) if pred.ndim == 1 else rng.integers(0, pred.shape[1], n)
        batch = raw_batch(pred, targets, kind, datatype)
        wide = raw_batch(widen_on_host(pred), targets, kind, datatype)
        want = oracle_invalid(pred, targets, kind)
        got = copy_scores(any_backend.score(batch, _params(datatype, 2.0)))
        ref = copy_scores(any_backend.score(wide, _params(datatype, 2.0)))
        np.testing.assert_array_equal(got["invalid"], want.astype(np.uint8))
        assert_same_rows(select(got, ~want), select(ref, ~want))
        if pred.ndim == 1:
            assert 0 < (~want).sum() < n


def test_huge_and_negative_class_indices_are_clamped_not_read(backend: CpuBackend) -> None:
    """Indices far outside the row, at both ends of int64: flagged, and the rows around them unharmed."""
    rng = np.random.default_rng(3)
    for classes in (5, 200):  # transposed blocks, and the wide spans
        x = rng.normal(0, 2, (6, classes)).astype(np.float32)
        y = np.array([0, -(2**63), 2**63 - 1, classes, -1, classes - 1])
        scores = copy_scores(backend.score(raw_batch(x, y, "logits", "FP32"), _params("FP32", 2.0)))
        assert scores["invalid"].tolist() == [0, 1, 1, 1, 1, 0]
        valid = np.array([True, False, False, False, False, True])
        alone = copy_scores(backend.score(raw_batch(x[valid], y[valid], "logits", "FP32"), _params("FP32", 2.0)))
        assert_same_rows(select(scores, valid), alone)


def test_outside_agrees_with_the_rules_on_every_float32_class() -> None:
    """xentd.jit.outside, compiled and in Python (what CUDA's simulator runs), on values of every
    class at both widths: the rules in NumPy are the oracle."""
    from numba import njit

    from xentd.jit import key_bounds, outside

    @njit
    def compiled(x: np.ndarray, kind: int, out: np.ndarray) -> None:
        lo, span = key_bounds(kind, x)
        for i in range(x.shape[0]):
            out[i] = outside(x[i], lo, span)

    special = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-300, -1e-300, 5e-324, -5e-324, np.inf, -np.inf, np.nan, -np.nan]
    rng = np.random.default_rng(9)
    for dtype, bits in ((np.float32, np.uint32), (np.float64, np.uint64)):
        randoms = rng.integers(0, 2 ** (8 * np.dtype(dtype).itemsize), 20_000, dtype=np.uint64).astype(bits)
        with np.errstate(over="ignore"):
            edges = np.array([*special, np.nextafter(1.0, 2.0)]).astype(dtype)
        x = np.concatenate([edges, np.nextafter(edges, dtype(2)), randoms.view(dtype)])
        for code, kind in enumerate(("probs", "logits", "log_probs")):
            with np.errstate(invalid="ignore"):
                wide = x.astype(np.float64)
                want = ~np.isfinite(wide)
                want |= {"probs": (wide < 0) | (wide > 1), "logits": np.zeros_like(want), "log_probs": wide > 0}[kind]
            got = np.empty(x.shape, np.bool_)
            compiled(x, code, got)
            np.testing.assert_array_equal(got, want)
            lo, span = key_bounds(code, x)
            np.testing.assert_array_equal([outside(v, lo, span) for v in x[:300]], want[:300])


def test_no_compilation_after_warmup_for_16_bit_predictions() -> None:
    """Warm-up compiles the uint16 and int16 signatures of every family, serial and parallel."""
    backend = CpuBackend(parallel_threshold=64)
    backend.warmup()
    dispatchers = [k for pair in cpu.KERNELS.values() for k in pair]
    before = [len(d.signatures) for d in dispatchers]
    for datatype in ("FP16", "BF16"):
        for kind in KINDS:
            for classes, layout, n in SHAPES:
                batch, _ = planted_case(datatype, kind, classes, min(n, 200), layout, seed=1)
                backend.score(batch, _params(datatype, 2.0))
    assert [len(d.signatures) for d in dispatchers] == before
    assert {b.predictions.dtype for b in warmup_batches()} >= {np.dtype(np.uint16), np.dtype(np.int16)}


# --- output buffers -----------------------------------------------------------------


def _batch(seed: int, n: int) -> Batch:
    rng = np.random.default_rng(seed)
    return raw_batch(rng.normal(0, 2, (n, 7)).astype(np.float32), rng.integers(0, 7, n), "logits", "FP32")


def test_results_in_outputs_of_their_own_live_at_once(backend: CpuBackend) -> None:
    """score(..., out=) writes into the caller's buffers: the results of several batches live at
    once, and none of them is the backend's own buffers, which the next plain call reuses."""
    batches = [_batch(seed, n) for seed, n in ((1, 40), (2, 3000), (3, 5))]
    outs = [backend.new_outputs() for _ in batches]
    results = [backend.score(b, default_params(b), out) for b, out in zip(batches, outs, strict=True)]
    own = backend.score(_batch(4, 100), default_params(batches[0]))
    for batch, out, scores in zip(batches, outs, results, strict=True):
        assert np.shares_memory(scores.loss, out.arrays.loss) and not np.shares_memory(scores.loss, own.loss)
        assert scores.invalid is not None and np.shares_memory(scores.invalid, out.arrays.invalid)
        alone = copy_scores(CpuBackend().score(batch, default_params(batch)))
        assert_same_rows(copy_scores(scores), alone)
    # Grow-only: a smaller batch reuses the same arrays.
    arrays = outs[1].arrays
    backend.score(batches[2], default_params(batches[2]), outs[1])
    assert outs[1].arrays is arrays


def test_router_scores_into_the_callers_outputs(backend: CpuBackend) -> None:
    router = Router(backend, None, default="cpu", per_model={}, cuda_min_elements=0)
    out = router.new_outputs()
    assert isinstance(out, OutputBuffers)
    batch = _batch(5, 50)
    scores = router.score(batch, default_params(batch), out)
    assert np.shares_memory(scores.brier, out.arrays.brier)
    assert scores.unnormalized is not None and scores.unnormalized.shape == (50,)


def test_unnormalized_rows_counts_valid_rows_only(backend: CpuBackend) -> None:
    """An invalid row's unnormalized flag is unspecified, so the count leaves it out."""
    p = np.array([[0.5, 0.5], [0.4, 0.4], [0.9, 0.3], [np.nan, 0.2], [1.5, 0.5]])
    scores = backend.score(raw_batch(p, np.zeros(5, np.int64), "probs", "FP64"), _params("FP64", 2.0))
    assert scores.invalid is not None and scores.unnormalized is not None
    assert scores.invalid.tolist() == [0, 0, 0, 1, 1]
    assert scores.unnormalized[:3].tolist() == [0, 1, 1]
    assert scores.unnormalized_rows == 2


# --- the binary log_probs entropy ---------------------------------------------------------


def binary_entropy_reference(x: float) -> float:
    """H = -(p log p + (1 - p) log(1 - p)) with p = exp(x), in 400-digit decimal arithmetic:
    enough for 1 - p at x = -1e-300 and for log(1 - p) at x = -700 (p = 1e-304)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 400
        lp = decimal.Decimal(x)  # exact: a float64 is a dyadic rational
        p = lp.exp()
        q = 1 - p
        return float(-(p * lp) - (q * q.ln() if q > 0 else 0))


# Confident rows both ways (p near 1: x near 0; p near 0: x very negative), and around -ln 2.
CONFIDENT_LOG_PROBS = [
    -1e-300,
    -1e-16,
    -1e-12,
    -1e-8,
    -0.5,
    -math.log(2.0) * (1 + 2**-52),
    -math.log(2.0),
    -math.log(2.0) * (1 - 2**-52),
    -0.7,
    -1.0,
    -10.0,
    -40.0,
    -100.0,
    -700.0,
]


def test_binary_log_probs_entropy_is_accurate_for_confident_rows(any_backend: CpuBackend) -> None:
    """Within 4 ulps of the truth, relative: log(1 - p) from the rounded 1 - p would give -40's
    entropy 2% low (1 - p rounds to 1, and its term p vanishes)."""
    x = np.array(CONFIDENT_LOG_PROBS)
    ref = np.array([binary_entropy_reference(v) for v in x])
    batch = raw_batch(x, np.ones_like(x), "log_probs", "FP64")
    for gamma in (2.0, 0.5):
        h = any_backend.score(batch, _params("FP64", gamma)).entropy
        assert h is not None
        np.testing.assert_allclose(h, ref, rtol=4 * 2.0**-52, atol=0)
