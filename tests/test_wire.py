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


# --- the typed header: integers, versions, duplicates, ts, context ------------------


def _reason(frames: list[bytes]) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        wire.decode(frames, **LIMITS)
    return info.value


def _raw(text: str, *tensors: bytes) -> list[bytes]:
    return [text.encode(), *tensors]


_TENSORS = '[{"name":"predictions","datatype":"FP32","shape":[2]},{"name":"targets","datatype":"INT64","shape":[2]}]'


def test_errors_name_the_field_path() -> None:
    spec = _header(tensors=[{"name": "predictions", "datatype": "FP32", "shape": [2, 1.0]}])
    err = _reason(_frames(spec, GOOD[0]))
    assert err.reason is Reason.BAD_SHAPE and "$.tensors[0].shape[1]" in err.detail
    err = _reason(_frames(_header(model=7), *GOOD))
    assert err.reason is Reason.BAD_HEADER and "$.model" in err.detail
    missing_shape = _header(tensors=[{"name": "predictions", "datatype": "FP32"}])
    assert _reason(_frames(missing_shape, GOOD[0])).reason is Reason.BAD_SHAPE


@pytest.mark.parametrize(
    "v,reason",
    [(2, Reason.UNSUPPORTED_VERSION), (0, Reason.UNSUPPORTED_VERSION), (1.0, Reason.UNSUPPORTED_VERSION)]
    + [("1", Reason.UNSUPPORTED_VERSION), (None, Reason.UNSUPPORTED_VERSION), (2**70, Reason.UNSUPPORTED_VERSION)],
)
def test_only_the_integer_1_is_version_1(v: object, reason: Reason) -> None:
    assert _reason(_frames(_header(v=v), *GOOD)).reason is reason


def test_a_missing_version_is_a_bad_header() -> None:
    h = _header()
    del h["v"]
    err = _reason(_frames(h, *GOOD))
    assert err.reason is Reason.BAD_HEADER and "header.v" in err.detail


def test_the_version_is_judged_before_the_rest_of_the_header() -> None:
    """A header of another version may differ anywhere: it is unsupported, not malformed."""
    assert _reason(_raw('{"tensors":{"x":1},"v":2}', *GOOD)).reason is Reason.UNSUPPORTED_VERSION
    assert _reason(_raw('{"tensors":{"x":1}}', *GOOD)).reason is Reason.BAD_HEADER


@pytest.mark.parametrize(
    "over,reason",
    [
        (
            {"tensors": [{"name": "predictions", "datatype": "FP32", "shape": [2.0]}, _header()["tensors"][1]]},
            "bad_shape",
        ),
        ({"producer": "p", "seq": 3.0}, "bad_header"),
        ({"producer": "p", "seq": 3.5}, "bad_header"),
        ({"v": 1.0}, "unsupported_version"),
    ],
)
def test_integer_fields_must_be_json_integers(over: dict, reason: str) -> None:
    assert _reason(_frames(_header(**over), *GOOD)).reason == reason


@pytest.mark.parametrize(
    "text",
    [
        '{"v":1,"v":1,"model":"m","input":"probs","tensors":%s}',
        '{"v":1,"model":"x","model":"m","input":"probs","tensors":%s}',
        '{"v":1,"model":"m","input":"probs","tensors":%s,"extra":1,"extra":2}',
        '{"v":1,"model":"m:1","input":"probs","batch_id":"a:b","batch_id":"c","tensors":%s}',
        '{"v":1,"model":"m","input":"probs","tensors":%s,"note":"\\u003a","ts":1,"ts":2}',
    ],
)
def test_a_repeated_key_is_a_bad_header(text: str) -> None:
    err = _reason(_raw(text % _TENSORS, *GOOD))
    assert err.reason is Reason.BAD_HEADER and "repeats the key" in err.detail


def test_a_repeated_key_inside_a_tensor_spec_is_a_bad_header() -> None:
    tensors = _TENSORS.replace('"shape":[2]}', '"shape":[2],"shape":[2]}', 1)
    err = _reason(_raw('{"v":1,"model":"m","input":"probs","tensors":' + tensors + "}", *GOOD))
    assert err.reason is Reason.BAD_HEADER and "'shape'" in err.detail


@pytest.mark.parametrize(
    "text",
    [
        '{"v":1,"model":"m","input":"probs","tensors":%s}',
        '{"v":1,"model":"org:m","input":"probs","tensors":%s,"batch_id":"2026-01-01T00:00:00Z"}',
        '{"v":1,"model":"m","input":"probs","tensors":%s,"extra":{"v":2,"model":"x"},"note":"a:b"}',
        '{"v":1,"model":"m","input":"probs","tensors":%s,"batch_id":null,"ts":null}',
        '{"v":1,"model":"m","input":"probs","tensors":%s,"batch_id":"\\u0062:1"}',
    ],
)
def test_keys_repeated_only_across_objects_are_fine(text: str) -> None:
    """Tensor specs share key names, nested unknown objects may reuse header keys, colons live in strings."""
    msg = wire.decode(_raw(text % _TENSORS, *GOOD), **LIMITS)
    assert msg.model in ("m", "org:m")


@pytest.mark.parametrize("ts", [-5, -1e-9, 1e308, 253402300800, 1.7e12, "1", True])
def test_ts_must_be_unix_seconds_up_to_year_9999(ts: object) -> None:
    err = _reason(_frames(_header(ts=ts), *GOOD))
    assert err.reason is Reason.BAD_HEADER and "$.ts" in err.detail


@pytest.mark.parametrize("ts", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_ts_is_a_bad_header(ts: str) -> None:
    text = '{"v":1,"model":"m","input":"probs","tensors":' + _TENSORS + ',"ts":' + ts + "}"
    assert _reason(_raw(text, *GOOD)).reason is Reason.BAD_HEADER


def test_valid_ts_range() -> None:
    for ts in (0, 0.0, 1.7e9, 253402300799):
        assert wire.decode(_frames(_header(ts=ts), *GOOD), **LIMITS).ts == float(ts)
    with pytest.raises(ValueError, match="ts must be"):
        wire.encode("m", np.ones(2), np.ones(2), ts=1.7e12)


def test_an_empty_batch_id_means_none() -> None:
    assert wire.decode(_frames(_header(batch_id=""), *GOOD), **LIMITS).batch_id is None
    assert "batch_id" not in json.loads(wire.encode("m", np.ones(2), np.ones(2), batch_id="")[0])


def test_datatype_names_are_case_sensitive() -> None:
    spec = _header(tensors=[{"name": "predictions", "datatype": "fp32", "shape": [2]}])
    err = _reason(_frames(spec, GOOD[0]))
    assert err.reason is Reason.UNKNOWN_DATATYPE and "case-sensitive" in err.detail


def test_a_refused_header_still_tells_its_model_and_stream_position() -> None:
    """So the pipeline can record the seq (no false gap) and count the rejection per model."""
    unknown = _header(
        tensors=[{"name": "predictions", "datatype": "FP8", "shape": [2]}, _header()["tensors"][1]],
        producer="p",
        seq=7,
    )
    err = _reason(_frames(unknown, *GOOD))
    assert (err.reason, err.model, err.producer, err.seq) == (Reason.UNKNOWN_DATATYPE, "m", "p", 7)
    bad_shape = _header(tensors=[{"name": "predictions", "datatype": "FP32", "shape": [-2]}], producer="p", seq=8)
    err = _reason(_frames(bad_shape, GOOD[0]))
    assert (err.reason, err.model, err.producer, err.seq) == (Reason.BAD_SHAPE, "m", "p", 8)
    err = _reason(_frames(_header(producer="p", seq=9), GOOD[0], GOOD[1][:-1]))
    assert (err.reason, err.seq) == (Reason.SIZE_MISMATCH, 9)
    err = _reason(_frames(_header(producer="p", seq=10), GOOD[0], b"\0" * (1 << 20)))
    assert (err.reason, err.model, err.seq) == (Reason.MESSAGE_TOO_LARGE, "m", 10)
    # Nothing that is not well-formed, and nothing from a header of another version.
    err = _reason(_frames(_header(model="a b", producer="p", seq=-1, ts=-1), *GOOD))
    assert (err.model, err.producer, err.seq) == (None, None, None)
    err = _reason(_frames(_header(v=2, producer="p", seq=11), *GOOD))
    assert (err.reason, err.model, err.seq) == (Reason.UNSUPPORTED_VERSION, None, None)


def test_invalid_utf8_in_an_ignored_key_is_still_refused() -> None:
    raw = json.dumps(_header()).encode()[:-1] + b', "note": "\xff"}'
    assert _reason([raw, *GOOD]).reason is Reason.BAD_HEADER


def test_encoded_header_is_compact_json_in_field_order() -> None:
    frames = wire.encode("m", np.ones(2, np.float32), np.ones(2, np.int64), batch_id="b", ts=2.5, producer="p", seq=1)
    assert bytes(frames[0]) == (
        b'{"v":1,"model":"m","input":"probs","tensors":[{"name":"predictions","datatype":"FP32","shape":[2]},'
        b'{"name":"targets","datatype":"INT64","shape":[2]}],"batch_id":"b","ts":2.5,"producer":"p","seq":1}'
    )


@pytest.mark.parametrize("depth", [50, 3000, 100_000])
def test_deep_nesting_in_an_ignored_key_is_refused_cleanly(depth: int) -> None:
    text = json.dumps(_header())[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
    limits = {**LIMITS, "max_header_bytes": 1 << 20, "max_message_bytes": 1 << 21}
    if depth == 50:
        assert wire.decode([text.encode(), *GOOD], **limits).model == "m"
    else:
        with pytest.raises(DecodeError) as info:
            wire.decode([text.encode(), *GOOD], **limits)
        assert info.value.reason is Reason.BAD_HEADER


def test_a_topic_mismatch_still_tells_the_stream_position() -> None:
    frames = _frames(_header(producer="p", seq=3), *GOOD)
    with pytest.raises(DecodeError) as info:
        wire.decode([b"other", *frames], topic=True, **LIMITS)
    assert (info.value.reason, info.value.model, info.value.producer, info.value.seq) == (
        Reason.TOPIC_MISMATCH,
        "m",
        "p",
        3,
    )


def test_ids_round_trip_uint64_above_2_63_and_int64() -> None:
    ids = np.array([0, 2**63, 2**64 - 1], np.uint64)
    frames = wire.encode("m", np.array([0.1, 0.5, 0.9]), ids=ids, input="probs")
    msg = wire.decode(frames, max_message_bytes=1 << 20, max_header_bytes=1 << 16)
    assert set(msg.tensors) == {"predictions", "ids"}
    assert msg.tensors["ids"].datatype == "UINT64"
    assert msg.tensors["ids"].array.tolist() == ids.tolist()
    labels = wire.encode("m", targets=np.array([1, 0, 1]), ids=np.array([-1, 5, 7], np.int64))
    msg = wire.decode(labels, max_message_bytes=1 << 20, max_header_bytes=1 << 16)
    assert set(msg.tensors) == {"targets", "ids"} and msg.tensors["ids"].datatype == "INT64"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "needs predictions, targets, or both"),
        ({"predictions": np.ones(2) / 2}, ValueError, "need ids"),
        ({"targets": np.ones(2, np.int64), "ids": np.arange(2), "weights": np.ones(2)}, ValueError, "no weights"),
        ({"predictions": np.ones(2) / 2, "ids": np.arange(2.0)}, TypeError, "int64 or uint64"),
        ({"predictions": np.ones(2) / 2, "targets": np.ones(2, np.uint64)}, TypeError, "ids only"),
    ],
)
def test_encode_refuses_incomplete_join_messages(kwargs: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        wire.encode("m", **kwargs)  # type: ignore[arg-type]
