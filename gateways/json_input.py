"""JSON from devices and HTTP clients, held to what Parley can store and give back.

Python's `json` accepts three things that would fail later, where nobody can answer the
sender (an MQTT QoS 1 message that can never be committed is never acknowledged, and the
broker redelivers it forever). So both edges refuse them at once, with a clear reason:
- integers outside 64 bits: msgpack, which stores the events, has no bigger integers;
- NaN and ±Infinity (also `1e400`): not JSON, and every client reading them back chokes;
- nesting deeper than MAX_DEPTH: msgpack refuses deep nesting, and no device needs it.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # msgpack's range: int64 and uint64


class UnsupportedValue(ValueError):
    """Valid JSON that Parley cannot store (see the module docstring)."""


def _int(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise UnsupportedValue(f"integer {text[:40]} does not fit in 64 bits")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnsupportedValue(f"number {text[:40]} is out of range")
    return value


def _constant(name: str) -> float:
    raise UnsupportedValue(f"{name} is not a JSON number")


def _check_depth(value: Any, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            raise UnsupportedValue(f"nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def loads(data: bytes | str) -> Any:
    """`json.loads`, raising `UnsupportedValue` (a ValueError) for what Parley cannot store
    and `json.JSONDecodeError` / `UnicodeDecodeError` for what is not JSON."""
    try:
        value = json.loads(data, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise UnsupportedValue(f"nested deeper than {MAX_DEPTH} levels") from None
    _check_depth(value, MAX_DEPTH)
    return value
