"""After warm-up, no batch the daemon can accept triggers a compilation."""

from __future__ import annotations

import itertools

import numpy as np

from tests.conftest import default_params, make_batch, softmax
from xentd import accumulate, scan, segments, wire
from xentd.config import Config, LimitsConfig, WindowsConfig
from xentd.daemon import Daemon
from xentd.kernels import cpu
from xentd.state import StateStore
from xentd.wire import BF16


def _dispatchers() -> list:
    out = [k for pair in cpu.KERNELS.values() for k in pair]
    out += [
        getattr(accumulate, n)
        for n in ("fold_batch", "time_add", "time_read", "count_push", "count_read", "derive_rows")
    ]
    out += [scan._scan_serial, scan._scan_parallel, scan._widen_serial, scan._widen_parallel]
    return out


def test_no_compilation_after_warmup() -> None:
    clock = lambda: 1000.0  # noqa: E731
    backend = cpu.CpuBackend(parallel_threshold=64)
    store = StateStore(WindowsConfig(), LimitsConfig(), clock)
    backend.warmup()
    scan.warmup()
    store.warmup()
    before = {id(d): len(d.signatures) for d in _dispatchers()}

    rng = np.random.default_rng(0)
    p2 = softmax(rng.normal(size=(100, 3)))
    encoders = {
        "FP16": lambda x: x.astype(np.float16),
        "BF16": lambda x: BF16.from_float32(x.astype(np.float32)),
        "FP32": lambda x: x.astype(np.float32),
        "FP64": lambda x: x,
    }
    targets = {
        "binary-int": (p2[:, 0], rng.integers(0, 2, 100).astype(np.uint8)),
        "binary-soft": (p2[:, 0], rng.random(100).astype(np.float16)),
        "index": (p2, rng.integers(0, 3, 100).astype(np.int32)),
        "soft32": (p2, softmax(rng.normal(size=(100, 3))).astype(np.float32)),
        "soft64": (p2, softmax(rng.normal(size=(100, 3)))),
        "onehot-int": (p2, np.eye(3, dtype=np.uint8)[rng.integers(0, 3, 100)]),
    }
    big = softmax(rng.normal(size=(30_000, 3)))  # past scan.PARALLEL_MIN: the parallel builds
    targets["big"] = (big, rng.integers(0, 3, 30_000))
    for (_dt, enc), (name, (pred, tgt)), weighted, short in itertools.product(
        encoders.items(), targets.items(), (False, True), (False, True)
    ):
        n = 5 if short else len(pred)
        weights = np.ones(n, np.float32) if weighted else None
        batch = make_batch(enc(pred[:n]), tgt[:n], "probs", weights, model=f"{name}-{pred.ndim}")
        scores = backend.score(batch, default_params(batch))
        with store.lock:
            store.model(batch.model, batch.num_classes).fold(scores, batch.weights, clock(), None)
    store.snapshot()
    after = {id(d): len(d.signatures) for d in _dispatchers()}
    assert after == before


def test_the_batched_check_compiles_nothing_after_warmup() -> None:
    """Drains of every prediction and target datatype, weighted or not, use only what the warm-ups
    compiled: the weights check, and the kernels that check and widen the values themselves."""
    segments.warmup()
    backend = cpu.CpuBackend()
    backend.warmup()
    dispatchers = [segments._check_weights, *(k for pair in cpu.KERNELS.values() for k in pair)]
    before = [len(k.signatures) for k in dispatchers]
    d = Daemon(Config())
    d.pipeline.backend = backend
    rng = np.random.default_rng(1)
    p = softmax(rng.normal(size=(8, 3)))
    preds = {
        "FP16": p.astype(np.float16),
        "BF16": BF16.from_float32(p.astype(np.float32)),
        "FP32": p.astype(np.float32),
        "FP64": p,
    }
    targets = {
        "index8": rng.integers(0, 3, 8).astype(np.uint8),
        "index64": rng.integers(0, 3, 8),
        "soft32": softmax(rng.normal(size=(8, 3))).astype(np.float32),
        "soft64": softmax(rng.normal(size=(8, 3))),
        "onehot": np.eye(3, dtype=np.uint8)[rng.integers(0, 3, 8)],
    }
    drain = []
    for (dt, pred), (name, tgt), weighted in itertools.product(preds.items(), targets.items(), (False, True)):
        weights = np.ones(8, np.float32) if weighted else None
        for model in (f"{dt}-{name}", f"{dt}-{name}-binary"):
            if model.endswith("binary"):
                pred_b = p[:, 0].astype(np.float32)
                frames = wire.encode(model, pred_b, rng.integers(0, 2, 8), weights=weights)
            else:
                frames = wire.encode(model, pred, tgt, weights=weights)
            drain += [[bytes(f) for f in frames]] * 4  # a drain long enough for the batched path
    d.handle_many(drain)
    assert sum(d.state.rejected.values()) == 0, d.state.rejected
    assert [len(k.signatures) for k in dispatchers] == before


def test_a_scrape_compiles_nothing_after_the_daemons_warmup() -> None:
    """The first /metrics of a restored store runs on what Daemon._compile warmed (the snapshot
    reader and the text kernels) before the scoring kernels are ready."""
    from xentd import textformat
    from xentd.exporter import Exposition

    clock = lambda: 1000.0  # noqa: E731
    store = StateStore(WindowsConfig(), LimitsConfig(), clock)
    store.warmup()
    textformat.warmup()
    dispatchers = [textformat.shortest, textformat.format_values, textformat.write_lines]
    before = [len(d.signatures) for d in dispatchers]
    backend = cpu.CpuBackend()
    rng = np.random.default_rng(3)
    for name, classes in (("a", 3), ("b", 2), ("c", 40)):
        batch = make_batch(softmax(rng.normal(size=(20, classes))), rng.integers(0, classes, 20), model=name)
        store.model(name, classes).fold(backend.score(batch, default_params(batch)), None, 1000.0, None)
    text = Exposition(store.snapshot, version="x", backend="cpu").text().decode()
    assert 'xentd_samples_total{model="c"} 20.0' in text
    assert [len(d.signatures) for d in dispatchers] == before
