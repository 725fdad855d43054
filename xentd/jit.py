"""How xentd builds its Numba kernels, and the low-level helpers that kernels in more than one module inline.

Serial and parallel builds: small inputs go to the serial build, because
starting the thread pool costs more than the work (~6 us against ~0.4 us for a
plain call, measured on the dev machine); large ones go to the
``parallel=True`` build, whose ``prange`` loops split across cores.

Cache freshness: Numba keeps a cached kernel for as long as the kernel's own
source file is unchanged (its modification time and size); code the kernel
inlines from another module is not looked at. So every helper that kernels of
more than one module inline lives here, and every build made through
:func:`cached` (and :func:`serial_and_parallel`) also records a hash of this
file in its cache index: changing a helper here recompiles every kernel that
may have inlined it, instead of loading the stale build.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit
from numba import types as nbtypes
from numba.core import cgutils
from numba.extending import intrinsic, overload

# What a cached build's freshness depends on besides its own source file: this file's text.
HELPERS_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def cached(*inlines: str, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``njit(cache=True, **options)``, whose cache entries are stale once this file changes (see the
    module doc), or once any of the files ``inlines`` changes: the sources of other helpers it inlines."""
    stamp = HELPERS_HASH
    for path in inlines:
        stamp += hashlib.sha256(Path(path).read_bytes()).hexdigest()

    def build(f: Callable[..., Any]) -> Any:
        dispatcher = njit(cache=True, **options)(f)
        # Numba compares this stamp, (mtime, size) of the function's file, with the one its
        # cache index was written with, and ignores the index when they differ.
        index = dispatcher._cache._cache_file
        index._source_stamp = (index._source_stamp, stamp)
        return dispatcher

    return build


def _twin(f: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    """A copy of ``f`` under another qualname.

    Numba's on-disk cache is keyed by qualname, and a serial and a parallel
    dispatcher of one function share an index: the parallel one then loads the
    serial build from cache. A distinct qualname gives each its own entry.
    """
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + suffix
    return g


def kernel_array(a: np.ndarray) -> np.ndarray:
    """A C-contiguous, aligned, read-only view of ``a``, copying only when it is not
    already contiguous and aligned.

    Numba compiles one specialisation per array type, and read-only (a frame's
    buffer) and writeable (a conversion) arrays are different types. Every array
    handed to a kernel goes through here, so each dtype has one signature, the
    one warm-up compiles.
    """
    if not (a.flags.c_contiguous and a.flags.aligned):
        a = np.ascontiguousarray(a).copy()
    view = a.view()
    view.flags.writeable = False
    return view


def serial_and_parallel(f: Callable[..., Any]) -> tuple[Any, Any]:
    """(serial build, parallel build) of ``f``, both cached on disk.

    Both use ``error_model="numpy"``: a float division then has no
    zero-divisor check (which raises in Python's model), and loops that divide
    can vectorise. Kernels never divide by zero (validated inputs), and
    inlined helpers compile under their caller's error model.
    """
    return (
        cached(error_model="numpy")(f),
        cached(parallel=True, error_model="numpy")(_twin(f, "__parallel")),
    )


# --- intrinsics ------------------------------------------------------------------
#
# What Numba does not express in a way the loop vectoriser accepts: bit
# reinterpretation, and min/max as ``llvm.minnum``/``llvm.maxnum`` with fast-math
# flags (a plain max loop is not recognised as a reduction, because Numba does
# not mark functions no-nans-fp-math). Callers pass finite values only: under
# fast-math a NaN or infinite operand is poison in LLVM.


def _resize(builder: Any, value: Any, integer: Any, width: int) -> Any:
    """The low ``width`` bits of ``value``, of Numba type ``integer`` (zero-extended when narrower)."""
    if integer.bitwidth > width:
        return builder.trunc(value, ir.IntType(width))
    if integer.bitwidth < width:
        return builder.zext(value, ir.IntType(width))
    return value


@intrinsic
def bits_to_float32(typingctx, bits):  # type: ignore[no-untyped-def]
    """Reinterpret the low 32 bits of an integer as a float32 (a free bitcast)."""
    if not isinstance(bits, nbtypes.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(_resize(builder, args[0], bits, 32), ir.FloatType())

    return nbtypes.float32(bits), codegen


@intrinsic
def half_bits_to_float32(typingctx, bits):  # type: ignore[no-untyped-def]
    """IEEE half bit pattern -> float32, exactly (LLVM fpext; F16C's vcvtph2ps where available)."""
    if not isinstance(bits, nbtypes.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        half = builder.bitcast(_resize(builder, args[0], bits, 16), ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return nbtypes.float32(bits), codegen


@intrinsic
def bf16_bits_to_float32(typingctx, bits):  # type: ignore[no-untyped-def]
    """BF16 bit pattern (the low 16 bits of an integer) -> float32: the top half of a float32
    (a shift and a bitcast in LLVM, so that it lowers alike on the CPU and on CUDA)."""
    if not isinstance(bits, nbtypes.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        wide = builder.zext(_resize(builder, args[0], bits, 16), ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return nbtypes.float32(bits), codegen


def _minmax_intrinsic(name: str):  # type: ignore[no-untyped-def]
    @intrinsic
    def impl(typingctx, a, b):  # type: ignore[no-untyped-def]
        if a not in (nbtypes.float32, nbtypes.float64) or a != b:
            return None
        llty = ir.FloatType() if a == nbtypes.float32 else ir.DoubleType()
        suffix = "f32" if a == nbtypes.float32 else "f64"

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            fnty = ir.FunctionType(llty, [llty, llty])
            fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.{name}.{suffix}")  # type: ignore[no-untyped-call]
            return builder.call(fn, args, fastmath=("fast",))

        return a(a, b), codegen

    return impl


# max and min of two finite values of one float type, as vectorisable llvm.maxnum / llvm.minnum.
fmax = _minmax_intrinsic("maxnum")
fmin = _minmax_intrinsic("minnum")

# The finite identities of the reductions below: fast-math min/max must never see an infinity.
FINITE_MAX = 1.7976931348623157e308


@cached(error_model="numpy", inline="always")
def finite_range(x, a, b):  # type: ignore[no-untyped-def]
    """(min, max, count of NaN/Inf) of a non-empty float x[a:b]; min and max skip the
    non-finite values (they are masked to 0 first), so they mean something only when the count is 0."""
    lo = FINITE_MAX
    hi = -FINITE_MAX
    bad = 0
    for j in range(a, b):
        v = np.float64(x[j])
        finite = (v - v) == 0.0
        bad += 0 if finite else 1
        clean = v if finite else 0.0
        lo = fmin(lo, clean)
        hi = fmax(hi, clean)
    return lo, hi, bad


# --- loads and value rules, for the scoring kernels ------------------------------
#
# Predictions reach the kernels as float32 or float64, or as the raw wire bits of FP16
# (uint16) and BF16 (int16: the dtype tells the two apart). ``load`` widens a value
# as it is read, chosen by the array's dtype when the kernel compiles. The value rules
# (finite; probabilities in [0, 1]; log-probabilities <= 0) are tested on the float's
# bit pattern, never with float comparisons: under fast-math LLVM may assume that no
# value is NaN or infinite, and delete ``x != x`` or fold a comparison with a NaN.
#
# Each is a plain Python function (what CUDA's simulator runs, and what tests may call)
# with an ``overload`` that is what Numba compiles, on the CPU and on CUDA alike.


def load(x: Any) -> Any:
    """A prediction value as the kernels compute with it: float32 and float64 as they are,
    FP16 (uint16) and BF16 (int16) bit patterns widened exactly to float32."""
    if isinstance(x, np.uint16):
        return np.float32(x.view(np.float16))
    if isinstance(x, np.int16):
        return (np.uint32(x.view(np.uint16)) << np.uint32(16)).view(np.float32)
    return x


@overload(load)
def _load(x):  # type: ignore[no-untyped-def]
    if x in (nbtypes.float32, nbtypes.float64):
        return lambda x: x
    # (mypy reads the intrinsics' typing signatures, typingctx first, as their call signatures.)
    if x == nbtypes.uint16:
        return lambda x: half_bits_to_float32(x)  # type: ignore[call-arg]
    if x == nbtypes.int16:
        return lambda x: bf16_bits_to_float32(x)  # type: ignore[call-arg]
    return None


# The rules as a range of the float's order key: its bits, read as a signed integer, with
# the magnitude bits flipped when the sign is set. Keys order as the floats do, -0 just
# below +0, and NaNs beyond the infinities (a negative NaN below -inf): so "finite and in
# [a, b]" is key(a) <= key <= key(b), one unsigned comparison of key - key(a) with
# key(b) - key(a). (lo, span) per input kind (xentd.validate.InputKind: probs, logits,
# log_probs), for float32 and for float64 keys; soft targets take the probs range.
_EXP32, _ONE32 = 0x7F800000, 0x3F800000
_EXP64, _ONE64 = 0x7FF0000000000000, 0x3FF0000000000000


def _as_int64(u: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    return u - (1 << 64) if u >= 1 << 63 else u


# probs: [-0, 1]; logits: [-max, max]; log_probs: [-max, +0].
BOUNDS32 = ((-1, _ONE32 + 1), (-_EXP32, 2 * _EXP32 - 1), (-_EXP32, _EXP32))
BOUNDS64 = ((-1, _ONE64 + 1), (-_EXP64, _as_int64(2 * _EXP64 - 1)), (-_EXP64, _EXP64))


def key_bounds(kind: int, like: Any) -> tuple[int, int]:
    """(lo, span) of ``kind``'s valid range (see above), for keys of the width that values
    loaded from ``like`` (an array, or a float scalar) are checked at: 64 bits for float64,
    32 for everything else (float32, FP16, BF16: checked once widened to float32)."""
    dtype = like.dtype if isinstance(like, np.ndarray) else np.asarray(like).dtype
    return (BOUNDS64 if dtype == np.float64 else BOUNDS32)[kind]


@overload(key_bounds)
def _key_bounds(kind, like):  # type: ignore[no-untyped-def]
    value = like.dtype if isinstance(like, nbtypes.Array) else like
    if value == nbtypes.float64:
        lo0, span0 = np.int64(BOUNDS64[0][0]), np.int64(BOUNDS64[0][1])
        lo1, span1 = np.int64(BOUNDS64[1][0]), np.int64(BOUNDS64[1][1])
        lo2, span2 = np.int64(BOUNDS64[2][0]), np.int64(BOUNDS64[2][1])
    elif value in (nbtypes.float32, nbtypes.uint16, nbtypes.int16):
        lo0, span0 = np.int64(BOUNDS32[0][0]), np.int64(BOUNDS32[0][1])
        lo1, span1 = np.int64(BOUNDS32[1][0]), np.int64(BOUNDS32[1][1])
        lo2, span2 = np.int64(BOUNDS32[2][0]), np.int64(BOUNDS32[2][1])
    else:
        return None

    def impl(kind, like):  # type: ignore[no-untyped-def]
        if kind == 0:
            return lo0, span0
        if kind == 1:
            return lo1, span1
        return lo2, span2

    return impl


def outside(x: Any, lo: int, span: int) -> bool:
    """Whether float ``x`` breaks the rule whose key range is (lo, span) (see key_bounds):
    NaN, infinite or out of range. Bit operations only, so that fast-math cannot drop it."""
    bits, width = (
        (np.float32(x).view(np.int32), 32) if isinstance(x, np.float32) else (np.float64(x).view(np.int64), 64)
    )
    key = int(bits)
    if key < 0:
        key ^= (1 << (width - 1)) - 1
    mask = (1 << width) - 1
    return ((key - lo) & mask) > (span & mask)


@intrinsic
def _outside(typingctx, x, lo, span):  # type: ignore[no-untyped-def]
    if x not in (nbtypes.float32, nbtypes.float64) or not isinstance(lo, nbtypes.Integer):
        return None
    width = x.bitwidth

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        value, low, spread = args
        integer = ir.IntType(width)
        bits = builder.bitcast(value, integer)
        flip = builder.and_(
            builder.ashr(bits, ir.Constant(integer, width - 1)), ir.Constant(integer, (1 << (width - 1)) - 1)
        )
        key = builder.xor(bits, flip)
        offset = builder.sub(key, _resize(builder, low, lo, width))
        return builder.icmp_unsigned(">", offset, _resize(builder, spread, span, width))

    return nbtypes.boolean(x, lo, span), codegen


@overload(outside)
def _outside_impl(x, lo, span):  # type: ignore[no-untyped-def]
    if x in (nbtypes.float32, nbtypes.float64):
        return lambda x, lo, span: _outside(x, lo, span)  # type: ignore[call-arg]
    return None


@intrinsic
def key_offset(typingctx, x, lo):  # type: ignore[no-untyped-def]
    """The unsigned integer of x's width that ``outside`` compares with the span: x is outside
    (lo, span) iff key_offset(x, lo) > span, unsigned. For loops that reduce it with ``max``
    (a vectorised unsigned max: one operation a value fewer than OR-ing comparisons)."""
    if x not in (nbtypes.float32, nbtypes.float64) or not isinstance(lo, nbtypes.Integer):
        return None
    width = x.bitwidth

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        value, low = args
        integer = ir.IntType(width)
        bits = builder.bitcast(value, integer)
        sign = builder.ashr(bits, ir.Constant(integer, width - 1))
        key = builder.xor(bits, builder.and_(sign, ir.Constant(integer, (1 << (width - 1)) - 1)))
        return builder.sub(key, _resize(builder, low, lo, width))

    return nbtypes.Integer(f"uint{width}")(x, lo), codegen


@intrinsic
def exceeds(typingctx, offset, span):  # type: ignore[no-untyped-def]
    """offset > span, both read as unsigned integers of offset's width (key_offset's): what
    ``outside`` is, for a reduced offset. (Numba would compare uint64 with int64 as floats.)"""
    if offset not in (nbtypes.uint32, nbtypes.uint64) or not isinstance(span, nbtypes.Integer):
        return None
    width = 32 if offset == nbtypes.uint32 else 64

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.icmp_unsigned(">", args[0], _resize(builder, args[1], span, width))

    return nbtypes.boolean(offset, span), codegen
