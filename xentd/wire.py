"""Wire protocol v1: the one codec that both the publisher and the daemon use.

A message is a ZeroMQ multipart message:

    [topic]  only on PUB/SUB: the model name, so subscribers can filter by prefix
    header   UTF-8 JSON object: v, model, input, tensors, optional batch_id and ts
    tensor*  raw little-endian C-ordered bytes, one frame per entry of header.tensors

Decoding checks only the framing: that the header is well-formed and that every
frame is exactly as long as its declared shape says. The header is a typed record
(:class:`Header`), decoded and type-checked by msgspec in one pass; its errors name
the field's path (``$.tensors[0].shape[1]``). Whether the values can be
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
from typing import Annotated, Any, Final, Literal, NamedTuple

import msgspec
import numpy as np

from xentd.errors import DecodeError, Reason
from xentd.names import MODEL_NAME_RE

VERSION: Final = 1
INPUT_KINDS: Final = ("probs", "logits", "log_probs")
TENSOR_NAMES: Final = ("predictions", "targets", "weights", "ids")
MAX_BATCH_ID_CHARS: Final = 256
MAX_SEQ: Final = (1 << 63) - 1
MAX_RANK: Final = 2
# Far past any frame that fits in memory; bounds dimensions that a zero elsewhere
# in the shape would otherwise let through to NumPy unchecked.
MAX_DIM: Final = 1 << 40
# The largest event time: 9999-12-31T23:59:59Z, the end of what common date types
# hold. A timestamp in milliseconds or nanoseconds is past it, and refused.
MAX_TS: Final = 253_402_300_799.0

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
    "UINT64": np.dtype("<u8"),  # ids only (xentd.validate says so for any other tensor)
}
# The datatypes an ``ids`` tensor may have; an INT64 id and a UINT64 id with the same 64 bits are one id.
ID_DATATYPES: Final = frozenset({"INT64", "UINT64"})
FLOAT_DATATYPES: Final = frozenset({"FP16", "BF16", "FP32", "FP64"})


# --- the header, as a typed record -----------------------------------------------
#
# Typed leniently where a finer reason than bad_header exists: a datatype is any
# string (an unknown one is unknown_datatype, checked after decoding), and shape
# errors are told apart by their path (bad_shape). Integers are strict: 1.0 is not 1.


class TensorSpec(msgspec.Struct, frozen=True, gc=False):
    """One entry of ``header.tensors``: the next data frame's name, datatype and shape."""

    name: Literal["predictions", "targets", "weights", "ids"]
    datatype: str
    shape: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=MAX_DIM)]], msgspec.Meta(max_length=MAX_RANK)]


class Header(msgspec.Struct, frozen=True, gc=False, omit_defaults=True, kw_only=True):
    """The header frame. Unknown keys are ignored; ``None`` stands for an absent key."""

    v: int
    model: str
    input: str | None = None  # required with predictions (xentd.validate); a labels-only message may omit it
    tensors: Annotated[list[TensorSpec], msgspec.Meta(min_length=1, max_length=len(TENSOR_NAMES))]
    batch_id: Annotated[str, msgspec.Meta(max_length=MAX_BATCH_ID_CHARS)] | None = None
    ts: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_TS)] | None = None
    producer: str | None = None
    seq: int | None = None


class _Envelope(msgspec.Struct, frozen=True, gc=False):
    """The keys a refused header is still read for, with any types (see ``_schema_error``)."""

    v: Any = msgspec.UNSET
    model: Any = None
    producer: Any = None
    seq: Any = None


@dataclass(frozen=True, slots=True)
class Tensor:
    """One decoded tensor: its protocol datatype and a read-only view of its bytes."""

    datatype: str
    array: np.ndarray


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded, not yet validated, batch."""

    model: str
    input: str | None
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
    np.dtype("uint64"): "UINT64",
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
    predictions: Any = None,
    targets: Any = None,
    *,
    input: str = "probs",
    weights: Any = None,
    ids: Any = None,
    batch_id: str | None = None,
    ts: float | None = None,
    producer: str | None = None,
    seq: int | None = None,
) -> list[bytes | memoryview]:
    """Encode one batch into frames (header first). Raises ValueError/TypeError on misuse.

    A full batch has ``predictions`` and ``targets``. With ``ids`` (int64 or uint64, one per
    sample) either may be left out: predictions alone wait in the daemon for their labels,
    and targets alone are labels for predictions sent earlier (docs/protocol.md, "Delayed labels").
    """
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
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ):
        raise ValueError(f"seq must be an integer in [0, 2^63), got {seq!r}")
    if ts is not None and not (math.isfinite(ts) and 0.0 <= ts <= MAX_TS):
        raise ValueError(f"ts must be Unix seconds in [0, {MAX_TS:.0f}] (year 9999), got {ts!r}")
    if predictions is None or targets is None:
        if predictions is None and targets is None:
            raise ValueError("a batch needs predictions, targets, or both")
        if ids is None:
            raise ValueError("predictions without targets (or targets without predictions) need ids to be joined by")
        if predictions is None and weights is not None:
            raise ValueError("a labels-only batch carries no weights: the prediction's weight is used")
    named = [(name, value) for name, value in (("predictions", predictions), ("targets", targets)) if value is not None]
    if weights is not None:
        named.append(("weights", weights))
    if ids is not None:
        named.append(("ids", ids))
    specs: list[TensorSpec] = []
    frames: list[bytes | memoryview] = []
    for name, value in named:
        datatype, arr = _as_wire_array(value, name)
        if name == "ids" and datatype not in ID_DATATYPES:
            raise TypeError(f"ids: dtype {arr.dtype} is not an id type; use int64 or uint64")
        if name != "ids" and datatype == "UINT64":
            raise TypeError(f"{name}: uint64 is for ids only; use int64")
        if arr.ndim > MAX_RANK:
            raise ValueError(f"{name}: rank {arr.ndim} is not supported (at most {MAX_RANK})")
        specs.append(TensorSpec(name, datatype, [int(d) for d in arr.shape]))  # type: ignore[arg-type]
        frames.append(arr.reshape(-1).view(np.uint8).data)
    header = Header(
        v=VERSION,
        model=model,
        input=input if predictions is not None else None,
        tensors=specs,
        batch_id=batch_id or None,  # "" means no batch id
        ts=None if ts is None else float(ts),
        producer=producer,
        seq=seq,
    )
    return [_HEADER_ENCODER.encode(header), *frames]


_HEADER_ENCODER: Final = msgspec.json.Encoder()


# --- decoding (daemon side) ---------------------------------------------------


def _fail(reason: Reason, detail: str, context: _Context | None = None) -> DecodeError:
    if context is None:
        return DecodeError(reason, detail)
    return DecodeError(reason, detail, model=context.model, producer=context.producer, seq=context.seq)


@dataclass(frozen=True, slots=True)
class _Context:
    """What a refused header still tells: a well-formed model name and stream position."""

    model: str | None = None
    producer: str | None = None
    seq: int | None = None


def _refuse(header: Header, reason: Reason, detail: str) -> DecodeError:
    """A rejection of a version-1 header that decoded, with its context (worked out only now)."""
    return _fail(reason, detail, _context(header.model, header.producer, header.seq))


# Names already found well-formed: a lookup costs less than the regular expression,
# and the hot path checks a model or producer name on every message.
_GOOD_NAMES: dict[str, None] = {}
_GOOD_NAMES_MAX: Final = 1 << 14


def well_formed_name(name: str) -> bool:
    """Whether ``name`` is a well-formed model or producer name (:data:`MODEL_NAME_RE`)."""
    if name in _GOOD_NAMES:
        return True
    if not MODEL_NAME_RE.fullmatch(name):
        return False
    if len(_GOOD_NAMES) >= _GOOD_NAMES_MAX:
        _GOOD_NAMES.clear()
    _GOOD_NAMES[name] = None
    return True


def _stream_position(producer: object, seq: object) -> tuple[str, int] | None:
    """(producer, seq) when both are well-formed, else None. The one definition of the rule."""
    if isinstance(producer, str) and well_formed_name(producer) and type(seq) is int and 0 <= seq <= MAX_SEQ:
        return producer, seq
    return None


def _context(model: object, producer: object, seq: object) -> _Context:
    position = _stream_position(producer, seq)
    return _Context(
        model=model if isinstance(model, str) and MODEL_NAME_RE.fullmatch(model) else None,
        producer=None if position is None else position[0],
        seq=None if position is None else position[1],
    )


_HEADER_DECODER: Final = msgspec.json.Decoder(Header)
_ENVELOPE_DECODER: Final = msgspec.json.Decoder(_Envelope)
# msgspec's messages: "Expected `int`, got `float` - at `$.tensors[0].shape[1]`",
# "Object missing required field `shape` - at `$.tensors[0]`".
_AT_RE: Final = re.compile(r" - at `(\$[^`]*)`$")
_MISSING_RE: Final = re.compile(r"^Object missing required field `([^`]*)`")
_SHAPE_PATH_RE: Final = re.compile(r"^\$\.tensors\[\d+\]\.shape(?:\[|$)")


def _salvage(raw: bytes) -> tuple[_Envelope | None, str]:
    """The few keys that decide a refused header's reason and context, read leniently."""
    try:
        return _ENVELOPE_DECODER.decode(raw), ""
    except msgspec.DecodeError as exc:  # ValidationError too: not an object
        return None, str(exc)
    except RecursionError:
        return None, "header nests too deeply"


def _is_version(v: object) -> bool:
    return type(v) is int and v == VERSION


def _unsupported(v: object) -> DecodeError:
    return _fail(
        Reason.UNSUPPORTED_VERSION,
        f"header.v is {json.dumps(v)[:16] if isinstance(v, (int, float, str)) or v is None else type(v).__name__}; "
        f"this daemon speaks version {VERSION} (a JSON integer)",
    )


def _schema_error(raw: bytes, message: str) -> DecodeError:
    """Map msgspec's validation error to a reason. The version is judged first, as if alone:
    a header of another version may differ in any key."""
    envelope, why = _salvage(raw)
    if envelope is None:
        return _fail(Reason.BAD_HEADER, f"header: {(why or message)[:160]}")
    if envelope.v is msgspec.UNSET:
        return _fail(Reason.BAD_HEADER, "header.v is required")
    if not _is_version(envelope.v):
        return _unsupported(envelope.v)
    at, missing = _AT_RE.search(message), _MISSING_RE.match(message)
    path = at.group(1) if at else "$"
    if missing:
        path = f"{path}.{missing.group(1)}"
    reason = Reason.BAD_SHAPE if _SHAPE_PATH_RE.match(path) else Reason.BAD_HEADER
    return _fail(reason, f"header: {message[:200]}", _context(envelope.model, envelope.producer, envelope.seq))


def _keys_surely_unique(raw: bytes, h: Header) -> bool:
    """A cheap proof that no object in the header repeats a key (msgspec keeps the last silently).

    Outside strings, a colon in JSON only ends a key, so the text's colons are all
    its keys plus the colons inside strings. When they number exactly the keys that
    were decoded, there is no other key, repeated or unknown (the usual header).
    Otherwise, with no escapes in the text, the colons inside the decoded strings can
    be added; anything else (unknown keys, nulls, escapes, a repeat) gets the exact check.
    """
    keys = 3 + (h.input is not None) + 3 * len(h.tensors)  # v, model, tensors; input unless labels-only
    keys += (h.batch_id is not None) + (h.ts is not None) + (h.producer is not None) + (h.seq is not None)
    extra = raw.count(b":") - keys
    if extra == 0:
        return True
    if b"\\" in raw:
        return False
    colons = h.model.count(":") + (h.input or "").count(":") + sum(t.datatype.count(":") for t in h.tensors)
    colons += (h.batch_id or "").count(":") + (h.producer or "").count(":")
    return extra == colons


def _repeated_key(raw: bytes) -> str | None:
    """The first key that some object of the header repeats, or None. Exact, and slow."""
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> None:
        if not repeated and len(items) > 1:
            seen: set[str] = set()
            for key, _ in items:
                if key in seen:
                    repeated.append(key)
                    break
                seen.add(key)

    try:
        json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        # msgspec read it, so only the stdlib parser's depth limit can get here.
        raise _fail(Reason.BAD_HEADER, "header nests too deeply") from None
    return repeated[0] if repeated else None


def read_header(raw: memoryview | bytes, max_header_bytes: int) -> Header:
    """Parse and type-check a header frame, or raise DecodeError with its reason."""
    if len(raw) > max_header_bytes:
        raise _fail(Reason.BAD_HEADER, f"header is {len(raw)} bytes, limit {max_header_bytes}")
    data = bytes(raw)
    if not data.isascii():
        # msgspec checks UTF-8 only in the strings it decodes, not in skipped values.
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(Reason.BAD_HEADER, f"header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        header = _HEADER_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise _schema_error(data, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise _fail(Reason.BAD_HEADER, f"header is not JSON: {str(exc)[:120]}") from None
    except RecursionError:
        raise _fail(Reason.BAD_HEADER, "header nests too deeply") from None
    if header.v != VERSION:
        raise _unsupported(header.v)
    if not _keys_surely_unique(data, header):
        repeated = _repeated_key(data)
        if repeated is not None:
            raise _refuse(header, Reason.BAD_HEADER, f"header repeats the key {repeated[:32]!r} in one object")
    return header


class Unpacked(NamedTuple):
    """A message whose framing is checked (see :func:`unpack`); its tensors are still raw buffers.

    ``buffers[i]`` is the data frame of ``header.tensors[i]``, exactly as long as its shape says.
    (A named tuple: the hot path builds one per message, and a tuple is the cheapest record to build.)
    """

    header: Header
    buffers: list[memoryview]
    nbytes: int
    producer: str | None
    seq: int | None

    def message(self) -> Message:
        """The :class:`Message`: a read-only NumPy view of each tensor, nothing copied."""
        tensors: dict[str, Tensor] = {}
        for spec, buf in zip(self.header.tensors, self.buffers, strict=True):
            dtype = DATATYPES[spec.datatype]
            array = np.frombuffer(buf, dtype=dtype, count=math.prod(spec.shape)).reshape(spec.shape)
            tensors[spec.name] = Tensor(spec.datatype, array)
        h = self.header
        return Message(
            model=h.model,
            input=h.input,
            tensors=tensors,
            batch_id=h.batch_id or None,
            ts=h.ts,
            nbytes=self.nbytes,
            producer=self.producer,
            seq=self.seq,
        )


def decode(frames: Sequence[Any], *, max_message_bytes: int, max_header_bytes: int, topic: bool = False) -> Message:
    """Decode frames (``zmq.Frame``, bytes or memoryview) into a :class:`Message`.

    With ``topic=True`` the first frame is a PUB/SUB topic and must equal the model name.
    A :class:`DecodeError` carries the model name and (producer, seq) whenever the
    header is version 1 and they are well-formed, so a refused message still counts
    as having arrived.
    """
    return unpack(frames, max_message_bytes=max_message_bytes, max_header_bytes=max_header_bytes, topic=topic).message()


def unpack(frames: Sequence[Any], *, max_message_bytes: int, max_header_bytes: int, topic: bool = False) -> Unpacked:
    """Every check of :func:`decode`, without building the tensor views.

    The daemon's hot path reads many messages' buffers as one array per layout
    (:mod:`xentd.pipeline`), so a view per tensor would be built only to be thrown away.
    """
    # zmq.Frame (what the daemon's socket gives), bytes and memoryview all export a buffer.
    # memoryview(frame) costs a third of frame.buffer (0.8 against 2.3 us for a 3-frame message).
    buffers = [memoryview(f) for f in frames]
    nbytes = sum([b.nbytes for b in buffers])
    head = 1 if topic else 0
    if nbytes > max_message_bytes:
        context = None
        if len(buffers) > head and buffers[head].nbytes <= max_header_bytes:
            envelope, _ = _salvage(bytes(buffers[head]))
            if envelope is not None and _is_version(envelope.v):
                context = _context(envelope.model, envelope.producer, envelope.seq)
        raise _fail(Reason.MESSAGE_TOO_LARGE, f"message is {nbytes} bytes, limit {max_message_bytes}", context)
    if not buffers:
        raise _fail(Reason.BAD_FRAMING, "empty message")
    if len(buffers) == head:
        raise _fail(Reason.BAD_FRAMING, "message has no header frame")
    header = read_header(buffers[head], max_header_bytes)
    model = header.model
    position = None
    if header.producer is not None or header.seq is not None:
        position = _stream_position(header.producer, header.seq)
        if position is None:
            raise _refuse(
                header,
                Reason.BAD_HEADER,
                "header.producer (1-128 characters of A-Z a-z 0-9 _ . : -) and header.seq "
                "(an integer in [0, 2^63)) go together",
            )
    if topic and bytes(buffers[0]) != model.encode("utf-8", "replace"):
        raise _refuse(header, Reason.TOPIC_MISMATCH, f"topic frame {bytes(buffers[0])[:64]!r} is not the model name")
    specs = header.tensors
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise _refuse(header, Reason.BAD_HEADER, f"tensor {spec.name!r} is listed twice")
        seen.add(spec.name)
        if spec.datatype not in DATATYPES:
            raise _refuse(
                header,
                Reason.UNKNOWN_DATATYPE,
                f"tensor {spec.name!r}: datatype {spec.datatype[:32]!r} is not one of {', '.join(DATATYPES)} "
                "(names are case-sensitive)",
            )
    data_frames = buffers[head + 1 :]
    if len(data_frames) != len(specs):
        raise _refuse(
            header,
            Reason.BAD_FRAMING,
            f"header lists {len(specs)} tensors but {len(data_frames)} data frames follow",
        )
    for spec, buf in zip(specs, data_frames, strict=True):
        expected = math.prod(spec.shape) * DATATYPES[spec.datatype].itemsize
        if expected != buf.nbytes:
            raise _refuse(
                header,
                Reason.SIZE_MISMATCH,
                f"tensor {spec.name!r}: shape {spec.shape} of {spec.datatype} is "
                f"{expected} bytes but its frame has {buf.nbytes}",
            )
    if position is None:
        return Unpacked(header, data_frames, nbytes, None, None)
    return Unpacked(header, data_frames, nbytes, position[0], position[1])
