"""What the backends share (xentd.kernels.base): the output scratch and the warm-up layouts."""

from __future__ import annotations

import numpy as np

from xentd.kernels import cpu
from xentd.kernels.base import OUTPUT_DTYPES, OutputBuffers, Outputs, warmup_batches


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
    assert allocated == [4] * 5 + [8] * 5 + [100] * 5


def test_scores_are_views_of_the_first_n_results() -> None:
    out = OutputBuffers(capacity=8)
    for a in out.arrays:
        a[:] = 1
    out.arrays.unnormalized[3:] = 0
    s = out.scores(5)
    assert len(s.loss) == len(s.focal) == len(s.correct) == len(s.true_class) == 5
    assert np.shares_memory(s.loss, out.arrays.loss)
    assert s.unnormalized_rows == 3  # counted over the first 5 only
    assert Outputs._fields[:4] == ("loss", "focal", "correct", "true_class")


def test_warmup_batches_reach_every_cpu_kernel_in_both_precisions() -> None:
    reached = {(cpu._family(b), b.predictions.dtype.name, b.targets.dtype.name) for b in warmup_batches()}
    assert {family for family, _, _ in reached} == set(cpu.KERNELS)
    assert {(f, p) for f, p, _ in reached} >= {
        ("binary", "float32"),
        ("binary", "float64"),
        ("index_f32", "float32"),
        ("index", "float64"),
        ("soft", "float32"),
        ("soft", "float64"),
    }
    assert {t for f, _, t in reached if f == "soft"} == {"float32", "float64"}
