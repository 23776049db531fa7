"""JSON from devices and HTTP clients, held to what Parley can store and give back.

Python's `json` accepts four things that would fail later, where nobody can answer the
sender (an MQTT QoS 1 message that can never be committed is never acknowledged, and the
broker redelivers it forever). So both edges refuse them at once, with a clear reason:
- integers outside 64 bits: msgpack, which stores the events, has no bigger integers;
- NaN and ±Infinity (also `1e400`): not JSON, and every client reading them back chokes;
- nesting deeper than MAX_DEPTH: msgpack refuses deep nesting, and no device needs it;
- strings with a lone surrogate (`"\\ud800"`): they cannot be written as UTF-8.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

MAX_DEPTH = 32
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # msgpack's range: int64 and uint64


class UnsupportedValue(ValueError):
    """Valid JSON that Parley cannot store (see the module docstring)."""


def _constant(name: str) -> float:
    raise UnsupportedValue(f"{name} is not a JSON number")


# Built once: `json.loads` with a hook builds a new decoder on every call, which costs more
# than the parse. The hook runs only when a NaN or Infinity literal appears.
_DECODER = json.JSONDecoder(parse_constant=_constant)


def _check(value: Any, limit: int) -> None:
    """One pass over a parsed value: integers in msgpack's range, finite floats (`1e400`
    parses as infinity), strings encodable as UTF-8, no deeper than `limit`. About 1 µs for
    a telemetry message; hooks into the parser for every number would cost 4."""
    stack: list[tuple[Any, int]] = [([value], 0)]  # wrapped, so a bare scalar is checked too
    while stack:
        item, depth = stack.pop()
        if type(item) is dict:
            for key in item:
                if not key.isascii():
                    _check_text(key)
            children = item.values()
        else:
            children = item
        for child in children:
            kind = type(child)
            if kind is str:
                if not child.isascii():
                    _check_text(child)
            elif kind is int:
                if not _INT_MIN <= child <= _INT_MAX:
                    raise UnsupportedValue(f"integer {str(child)[:40]} does not fit in 64 bits")
            elif kind is float:
                if not math.isfinite(child):
                    raise UnsupportedValue("a number is out of range")
            elif kind is dict or kind is list:
                if depth >= limit:
                    raise UnsupportedValue(f"nested deeper than {limit} levels")
                stack.append((child, depth + 1))


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedValue("a string has a lone surrogate (not encodable as UTF-8)") from None


# Where orjson and the rules above could disagree: a run of 19+ digits may be an integer
# beyond 64 bits (orjson would make it a float), and more brackets than MAX_DEPTH may
# nest too deep (orjson allows 1024 levels). Both tests run in C over the raw bytes; the
# digit test maps every digit to "0" and looks for 19 of them (0.3 µs; a regex took 1.4).
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


def loads(data: bytes | str) -> Any:
    """`json.loads` for UTF-8 JSON, raising `UnsupportedValue` (a ValueError) for what
    Parley cannot store and `json.JSONDecodeError` / `UnicodeDecodeError` for what is not
    JSON.

    Ordinary payloads are parsed by orjson, which itself refuses NaN, Infinity, numbers
    that overflow a double and lone surrogates, and is 7x faster than the standard
    library here (0.55 against 3.8 µs for a telemetry message). Anything orjson refuses,
    and anything the byte tests above flag, takes the standard library's path below,
    so every refusal gives the same error as before and every accepted value is the same.
    """
    if isinstance(data, (bytes, bytearray)) and _LONG_RUN not in data.translate(_DIGITS_TO_ZERO) \
            and data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # say precisely why, below
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    if text.startswith("\ufeff"):  # else the message would be "Expecting value: line 1 column 1"
        raise json.JSONDecodeError("starts with a UTF-8 byte order mark (BOM), which JSON text must not "
                                   "have (RFC 8259 §8.1)", text, 0)
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise UnsupportedValue(f"nested deeper than {MAX_DEPTH} levels") from None
    _check(value, MAX_DEPTH)
    return value
