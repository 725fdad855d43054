#!/usr/bin/env python3
"""What a change costs the scoring kernels and the per-model state, side by side with another checkout.

Usage:
    .venv/bin/python scripts/kernel_cost.py --against /tmp/base            # kernels and state memory
    .venv/bin/python scripts/kernel_cost.py --against /tmp/base --repeats 7
    .venv/bin/python scripts/kernel_cost.py --against /tmp/base --only kernels --parallel
    .venv/bin/python scripts/kernel_cost.py --against /tmp/base --only kernels --match binary
    .venv/bin/python scripts/kernel_cost.py --against /tmp/base --only fp16
    .venv/bin/python scripts/kernel_cost.py --against /tmp/base --identical

Every measurement runs in a fresh process, alternating between the other
checkout's xentd ("before") and this one's ("after"); the table shows medians
over ``--repeats`` rounds, and the ratio after / before. The machine is shared
and noisy: only side-by-side medians mean anything.

- ``kernel ...``: seconds per ``CpuBackend.score`` call (best of many calls in
  one process): FP32 logits and probs with class-index targets, N x C, at 64 MB
  of predictions and at 64 rows; FP32 soft-target logits; binary logits and
  probs in FP32 and FP64, 64 MB. Serial kernels (one core), so that the other
  core's noise matters less; ``--parallel`` times the ``prange`` builds.
- ``+entropy ...``: what the pipeline pays for the loss and the label-free
  entropy of the same batch: the kernel itself where it returns the entropy
  (since 58dde4e), the kernel plus ``predstats.row_stats`` where it does not.
- ``fp16 ...`` (``--only fp16``): 64 MB of FP16 logits, C=10 and C=32000, scored
  as validation hands them today (``scan.widen``: widen into float32 and scan for
  the value rules, then the float32 kernel; ``host`` is the sum of the two) and,
  where the checkout's kernels take FP16 bits, as ``in-kernel``: the uint16 array
  itself, widened and checked by the kernel.
- ``state RSS``: the growth of the process's resident memory when 10,000 models
  of 10 classes each fold ten 64-sample batches (what ``bench.py scale`` sends),
  with the default windows, through ``StateStore`` and ``ModelState.fold``;
- ``steady KB``: the bytes each component of one 10-class model holds once it has
  seen traffic for longer than every window (every time bucket used, the count
  ring full): what a busy model costs, whatever the benchmark's load.

``--identical`` instead scores one set of valid batches with both checkouts
(every layout, input kind and datatype, gamma 2 and 0.5, serial and parallel
builds) and compares every output array the two have in common, and the
unnormalized_rows counts, bit for bit; no row may be flagged invalid.
FP16 and BF16 go to the other checkout widened to float32 on the host, as its
validation hands them, and to this one both so and as their wire bits (uint16,
int16), where this checkout's kernels take them. Binary log_probs entropies
below log p = -ln 2 are left out: their formula changed on purpose (log1mexp).
Since b143419 so did the entropies of binary probabilities (log1p(-p) for
log(1 - p): relative 1e-12, absolute 1e-15), of FP64 class-index probs rows
(summed by fast-math spans: relative 1e-12) and of float32 class-index log_probs
and probs rows (float32 terms: relative 1e-5); the largest relative difference is
printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent.parent

MB64 = 64 << 20
# (label, datatype, kind, rows, classes, targets); classes 0 is binary.
KERNEL_CASES = (
    ("logits C=10 64MB", "FP32", "logits", MB64 // 40, 10, "index"),
    ("logits C=10 64x10", "FP32", "logits", 64, 10, "index"),
    ("logits C=1000 64MB", "FP32", "logits", MB64 // 4000, 1000, "index"),
    ("logits C=32000 64 rows", "FP32", "logits", 64, 32_000, "index"),
    ("probs C=10 64MB", "FP32", "probs", MB64 // 40, 10, "index"),
    ("probs C=1000 64MB", "FP32", "probs", MB64 // 4000, 1000, "index"),
    ("probs FP64 C=10 64MB", "FP64", "probs", MB64 // 80, 10, "index"),
    ("log_probs C=10 64MB", "FP32", "log_probs", MB64 // 40, 10, "index"),
    ("log_probs C=1000 64MB", "FP32", "log_probs", MB64 // 4000, 1000, "index"),
    ("soft logits C=10 32MB", "FP32", "logits", MB64 // 80, 10, "soft"),
    ("binary logits FP32 64MB", "FP32", "logits", MB64 // 4, 0, "index"),
    ("binary logits FP64 64MB", "FP64", "logits", MB64 // 8, 0, "index"),
    ("binary probs FP32 64MB", "FP32", "probs", MB64 // 4, 0, "index"),
    ("binary probs FP64 64MB", "FP64", "probs", MB64 // 8, 0, "index"),
)
FP16_CASES = (("C=10", MB64 // 20, 10), ("C=32000", MB64 // 64_000, 32_000))
MODELS = 10_000
BATCHES_PER_MODEL = 10
ROWS = 64
KINDS = {"probs": 0, "logits": 1, "log_probs": 2}
NP_DTYPES = {"FP32": np.float32, "FP64": np.float64}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _import(root: str) -> Any:
    """This process's xentd from ``root`` (checked), and its CpuBackend class."""
    sys.path.insert(0, root)
    from xentd.kernels.cpu import CpuBackend

    assert Path(sys.modules["xentd"].__file__ or "").resolve().is_relative_to(Path(root).resolve())
    return CpuBackend


def _takes_16_bit() -> bool:
    """Whether this process's kernels take FP16/BF16 bits (uint16/int16 predictions)."""
    from xentd.kernels import base

    return "invalid" in base.Outputs._fields


def _padded(a: np.ndarray) -> np.ndarray:
    """``a`` copied into the start of a larger allocation. Before SCRATCH_PAD, the float32
    class-index kernels could round a batch's last row otherwise when their scratch was
    allocated right after its array (xentd.kernels.cpu.SCRATCH_PAD): padding keeps the other
    checkout's results from depending on where its allocations land."""
    flat = np.empty(a.size + 1024, a.dtype)
    flat[: a.size] = a.reshape(-1)
    return flat[: a.size].reshape(a.shape)


def _batch(pred: np.ndarray, tgt: np.ndarray, kind: str, datatype: str) -> Any:
    from xentd.jit import kernel_array
    from xentd.validate import Batch, InputKind, TargetKind

    return Batch(
        model="m",
        kind=InputKind(KINDS[kind]),
        predictions=kernel_array(_padded(pred)),
        targets=kernel_array(tgt),
        target_kind=TargetKind.INDEX if tgt.dtype == np.int64 else TargetKind.SOFT,
        weights=None,
        num_classes=2 if pred.ndim == 1 else pred.shape[1],
        prediction_datatype=datatype,
        batch_id=None,
        ts=None,
    )


def _best(fn: Callable[[], Any], seconds: float = 1.5) -> float:
    fn()  # compile or load
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _logits(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    return (rng.normal(0, 2, (n, c)) if c else rng.normal(0, 2, n)).astype(np.float32)


def _kernel_timings(parallel: bool, match: str) -> dict[str, Any]:
    from xentd.kernels import ScoringParams
    from xentd.kernels.cpu import CpuBackend

    backend = CpuBackend(parallel_threshold=0 if parallel else 1 << 62)
    params = ScoringParams(eps=1e-7, focal_gamma=2.0, normalization_tolerance=1e-3)
    out: dict[str, Any] = {}
    for label, datatype, kind, n, c, targets in KERNEL_CASES:
        if match not in label:
            continue
        rng = np.random.default_rng(zlib.crc32(label.encode()))
        z = _logits(rng, n, c).astype(NP_DTYPES[datatype])
        if kind == "probs":
            e = np.exp(z - z.max(axis=1, keepdims=True)) if c else 1.0 / (1.0 + np.exp(-z))
            z = (e / e.sum(axis=1, keepdims=True) if c else e).astype(z.dtype)
        elif kind == "log_probs" and c:
            m = z.max(axis=1, keepdims=True)
            z = (z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))).astype(z.dtype)
        if not c:
            tgt = rng.integers(0, 2, n).astype(np.float64)
        elif targets == "index":
            tgt = rng.integers(0, c, n)
        else:
            tgt = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
        batch = _batch(z, tgt, kind, datatype)
        del z, tgt
        out[f"kernel {label}"] = _best(lambda b=batch: backend.score(b, params))
        if getattr(backend.score(batch, params), "entropy", None) is None:
            # A checkout whose kernels give no entropy: the pipeline took it from predstats.
            out[f"+entropy {label}"] = _best(lambda b=batch: _score_and_entropy(backend, b, params))
        else:
            out[f"+entropy {label}"] = out[f"kernel {label}"]
    return out


def _score_and_entropy(backend: Any, batch: Any, params: Any) -> None:
    from xentd.predstats import row_stats

    backend.score(batch, params)
    row_stats(batch.predictions, int(batch.kind))


def _fp16_timings(parallel: bool) -> dict[str, Any]:
    from xentd import scan
    from xentd.kernels import ScoringParams
    from xentd.kernels.cpu import CpuBackend

    backend = CpuBackend(parallel_threshold=0 if parallel else 1 << 62)
    params = ScoringParams(eps=float(np.finfo(np.float16).eps), focal_gamma=2.0, normalization_tolerance=1e-3)
    out: dict[str, Any] = {}
    for label, n, c in FP16_CASES:
        rng = np.random.default_rng(c)
        bits = _logits(rng, n, c).astype(np.float16).view(np.uint16)
        tgt = rng.integers(0, c, n)
        wide = np.empty(bits.shape, np.float32)
        host, in_kernel = _batch(wide, tgt, "logits", "FP16"), _batch(bits, tgt, "logits", "FP16")
        widen = _best(lambda bits=bits, wide=wide: scan.widen(bits, wide, half=True))
        kernel = _best(lambda b=host: backend.score(b, params))
        out[f"fp16 {label} widen+scan"] = widen
        out[f"fp16 {label} float32 kernel"] = kernel
        out[f"fp16 {label} host total"] = widen + kernel
        if _takes_16_bit():
            out[f"fp16 {label} in-kernel"] = _best(lambda b=in_kernel: backend.score(b, params))
    return out


def _state_memory() -> dict[str, Any]:
    from xentd.config import LimitsConfig, WindowsConfig
    from xentd.kernels import SampleScores
    from xentd.state import ModelState, StateStore

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    fields = set(SampleScores.__dataclass_fields__)
    values = {
        "loss": rng.random(ROWS),
        "focal": rng.random(ROWS),
        "correct": rng.integers(0, 2, ROWS).astype(np.uint8),
        "true_class": rng.integers(0, 10, ROWS),
        "unnormalized_rows": 0,
        "confidence": rng.random(ROWS),
        "brier": rng.random(ROWS),
    }
    scores = SampleScores(**{k: v for k, v in values.items() if k in fields})
    store = StateStore(WindowsConfig(), LimitsConfig(max_models=MODELS), lambda: 1.7e9)
    store.warmup()
    before = _rss()
    for b in range(BATCHES_PER_MODEL):
        for i in range(MODELS):
            store.model(f"model-{i}", 10).fold(scores, None, 1.7e9 + b, None)
    out["state RSS MiB"] = (_rss() - before) / 2**20

    # One model at steady state: every time bucket used (4,000 s of traffic, past the 1 h
    # window) and the count-window ring full (12,000 samples, past last_10000).
    model = ModelState("steady", 10, WindowsConfig(), LimitsConfig(), 1.7e9)
    three = SampleScores(**{k: (v[:3] if isinstance(v, np.ndarray) else v) for k, v in values.items() if k in fields})
    for k in range(4_000):
        model.fold(three, None, 1.7e9 + k, None)
    for name, component in model.components().items():
        arrays = component.save()[1]
        out[f"steady KB {name or 'loss'}"] = sum(a.nbytes for a in arrays.values()) / 1024
    return out


def _child(root: str, only: str, parallel: bool, match: str) -> dict[str, Any]:
    _import(root)
    out: dict[str, Any] = {}
    if only in ("all", "kernels"):
        out.update(_kernel_timings(parallel, match))
    if only == "fp16":
        out.update(_fp16_timings(parallel))
    if only in ("all", "state"):
        out.update(_state_memory())
    return out


# --- bit-for-bit comparison ----------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _encode(x: np.ndarray, datatype: str) -> tuple[np.ndarray, np.ndarray]:
    """(the predictions as the kernels take them on the wire's datatype, the same values
    widened on the host: float32 for FP16/BF16, as validation widens them today)."""
    if datatype == "FP16":
        bits = x.astype(np.float16).view(np.uint16)
        return bits, bits.view(np.float16).astype(np.float32)
    if datatype == "BF16":
        f = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype(np.uint16)  # to nearest even
        return rounded.view(np.int16), (rounded.astype(np.uint32) << 16).view(np.float32)
    wide = x.astype(NP_DTYPES[datatype])
    return wide, wide


def identity_cases() -> Iterator[tuple[str, str, str, np.ndarray, np.ndarray]]:
    """(name, datatype, kind, predictions as float64, targets) of every valid batch compared:
    binary and multiclass on both sides of the kernels' thresholds, with edge rows first
    (uniform, one-hot, confident, tied maxima)."""
    for datatype in ("FP32", "FP64", "FP16", "BF16"):
        for kind in KINDS:
            for c in (0, 2, 3, 10, 48, 49, 257, 1000, 32_000):
                n = 5000 if c == 0 else 1061 if c <= 49 else {257: 100, 1000: 40, 32_000: 5}[c]
                layouts = ("binary",) if c == 0 else ("index", "soft32", "soft64")
                for layout in layouts:
                    name = f"{datatype}/{kind}/C={c}/{layout}"
                    rng = np.random.default_rng(zlib.crc32(name.encode()))
                    if c == 0:
                        z = rng.normal(0.0, 1.0, n) * rng.uniform(0.1, 30.0, n)
                        z[:8] = [0.0, 1e-9, -1e-9, 40.0, -40.0, 800.0, -800.0, 3.0]
                        p = 0.5 + 0.5 * np.tanh(0.5 * z)  # the sigmoid, without overflow
                        x = {"logits": z, "probs": p, "log_probs": -np.logaddexp(0.0, -z)}[kind]
                        if kind == "probs":
                            x[:4] = [0.0, 1.0, 1e-12, 0.5]
                        y = np.where(rng.random(n) < 0.5, rng.integers(0, 2, n), rng.random(n)).astype(np.float64)
                        yield name, datatype, kind, x, y
                        continue
                    z = rng.normal(0.0, 1.0, (n, c)) * rng.uniform(0.1, 30.0, (n, 1))
                    z[0] = 0.0
                    z[1] = 0.0
                    z[1, 0] = 1e4
                    z[2, c - 1] = z[2].max() + 40.0
                    z[3, 0] = z[3, c - 1] = z[3].max() + 2.0
                    x = {"logits": z, "probs": _softmax(z), "log_probs": z - z.max(axis=1, keepdims=True)}[kind]
                    if kind == "log_probs":
                        x = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
                    if layout == "index":
                        y = np.where(rng.random(n) < 0.3, x.argmax(axis=1), rng.integers(0, c, n)).astype(np.int64)
                    else:
                        y = _softmax(rng.normal(0, 2, (n, c))).astype(np.float32 if layout == "soft32" else np.float64)
                    yield name, datatype, kind, x, y


def _dump(root: str, path: str) -> None:
    """Every case's outputs under ``root``'s kernels, saved to ``path`` (npz)."""
    cpu_backend = _import(root)
    from xentd.kernels import ScoringParams
    from xentd.validate import DATATYPE_EPS

    bits_too = _takes_16_bit()

    builds = {"serial": cpu_backend(parallel_threshold=1 << 62), "parallel": cpu_backend(parallel_threshold=0)}
    saved: dict[str, np.ndarray] = {}
    for name, datatype, kind, x, y in identity_cases():
        bits, wide = _encode(x, datatype)
        inputs = {"host": wide}
        if bits_too and datatype in ("FP16", "BF16"):
            inputs["bits"] = bits
        eps = DATATYPE_EPS[datatype]
        for gamma in (2.0, 0.5):
            params = ScoringParams(eps=eps, focal_gamma=gamma, normalization_tolerance=math.sqrt(eps))
            for how, pred in inputs.items():
                batch = _batch(pred, y, kind, datatype)
                for build, backend in builds.items():
                    scores = backend.score(batch, params)
                    for field in scores.__dataclass_fields__:
                        value = getattr(scores, field)
                        if isinstance(value, (np.ndarray, int)):
                            saved[f"{name}|{gamma}|{how}|{build}|{field}"] = np.array(value, copy=True)
    np.savez(path, **saved)


def _entropy_tolerance(name: str) -> tuple[float, float] | None:
    """(relative, absolute) tolerance of case ``name``'s entropy where it changed on purpose
    since b143419 (the module's docstring), None where it must be the same bits. Binary
    probabilities: the old log(1 - p) of the rounded 1 - p dropped the (1 - p) log(1 - p)
    term, about p, where 1 - p rounds (2.7% of H at p = 4e-18): absolutely 1e-15 there."""
    datatype, kind, _classes, layout = name.split("/")
    if layout == "binary":
        return (1e-12, 1e-15) if kind == "probs" else None
    if layout != "index" or (kind, datatype) == ("log_probs", "FP64") or kind == "logits":
        return None
    return (1e-12, 1e-30) if datatype == "FP64" else (1e-5, 1e-30)


def _identical(against: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for side, root in (("before", against), ("after", str(HERE))):
            files[side] = f"{tmp}/{side}.npz"
            subprocess.run(
                [sys.executable, __file__, "--against", root, "--dump", root, files[side]], check=True, cwd=root
            )
            print(f"{side}: scored", file=sys.stderr)
        before, after = np.load(files["before"]), np.load(files["after"])
        masks = {}
        for name, _datatype, kind, x, _y in identity_cases():
            if kind == "log_probs" and x.ndim == 1:
                masks[name] = _encode(x, _datatype)[1].astype(np.float64) >= -math.log(2.0)
        compared = differ = rows = flagged = 0
        worst = 0.0  # the largest relative difference of the entropies compared to a tolerance
        for key in after.files:
            name, gamma, how, build, field = key.split("|")
            if field == "invalid":  # every batch here is valid
                flagged += int(np.count_nonzero(after[key]))
                continue
            other = f"{name}|{gamma}|host|{build}|{field}"
            if other not in before.files:
                continue
            a, b = after[key], before[other]
            if field == "entropy" and name in masks:
                a, b = a[masks[name]], b[masks[name]]
            compared += 1
            rows += a.size
            tolerance = _entropy_tolerance(name) if field == "entropy" else None
            if tolerance is not None:
                rtol, atol = tolerance
                scale = np.maximum(np.abs(b), 1e-25)
                worst = max(worst, float(np.max(np.abs(a - b) / scale, initial=0.0)))
                if not np.allclose(a, b, rtol=rtol, atol=atol):
                    differ += 1
                    print(f"DIFFERS beyond rtol {rtol}, atol {atol}: {key}")
                continue
            if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
                differ += 1
                print(f"DIFFERS: {key} against the other checkout's {how == 'bits' and 'host-widened ' or ''}batch")
        print(
            f"{compared} arrays ({rows} values) compared bit for bit (the changed entropies to their tolerance:"
            f" largest relative difference {worst:.2e}), {differ} differ; {flagged} rows flagged invalid"
        )
        if differ or flagged:
            sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the other checkout's root ('before')")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=("all", "kernels", "fp16", "state"), default="all")
    parser.add_argument("--parallel", action="store_true", help="time the prange builds (all cores)")
    parser.add_argument("--match", default="", help="only the kernel cases whose label contains this")
    parser.add_argument("--identical", action="store_true", help="compare the kernels' outputs bit for bit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dump", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.only, args.parallel, args.match)))
        return
    if args.dump:
        _dump(*args.dump)
        return
    if args.identical:
        _identical(args.against)
        return
    sides = {"before": str(Path(args.against).resolve()), "after": str(HERE)}
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for run in range(args.repeats):
        for side, root in sides.items():
            command = [
                sys.executable,
                __file__,
                "--against",
                root,
                "--child",
                root,
                "--only",
                args.only,
                "--match",
                args.match,
            ]
            done = subprocess.run(
                command + (["--parallel"] if args.parallel else []),
                check=True,
                capture_output=True,
                text=True,
                cwd=root,
            )
            results[side].append(json.loads(done.stdout.splitlines()[-1]))
            print(f"run {run + 1}/{args.repeats} {side}: done", file=sys.stderr)
    build = "parallel" if args.parallel else "serial"
    print(f"median of {args.repeats} alternating runs; kernels in ms per call ({build} build)")
    print(f"{'measure':<34} {'before':>10} {'after':>10} {'after/before':>13}")
    for key in results["after"][0]:
        a = statistics.median(r[key] for r in results["after"])
        scale = 1 if "RSS" in key or "KB" in key else 1e3
        if key not in results["before"][0]:  # something the other checkout does not have
            print(f"{key:<34} {'-':>10} {a * scale:>10.3f}")
            continue
        b = statistics.median(r[key] for r in results["before"])
        print(f"{key:<34} {b * scale:>10.3f} {a * scale:>10.3f} {a / b:>13.3f}")


if __name__ == "__main__":
    main()
