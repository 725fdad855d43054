"""Message generators for fuzzing: valid batches, and hostile mutations of them.

Shared by the test suite (a bounded sample) and ``scripts/fuzz.py`` (the long run).
Everything is driven by one ``numpy.random.Generator``, so a failing case is
reproduced from its seed and index.

Valid messages go to models named ``valid-*``; mutated ones to models named
``fuzz-*``. A mutation may leave a message valid (a flipped bit in a float is
usually still a float), so the exact-count check covers only ``valid-*``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from xentd import wire
from xentd.config import Config, IngestConfig, LimitsConfig, WindowsConfig
from xentd.daemon import Daemon
from xentd.errors import Reason

Frames = list[bytes]

VALID_MODELS = tuple(f"valid-{i}" for i in range(4))
FUZZ_MODELS = tuple(f"fuzz-{i}" for i in range(4))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Valid:
    frames: Frames
    model: str
    samples: int


def valid_message(rng: np.random.Generator, model: str, *, batch_id: str | None = None) -> Valid:
    """A random well-formed batch. Each model keeps one class count, so none is rejected."""
    n = int(rng.integers(0, 40))
    classes = 2 + int(model[-1]) * 3 if model[-1].isdigit() else 5
    kind = str(rng.choice(["probs", "logits", "log_probs"]))
    x = rng.normal(0, 2, (n, classes))
    if kind == "probs":
        pred = _softmax(x)
    elif kind == "log_probs":
        pred = np.log(np.maximum(_softmax(x), 1e-300))
    else:
        pred = x
    dtype = rng.choice(["FP16", "BF16", "FP32", "FP64"])
    if dtype == "BF16":
        pred_arr: object = wire.BF16.from_float32(pred.astype(np.float32))
        if kind == "log_probs":  # rounding up can cross 0
            pred_arr = wire.BF16.from_float32(np.minimum(pred, 0).astype(np.float32))
    else:
        pred_arr = pred.astype({"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}[str(dtype)])
        if kind == "log_probs":
            pred_arr = np.minimum(pred_arr, 0)  # type: ignore[call-overload]
        if kind == "probs":
            pred_arr = np.clip(pred_arr, 0, 1)  # type: ignore[call-overload]
    y = rng.integers(0, classes, n).astype(rng.choice([np.int64, np.int32, np.uint8]))
    weights = rng.random(n) + 0.1 if rng.random() < 0.3 else None
    frames = wire.encode(
        model,
        pred_arr,
        y,
        input=kind,
        weights=weights,
        batch_id=batch_id,
        ts=1.7e9 + float(rng.random()) if rng.random() < 0.5 else None,
    )
    return Valid([bytes(f) for f in frames], model, n)


# --- mutations ------------------------------------------------------------------


def _header(frames: Frames) -> dict[str, object]:
    return json.loads(frames[0])  # type: ignore[no-any-return]


def _with_header(frames: Frames, header: object) -> Frames:
    return [json.dumps(header).encode(), *frames[1:]]


def _set_tensor(field: str, values: list[object]) -> Callable[[Frames, np.random.Generator], Frames]:
    def mutate(frames: Frames, rng: np.random.Generator) -> Frames:
        h = _header(frames)
        specs = h["tensors"]
        assert isinstance(specs, list)
        specs[int(rng.integers(0, len(specs)))][field] = values[int(rng.integers(0, len(values)))]
        return _with_header(frames, h)

    return mutate


def _set_key(key: str, values: list[object]) -> Callable[[Frames, np.random.Generator], Frames]:
    def mutate(frames: Frames, rng: np.random.Generator) -> Frames:
        h = _header(frames)
        h[key] = values[int(rng.integers(0, len(values)))]
        return _with_header(frames, h)

    return mutate


def _random_bytes(frames: Frames, rng: np.random.Generator) -> Frames:
    return [rng.bytes(int(rng.integers(0, 200))) for _ in range(int(rng.integers(0, 5)))]


def _flip_bytes(frames: Frames, rng: np.random.Generator) -> Frames:
    out = list(frames)
    i = int(rng.integers(0, len(out)))
    if out[i]:
        b = bytearray(out[i])
        for _ in range(int(rng.integers(1, 8))):
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
        out[i] = bytes(b)
    return out


def _truncate(frames: Frames, rng: np.random.Generator) -> Frames:
    out = list(frames)
    i = int(rng.integers(0, len(out)))
    out[i] = out[i][: int(rng.integers(0, max(1, len(out[i]))))]
    return out


def _drop_frame(frames: Frames, rng: np.random.Generator) -> Frames:
    out = list(frames)
    del out[int(rng.integers(0, len(out)))]
    return out


def _extra_frame(frames: Frames, rng: np.random.Generator) -> Frames:
    return [*frames, rng.bytes(int(rng.integers(0, 64)))]


def _not_utf8(frames: Frames, rng: np.random.Generator) -> Frames:
    return [b"\xff\xfe" + frames[0][2:], *frames[1:]]


def _nested(frames: Frames, rng: np.random.Generator) -> Frames:
    depth = int(rng.choice([50, 5000, 100000]))
    return [b"[" * depth + b"]" * depth, *frames[1:]]


def _huge_header(frames: Frames, rng: np.random.Generator) -> Frames:
    h = _header(frames)
    h["padding"] = "x" * int(rng.choice([70_000, 1_000_000]))
    return _with_header(frames, h)


def _not_object(frames: Frames, rng: np.random.Generator) -> Frames:
    return _with_header(frames, [1, 2, 3] if rng.random() < 0.5 else "header")


def _nan_inf(frames: Frames, rng: np.random.Generator) -> Frames:
    h = _header(frames)
    specs = h["tensors"]
    assert isinstance(specs, list)
    idx = [i for i, s in enumerate(specs) if s["datatype"] in wire.FLOAT_DATATYPES and np.prod(s["shape"]) > 0]
    if not idx:
        return _flip_bytes(frames, rng)
    i = idx[int(rng.integers(0, len(idx)))]
    spec = specs[i]
    dtype = wire.DATATYPES[spec["datatype"]]
    arr = np.frombuffer(frames[1 + i], dtype=dtype).copy()
    bad = {"FP16": [0x7E00, 0x7C00, 0xFC00], "BF16": [0x7FC0, 0x7F80, 0xFF80]}.get(spec["datatype"])
    pos = int(rng.integers(0, arr.size))
    if bad is not None:
        arr[pos] = bad[int(rng.integers(0, 3))]
    else:
        arr[pos] = [np.nan, np.inf, -np.inf][int(rng.integers(0, 3))]
    out = list(frames)
    out[1 + i] = arr.tobytes()
    return out


def _label_out_of_range(frames: Frames, rng: np.random.Generator) -> Frames:
    h = _header(frames)
    specs = h["tensors"]
    assert isinstance(specs, list)
    for i, s in enumerate(specs):
        if s["name"] == "targets" and s["datatype"] not in wire.FLOAT_DATATYPES and np.prod(s["shape"]) > 0:
            arr = np.frombuffer(frames[1 + i], dtype=wire.DATATYPES[s["datatype"]]).copy()
            info = np.iinfo(arr.dtype)
            arr[int(rng.integers(0, arr.size))] = info.max if rng.random() < 0.5 or info.min == 0 else -1
            out = list(frames)
            out[1 + i] = arr.tobytes()
            return out
    return _flip_bytes(frames, rng)


def _oversize(frames: Frames, rng: np.random.Generator) -> Frames:
    # Past the 1 MiB limit the fuzz daemons run with.
    return [*frames, b"\0" * (1 << 20)]


def _bad_model(frames: Frames, rng: np.random.Generator) -> Frames:
    names = ["", "a b", "x" * 129, "ünïcode", "../etc", "a\nb", 'q"uote', "\0"]
    h = _header(frames)
    h["model"] = names[int(rng.integers(0, len(names)))]
    return _with_header(frames, h)


def _repeat_key(frames: Frames, rng: np.random.Generator) -> Frames:
    """The header with one of its keys written twice (a JSON parser would keep either copy)."""
    h = _header(frames)
    key = list(h)[int(rng.integers(0, len(h)))]
    text = json.dumps(h)
    return [("{" + json.dumps(key) + ": " + json.dumps(h[key]) + ", " + text[1:]).encode(), *frames[1:]]


def _many_models(frames: Frames, rng: np.random.Generator) -> Frames:
    h = _header(frames)
    h["model"] = f"fuzz-flood-{int(rng.integers(0, 1 << 30))}"
    return _with_header(frames, h)


_BIG = [2**31, 2**32 + 1, 2**63, 2**64 + 3, 10**30]

MUTATIONS: dict[str, Callable[[Frames, np.random.Generator], Frames]] = {
    "random_bytes": _random_bytes,
    "flip_bytes": _flip_bytes,
    "truncate": _truncate,
    "drop_frame": _drop_frame,
    "extra_frame": _extra_frame,
    "not_utf8": _not_utf8,
    "nested": _nested,
    "huge_header": _huge_header,
    "not_object": _not_object,
    "datatype": _set_tensor(
        "datatype",
        [">f4", "<f4", "float32", "FP8", "fp32", "BOOL", "BYTES", "", 7, None, "FP64", "INT8", "UINT64", "BF16"],
    ),
    "shape": _set_tensor(
        "shape",
        [
            [],
            [0],
            [-1],
            [1, 2, 3],
            [0, *_BIG[-1:]],
            [_BIG[0], _BIG[0]],
            [_BIG[2]],
            [_BIG[3], 0],
            [2**62, 4],
            [1.5],
            ["3"],
            [True],
            None,
            "3",
            [3, 0],
            [0, 0],
        ],
    ),
    "name": _set_tensor("name", ["predictions", "targets", "weights", "labels", "", None, 1]),
    "version": _set_key("v", [0, 2, "1", 1.0, True, None, -1, 2**70]),
    "input": _set_key("input", ["prob", "LOGITS", "", None, 3, "log_probs", "logits", "probs"]),
    "tensors": _set_key("tensors", [[], {}, None, "x", [1], [[]], [{}] * 4]),
    "batch_id": _set_key("batch_id", [1, "x" * 300, None, "", ["a"]]),
    "ts": _set_key("ts", ["now", float("nan"), float("inf"), True, 1e308, -1, 2**80]),
    "nan_inf": _nan_inf,
    "label_out_of_range": _label_out_of_range,
    "oversize": _oversize,
    "bad_model": _bad_model,
    "many_models": _many_models,
    "repeat_key": _repeat_key,
}


def mutated_message(rng: np.random.Generator) -> tuple[str, Frames]:
    """A hostile message: one or two mutations of a valid ``fuzz-*`` batch."""
    base = valid_message(rng, FUZZ_MODELS[int(rng.integers(0, len(FUZZ_MODELS)))]).frames
    names = list(MUTATIONS)
    applied = []
    for _ in range(1 if rng.random() < 0.8 else 2):
        name = names[int(rng.integers(0, len(names)))]
        try:
            base = MUTATIONS[name](base, rng)
        except (ValueError, KeyError, TypeError, IndexError, AssertionError, RecursionError):
            # The previous mutation already broke the header beyond this one's reach.
            continue
        applied.append(name)
    return "+".join(applied) or "none", base


def stream(seed: int, count: int, bad_fraction: float = 0.5) -> Iterator[tuple[str, Frames, Valid | None]]:
    """``count`` messages, valid and hostile interleaved: (mutation or "valid", frames, Valid or None)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        if rng.random() < bad_fraction:
            name, frames = mutated_message(rng)
            yield name, frames, None
        else:
            v = valid_message(rng, VALID_MODELS[int(rng.integers(0, len(VALID_MODELS)))])
            yield "valid", v.frames, v


# --- the in-process harness -------------------------------------------------------

FUZZ_CONFIG = Config(
    ingest=IngestConfig(max_message_bytes=1 << 20),
    limits=LimitsConfig(max_models=16),
    windows=WindowsConfig(count=(100,)),
)


@dataclass
class Report:
    messages: int = 0
    valid: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    by_mutation: dict[str, Counter[str]] = field(default_factory=dict)
    slowest: tuple[float, str] = (0.0, "")
    problems: list[str] = field(default_factory=list)


def _model_rows(d: Daemon, prefix: str) -> dict[str, tuple[object, ...]]:
    rows = {}
    for m in d.state.snapshot().models:
        if m.name.startswith(prefix):
            rows[m.name] = (
                m.samples,
                m.weight,
                m.loss_weighted_sum,
                m.correct_weighted_sum,
                m.batches,
                m.hist_counts.tolist(),
                m.class_weight.tolist(),
                m.class_loss_weighted_sum.tolist(),
                [(w, s) for w, s in m.windows],
            )
    return rows


def run_in_process(seed: int, count: int, chunk: int = 64) -> Report:
    """Feed ``count`` fuzz messages through a daemon's real handling path, in drains of ``chunk``.

    A control daemon gets only the valid messages. The valid models' state must be
    identical in both, every message must be accounted for, and no rejection may be
    an internal error.
    """
    clock = lambda: 1_700_000_000.0  # noqa: E731 - both daemons must see one time
    fuzzed, control = Daemon(FUZZ_CONFIG, clock=clock), Daemon(FUZZ_CONFIG, clock=clock)
    fuzzed._init_backend()
    control.pipeline.backend = fuzzed.backend
    report = Report()
    expected: Counter[str] = Counter()
    items = stream(seed, count)
    while True:
        batch = list(itertools.islice(items, chunk))
        if not batch:
            break
        before = Counter(fuzzed.state.rejected)
        started = time.perf_counter()
        fuzzed.handle_many([frames for _, frames, _ in batch])
        elapsed = (time.perf_counter() - started) / len(batch)
        if elapsed > report.slowest[0]:
            report.slowest = (elapsed, ",".join(sorted({n for n, _, _ in batch})))
        control.handle_many([frames for _, frames, v in batch if v is not None])
        for _, _, v in batch:
            report.messages += 1
            if v is not None:
                report.valid += 1
                expected[v.model] += v.samples
        # Attribute this drain's rejections to the mutations in it (exact for chunk=1).
        delta = Counter(fuzzed.state.rejected)
        delta.subtract(before)
        for reason, n in delta.items():
            if n:
                report.rejected[reason] += n
                if chunk == 1:
                    report.by_mutation.setdefault(batch[0][0], Counter())[reason] += n
    if report.rejected[Reason.INTERNAL_ERROR.value]:
        report.problems.append(f"{report.rejected[Reason.INTERNAL_ERROR.value]} internal errors")
    if fuzzed.state.counters.messages != report.messages:
        report.problems.append(f"daemon counted {fuzzed.state.counters.messages} messages, sent {report.messages}")
    got, want = _model_rows(fuzzed, "valid-"), _model_rows(control, "valid-")
    if got != want:
        report.problems.append("valid models' state differs from the control daemon's")
    for model, samples in expected.items():
        if samples and got.get(model, (0,))[0] != samples:
            report.problems.append(f"{model}: {got.get(model, (0,))[0]} samples scored, {samples} sent")
    return report
