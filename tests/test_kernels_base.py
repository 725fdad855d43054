"""The output scratch every backend allocates through (xentd.kernels.base.OutputBuffers).

That warm-up covers every layout is tests/test_warmup.py's."""

from __future__ import annotations

import numpy as np

from xentd.kernels.base import OUTPUT_DTYPES, OutputBuffers, Outputs


def test_output_buffers_only_grow_and_keep_every_dtype() -> None:
    allocated: list[int] = []

    def allocate(n: int, dtype: np.dtype) -> np.ndarray:  # type: ignore[type-arg]
        allocated.append(n)
        return np.empty(n, dtype)

    out = OutputBuffers(allocate, capacity=4)
    assert [a.dtype for a in out.arrays] == list(OUTPUT_DTYPES) and out.capacity == 4
    first = out.arrays
    out.reserve(4)
    assert out.arrays is first  # big enough: nothing allocated
    out.reserve(5)
    assert out.capacity == 8  # at least doubling
    out.reserve(100)
    assert out.capacity == 100
    k = len(OUTPUT_DTYPES)  # one array per output
    assert allocated == [4] * k + [8] * k + [100] * k


def test_scores_are_views_of_the_first_n_results() -> None:
    out = OutputBuffers(capacity=8)
    for a in out.arrays:
        a[:] = 1
    out.arrays.unnormalized[3:] = 0
    out.arrays.invalid[:] = 0
    s = out.scores(5)
    assert len(s.loss) == len(s.focal) == len(s.correct) == len(s.true_class) == 5
    assert s.entropy is not None
    assert len(s.confidence) == len(s.brier) == len(s.entropy) == 5
    assert np.shares_memory(s.loss, out.arrays.loss)
    assert np.shares_memory(s.brier, out.arrays.brier)
    assert np.shares_memory(s.entropy, out.arrays.entropy)
    assert s.unnormalized_rows == 3  # counted over the first 5 only
    assert Outputs._fields[:4] == ("loss", "focal", "correct", "true_class")
    assert Outputs._fields[-4:] == ("confidence", "brier", "entropy", "invalid")
    assert OUTPUT_DTYPES.entropy == np.float64 and OUTPUT_DTYPES.invalid == np.uint8
    # The per-row flags, as views too.
    assert s.invalid is not None and s.unnormalized is not None
    assert np.shares_memory(s.invalid, out.arrays.invalid) and len(s.invalid) == 5
    assert np.shares_memory(s.unnormalized, out.arrays.unnormalized) and s.unnormalized.tolist() == [1, 1, 1, 0, 0]


def test_unnormalized_rows_leaves_invalid_rows_out() -> None:
    out = OutputBuffers(capacity=8)
    out.arrays.unnormalized[:6] = [1, 1, 0, 1, 0, 0]
    out.arrays.invalid[:6] = [0, 1, 0, 1, 1, 0]
    assert out.scores(6).unnormalized_rows == 1
