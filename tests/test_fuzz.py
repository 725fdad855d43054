"""Hostile input: the decoder and validator refuse it with a specific reason, and never fail otherwise.

Three layers: hypothesis properties over arbitrary frames and headers, one
explicit case per kind of hostile message with the reason it must get, and a
bounded sample of the mutation fuzzer that ``scripts/fuzz.py`` runs at length.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import fuzzing
from xentd import wire
from xentd.config import Config, IngestConfig, LimitsConfig
from xentd.daemon import Daemon
from xentd.errors import DecodeError, Reason, RejectedBatch
from xentd.validate import validate

LIMITS = {"max_message_bytes": 1 << 20, "max_header_bytes": 1 << 16}


def _decode_and_validate(frames: list[bytes]) -> None:
    validate(wire.decode(frames, **LIMITS))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_frames_are_refused_cleanly(frames: list[bytes]) -> None:
    try:
        wire.decode(frames, **LIMITS)
    except DecodeError:
        pass


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_dims = st.one_of(
    st.integers(min_value=0, max_value=6),
    st.sampled_from([2**31, 2**40, 2**41, 2**64, 10**30]),
    st.integers(min_value=-3, max_value=-1),
)
_spec = st.fixed_dictionaries(
    {
        "name": st.sampled_from([*wire.TENSOR_NAMES, "labels"]),
        "datatype": st.sampled_from([*wire.DATATYPES, ">f4", "FP8", "UINT64"]),
        "shape": st.one_of(st.lists(_dims, max_size=3), _json),
    }
)
_header = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(1), _json_scalars),
        "model": st.one_of(st.just("m"), st.text(max_size=10)),
        "input": st.sampled_from(["probs", "logits", "log_probs", "x"]),
        "tensors": st.lists(_spec, max_size=4),
    },
    optional={"batch_id": _json, "ts": _json_scalars, "extra": _json},
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_header, st.data())
def test_arbitrary_headers_are_refused_cleanly(header: dict[str, Any], data: st.DataObject) -> None:
    """Frames sized to agree with the header half the time, so validation is reached too."""
    frames = [json.dumps(header).encode()]
    for spec in header["tensors"]:
        size = None
        try:
            size = int(np.prod(spec["shape"], dtype=object)) * wire.DATATYPES[spec["datatype"]].itemsize
        except Exception:  # noqa: BLE001 - a hostile spec: any frame will do
            pass
        if size is not None and 0 <= size <= 4096 and data.draw(st.booleans()):
            frames.append(data.draw(st.binary(min_size=size, max_size=size)))
        else:
            frames.append(data.draw(st.binary(max_size=64)))
    try:
        _decode_and_validate(frames)
    except RejectedBatch as exc:
        assert exc.reason is not Reason.INTERNAL_ERROR


# --- one case per kind of hostile message, with the reason it must get ----------


def _valid() -> list[bytes]:
    p = np.full((4, 3), 1 / 3, np.float32)
    return [bytes(f) for f in wire.encode("m", p, np.array([0, 1, 2, 0]))]


def _with(frames: list[bytes], **changes: Any) -> list[bytes]:
    header = json.loads(frames[0])
    for key, value in changes.items():
        if key.startswith("pred_"):
            header["tensors"][0][key[5:]] = value
        else:
            header[key] = value
    return [json.dumps(header).encode(), *frames[1:]]


def _without(frames: list[bytes], key: str) -> list[bytes]:
    header = json.loads(frames[0])
    del header[key]
    return [json.dumps(header).encode(), *frames[1:]]


def _header_only(raw: bytes) -> list[bytes]:
    return [raw, *_valid()[1:]]


CASES: dict[str, tuple[Reason, list[bytes]]] = {
    "empty message": (Reason.BAD_FRAMING, []),
    "truncated frame": (Reason.SIZE_MISMATCH, [*_valid()[:1], _valid()[1][:-1], _valid()[2]]),
    "missing frame": (Reason.BAD_FRAMING, _valid()[:2]),
    "extra frame": (Reason.BAD_FRAMING, [*_valid(), b"\0" * 8]),
    "header not UTF-8": (Reason.BAD_HEADER, _header_only(b'{"v": 1, "model": "\xff"}')),
    "header not JSON": (Reason.BAD_HEADER, _header_only(b"{v: 1")),
    "header deeply nested": (Reason.BAD_HEADER, _header_only(b"[" * 100_000 + b"]" * 100_000)),
    "header huge": (Reason.BAD_HEADER, _with(_valid(), pad="x" * 70_000)),
    "header an array": (Reason.BAD_HEADER, _header_only(b"[1, 2]")),
    "big-endian datatype": (Reason.UNKNOWN_DATATYPE, _with(_valid(), pred_datatype=">f4")),
    "unknown datatype": (Reason.UNKNOWN_DATATYPE, _with(_valid(), pred_datatype="FP8")),
    "shape overflows int64": (Reason.SIZE_MISMATCH, _with(_valid(), pred_shape=[2**32 + 1, 2**32 + 1])),
    "huge dimension beside a zero": (
        Reason.BAD_SHAPE,
        [*_with(_valid(), pred_shape=[0, 10**30])[:1], b"", _valid()[2]],
    ),
    "shape disagrees with frame": (Reason.SIZE_MISMATCH, _with(_valid(), pred_shape=[4, 4])),
    "negative dimension": (Reason.BAD_SHAPE, _with(_valid(), pred_shape=[-4, 3])),
    "rank 3": (Reason.BAD_SHAPE, _with(_valid(), pred_shape=[1, 4, 3])),
    "oversize in total": (Reason.MESSAGE_TOO_LARGE, [*_valid(), b"\0" * (1 << 20)]),
    "NaN": (Reason.NON_FINITE, [*_valid()[:1], np.array([np.nan] * 12, np.float32).tobytes(), _valid()[2]]),
    "Inf weight": (
        Reason.NON_FINITE,
        [bytes(f) for f in wire.encode("m", np.full((2, 2), 0.5), [0, 1], weights=[1.0, np.inf])],
    ),
    "label out of range": (
        Reason.TARGET_OUT_OF_RANGE,
        [bytes(f) for f in wire.encode("m", np.full((2, 2), 0.5), np.array([0, 2]))],
    ),
    "negative label": (
        Reason.TARGET_OUT_OF_RANGE,
        [bytes(f) for f in wire.encode("m", np.full((2, 2), 0.5), np.array([0, -1]))],
    ),
    "version 2": (Reason.UNSUPPORTED_VERSION, _with(_valid(), v=2)),
    "version 1.0": (Reason.UNSUPPORTED_VERSION, _with(_valid(), v=1.0)),
    "version missing": (Reason.BAD_HEADER, _without(_valid(), "v")),
    "repeated key": (Reason.BAD_HEADER, [b'{"v": 1, ' + _valid()[0][1:], *_valid()[1:]]),
    "fractional dimension": (Reason.BAD_SHAPE, _with(_valid(), pred_shape=[4, 3.0])),
    "negative ts": (Reason.BAD_HEADER, _with(_valid(), ts=-5)),
    "ts in milliseconds": (Reason.BAD_HEADER, _with(_valid(), ts=1.7e12)),
    "fractional seq": (Reason.BAD_HEADER, _with(_valid(), producer="p", seq=1.0)),
    "bad model name": (Reason.BAD_MODEL_NAME, _with(_valid(), model="a/b")),
}


@pytest.mark.parametrize("case", CASES)
def test_each_hostile_message_gets_its_reason(case: str) -> None:
    reason, frames = CASES[case]
    with pytest.raises(RejectedBatch) as info:
        _decode_and_validate(frames)
    assert info.value.reason is reason, info.value


def test_too_many_models_is_a_counted_rejection() -> None:
    d = Daemon(Config(limits=LimitsConfig(max_models=2)))
    d._init_backend()
    for name in ("a", "b", "c", "d"):
        d.handle([bytes(f) for f in wire.encode(name, np.full((1, 2), 0.5), [1])])
    assert sorted(m.name for m in d.state.snapshot().models) == ["a", "b"]
    assert d.state.rejected[Reason.TOO_MANY_MODELS.value] == 2


def test_oversize_message_is_refused_before_decoding() -> None:
    d = Daemon(Config(ingest=IngestConfig(max_message_bytes=1000)))
    d._init_backend()
    d.handle([bytes(f) for f in wire.encode("m", np.full((100, 2), 0.5), np.zeros(100, np.int64))])
    assert d.state.rejected[Reason.MESSAGE_TOO_LARGE.value] == 1
    assert not d.state.models


# --- a bounded sample of the mutation fuzzer (scripts/fuzz.py runs millions) -----


@pytest.mark.parametrize("chunk", [1, 64])
def test_mutation_fuzz_sample(chunk: int) -> None:
    report = fuzzing.run_in_process(seed=chunk, count=4000, chunk=chunk)
    assert not report.problems, report.problems
    assert report.valid > 1500
    assert sum(report.rejected.values()) > 1000
    if chunk == 1:
        # Every mutation kind was exercised and refused under a specific reason.
        kinds = {k for name in report.by_mutation for k in name.split("+")}
        assert kinds == set(fuzzing.MUTATIONS)


def test_float64_overflow_is_refused_and_spares_the_rest_of_its_group() -> None:
    """Finite inputs whose losses overflow float64 must not turn a model's totals into Inf."""
    d = Daemon(Config())
    d._init_backend()
    ok = [bytes(f) for f in wire.encode("m", np.array([[0.0, 1.0]]), [1], input="logits")]
    huge_logits = [bytes(f) for f in wire.encode("m", np.array([[1e308, -1e308]]), [1], input="logits")]
    huge_weight = [bytes(f) for f in wire.encode("m", np.array([[0.0, 1.0]]), [1], input="logits", weights=[1e308])]
    d.handle_many([ok, huge_logits, ok, huge_weight, huge_weight, ok])
    (m,) = d.state.snapshot().models
    assert m.batches == 4 and m.samples == 4  # ok x3 and the first huge weight; the second would sum to Inf
    assert np.isfinite(m.loss_weighted_sum) and np.isfinite(m.weight)
    assert d.state.rejected[Reason.NON_FINITE.value] == 2
    assert all(np.isfinite(s.cross_entropy) for _, s in m.windows)
