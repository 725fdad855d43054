"""The CUDA backend gives the CPU backend's results: under Numba's CUDA simulator in CI, on a GPU when marked.

Small blocks (8 threads; the simulator allows less than a warp), a grid of 3
blocks and 256-byte chunks make every path run: several blocks, rows longer
than a block (threads stride over the classes), more rows than blocks (blocks
stride over the rows), and many chunks alternating between the two streams.
The simulator runs each CUDA thread as a Python thread, so the batches are
small. FP16 and BF16 reach the kernels already widened to float32
(xentd.validate), so FP32 and FP64 cover the kernels' inputs.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from tests import naive
from tests.conftest import default_params, make_batch, softmax
from tests.kernel_cases import EXACT, assert_scores, reference, reference_case, reference_cases

cuda_backend = pytest.importorskip("xentd.kernels.cuda")
from xentd.kernels.cpu import CpuBackend  # noqa: E402
from xentd.kernels.cuda import CudaBackend  # noqa: E402

REAL_GPU = os.environ.get("XENTD_REAL_GPU") == "1"


@pytest.fixture(scope="module")
def gpu() -> CudaBackend:
    ok, why = cuda_backend.available()
    if not ok:
        pytest.skip(why)
    # 8 threads only on the simulator; a GPU needs at least a warp.
    return CudaBackend(threads_per_block=8 if cuda_backend.SIMULATOR else 32, chunk_bytes=256, blocks=3)


@reference_cases(["FP32", "FP64"], [(None, 300), (3, 4), (40, 4)])
def test_matches_float64_reference(
    gpu: CudaBackend, datatype: str, kind: str, classes: int | None, n: int, targets: str
) -> None:
    batch = reference_case(datatype, kind, classes, n, targets)
    # Every sum is float64 on the GPU, FP32 logits included: exact to rounding.
    assert_scores(gpu.score(batch, default_params(batch)), reference(batch, kind), EXACT)


@pytest.mark.parametrize("classes", [2, 100])
def test_same_results_as_the_cpu_backend(gpu: CudaBackend, classes: int) -> None:
    rng = np.random.default_rng(classes)
    x = rng.normal(0, 3, (3, classes))
    y = rng.integers(0, classes, 3)
    for kind, pred in (("logits", x), ("probs", softmax(x)), ("log_probs", naive.log_softmax(x))):
        batch = make_batch(pred, y, kind)
        cpu = CpuBackend(parallel_threshold=1 << 62).score(batch, default_params(batch))
        cpu = (cpu.loss.copy(), cpu.focal.copy(), cpu.correct.copy(), cpu.true_class.copy(), cpu.unnormalized_rows)
        got = gpu.score(batch, default_params(batch))
        np.testing.assert_allclose(got.loss, cpu[0], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(got.focal, cpu[1], rtol=1e-13, atol=1e-15)
        np.testing.assert_array_equal(got.correct, cpu[2])
        np.testing.assert_array_equal(got.true_class, cpu[3])
        assert got.unnormalized_rows == cpu[4]


def test_a_256k_class_row(gpu: CudaBackend) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(0, 4, (1, 256_000)).astype(np.float32)
    y = np.array([123_456])
    batch = make_batch(x, y, "logits")
    scores = gpu.score(batch, default_params(batch))
    ref = -naive.log_softmax(x)[0, 123_456]
    assert scores.loss[0] == pytest.approx(ref, rel=1e-12)


def test_ties_pick_the_first_maximum_like_the_cpu(gpu: CudaBackend) -> None:
    """Top-1 across a block reduction must break ties by the lowest index."""
    p = np.zeros((4, 30))
    p[:, [7, 12, 21]] = 1 / 3  # three equal maxima in different threads' strides
    batch = make_batch(p, np.array([7, 12, 21, 0]), "probs")
    assert gpu.score(batch, default_params(batch)).correct.tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_extreme_logits(gpu: CudaBackend, datatype: str) -> None:
    x = np.array(
        [[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype=np.float32 if datatype == "FP32" else np.float64
    )
    batch = make_batch(x, np.array([0, 1, 2]), "logits")
    np.testing.assert_allclose(gpu.score(batch, default_params(batch)).loss, [0.0, 2e4, math.log(3)], rtol=1e-12)
    xb = np.array([1e4, -1e4, 1e4, -1e4])
    batch = make_batch(xb, np.array([1, 0, 0, 1]), "logits")
    np.testing.assert_allclose(gpu.score(batch, default_params(batch)).loss, [0.0, 0.0, 1e4, 1e4], rtol=1e-15)


def test_clipping_and_subnormals(gpu: CudaBackend) -> None:
    eps32 = float(np.finfo(np.float32).eps)
    p = np.array([[1e-45, 1.0 - 1e-45], [1e-30, 1.0], [0.25, 0.75], [0.0, 1.0]], dtype=np.float32)
    batch = make_batch(p, np.array([0, 0, 0, 0]), "probs")
    np.testing.assert_allclose(
        gpu.score(batch, default_params(batch)).loss,
        [-math.log(eps32)] * 2 + [math.log(4), -math.log(eps32)],
        rtol=1e-7,
    )
    b = make_batch(np.array([0.0, 1.0, 0.5]), np.array([1, 0, 1]), "probs")
    eps = float(np.finfo(np.float64).eps)
    np.testing.assert_allclose(gpu.score(b, default_params(b)).loss, [-math.log(eps)] * 2 + [math.log(2)], rtol=1e-12)


def test_empty_batch_and_warmup(gpu: CudaBackend) -> None:
    gpu.warmup()
    batch = make_batch(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), "logits")
    scores = gpu.score(batch, default_params(batch))
    assert scores.loss.shape == (0,) and scores.unnormalized_rows == 0


@pytest.mark.gpu
@pytest.mark.skipif(not REAL_GPU, reason="real-GPU test: run with XENTD_REAL_GPU=1 on a machine with a GPU")
def test_real_gpu_large_batch_matches_cpu() -> None:
    """On a real device (warp shuffles, default block size): a large FP32 logits batch, against the CPU."""
    gpu = CudaBackend()
    assert not cuda_backend.SIMULATOR
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (512, 32_000)).astype(np.float32)
    y = rng.integers(0, 32_000, 512)
    batch = make_batch(x, y, "logits")
    got = gpu.score(batch, default_params(batch))
    ref = naive.multiclass(x, y, "logits", eps=batch.dtype_eps)
    np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-12)
    np.testing.assert_array_equal(got.correct, ref.correct)
