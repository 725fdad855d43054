"""Validation: conversions, and every rule that rejects a batch."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import make_batch
from xentd import wire
from xentd.errors import Reason, ValidationError
from xentd.validate import InputKind, TargetKind, concatenate, validate
from xentd.wire import BF16


def _rejects(reason: Reason, *args: object, **kw: object) -> None:
    with pytest.raises(ValidationError) as info:
        make_batch(*args, **kw)
    assert info.value.reason is reason, info.value


P = np.array([[0.7, 0.3], [0.4, 0.6]])
Y = np.array([0, 1])


def test_batch_arrays_are_readonly_contiguous_and_widened() -> None:
    b = make_batch(P.astype(np.float16), Y.astype(np.uint8), weights=np.array([1, 2], np.int32))
    assert b.predictions.dtype == np.float32 and b.prediction_datatype == "FP16"
    assert b.dtype_eps == float(np.finfo(np.float16).eps)
    assert b.targets.dtype == np.int64 and b.target_kind is TargetKind.INDEX
    assert b.weights is not None and b.weights.dtype == np.float64
    for a in (b.predictions, b.targets, b.weights):
        assert not a.flags.writeable and a.flags.c_contiguous and a.flags.aligned
    assert b.kind is InputKind.PROBS and b.num_classes == 2 and not b.binary


def test_bf16_predictions_are_widened_exactly() -> None:
    x = np.array([[0.5, -1.25], [3.0, 0.0]], np.float32)
    b = make_batch(BF16.from_float32(x), Y, "logits")
    assert b.prediction_datatype == "BF16" and b.dtype_eps == 2.0**-7
    np.testing.assert_array_equal(b.predictions, x)


def test_binary_targets_become_float() -> None:
    b = make_batch(np.array([0.2, 0.9]), np.array([0, 1], np.int8))
    assert b.binary and b.targets.dtype == np.float64 and b.num_classes == 2
    b = make_batch(np.array([0.2, 0.9]), np.array([0.1, 0.8], np.float32))
    assert b.target_kind is TargetKind.SOFT


def test_one_hot_integer_targets_are_accepted_as_soft() -> None:
    b = make_batch(P, np.eye(2, dtype=np.uint8)[Y])
    assert b.target_kind is TargetKind.SOFT and b.targets.shape == (2, 2)


@pytest.mark.parametrize(
    "args,kw,reason",
    [
        ((P.astype(np.int32), Y), {}, Reason.BAD_DATATYPE),
        ((np.ones((2, 1)), Y), {}, Reason.SHAPE_MISMATCH),
        ((P, np.array([0, 1, 1])), {}, Reason.SHAPE_MISMATCH),
        ((P, np.ones((2, 3))), {}, Reason.SHAPE_MISMATCH),
        ((P, np.array([0.5, 0.5])), {}, Reason.SHAPE_MISMATCH),
        ((np.array([0.5, 0.5]), np.ones((2, 2))), {}, Reason.SHAPE_MISMATCH),
        ((P, Y), {"weights": np.ones(3)}, Reason.SHAPE_MISMATCH),
        ((np.array([[np.nan, 0.5], [0.5, 0.5]]), Y), {}, Reason.NON_FINITE),
        ((np.array([[np.inf, 0.5], [0.5, 0.5]]), Y, "logits"), {}, Reason.NON_FINITE),
        ((np.array([-np.inf, 0.5]), Y, "log_probs"), {}, Reason.NON_FINITE),
        ((P, np.array([[0.5, np.nan], [1, 0]])), {}, Reason.NON_FINITE),
        ((P, Y), {"weights": np.array([1.0, np.nan])}, Reason.NON_FINITE),
        ((np.array([[1.5, -0.5], [0.5, 0.5]]), Y), {}, Reason.PROBABILITY_OUT_OF_RANGE),
        ((np.array([1.0000001, 0.5]), Y), {}, Reason.PROBABILITY_OUT_OF_RANGE),
        ((np.array([[0.1, -2.0], [-0.1, -3.0]]), Y, "log_probs"), {}, Reason.PROBABILITY_OUT_OF_RANGE),
        ((P, np.array([0, 2])), {}, Reason.TARGET_OUT_OF_RANGE),
        ((P, np.array([-1, 0])), {}, Reason.TARGET_OUT_OF_RANGE),
        ((np.array([0.2, 0.8]), np.array([0, 2])), {}, Reason.TARGET_OUT_OF_RANGE),
        ((np.array([0.2, 0.8]), np.array([0.0, 1.5])), {}, Reason.TARGET_OUT_OF_RANGE),
        ((P, np.array([[1.2, -0.2], [0, 1]])), {}, Reason.TARGET_OUT_OF_RANGE),
        ((P, Y), {"weights": np.array([1.0, -0.5])}, Reason.NEGATIVE_WEIGHT),
    ],
)
def test_rejections(args: tuple, kw: dict, reason: Reason) -> None:
    _rejects(reason, *args, **kw)


def test_input_kind_and_missing_tensors_from_raw_headers() -> None:
    import json

    from xentd import wire
    from xentd.validate import validate

    good = [b"\x00" * 8]
    header = {
        "v": 1,
        "model": "m",
        "input": "softmax",
        "tensors": [{"name": "predictions", "datatype": "FP32", "shape": [2]}],
    }
    msg = wire.decode([json.dumps(header).encode(), *good], max_message_bytes=1 << 20, max_header_bytes=4096)
    with pytest.raises(ValidationError) as info:
        validate(msg)
    assert info.value.reason is Reason.BAD_INPUT_KIND
    for bad_name in ("x" * 129, "", "m\n", "spaces here", "caf\u00e9"):
        header.update(input="probs", model=bad_name)
        msg = wire.decode([json.dumps(header).encode(), *good], max_message_bytes=1 << 20, max_header_bytes=4096)
        with pytest.raises(ValidationError) as info:
            validate(msg)
        assert info.value.reason is Reason.BAD_MODEL_NAME
    header.update(input="probs", model="m")
    msg = wire.decode([json.dumps(header).encode(), *good], max_message_bytes=1 << 20, max_header_bytes=4096)
    with pytest.raises(ValidationError) as info:
        validate(msg)
    assert info.value.reason is Reason.MISSING_TENSOR


def test_target_rows_that_are_not_a_distribution_are_counted_not_refused() -> None:
    p = np.full((5, 3), 1 / 3)
    soft = np.array([[0.2, 0.3, 0.5], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.2, 0.2, 0.2]])
    b = make_batch(p, soft)
    assert b.unnormalized_targets == 3 and b.target_kind is TargetKind.SOFT
    np.testing.assert_array_equal(b.targets, soft)  # scored as sent
    multi_hot = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]], np.uint8)
    assert make_batch(p, multi_hot).unnormalized_targets == 2
    assert make_batch(p, np.eye(3, dtype=np.int64)[[0, 1, 2, 0, 1]]).unnormalized_targets == 0


def test_soft_target_tolerance_follows_the_datatype_or_the_given_value() -> None:
    p = np.full((2, 2), 0.5)
    off = np.array([[0.5, 0.5 + 1e-4], [0.5, 0.5]])
    assert make_batch(p, off.astype(np.float64)).unnormalized_targets == 1  # sqrt(eps64) = 1.5e-8
    assert make_batch(p, off.astype(np.float32)).unnormalized_targets == 0  # sqrt(eps32) = 3.5e-4
    assert make_batch(p, off.astype(np.float16)).unnormalized_targets == 0
    frames = [bytes(f) for f in wire.encode("m", p, off)]
    msg = wire.decode(frames, max_message_bytes=1 << 20, max_header_bytes=4096)
    assert validate(msg, target_tolerance=1e-3).unnormalized_targets == 0
    assert validate(msg, target_tolerance=1e-5).unnormalized_targets == 1


def test_index_and_binary_targets_are_never_unnormalized() -> None:
    assert make_batch(P, Y).unnormalized_targets == 0
    assert make_batch(np.array([0.2, 0.9]), np.array([0.3, 0.6])).unnormalized_targets == 0


def test_concatenated_batches_keep_their_unnormalized_counts() -> None:
    a = make_batch(P, np.array([[0.5, 0.6], [1.0, 0.0]]))
    b = make_batch(P, np.array([[0.5, 0.6], [0.5, 0.6]]))
    assert concatenate([a, b]).unnormalized_targets == 3
