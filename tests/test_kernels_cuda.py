"""The CUDA backend gives the CPU backend's results: under Numba's CUDA simulator in CI, on a GPU when marked.

Small blocks (8 threads; the simulator allows less than a warp), a grid of 3
blocks and 256-byte chunks make every path run: several blocks, rows longer
than a block (threads stride over the classes), more rows than blocks (blocks
stride over the rows), and many chunks alternating between the two streams.
The simulator runs each CUDA thread as a Python thread, so the batches are
small. FP16 and BF16 reach the kernels as their wire bits (uint16, int16) and
are widened on the device: those batches must score as the host-widened
float32 ones do, bit for bit. Value checks (``invalid``) are held to the float64
oracle and to the CPU backend on the same batches. What the simulator cannot
show, that the kernels also type and lower for a real device, is checked by
compiling them to NVVM IR without one (test_kernels_lower_for_a_real_device).

Confidence and the Brier score are held to a relative 1e-12 against the exact
reference (tests/calibration_ref.py) for either input type: every sum is
float64, and the inputs are the same numbers.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests import calibration_ref, naive
from tests.conftest import default_params, make_batch, softmax
from tests.kernel_cases import (
    DATATYPES,
    ENTROPY_EXACT,
    ENTROPY_F32,
    EXACT,
    KINDS,
    assert_same_rows,
    assert_scores,
    copy_scores,
    encode_dtype,
    entropy_case,
    planted_case,
    raw_batch,
    reference,
    reference_case,
    reference_cases,
    rows_of,
    select,
    widen_on_host,
)
from xentd.kernels import SampleScores, ScoringParams
from xentd.predstats import row_stats
from xentd.validate import DATATYPE_EPS, Batch

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


def assert_calibration(scores: SampleScores, batch: Batch, kind: str) -> None:
    """Confidence and Brier score against the exact reference, relative 1e-12 (exact zeros exactly)."""
    x, y = batch.predictions, batch.targets
    conf, brier = calibration_ref.binary(x, y, kind) if batch.binary else calibration_ref.multiclass(x, y, kind)
    np.testing.assert_allclose(scores.confidence, conf, rtol=1e-12, atol=0)
    np.testing.assert_allclose(scores.brier, brier, rtol=1e-12, atol=0)


def as_kind(logits: np.ndarray, kind: str) -> np.ndarray:
    """Multiclass predictions of the given kind from float64 logits."""
    if kind == "logits":
        return logits
    return softmax(logits) if kind == "probs" else naive.log_softmax(logits)


@reference_cases(["FP32", "FP64"], [(None, 300), (3, 4), (40, 4)])
def test_matches_float64_reference(
    gpu: CudaBackend, datatype: str, kind: str, classes: int | None, n: int, targets: str
) -> None:
    batch = reference_case(datatype, kind, classes, n, targets)
    # Every sum is float64 on the GPU, FP32 logits included: exact to rounding.
    scores = gpu.score(batch, default_params(batch))
    assert_scores(scores, reference(batch, kind), EXACT)
    assert_calibration(scores, batch, kind)


@pytest.mark.parametrize("classes", [2, 100])
def test_same_results_as_the_cpu_backend(gpu: CudaBackend, classes: int) -> None:
    rng = np.random.default_rng(classes)
    x = rng.normal(0, 3, (3, classes))
    y = rng.integers(0, classes, 3)
    for kind, pred in (("logits", x), ("probs", softmax(x)), ("log_probs", naive.log_softmax(x))):
        batch = make_batch(pred, y, kind)
        cpu_scores = CpuBackend(parallel_threshold=1 << 62).score(batch, default_params(batch))
        cpu = (
            cpu_scores.loss.copy(),
            cpu_scores.focal.copy(),
            cpu_scores.correct.copy(),
            cpu_scores.true_class.copy(),
            cpu_scores.unnormalized_rows,
            cpu_scores.confidence.copy(),
            cpu_scores.brier.copy(),
        )
        cpu_entropy = cpu_scores.entropy.copy() if cpu_scores.entropy is not None else None
        got = gpu.score(batch, default_params(batch))
        assert got.entropy is not None and cpu_entropy is not None
        np.testing.assert_allclose(got.entropy, cpu_entropy, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(got.loss, cpu[0], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(got.focal, cpu[1], rtol=1e-13, atol=1e-15)
        np.testing.assert_array_equal(got.correct, cpu[2])
        np.testing.assert_array_equal(got.true_class, cpu[3])
        assert got.unnormalized_rows == cpu[4]
        # The two backends sum in different orders: agreement to rounding, as for the loss.
        np.testing.assert_allclose(got.confidence, cpu[5], rtol=1e-13, atol=0)
        np.testing.assert_allclose(got.brier, cpu[6], rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("classes", [None, 3, 40])
@pytest.mark.parametrize("targets", ["index", "soft"])
def test_entropy_matches_oracle_predstats_and_cpu(
    gpu: CudaBackend, dtype: type, kind: str, classes: int | None, targets: str
) -> None:
    """The label-free entropy: edge rows (p = 0 entries, extreme and confident logits, ties)
    and rows longer than a block. Every sum is float64 here, float32 logits included."""
    batch = entropy_case(dtype, kind, classes, 12 if classes is None else 8, targets, seed=(classes or 1) + len(kind))
    h = gpu.score(batch, default_params(batch)).entropy
    assert h is not None
    h = h.copy()
    np.testing.assert_allclose(h, naive.entropy(batch.predictions, kind), **ENTROPY_EXACT)
    f32_logits = batch.predictions.dtype == np.float32 and not batch.binary and kind == "logits"
    near_f32 = {**ENTROPY_F32, "atol": ENTROPY_EXACT["atol"]}  # the float32 paths; log s near 0 (kernel_cases)
    np.testing.assert_allclose(
        h, row_stats(batch.predictions, int(batch.kind))[0], **(near_f32 if f32_logits else ENTROPY_EXACT)
    )
    # The CPU backend's float32 class-index path takes each term in float32 (relative 1e-5).
    cpu_h = CpuBackend(parallel_threshold=1 << 62).score(batch, default_params(batch)).entropy
    fast = batch.predictions.dtype == np.float32 and not batch.binary and targets == "index"
    np.testing.assert_allclose(h, cpu_h, **(near_f32 if fast else ENTROPY_EXACT))


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
@pytest.mark.parametrize("kind", KINDS)
def test_confidence_and_brier_with_tied_maxima(gpu: CudaBackend, datatype: str, kind: str) -> None:
    """Three equal maxima in different threads' strides (8 threads): the confidence is their
    common p, and the Brier score counts each, with the target on a tied maximum, on another
    class, and soft."""
    rng = np.random.default_rng(14)
    logits = rng.normal(0.0, 1.0, (4, 30))
    logits[:, [7, 12, 21]] = 4.0
    pred = encode_dtype(as_kind(logits, kind), datatype)
    for y in (np.array([7, 12, 21, 0]), softmax(rng.normal(0.0, 2.0, (4, 30))).astype(np.float32)):
        batch = make_batch(pred, y, kind)
        scores = gpu.score(batch, default_params(batch))
        assert_calibration(scores, batch, kind)
        if y.ndim == 1:
            assert scores.correct.tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_confidence_and_brier_of_confident_predictions(gpu: CudaBackend, datatype: str) -> None:
    """p within 1e-9 to 1e-16 of 1 (and of 0): the Brier score is made of 1 - p there, which a
    rounded p does not keep; each path must still give it to a relative 1e-12."""
    logits = np.full((5, 20), -5.0)
    for r, (j, v) in enumerate([(3, 20.0), (11, 30.0), (0, 35.0), (19, 1e4), (6, 25.0)]):
        logits[r, j] = v
    index = np.array([3, 11, 0, 19, 9])  # the last row's target is not its maximum
    near = np.eye(20)[[3, 11, 0, 19, 6]] * (1.0 - 1e-6) + 1e-6 / 20  # near-one-hot soft rows
    for kind in KINDS:
        pred = encode_dtype(as_kind(logits, kind), datatype)
        for y in (index, np.eye(20)[index], near):
            batch = make_batch(pred, y, kind)
            assert_calibration(gpu.score(batch, default_params(batch)), batch, kind)
    binary = {
        "logits": ([30.0, -30.0, 40.0, 25.0, 1e-3, -1e4, 1e4], [1.0, 0.0, 1.0, 0.999999, 0.5, 0.0, 1.0]),
        "probs": ([1.0 - 1e-12, 1e-15, 1.0, 0.0, 0.5, 1.0 - 2.0**-40], [1.0, 0.0, 1.0, 0.0, 0.25, 1.0]),
        "log_probs": ([-1e-14, -40.0, 0.0, -1e-9, -0.5], [1.0, 0.0, 1.0, 1.0, 0.999]),
    }
    for kind, (x, t) in binary.items():
        batch = make_batch(encode_dtype(np.array(x), datatype), np.array(t), kind)
        assert_calibration(gpu.score(batch, default_params(batch)), batch, kind)


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
    # No p near 1 over 32,000 classes: float64 from the definitions is exact enough here.
    p = softmax(x.astype(np.float64))
    d = p.copy()
    d[np.arange(512), y] -= 1.0  # p - t, t one-hot
    np.testing.assert_allclose(got.confidence, p.max(axis=1), rtol=1e-12)
    np.testing.assert_allclose(got.brier, (d**2).sum(axis=1), rtol=1e-12)


# --- value checks and FP16/BF16 bits ---------------------------------------------------

# (classes, target layout, rows): kept small, the simulator is slow. 40 classes span
# several 8-thread strides; 3 fewer classes than threads.
CUDA_SHAPES = [(None, "binary", 16), (40, "index", 5), (3, "index", 4), (3, "soft32", 4), (40, "soft64", 4)]


# The simulator runs the kernels as Python on NumPy scalars, whose arithmetic on the planted
# NaNs and infinities warns (a GPU's does not): warnings are errors in this suite.
ARITHMETIC_ON_INVALID_ROWS = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _params(datatype: str, gamma: float = 2.0) -> ScoringParams:
    eps = DATATYPE_EPS[datatype]
    return ScoringParams(eps=eps, focal_gamma=gamma, normalization_tolerance=math.sqrt(eps))


def _assert_close_rows(got: dict, want: dict, fast_f32: bool) -> None:  # type: ignore[type-arg]
    """The CPU and the GPU sum in different orders: to rounding, as elsewhere in this file;
    the CPU's float32 class-index path to its own bounds (FAST_F32, ENTROPY_F32)."""
    for name in ("loss", "focal", "confidence", "brier", "entropy"):
        rtol = (1e-5 if name == "entropy" else 5e-6) if fast_f32 else 1e-12
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=1e-12 if fast_f32 else 1e-13)
    for name in ("correct", "true_class", "unnormalized"):
        np.testing.assert_array_equal(got[name], want[name])


@ARITHMETIC_ON_INVALID_ROWS
@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("classes,layout,n", CUDA_SHAPES)
def test_invalid_rows_are_flagged_as_on_the_cpu(
    gpu: CudaBackend, datatype: str, kind: str, classes: int | None, layout: str, n: int
) -> None:
    """NaN, infinities, out-of-range values, class indices and soft targets planted in random
    rows (tests/kernel_cases.py): the flags are the oracle's and the CPU's; valid rows score,
    bit for bit, as they do in a batch without the invalid rows, and as on the CPU to rounding.
    FP16 and BF16 arrive as their bits and score as the host-widened float32 batch does."""
    batch, want = planted_case(datatype, kind, classes, n, layout, seed=(classes or 1) * 7 + len(kind) + len(layout))
    got = copy_scores(gpu.score(batch, _params(datatype)))
    np.testing.assert_array_equal(got["invalid"], want.astype(np.uint8))
    cpu = copy_scores(CpuBackend(parallel_threshold=1 << 62).score(batch, _params(datatype)))
    np.testing.assert_array_equal(cpu["invalid"], want.astype(np.uint8))
    clean = copy_scores(gpu.score(rows_of(batch, ~want), _params(datatype)))
    assert not clean["invalid"].any()
    assert_same_rows(select(got, ~want), clean)
    fast_f32 = classes is not None and layout == "index" and datatype != "FP64"
    _assert_close_rows(select(got, ~want), select(cpu, ~want), fast_f32)
    if datatype in ("FP16", "BF16"):
        wide = raw_batch(widen_on_host(batch.predictions), batch.targets, kind, datatype)
        ref = copy_scores(gpu.score(wide, _params(datatype)))
        np.testing.assert_array_equal(ref["invalid"], want.astype(np.uint8))
        assert_same_rows(select(got, ~want), select(ref, ~want))


@ARITHMETIC_ON_INVALID_ROWS
@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_every_16_bit_pattern_as_binary_predictions(gpu: CudaBackend, datatype: str) -> None:
    """A sample of every class of bit pattern (zeros, subnormals, normals, infinities, NaNs of
    both signs), one a row: flags as the oracle's, valid rows as the host-widened float32."""
    from tests.kernel_cases import BITS_DTYPE, oracle_invalid

    signs = (0x0000, 0x8000)
    if datatype == "FP16":
        patterns = [
            s | m
            for s in signs
            for m in (0x0000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x3BFF, 0x7BFF, 0x7C00, 0x7C01, 0x7E00)
        ]
    else:
        patterns = [
            s | m
            for s in signs
            for m in (0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x3F7F, 0x7F7F, 0x7F80, 0x7F81, 0x7FC0)
        ]
    all_bits = np.array(patterns, np.uint16).view(BITS_DTYPE[datatype])
    for kind in KINDS:
        # The simulator runs math.exp in Python, which raises where a GPU's returns inf: no
        # log-probability of e^700 and beyond here (the CPU tests take every pattern).
        keep = ~((kind == "log_probs") & (widen_on_host(all_bits) > 700.0))
        bits = all_bits[keep]
        targets = np.linspace(0.0, 1.0, bits.size)
        want = oracle_invalid(bits, targets, kind)
        got = copy_scores(gpu.score(raw_batch(bits, targets, kind, datatype), _params(datatype)))
        ref = copy_scores(gpu.score(raw_batch(widen_on_host(bits), targets, kind, datatype), _params(datatype)))
        np.testing.assert_array_equal(got["invalid"], want.astype(np.uint8))
        assert_same_rows(select(got, ~want), select(ref, ~want))


def test_binary_log_probs_entropy_is_accurate_for_confident_rows(gpu: CudaBackend) -> None:
    """As on the CPU (test_kernel_validity.py): log(1 - p) as log1mexp, within 4 ulps."""
    from tests.test_kernel_validity import CONFIDENT_LOG_PROBS, binary_entropy_reference

    x = np.array(CONFIDENT_LOG_PROBS)
    batch = raw_batch(x, np.ones_like(x), "log_probs", "FP64")
    h = gpu.score(batch, _params("FP64")).entropy
    assert h is not None
    np.testing.assert_allclose(h, [binary_entropy_reference(v) for v in x], rtol=4 * 2.0**-52, atol=0)


def test_results_in_outputs_of_their_own(gpu: CudaBackend) -> None:
    """score(..., out=) copies into the caller's pinned buffers; the backend's own are left alone."""
    rng = np.random.default_rng(2)
    batches = [
        raw_batch(rng.normal(0, 2, (n, 5)).astype(np.float32), rng.integers(0, 5, n), "logits", "FP32") for n in (3, 7)
    ]
    outs = [gpu.new_outputs() for _ in batches]
    results = [gpu.score(b, _params("FP32"), out) for b, out in zip(batches, outs, strict=True)]
    for batch, out, scores in zip(batches, outs, results, strict=True):
        assert np.shares_memory(scores.loss, out.arrays.loss)
        alone = copy_scores(gpu.score(batch, _params("FP32")))
        assert_same_rows(copy_scores(scores), alone)


def test_kernels_lower_for_a_real_device() -> None:
    """Every kernel signature (float32, float64, FP16 and BF16 bits; each target layout) types
    and lowers to NVVM IR for a real device, in a process without the simulator: what the
    simulator cannot show (it runs the Python source). NVVM and a GPU are not needed; the
    compute capability is given. FP16 loads must lower to a half-to-float extension."""
    script = textwrap.dedent(
        """
        import types as pytypes

        import numba.cuda.dispatcher as dispatcher
        from numba import types
        from numba.cuda import compiler

        # Device functions ask the current device for its compute capability: give one.
        dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))
        from xentd.kernels import cuda as ck

        assert not ck.SIMULATOR
        f64, f32, i64, u8 = types.float64, types.float32, types.int64, types.uint8
        outputs = [f64[::1], f64[::1], u8[::1], i64[::1], u8[::1], f64[::1], f64[::1], f64[::1], u8[::1]]
        for dtype in (f32, f64, types.uint16, types.int16):
            for kernel, ndim, targets in (
                (ck._binary, 1, [f64[::1]]),
                (ck._multiclass_index, 2, [i64[::1]]),
                (ck._multiclass_soft, 2, [f32[:, ::1], f64[:, ::1]]),
            ):
                for tgt in targets:
                    args = (types.Array(dtype, ndim, "C"), tgt, i64, f64, f64, f64, *outputs)
                    ir = compiler.compile_cuda(kernel.py_func, types.void, args, cc=(9, 0)).library.get_llvm_str()
                    assert ("fpext half" in ir) == (dtype == types.uint16), (kernel, dtype)
        print("lowered")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    if done.returncode and ("has no attribute" in done.stderr or "unexpected keyword" in done.stderr):
        pytest.skip(f"numba-cuda's compiler internals differ: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0 and "lowered" in done.stdout, done.stderr[-3000:]
