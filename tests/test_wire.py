"""The codec: round trips, zero-copy decoding, and every framing error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xentd import wire
from xentd.errors import DecodeError, Reason
from xentd.wire import BF16, bf16_to_float32

LIMITS = {"max_message_bytes": 1 << 20, "max_header_bytes": 4096}


def _frames(header: dict, *tensors: bytes) -> list[bytes]:
    return [json.dumps(header).encode(), *tensors]


def _header(**over: object) -> dict:
    h = {
        "v": 1,
        "model": "m",
        "input": "probs",
        "tensors": [
            {"name": "predictions", "datatype": "FP32", "shape": [2]},
            {"name": "targets", "datatype": "INT64", "shape": [2]},
        ],
    }
    h.update(over)
    return h


GOOD = (np.array([0.25, 0.5], "<f4").tobytes(), np.array([0, 1], "<i8").tobytes())


@pytest.mark.parametrize(
    "dtype", ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"]
)
def test_round_trip_every_datatype(dtype: str) -> None:
    pred = np.linspace(0.1, 0.9, 12).reshape(4, 3).astype(np.float64)
    tgt = np.arange(4).astype(dtype) % 3
    frames = wire.encode("model-1", pred, tgt, input="probs", weights=np.ones(4, dtype), batch_id="b1", ts=12.5)
    msg = wire.decode([bytes(f) for f in frames], **LIMITS)
    assert (msg.model, msg.input, msg.batch_id, msg.ts) == ("model-1", "probs", "b1", 12.5)
    np.testing.assert_array_equal(msg.tensors["targets"].array, tgt)
    assert msg.tensors["targets"].array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(msg.tensors["weights"].array, np.ones(4))
    np.testing.assert_array_equal(msg.tensors["predictions"].array, pred)


def test_big_endian_input_is_sent_little_endian() -> None:
    pred = np.array([0.25, 0.75], ">f8")
    frames = wire.encode("m", pred, np.array([0, 1], ">i4"))
    assert bytes(frames[1]) == np.array([0.25, 0.75], "<f8").tobytes()
    msg = wire.decode([bytes(f) for f in frames], **LIMITS)
    np.testing.assert_array_equal(msg.tensors["predictions"].array, [0.25, 0.75])


def test_bool_targets_travel_as_uint8() -> None:
    frames = wire.encode("m", np.array([0.2, 0.9]), np.array([False, True]))
    assert json.loads(frames[0])["tensors"][1]["datatype"] == "UINT8"


def test_decoding_is_zero_copy() -> None:
    buf = bytearray(np.array([0.25, 0.5], "<f4").tobytes())
    msg = wire.decode([json.dumps(_header()).encode(), memoryview(buf), GOOD[1]], **LIMITS)
    arr = msg.tensors["predictions"].array
    buf[0:4] = np.array([0.125], "<f4").tobytes()
    assert arr[0] == 0.125  # a view on the frame, not a copy


def test_bf16_round_to_nearest_even_and_widen_exactly() -> None:
    x = np.array([1.0, -2.5, 3.14159265, 1e-30, np.inf, -np.inf, 65504.0, 1.00390625 + 2**-9], np.float32)
    bits = BF16.from_float32(x).bits
    back = bf16_to_float32(bits)
    assert back[0] == 1.0 and back[1] == -2.5 and np.isinf(back[4]) and np.isinf(back[5])
    assert abs(back[2] - 3.140625) < 1e-7  # nearest bf16 to pi
    assert back[7] == np.float32(1.0078125)  # a tie rounds to the even mantissa
    assert np.isnan(bf16_to_float32(BF16.from_float32(np.array([np.nan], np.float32)).bits))[0]
    frames = wire.encode("m", BF16(bits), np.zeros(8, np.int64))
    assert json.loads(frames[0])["tensors"][0]["datatype"] == "BF16"


def test_encode_refuses_misuse() -> None:
    with pytest.raises(ValueError, match="model name"):
        wire.encode("bad name!", np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="input must be"):
        wire.encode("m", np.ones(2), np.ones(2), input="softmax")
    with pytest.raises(TypeError, match="complex128"):
        wire.encode("m", np.ones(2, complex), np.ones(2))
    with pytest.raises(TypeError, match="uint64"):
        wire.encode("m", np.ones(2), np.ones(2, np.uint64))
    with pytest.raises(ValueError, match="rank 3"):
        wire.encode("m", np.ones((2, 2, 2)), np.ones(2))


@pytest.mark.parametrize(
    "frames,reason",
    [
        ([], Reason.BAD_FRAMING),
        ([b"\xff\xfe{}"], Reason.BAD_HEADER),
        ([b"not json"], Reason.BAD_HEADER),
        ([b"[1, 2]"], Reason.BAD_HEADER),
        ([b"[" * 3000 + b"]" * 3000], Reason.BAD_HEADER),
        ([b" " * 5000], Reason.BAD_HEADER),
        (_frames(_header(v=2), *GOOD), Reason.UNSUPPORTED_VERSION),
        (_frames(_header(v=True), *GOOD), Reason.UNSUPPORTED_VERSION),
        (_frames(_header(model=7), *GOOD), Reason.BAD_HEADER),
        (_frames(_header(input=None), *GOOD), Reason.BAD_HEADER),
        (_frames(_header(batch_id=5), *GOOD), Reason.BAD_HEADER),
        (_frames(_header(ts="now"), *GOOD), Reason.BAD_HEADER),
        (_frames(_header(tensors=[]), *GOOD), Reason.BAD_HEADER),
        (_frames(_header(tensors=[{"name": "x", "datatype": "FP32", "shape": [2]}]), GOOD[0]), Reason.BAD_HEADER),
        (
            _frames(_header(tensors=[{"name": "predictions", "datatype": "FP32", "shape": [2]}] * 2), *GOOD),
            Reason.BAD_HEADER,
        ),
        (
            _frames(_header(tensors=[{"name": "predictions", "datatype": "COMPLEX64", "shape": [2]}]), GOOD[0]),
            Reason.UNKNOWN_DATATYPE,
        ),
        (
            _frames(_header(tensors=[{"name": "predictions", "datatype": ">f4", "shape": [2]}]), GOOD[0]),
            Reason.UNKNOWN_DATATYPE,
        ),
        (
            _frames(_header(tensors=[{"name": "predictions", "datatype": "FP32", "shape": [-1]}]), GOOD[0]),
            Reason.BAD_SHAPE,
        ),
        (
            _frames(_header(tensors=[{"name": "predictions", "datatype": "FP32", "shape": [1, 1, 2]}]), GOOD[0]),
            Reason.BAD_SHAPE,
        ),
        (
            _frames(_header(tensors=[{"name": "predictions", "datatype": "FP32", "shape": [2**62, 2**62]}]), GOOD[0]),
            Reason.BAD_SHAPE,
        ),
        (
            _frames(_header(tensors=[{"name": "predictions", "datatype": "FP32", "shape": [2**33, 2**33]}]), GOOD[0]),
            Reason.SIZE_MISMATCH,
        ),
        (_frames(_header(), GOOD[0], GOOD[1][:-1]), Reason.SIZE_MISMATCH),
        (_frames(_header(), GOOD[0]), Reason.BAD_FRAMING),
        (_frames(_header(), *GOOD, b"extra"), Reason.BAD_FRAMING),
        (_frames(_header(), GOOD[0], b"\0" * (1 << 20)), Reason.MESSAGE_TOO_LARGE),
    ],
)
def test_decode_errors_carry_their_reason(frames: list[bytes], reason: Reason) -> None:
    with pytest.raises(DecodeError) as info:
        wire.decode(frames, **LIMITS)
    assert info.value.reason is reason


def test_topic_frame_must_name_the_model() -> None:
    frames = _frames(_header(), *GOOD)
    assert wire.decode([b"m", *frames], topic=True, **LIMITS).model == "m"
    with pytest.raises(DecodeError) as info:
        wire.decode([b"other", *frames], topic=True, **LIMITS)
    assert info.value.reason is Reason.TOPIC_MISMATCH
