"""The CUDA backend: the CPU kernels' definitions, computed on a GPU with numba-cuda.

Same arguments and same results as :mod:`xentd.kernels.cpu` (its float64
kernels are the reference: every sum here is float64 too, so the two agree to
rounding order, about 1e-15 relative).

Multiclass rows are cooperative: one block per row (a grid-stride loop over
rows when there are more rows than blocks), its threads striding over the
classes. Each pass reduces per-thread partials across the block: a
shared-memory tree down to one warp, then warp shuffles; two sums of a pass
share one tree. A row pass needs the row's maximum (and its first index, for
top-1) before the sum of exponentials, so logits take two passes over the row;
soft targets a third, which also sums the Brier score. Binary batches are one
thread per sample.

Confidence and the Brier score come from the same passes. The Brier score
needs 1 - p wherever p is close to 1, and 1 - p taken from a rounded p keeps
little of it (p = 1 - 1e-9 leaves ~1e-7 relative), as sum_c p_c^2 - 2 p_t + 1
would. So the sums of exp(x - m) leave out one class: for class-index targets
the target (S = rest + exp(x_t - m), 1 - p_t = rest / S, and the score is
(sum_{c != t} e_c^2 + rest^2) / S^2, all terms positive; for probs and
log_probs, sum_{c != t} p_c^2 in the first pass), for soft targets the first
maximum (1 - p_top = rest / S). Log-probabilities take 1 - p from expm1, and
binary logits and log_probs take p - t as p (1 - t) - (1 - p) t, each factor to
full relative accuracy.

The label-free entropy (cpu._row_entropy, cpu._binary_entropy) is one more sum in
the same passes: of e_c (x_c - m) next to the exponentials for logits, of p_c log p_c
(or exp(x_c) x_c) next to the mass otherwise; a class-index row reduces it in the
same tree as its other two sums.

Value rules (``SampleScores.invalid``): each thread tests the values it loads in a
row's first pass (xentd.jit.outside, on the float64 value: exact widening keeps
every rule), and the block ORs the flags in the barrier that the first reduction
starts with anyway (``cuda.syncthreads_or``): no extra pass, no extra barrier. A
class index out of range is flagged and clamped, as on the CPU.

FP16 and BF16 predictions are uploaded as their wire bits (uint16, int16: half the
bytes of float32) and widened as each value is loaded (xentd.jit.load).

Batches are copied in chunks through two streams, each with a pinned staging
buffer: while one chunk is copied to the device and scored, the next is staged
on the host. Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) runs all of
it without a GPU, except warp shuffles, which it does not provide: there the
whole reduction runs through shared memory.
"""

from __future__ import annotations

import math
import types
from typing import Any

import numpy as np

from xentd.errors import BackendUnavailable
from xentd.jit import key_bounds, load, outside
from xentd.kernels import cpu
from xentd.kernels.base import WARMUP_PARAMS, OutputBuffers, SampleScores, ScoringParams, warmup_batches
from xentd.validate import Batch, TargetKind

try:
    import numba
    from numba import cuda
except ImportError as exc:  # pragma: no cover - numba itself is a dependency
    raise BackendUnavailable(f"numba's CUDA target is not importable: {exc}") from None

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
MAX_THREADS = 1024  # the hardware limit per block; shared scratch is sized for it
WARP = 32
PROBS, LOGITS, LOG_PROBS = cpu.PROBS, cpu.LOGITS, cpu.LOG_PROBS
NEG_INF = -math.inf


def available() -> tuple[bool, str]:
    """Whether a CUDA device can be used, and why not."""
    try:
        if cuda.is_available():
            return True, "simulator" if SIMULATOR else str(cuda.get_current_device().name)
        return False, "no CUDA device or driver found"
    except Exception as exc:  # noqa: BLE001 - any driver failure means "not available"
        return False, f"CUDA driver error: {exc}"


# --- block reductions --------------------------------------------------------------
#
# ``nt`` (threads per block) is a power of two, at least one warp on a GPU.
# Every thread of the block must call these.


@cuda.jit(device=True)
def _better(v, i, w, j):  # type: ignore[no-untyped-def]
    # The larger value wins; on a tie the smaller index, so top-1 is the first maximum, as on the CPU.
    return w > v or (w == v and j < i)


if SIMULATOR:
    # The simulator has no warp shuffles: the shared-memory tree runs all the way
    # down (LANES = 1), and blocks smaller than a warp are allowed, which keeps
    # simulated barriers (Python threads) cheap enough for CI.
    LANES = 1

    @cuda.jit(device=True)
    def _warp_argmax(sval, sidx, tid):  # type: ignore[no-untyped-def]
        pass

    @cuda.jit(device=True)
    def _warp_sum(ssum, tid):  # type: ignore[no-untyped-def]
        pass

    @cuda.jit(device=True)
    def _warp_sum2(sa, sb, tid):  # type: ignore[no-untyped-def]
        pass

    @cuda.jit(device=True)
    def _warp_sum3(sa, sb, sc, tid):  # type: ignore[no-untyped-def]
        pass

else:  # pragma: no cover - needs a GPU; tests marked `gpu`
    LANES = WARP

    @cuda.jit(device=True)
    def _warp_argmax(sval, sidx, tid):  # type: ignore[no-untyped-def]
        if tid < WARP:
            v = sval[tid]
            i = sidx[tid]
            s = WARP // 2
            while s > 0:
                w = cuda.shfl_down_sync(0xFFFFFFFF, v, s)
                j = cuda.shfl_down_sync(0xFFFFFFFF, i, s)
                if _better(v, i, w, j):
                    v = w
                    i = j
                s //= 2
            if tid == 0:
                sval[0] = v
                sidx[0] = i
        cuda.syncthreads()

    @cuda.jit(device=True)
    def _warp_sum(ssum, tid):  # type: ignore[no-untyped-def]
        if tid < WARP:
            v = ssum[tid]
            s = WARP // 2
            while s > 0:
                v += cuda.shfl_down_sync(0xFFFFFFFF, v, s)
                s //= 2
            if tid == 0:
                ssum[0] = v
        cuda.syncthreads()

    @cuda.jit(device=True)
    def _warp_sum2(sa, sb, tid):  # type: ignore[no-untyped-def]
        if tid < WARP:
            a = sa[tid]
            b = sb[tid]
            s = WARP // 2
            while s > 0:
                a += cuda.shfl_down_sync(0xFFFFFFFF, a, s)
                b += cuda.shfl_down_sync(0xFFFFFFFF, b, s)
                s //= 2
            if tid == 0:
                sa[0] = a
                sb[0] = b
        cuda.syncthreads()

    @cuda.jit(device=True)
    def _warp_sum3(sa, sb, sc, tid):  # type: ignore[no-untyped-def]
        if tid < WARP:
            a = sa[tid]
            b = sb[tid]
            c = sc[tid]
            s = WARP // 2
            while s > 0:
                a += cuda.shfl_down_sync(0xFFFFFFFF, a, s)
                b += cuda.shfl_down_sync(0xFFFFFFFF, b, s)
                c += cuda.shfl_down_sync(0xFFFFFFFF, c, s)
                s //= 2
            if tid == 0:
                sa[0] = a
                sb[0] = b
                sc[0] = c
        cuda.syncthreads()


@cuda.jit(device=True)
def _argmax_all(v, i, sval, sidx, tid, nt):  # type: ignore[no-untyped-def]
    """The block's best (value, index) of every thread's (v, i); every thread gets it."""
    sval[tid] = v
    sidx[tid] = i
    cuda.syncthreads()
    s = nt // 2
    while s >= LANES:
        if tid < s and _better(sval[tid], sidx[tid], sval[tid + s], sidx[tid + s]):
            sval[tid] = sval[tid + s]
            sidx[tid] = sidx[tid + s]
        cuda.syncthreads()
        s //= 2
    _warp_argmax(sval, sidx, tid)
    best, arg = sval[0], sidx[0]
    cuda.syncthreads()  # everyone has read slot 0 before the scratch is reused
    return best, arg


@cuda.jit(device=True)
def _argmax_any(v, i, bad, sval, sidx, tid, nt):  # type: ignore[no-untyped-def]
    """_argmax_all, and whether any thread's ``bad`` is true: the first barrier is
    ``syncthreads_or``, which ORs a predicate across the block as it synchronises."""
    sval[tid] = v
    sidx[tid] = i
    any_bad = cuda.syncthreads_or(1 if bad else 0)  # its predicate is an integer
    s = nt // 2
    while s >= LANES:
        if tid < s and _better(sval[tid], sidx[tid], sval[tid + s], sidx[tid + s]):
            sval[tid] = sval[tid + s]
            sidx[tid] = sidx[tid + s]
        cuda.syncthreads()
        s //= 2
    _warp_argmax(sval, sidx, tid)
    best, arg = sval[0], sidx[0]
    cuda.syncthreads()  # everyone has read slot 0 before the scratch is reused
    return best, arg, any_bad != 0


@cuda.jit(device=True)
def _sum_all(x, ssum, tid, nt):  # type: ignore[no-untyped-def]
    """The block's sum of every thread's ``x``; every thread gets it."""
    ssum[tid] = x
    cuda.syncthreads()
    s = nt // 2
    while s >= LANES:
        if tid < s:
            ssum[tid] += ssum[tid + s]
        cuda.syncthreads()
        s //= 2
    _warp_sum(ssum, tid)
    total = ssum[0]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def _sum2_all(x, y, sa, sb, tid, nt):  # type: ignore[no-untyped-def]
    """The block's sums of every thread's ``x`` and of its ``y``, through one tree (one set of
    barriers) in two scratch arrays; every thread gets both."""
    sa[tid] = x
    sb[tid] = y
    cuda.syncthreads()
    s = nt // 2
    while s >= LANES:
        if tid < s:
            sa[tid] += sa[tid + s]
            sb[tid] += sb[tid + s]
        cuda.syncthreads()
        s //= 2
    _warp_sum2(sa, sb, tid)
    a, b = sa[0], sb[0]
    cuda.syncthreads()
    return a, b


@cuda.jit(device=True)
def _sum3_all(x, y, z, sa, sb, sc, tid, nt):  # type: ignore[no-untyped-def]
    """_sum2_all for three sums (each array summed in the same order as there)."""
    sa[tid] = x
    sb[tid] = y
    sc[tid] = z
    cuda.syncthreads()
    s = nt // 2
    while s >= LANES:
        if tid < s:
            sa[tid] += sa[tid + s]
            sb[tid] += sb[tid + s]
            sc[tid] += sc[tid + s]
        cuda.syncthreads()
        s //= 2
    _warp_sum3(sa, sb, sc, tid)
    a, b, c = sa[0], sb[0], sc[0]
    cuda.syncthreads()
    return a, b, c


def _device(f: Any, **callees: Any) -> Any:
    """A CUDA device function of ``f``, with the helpers it calls (globals of
    xentd.kernels.cpu, CPU dispatchers there) swapped for their device builds."""
    if callees:
        f = types.FunctionType(f.__code__, {**f.__globals__, **callees}, f.__name__, f.__defaults__, f.__closure__)
    return cuda.jit(device=True)(f)


# The loss formulas are the CPU kernels' own (see xentd/kernels/cpu.py), compiled for the device.
# On the device, exp and log are libdevice's (through _binary_terms), not the CPU's vectorisable ones.
_focal_weight = _device(cpu._focal_weight.py_func)
_index_terms = _device(cpu._index_terms.py_func)
_row_confidence = _device(cpu._row_confidence.py_func)
_index_calibration = _device(cpu._index_calibration.py_func, _row_confidence=_row_confidence)
_binary_calibration = _device(cpu._binary_calibration.py_func)
_soft_terms = _device(cpu._soft_terms.py_func)
_soft_brier_term = _device(cpu._soft_brier_term.py_func)
_binary_terms = _device(
    cpu._binary_terms.py_func,
    _binary_prob_terms=_device(cpu._binary_prob_terms.py_func),
    _binary_logit_terms=_device(cpu._binary_logit_terms.py_func),
)


_class_index = _device(cpu._class_index.py_func)


@cuda.jit(device=True)
def _log(x):  # type: ignore[no-untyped-def]
    return math.log(x)


@cuda.jit(device=True)
def _log1p(x):  # type: ignore[no-untyped-def]
    return math.log1p(x)


# The entropy's formulas, with libdevice's log and log1p in place of the CPU's vectorisable ones.
_plogp = _device(cpu._plogp.py_func, log64=_log)
_row_entropy = _device(cpu._row_entropy.py_func)
_prob_logs = _device(cpu._prob_logs.py_func, log64=_log, log1p64=_log1p)
_binary_entropy = _device(cpu._binary_entropy.py_func, _prob_logs=_prob_logs, log64=_log, log1p64=_log1p)


# --- kernels ------------------------------------------------------------------------


@cuda.jit
def _multiclass_index(pred, tgt, kind, eps, gamma, tol, loss, focal, correct, tcls, unnorm, conf, brier, ent, inv):  # type: ignore[no-untyped-def]
    sval = cuda.shared.array(MAX_THREADS, numba.float64)
    sidx = cuda.shared.array(MAX_THREADS, numba.int64)
    ssum = cuda.shared.array(MAX_THREADS, numba.float64)
    sent = cuda.shared.array(MAX_THREADS, numba.float64)  # the entropy's sum
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n, c = pred.shape
    key_lo, key_span = key_bounds(kind, 0.0)  # values are checked once widened to float64
    for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        t, bad_target = _class_index(tgt[i], c)
        best = NEG_INF
        arg = c
        bad = False
        mass = 0.0
        sq = 0.0  # sum over the other classes of p_c^2 (probs, log_probs)
        h = 0.0  # the entropy's sum (cpu._row_entropy)
        for j in range(tid, c, nt):
            x = numba.float64(load(pred[i, j]))
            bad |= outside(x, key_lo, key_span)
            if x > best:
                best = x
                arg = j
            if kind == PROBS:
                mass += x
                sq += 0.0 if j == t else x * x
                h += _plogp(x)
            elif kind == LOG_PROBS:
                e = math.exp(x)
                mass += e
                sq += 0.0 if j == t else e * e
                h += e * x
        m, top, bad = _argmax_any(best, arg, bad, sval, sidx, tid, nt)
        # From here sval is the second sum's scratch. Both branches reduce (kind is the same for the whole block).
        rest = 0.0
        if kind == LOGITS:
            # The sums of exp(x - m) and of its square over the classes other than the
            # target: S = rest + exp(x_t - m) and 1 - p_t = rest / S, with no subtraction.
            # The entropy's sum too; the target's term is added below.
            for j in range(tid, c, nt):
                if j != t:
                    d = numba.float64(load(pred[i, j])) - m
                    e = math.exp(d)
                    rest += e
                    sq += e * e
                    h += e * d
            rest, sq, h = _sum3_all(rest, sq, h, ssum, sval, sent, tid, nt)
        else:
            mass, sq, h = _sum3_all(mass, sq, h, ssum, sval, sent, tid, nt)
        if tid == 0:
            xt = numba.float64(load(pred[i, t]))
            et = math.exp(xt - m) if kind == LOGITS else 0.0
            s = rest + et if kind == LOGITS else 0.0
            lpt, q, mass = _index_terms(kind, xt, m, s, mass, eps)
            loss[i] = -lpt
            focal[i] = -_focal_weight(q, gamma) * lpt
            correct[i] = 1 if top == t else 0
            tcls[i] = t
            unnorm[i] = 1 if abs(mass - 1.0) > tol else 0
            conf[i], brier[i] = _index_calibration(kind, m, s, sq, rest, xt)
            if kind == LOGITS:
                ent[i] = _row_entropy(LOGITS, math.log(s), h + et * (xt - m), s)
            else:
                ent[i] = _row_entropy(kind, 0.0, h, 0.0)
            inv[i] = 1 if bad or bad_target else 0


@cuda.jit
def _multiclass_soft(pred, tgt, kind, eps, gamma, tol, loss, focal, correct, tcls, unnorm, conf, brier, ent, inv):  # type: ignore[no-untyped-def]
    sval = cuda.shared.array(MAX_THREADS, numba.float64)
    sidx = cuda.shared.array(MAX_THREADS, numba.int64)
    ssum = cuda.shared.array(MAX_THREADS, numba.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n, c = pred.shape
    key_lo, key_span = key_bounds(kind, 0.0)  # values are checked once widened to float64
    target_lo, target_span = key_bounds(PROBS, 0.0)  # soft targets: probabilities
    for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        # The first pass finds both rows' first maxima and the mass, each element loaded once:
        # sharing _multiclass_index's pass would add a second one over the target row.
        best = NEG_INF
        arg = c
        tbest = NEG_INF
        targ = c
        mass = 0.0
        h = 0.0  # the entropy's sum (cpu._row_entropy)
        bad = False
        for j in range(tid, c, nt):
            x = numba.float64(load(pred[i, j]))
            if x > best:
                best = x
                arg = j
            tj = numba.float64(tgt[i, j])
            bad |= outside(x, key_lo, key_span) | outside(tj, target_lo, target_span)
            if tj > tbest:
                tbest = tj
                targ = j
            if kind == PROBS:
                mass += x
                h += _plogp(x)
            elif kind == LOG_PROBS:
                e = math.exp(x)
                mass += e
                h += e * x
        m, top, bad = _argmax_any(best, arg, bad, sval, sidx, tid, nt)
        _, truth = _argmax_all(tbest, targ, sval, sidx, tid, nt)
        rest = 0.0
        if kind == LOGITS:
            # The sum of exp(x - m) over the classes other than the first maximum, whose
            # term is exactly 1: S = 1 + rest, and 1 - p_top = rest / S with no subtraction.
            # The first maximum's entropy term, 1 * 0, is left out with it.
            for j in range(tid, c, nt):
                if j != top:
                    d = numba.float64(load(pred[i, j])) - m
                    e = math.exp(d)
                    rest += e
                    h += e * d
            rest, h = _sum2_all(rest, h, ssum, sval, tid, nt)
        else:
            mass, h = _sum2_all(mass, h, ssum, sval, tid, nt)
        s = 1.0 + rest
        lse = m + math.log(s) if kind == LOGITS else 0.0
        inv_s = 1.0 / s
        total = 0.0
        ftotal = 0.0
        sq = 0.0
        for j in range(tid, c, nt):
            x = numba.float64(load(pred[i, j]))
            tj = numba.float64(tgt[i, j])
            if tj != 0.0:  # 0 * log(0) is 0, as in xlogy
                lp, q = _soft_terms(kind, x, lse, eps)
                total -= tj * lp
                ftotal -= tj * _focal_weight(q, gamma) * lp
            sq += _soft_brier_term(kind, x, tj, j == top, m, rest, inv_s)
        total, ftotal = _sum2_all(total, ftotal, ssum, sval, tid, nt)
        sq = _sum_all(sq, ssum, tid, nt)
        if tid == 0:
            loss[i] = total
            focal[i] = ftotal
            correct[i] = 1 if top == truth else 0
            tcls[i] = truth
            unnorm[i] = 1 if kind != LOGITS and abs(mass - 1.0) > tol else 0
            conf[i] = _row_confidence(kind, m, inv_s)
            brier[i] = sq
            ent[i] = _row_entropy(kind, math.log(s) if kind == LOGITS else 0.0, h, s)
            inv[i] = 1 if bad else 0


@cuda.jit
def _binary(pred, tgt, kind, eps, gamma, tol, loss, focal, correct, tcls, unnorm, conf, brier, ent, inv):  # type: ignore[no-untyped-def]
    log_eps = math.log(eps)
    key_lo, key_span = key_bounds(kind, 0.0)  # values are checked once widened to float64
    target_lo, target_span = key_bounds(PROBS, 0.0)  # binary targets: probabilities
    for i in range(cuda.grid(1), pred.shape[0], cuda.gridsize(1)):
        t = tgt[i]
        x = numba.float64(load(pred[i]))
        lp, lq, p, q, positive = _binary_terms(kind, x, eps, log_eps)
        loss[i] = -(t * lp + (1.0 - t) * lq)
        focal[i] = -(t * _focal_weight(q, gamma) * lp + (1.0 - t) * _focal_weight(p, gamma) * lq)
        truth = t > 0.5
        correct[i] = 1 if positive == truth else 0
        tcls[i] = 1 if truth else 0
        unnorm[i] = 0
        conf[i], brier[i] = _binary_calibration(kind, x, p, q, t)
        ent[i] = _binary_entropy(kind, x, lp, lq, p, q)
        inv[i] = 1 if outside(x, key_lo, key_span) | outside(numba.float64(t), target_lo, target_span) else 0


# --- host side ----------------------------------------------------------------------


class _Slot:
    """One stream with its pinned staging buffers and device buffers, reused across chunks and batches.

    Buffers only grow (doubling), so steady traffic allocates nothing: device
    allocation is a synchronising driver call that costs more than a small batch.
    """

    def __init__(self) -> None:
        self.stream = cuda.stream()
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, object] = {}
        # What the kernels write, on the device; copied back into the backend's pinned OutputBuffers.
        self.out = OutputBuffers(cuda.device_array)

    def _buffers(self, key: str, size: int, dtype: np.dtype[Any]) -> tuple[np.ndarray, object]:
        host = self._host.get(key)
        if host is None or host.dtype != dtype or host.size < size:
            cap = max(size, 2 * host.size if host is not None and host.dtype == dtype else 0, 1)
            self._host[key] = host = cuda.pinned_array(cap, dtype)
            self._device[key] = cuda.device_array(cap, dtype)
        return host, self._device[key]

    def upload(self, key: str, chunk: np.ndarray) -> object:
        """Stage ``chunk`` in pinned memory and start its copy to the device (the stream must be idle)."""
        host, device = self._buffers(key, chunk.size, chunk.dtype)
        staged = host[: chunk.size].reshape(chunk.shape)
        staged[...] = chunk
        view = device[: chunk.size].reshape(chunk.shape)  # type: ignore[index]
        view.copy_to_device(staged, stream=self.stream)
        return view


class CudaBackend:
    """Scores batches with the CUDA kernels above. Raises :class:`BackendUnavailable` without a device."""

    name = "cuda"

    def __init__(self, *, threads_per_block: int = 256, chunk_bytes: int = 1 << 24, blocks: int = 4096) -> None:
        ok, why = available()
        if not ok:
            raise BackendUnavailable(f"the cuda backend needs a CUDA GPU: {why}")
        smallest = 1 if SIMULATOR else WARP
        if not smallest <= threads_per_block <= MAX_THREADS or threads_per_block & (threads_per_block - 1):
            raise ValueError(f"threads_per_block must be a power of two in [{smallest}, {MAX_THREADS}]")
        self.device = why
        self.threads = threads_per_block
        self.chunk_bytes = chunk_bytes
        self.blocks = blocks
        self._slots = [_Slot(), _Slot()]
        self._out = self.new_outputs()

    def new_outputs(self) -> OutputBuffers:
        """Output buffers in pinned host memory, which the device copies into directly."""
        return OutputBuffers(cuda.pinned_array)

    def score(self, batch: Batch, params: ScoringParams, out: OutputBuffers | None = None) -> SampleScores:
        """Score a batch into ``out``, or into this backend's own buffers (see ``Backend.score``).
        FP16/BF16 bits are uploaded as they are (half the bytes) and widened on the device."""
        n = batch.size
        if out is None:
            out = self._out
        out.reserve(n)
        if batch.binary:
            kernel = _binary
        elif batch.target_kind is TargetKind.INDEX:
            kernel = _multiclass_index
        else:
            kernel = _multiclass_soft
        row_bytes = max(1, batch.predictions[:1].nbytes + batch.targets[:1].nbytes)
        rows = max(1, self.chunk_bytes // row_bytes)
        for k, start in enumerate(range(0, n, rows)):
            stop = min(n, start + rows)
            slot = self._slots[k % 2]
            slot.stream.synchronize()  # its buffers are free again
            d_pred = slot.upload("pred", batch.predictions[start:stop])
            d_tgt = slot.upload("tgt", batch.targets[start:stop])
            slot.out.reserve(stop - start)
            if batch.binary:
                grid = min(self.blocks, (stop - start + self.threads - 1) // self.threads)
            else:
                grid = min(self.blocks, stop - start)
            kernel[grid, self.threads, slot.stream](
                d_pred, d_tgt, int(batch.kind), *params.kernel_args, *slot.out.arrays
            )
            for d, host in zip(slot.out.arrays, out.arrays, strict=True):
                d[: stop - start].copy_to_host(host[start:stop], stream=slot.stream)
        for slot in self._slots:
            slot.stream.synchronize()
        return out.scores(n)

    def warmup_parallel(self) -> None:
        """Nothing to add: every CUDA kernel is compiled by :meth:`warmup`."""

    def warmup(self, *, parallel: bool = True) -> None:
        """Compile every kernel signature ``score`` can use, on tiny batches."""
        for batch in warmup_batches():
            self.score(batch, WARMUP_PARAMS)
