"""AMQP field tables that survive a round trip through eglo exactly.

pamqp decodes a header into a plain Python value and encodes it back by the value's Python type:
a producer's 64-bit `double` comes back as a 32-bit float (0.1 turns into 0.10000000149011612, and
a value beyond float32 raises OverflowError in the middle of settling), a 64-bit int of 5 as an
8-bit one, a millisecond `timestamp` as seconds, a long string that is not UTF-8 as bytes pamqp
cannot encode at all. Dead-letter and delay copies must carry every header as the producer sent it.

`install()` makes the decoder return values that remember their wire type (subclasses of int,
float, Decimal, bytes and datetime, so reading them is unchanged) and the encoder write such a
value back with that type. Values without a remembered type are encoded as before, except that a
float is always a 64-bit double. Both directions are total: whatever the broker delivers decodes.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import struct
from collections.abc import Callable
from typing import Any, ClassVar

from pamqp import decode, encode

_TABLE_ENTRY_MAX_KEY = 255


class _Typed:
    code: ClassVar[bytes]


class _TypedInt(int, _Typed):
    fmt: ClassVar[struct.Struct]


def _int_type(name: str, code: bytes, fmt: str) -> type[_TypedInt]:
    return type(name, (_TypedInt,), {"code": code, "fmt": struct.Struct(fmt)})


Int8 = _int_type("Int8", b"b", ">b")
UInt8 = _int_type("UInt8", b"B", ">B")
Int16 = _int_type("Int16", b"s", ">h")
UInt16 = _int_type("UInt16", b"u", ">H")
Int32 = _int_type("Int32", b"I", ">i")
UInt32 = _int_type("UInt32", b"i", ">I")
Int64 = _int_type("Int64", b"l", ">q")
# RabbitMQ's `L`; pamqp reads it signed, and so it is written back.
Int64L = _int_type("Int64L", b"L", ">q")


class Float32(float, _Typed):
    code = b"f"


class Float64(float, _Typed):
    code = b"d"


class LongBytes(bytes, _Typed):
    """A long string (`S`) that is not UTF-8: kept as its bytes."""

    code = b"S"


class AmqpDecimal(decimal.Decimal, _Typed):
    code = b"D"
    raw: bytes


class AmqpTimestamp(_dt.datetime, _Typed):
    """A `timestamp` with its raw 64-bit value (seconds, or what a producer meant as milliseconds);
    the datetime is the best reading of it and is clamped when the value is out of range."""

    code = b"T"
    raw: int


_Q = struct.Struct(">Q")


def _timestamp_from_raw(raw: int) -> AmqpTimestamp:
    seconds = raw / 1000.0 if raw > 0xFFFFFFFF else float(raw)  # pamqp's millisecond heuristic
    try:
        moment = _dt.datetime.fromtimestamp(seconds, tz=_dt.UTC)
    except (OverflowError, OSError, ValueError):
        moment = _dt.datetime.max.replace(tzinfo=_dt.UTC)
    value = AmqpTimestamp(
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
        moment.microsecond,
        tzinfo=_dt.UTC,
    )
    value.raw = raw
    return value


def _decode_timestamp(data: bytes) -> tuple[int, AmqpTimestamp]:
    try:
        return 8, _timestamp_from_raw(_Q.unpack_from(data)[0])
    except struct.error as err:
        raise ValueError("Could not unpack timestamp value") from err


def _decode_int(cls: type[_TypedInt]) -> Callable[[bytes], tuple[int, int]]:
    def read(data: bytes) -> tuple[int, int]:
        try:
            return cls.fmt.size, cls(cls.fmt.unpack_from(data)[0])
        except struct.error as err:
            raise ValueError(f"Could not unpack {cls.__name__}") from err

    return read


def _decode_float(cls: type[float], fmt: struct.Struct) -> Callable[[bytes], tuple[int, float]]:
    def read(data: bytes) -> tuple[int, float]:
        try:
            return fmt.size, cls(fmt.unpack_from(data)[0])
        except struct.error as err:
            raise ValueError(f"Could not unpack {cls.__name__}") from err

    return read


def _decode_decimal(data: bytes) -> tuple[int, AmqpDecimal]:
    consumed, value = decode.decimal(data)
    typed = AmqpDecimal(value)
    typed.raw = bytes(data[:5])
    return consumed, typed


def _decode_long_str(data: bytes) -> tuple[int, str | bytes]:
    consumed, value = decode.long_str(data)
    return consumed, LongBytes(value) if isinstance(value, bytes) else value


_ORIGINAL_ENCODE = encode.encode_table_value
_ORIGINAL_TIMESTAMP = encode.timestamp
_D = struct.Struct(">d")
_I = struct.Struct(">I")


def encode_value(value: Any) -> bytes:
    """One field value with its type octet, as the producer sent it when it came from the wire."""
    if isinstance(value, _TypedInt):
        return value.code + value.fmt.pack(value)
    if isinstance(value, Float32):
        return b"f" + struct.pack(">f", value)
    if isinstance(value, float):
        # Float64 and plain floats alike: pamqp would narrow a plain float to 32 bits.
        return b"d" + _D.pack(value)
    if isinstance(value, AmqpDecimal):
        return b"D" + value.raw
    if isinstance(value, AmqpTimestamp):
        return b"T" + _Q.pack(value.raw)
    if isinstance(value, bytes | bytearray):
        code = b"x" if isinstance(value, bytearray) else b"S"
        return code + _I.pack(len(value)) + bytes(value)
    if isinstance(value, dict):
        return b"F" + encode_table(value)
    return _ORIGINAL_ENCODE(value)


def encode_table(value: dict[str, Any] | None) -> bytes:
    """A field table; keys are kept whole up to AMQP's 255 bytes (pamqp cut them at 128)."""
    if not value:
        return _I.pack(0)
    parts = []
    for key, item in sorted(value.items()):
        raw_key = key.encode("utf-8")
        if len(raw_key) > _TABLE_ENTRY_MAX_KEY:
            raise TypeError(f"header name longer than {_TABLE_ENTRY_MAX_KEY} bytes")
        parts.append(bytes((len(raw_key),)) + raw_key)
        parts.append(encode_value(item))
    body = b"".join(parts)
    return _I.pack(len(body)) + body


def _encode_timestamp(value: Any) -> bytes:
    if isinstance(value, AmqpTimestamp):
        return _Q.pack(value.raw)
    return _ORIGINAL_TIMESTAMP(value)


_installed = False


def install() -> None:
    """Route pamqp's field-table and timestamp coding through this module (idempotent)."""
    global _installed
    if _installed:
        return
    for cls in (Int8, UInt8, Int16, UInt16, Int32, UInt32, Int64, Int64L):
        decode.TABLE_MAPPING[cls.code] = _decode_int(cls)
    decode.TABLE_MAPPING[b"f"] = _decode_float(Float32, struct.Struct(">f"))
    decode.TABLE_MAPPING[b"d"] = _decode_float(Float64, _D)
    decode.TABLE_MAPPING[b"D"] = _decode_decimal
    decode.TABLE_MAPPING[b"S"] = _decode_long_str
    decode.TABLE_MAPPING[b"T"] = _decode_timestamp
    decode.METHODS["timestamp"] = _decode_timestamp
    encode.encode_table_value = encode_value
    encode.field_table = encode_table
    encode.METHODS["table"] = encode_table
    encode.METHODS["timestamp"] = _encode_timestamp
    _installed = True
