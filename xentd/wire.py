"""Wire protocol v1: the one codec that both the publisher and the daemon use.

A message is a ZeroMQ multipart message:

    [topic]  only on PUB/SUB: the model name, so subscribers can filter by prefix
    header   UTF-8 JSON object: v, model, input, tensors, optional batch_id and ts
    tensor*  raw little-endian C-ordered bytes, one frame per entry of header.tensors

Decoding checks only the framing: that the header is well-formed and that every
frame is exactly as long as its declared shape says. Whether the values can be
scored is :mod:`xentd.validate`'s job. Tensors are views on the frame buffers
(``np.frombuffer``); nothing is copied and nothing is ever unpickled.

docs/protocol.md is the specification; keep the two in step.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from xentd.errors import DecodeError, Reason

VERSION: Final = 1
MODEL_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")  # always fullmatch
INPUT_KINDS: Final = ("probs", "logits", "log_probs")
TENSOR_NAMES: Final = ("predictions", "targets", "weights")
MAX_BATCH_ID_CHARS: Final = 256
MAX_SEQ: Final = (1 << 63) - 1
MAX_RANK: Final = 2
# Far past any frame that fits in memory; bounds dimensions that a zero elsewhere
# in the shape would otherwise let through to NumPy unchecked.
MAX_DIM: Final = 1 << 40

# Open Inference Protocol datatype names -> little-endian storage dtype.
# BF16 has no NumPy dtype; it travels as its 16 raw bits and is widened on decode.
DATATYPES: Final[Mapping[str, np.dtype[Any]]] = {
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
}
FLOAT_DATATYPES: Final = frozenset({"FP16", "BF16", "FP32", "FP64"})


@dataclass(frozen=True, slots=True)
class Tensor:
    """One decoded tensor: its protocol datatype and a read-only view of its bytes."""

    datatype: str
    array: np.ndarray


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded, not yet validated, batch."""

    model: str
    input: str
    tensors: Mapping[str, Tensor]
    batch_id: str | None
    ts: float | None
    nbytes: int
    # A producer's stream: its id and this message's sequence number in it.
    producer: str | None = None
    seq: int | None = None


# --- encoding (publisher side) ------------------------------------------------

_NUMPY_TO_DATATYPE: Final = {
    np.dtype("float16"): "FP16",
    np.dtype("float32"): "FP32",
    np.dtype("float64"): "FP64",
    np.dtype("int8"): "INT8",
    np.dtype("int16"): "INT16",
    np.dtype("int32"): "INT32",
    np.dtype("int64"): "INT64",
    np.dtype("uint8"): "UINT8",
    np.dtype("uint16"): "UINT16",
    np.dtype("uint32"): "UINT32",
}


class BF16:
    """Marks a uint16 array as bfloat16 bit patterns, for producers without ``ml_dtypes``.

    ``BF16.from_float32(x)`` rounds to nearest even, like every ML framework does.
    """

    __slots__ = ("bits",)

    def __init__(self, bits: np.ndarray) -> None:
        if bits.dtype != np.uint16:
            raise TypeError(f"BF16 wraps uint16 bit patterns, got dtype {bits.dtype}")
        self.bits = bits

    @classmethod
    def from_float32(cls, x: np.ndarray) -> BF16:
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
        bits = (rounded >> np.uint32(16)).astype(np.uint16)
        # NaN must stay NaN: rounding could carry a NaN payload into infinity.
        nan = np.isnan(np.asarray(x, dtype=np.float32))
        bits[nan] = np.uint16(0x7FC0)
        return cls(bits)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns to float32. Exact: bf16 is the top half of an fp32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _as_wire_array(value: Any, name: str) -> tuple[str, np.ndarray]:
    if isinstance(value, BF16):
        return "BF16", np.ascontiguousarray(value.bits, dtype="<u2")
    arr = np.asarray(value)
    if arr.dtype.name == "bfloat16":  # ml_dtypes / jax arrays, without importing them
        return "BF16", np.ascontiguousarray(arr).view(np.uint16).astype("<u2", copy=False)
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    native = arr.dtype.newbyteorder("=")
    datatype = _NUMPY_TO_DATATYPE.get(native)
    if datatype is None:
        supported = ", ".join(sorted(_NUMPY_TO_DATATYPE.values()) + ["BF16"])
        raise TypeError(f"{name}: dtype {arr.dtype} has no protocol datatype; use one of {supported}")
    return datatype, np.ascontiguousarray(arr, dtype=DATATYPES[datatype])


def encode(
    model: str,
    predictions: Any,
    targets: Any,
    *,
    input: str = "probs",
    weights: Any = None,
    batch_id: str | None = None,
    ts: float | None = None,
    producer: str | None = None,
    seq: int | None = None,
) -> list[bytes | memoryview]:
    """Encode one batch into frames (header first). Raises ValueError/TypeError on misuse."""
    if not isinstance(model, str) or not MODEL_NAME_RE.fullmatch(model):
        raise ValueError(f"model name {model!r} must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    if input not in INPUT_KINDS:
        raise ValueError(f"input must be one of {', '.join(INPUT_KINDS)}, got {input!r}")
    if batch_id is not None and (not isinstance(batch_id, str) or len(batch_id) > MAX_BATCH_ID_CHARS):
        raise ValueError(f"batch_id must be a string of at most {MAX_BATCH_ID_CHARS} characters")
    if (producer is None) != (seq is None):
        raise ValueError("producer and seq go together")
    if producer is not None and not MODEL_NAME_RE.fullmatch(producer):
        raise ValueError(f"producer {producer!r} must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    if seq is not None and not (isinstance(seq, int) and 0 <= seq <= MAX_SEQ):
        raise ValueError(f"seq must be an integer in [0, 2^63), got {seq!r}")
    named = [("predictions", predictions), ("targets", targets)]
    if weights is not None:
        named.append(("weights", weights))
    specs: list[dict[str, Any]] = []
    frames: list[bytes | memoryview] = []
    for name, value in named:
        datatype, arr = _as_wire_array(value, name)
        if arr.ndim > MAX_RANK:
            raise ValueError(f"{name}: rank {arr.ndim} is not supported (at most {MAX_RANK})")
        specs.append({"name": name, "datatype": datatype, "shape": list(arr.shape)})
        frames.append(arr.reshape(-1).view(np.uint8).data)
    header: dict[str, Any] = {"v": VERSION, "model": model, "input": input, "tensors": specs}
    if batch_id is not None:
        header["batch_id"] = batch_id
    if ts is not None:
        header["ts"] = float(ts)
    if producer is not None:
        header["producer"] = producer
        header["seq"] = seq
    return [json.dumps(header, separators=(",", ":")).encode("utf-8"), *frames]


# --- decoding (daemon side) ---------------------------------------------------


def _fail(reason: Reason, detail: str) -> DecodeError:
    return DecodeError(reason, detail)


def parse_header(raw: memoryview | bytes, max_header_bytes: int) -> dict[str, Any]:
    if len(raw) > max_header_bytes:
        raise _fail(Reason.BAD_HEADER, f"header is {len(raw)} bytes, limit {max_header_bytes}")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(Reason.BAD_HEADER, f"header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _fail(Reason.BAD_HEADER, f"header is not JSON: {str(exc)[:120]}") from None
    if not isinstance(header, dict):
        raise _fail(Reason.BAD_HEADER, f"header must be a JSON object, got {type(header).__name__}")
    return header


def _tensor_specs(header: Mapping[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    specs = header.get("tensors")
    if not isinstance(specs, list) or not specs:
        raise _fail(Reason.BAD_HEADER, "header.tensors must be a non-empty list")
    if len(specs) > len(TENSOR_NAMES):
        raise _fail(Reason.BAD_HEADER, f"header.tensors lists {len(specs)} tensors, at most {len(TENSOR_NAMES)}")
    out: list[tuple[str, str, tuple[int, ...]]] = []
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise _fail(Reason.BAD_HEADER, f"header.tensors[{i}] must be an object")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if name not in TENSOR_NAMES:
            raise _fail(
                Reason.BAD_HEADER, f"header.tensors[{i}].name must be one of {', '.join(TENSOR_NAMES)}, got {name!r}"
            )
        if name in seen:
            raise _fail(Reason.BAD_HEADER, f"tensor {name!r} is listed twice")
        seen.add(name)
        if not isinstance(datatype, str):
            raise _fail(Reason.BAD_HEADER, f"tensor {name!r}: datatype must be a string")
        if datatype not in DATATYPES:
            raise _fail(
                Reason.UNKNOWN_DATATYPE,
                f"tensor {name!r}: datatype {datatype[:32]!r} is not one of {', '.join(DATATYPES)}",
            )
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
        ):
            raise _fail(
                Reason.BAD_SHAPE,
                f"tensor {name!r}: shape must be a list of at most {MAX_RANK} "
                f"integers in [0, 2^40], got {str(shape)[:64]}",
            )
        out.append((name, datatype, tuple(shape)))
    return out


def decode(frames: Sequence[Any], *, max_message_bytes: int, max_header_bytes: int, topic: bool = False) -> Message:
    """Decode frames (``zmq.Frame``, bytes or memoryview) into a :class:`Message`.

    With ``topic=True`` the first frame is a PUB/SUB topic and must equal the model name.
    """
    buffers = [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames]
    nbytes = sum(b.nbytes for b in buffers)
    if nbytes > max_message_bytes:
        raise _fail(Reason.MESSAGE_TOO_LARGE, f"message is {nbytes} bytes, limit {max_message_bytes}")
    topic_buf = None
    if topic:
        if not buffers:
            raise _fail(Reason.BAD_FRAMING, "empty message")
        topic_buf, buffers = buffers[0], buffers[1:]
    if not buffers:
        raise _fail(Reason.BAD_FRAMING, "message has no header frame")
    header = parse_header(buffers[0], max_header_bytes)
    if header.get("v") != VERSION or isinstance(header.get("v"), bool):
        raise _fail(
            Reason.UNSUPPORTED_VERSION,
            f"header.v is {str(header.get('v'))[:16]!r}; this daemon speaks version {VERSION}",
        )
    model = header.get("model")
    if not isinstance(model, str):
        raise _fail(Reason.BAD_HEADER, "header.model must be a string")
    if topic_buf is not None and bytes(topic_buf) != model.encode("utf-8", "replace"):
        raise _fail(Reason.TOPIC_MISMATCH, f"topic frame {bytes(topic_buf)[:64]!r} is not the model name")
    kind = header.get("input")
    if not isinstance(kind, str):
        raise _fail(Reason.BAD_HEADER, "header.input must be a string")
    batch_id = header.get("batch_id")
    if batch_id is not None and (not isinstance(batch_id, str) or len(batch_id) > MAX_BATCH_ID_CHARS):
        raise _fail(Reason.BAD_HEADER, f"header.batch_id must be a string of at most {MAX_BATCH_ID_CHARS} chars")
    ts = header.get("ts")
    if ts is not None:
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise _fail(Reason.BAD_HEADER, "header.ts must be a finite number of Unix seconds")
        ts = float(ts)
    producer, seq = header.get("producer"), header.get("seq")
    if producer is not None or seq is not None:
        if not isinstance(producer, str) or not MODEL_NAME_RE.fullmatch(producer):
            raise _fail(
                Reason.BAD_HEADER, "header.producer must be 1-128 characters of A-Z a-z 0-9 _ . : - when seq is given"
            )
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
            raise _fail(Reason.BAD_HEADER, "header.seq must be an integer in [0, 2^63) when producer is given")
    specs = _tensor_specs(header)
    data_frames = buffers[1:]
    if len(data_frames) != len(specs):
        raise _fail(Reason.BAD_FRAMING, f"header lists {len(specs)} tensors but {len(data_frames)} data frames follow")
    tensors: dict[str, Tensor] = {}
    for (name, datatype, shape), buf in zip(specs, data_frames, strict=True):
        dtype = DATATYPES[datatype]
        count = math.prod(shape)
        expected = count * dtype.itemsize
        if expected != buf.nbytes:
            raise _fail(
                Reason.SIZE_MISMATCH,
                f"tensor {name!r}: shape {list(shape)} of {datatype} is "
                f"{expected} bytes but its frame has {buf.nbytes}",
            )
        arr = np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)
        tensors[name] = Tensor(datatype, arr)
    return Message(
        model=model, input=kind, tensors=tensors, batch_id=batch_id, ts=ts, nbytes=nbytes, producer=producer, seq=seq
    )
