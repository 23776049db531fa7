"""json_input.loads (orjson for ordinary payloads, the standard library for the rest) must
accept, give back and refuse exactly what the standard-library-only version did."""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import pytest

from gateways import json_input
from gateways.json_input import MAX_DEPTH, UnsupportedValue

_REFERENCE_DECODER = json.JSONDecoder(parse_constant=json_input._constant)


def reference(data: bytes | str) -> Any:
    """The standard-library-only `loads` (as before orjson): json, then the same checks."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    try:
        value = _REFERENCE_DECODER.decode(text)
    except RecursionError:
        raise UnsupportedValue("too deep") from None
    json_input._check(value, MAX_DEPTH)
    return value


def outcome(loads, data: bytes | str) -> tuple[str, Any]:
    try:
        return "ok", loads(data)
    except Exception as exc:  # noqa: BLE001 - the class is what is compared
        return "error", type(exc)


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (1 is not 1.0, -0.0 is not 0.0) and
    the same key order."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if type(a) is dict:
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_like_reference(data: bytes | str) -> tuple[str, Any]:
    want, got = outcome(reference, data), outcome(json_input.loads, data)
    if want[0] == "ok":
        assert got[0] == "ok" and same(got[1], want[1]), f"{data[:80]!r}: {got} != {want}"
    else:
        assert got == want, f"{data[:80]!r}: {got} != {want}"
    return want


OK = "ok"
D = 2 ** 63
NESTED_MAX = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
NESTED_OVER = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)

CASES: list[tuple[str, bytes | str, Any]] = [
    # (name, input, what the standard library version gave: OK or the exception class)
    ("telemetry", b'{"type": "state", "ts": 1710000010000, "data": {"temperature": 28.5, "on": true, "x": null}}', OK),
    ("array", b'[1, "two", 3.0, false, null, [], {}]', OK),
    ("scalar", b"42", OK),
    ("string", b'"plain"', OK),
    ("duplicate keys", b'{"a": 1, "b": 2, "a": 3}', OK),
    ("unicode raw", '{"温度": "°C ✓ 🌡"}'.encode(), OK),
    ("unicode escaped", b'{"\\u6e29": "\\u00b0C"}', OK),
    ("surrogate pair escaped", b'{"t": "\\ud83c\\udf21"}', OK),
    ("surrogate pair upper case", b'"\\uD83C\\uDF21"', OK),
    ("nul escaped", b'"\\u0000"', OK),
    ("escapes", b'"\\"\\\\\\/\\b\\f\\n\\r\\t"', OK),
    ("1e308", b"1e308", OK),
    ("largest double", b"1.7976931348623157e308", OK),
    ("smallest subnormal", b"5e-324", OK),
    ("underflow to zero", b"1e-400", OK),
    ("underflow to minus zero", b"-1e-400", OK),
    ("-0 (an int)", b"-0", OK),
    ("-0.0", b"-0.0", OK),
    ("0.1", b"0.1", OK),
    ("float that looks like an int", b"1.0", OK),
    ("exponent form", b"[1E+2, 1e-2, 2.5E3]", OK),
    ("2**53 + 1", b"9007199254740993", OK),
    ("18 digits", b"[999999999999999999, -999999999999999999]", OK),
    ("2**63 - 1", str(D - 1).encode(), OK),
    ("2**64 - 1", str(2 ** 64 - 1).encode(), OK),
    ("-(2**63)", str(-D).encode(), OK),
    ("2**64", str(2 ** 64).encode(), UnsupportedValue),
    ("-(2**63) - 1", str(-D - 1).encode(), UnsupportedValue),
    ("2**64 in an object", b'{"data": {"x": 18446744073709551616}}', UnsupportedValue),
    ("19-digit float", b"1234567890123456789.5", OK),
    ("20 digits after the point", b"0.12345678901234567890", OK),
    ("19 digits in a string", b'{"serial": "1234567890123456789012345"}', OK),
    ("19 digits in a key", b'{"12345678901234567890": 1}', OK),
    ("5000 digits", b"1" + b"0" * 4999, ValueError),  # Python's int limit: as before
    ("NaN", b'{"x": NaN}', UnsupportedValue),
    ("Infinity", b"[Infinity]", UnsupportedValue),
    ("-Infinity", b'{"x": -Infinity}', UnsupportedValue),
    ("1e400", b'{"x": 1e400}', UnsupportedValue),
    ("-1e400", b"-1e400", UnsupportedValue),
    ("just over the largest double", b"1.7976931348623159e308", UnsupportedValue),
    ("lone high surrogate in a value", b'{"x": "\\ud800"}', UnsupportedValue),
    ("lone low surrogate in a value", b'["a\\udfffb"]', UnsupportedValue),
    ("lone surrogate in a key", b'{"\\udfff": 1}', UnsupportedValue),
    ("lone surrogate in a nested key", b'{"a": [{"\\ud83c": 1}]}', UnsupportedValue),
    ("surrogates the wrong way round", b'"\\udf21\\ud83c"', UnsupportedValue),
    ("nesting MAX_DEPTH", NESTED_MAX, OK),
    ("nesting MAX_DEPTH objects", b'{"a":' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH, OK),
    ("nesting MAX_DEPTH + 1", NESTED_OVER, UnsupportedValue),
    ("nesting MAX_DEPTH + 1 objects", b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), UnsupportedValue),
    ("nesting 5000", b"[" * 5000 + b"]" * 5000, UnsupportedValue),
    ("many brackets in a string", b'{"s": "' + b"[{" * 100 + b'"}', OK),
    ("brackets in strings and nesting MAX_DEPTH",
     b'{"s": "[[[[{{{{", "d": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}", OK),
    ("brackets in strings and nesting MAX_DEPTH + 1",
     b'{"s": "]]]]}}}}", "d": ' + NESTED_MAX + b"}", UnsupportedValue),
    ("many flat brackets", b"[" + b",".join([b"[]"] * 100) + b"]", OK),
    ("UTF-8 BOM", b"\xef\xbb\xbf{}", json.JSONDecodeError),
    ("invalid UTF-8", b"\xff", UnicodeDecodeError),
    ("invalid UTF-8 in a string", b'{"x": "\xc3\x28"}', UnicodeDecodeError),
    ("UTF-8 encoded surrogate", b'"\xed\xa0\x80"', UnicodeDecodeError),
    ("overlong UTF-8", b'"\xc0\xaf"', UnicodeDecodeError),
    ("empty", b"", json.JSONDecodeError),
    ("whitespace", b" \t\r\n", json.JSONDecodeError),
    ("whitespace around", b' \n{"a" : [ 1 , 2 ] }\r\n\t', OK),
    ("form feed is not whitespace", b"\x0c1", json.JSONDecodeError),
    ("control character in a string", b'"a\tb"', json.JSONDecodeError),
    ("trailing comma", b"[1,]", json.JSONDecodeError),
    ("single quotes", b"{'a': 1}", json.JSONDecodeError),
    ("leading zero", b"01", json.JSONDecodeError),
    ("bare point", b".5", json.JSONDecodeError),
    ("trailing point", b"1.", json.JSONDecodeError),
    ("plus sign", b"+1", json.JSONDecodeError),
    ("extra data", b"{} {}", json.JSONDecodeError),
    ("truncated", b'{"a": [1, 2', json.JSONDecodeError),
    ("bad escape", b'"\\x41"', json.JSONDecodeError),
    ("not a literal", b"nul", json.JSONDecodeError),
    ("str input", '{"a": 18446744073709551615, "b": "\\ud83c\\udf21"}', OK),
    ("str input, lone surrogate", '"\\ud800"', UnsupportedValue),
    ("bytearray input", bytearray(b'{"a": [1, 2.5]}'), OK),
]


@pytest.mark.parametrize("data,expected", [(d, e) for _, d, e in CASES], ids=[n for n, _, _ in CASES])
def test_loads_gives_what_the_standard_library_version_gave(data, expected):
    want = assert_like_reference(data)
    if expected is OK:
        assert want[0] == OK
    else:
        assert want == ("error", expected)


def test_loads_agrees_with_the_standard_library_version_on_generated_input():
    """Numbers of every shape (random doubles, long mantissas, huge and tiny exponents,
    18-digit integers), and short byte soups that are mostly not JSON."""
    rnd = random.Random(20261122)
    digits = "0123456789"

    def number() -> str:
        return (rnd.choice(["", "-"]) + (rnd.choice("123456789") + "".join(rnd.choices(digits, k=rnd.randint(0, 17))))
                + rnd.choice(["", "." + "".join(rnd.choices(digits, k=rnd.randint(1, 17)))])
                + rnd.choice(["", f"e{rnd.randint(-340, 320)}", f"E+{rnd.randint(0, 30)}"]))

    for _ in range(3000):
        double = struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0]
        assert_like_reference(repr(double).encode())  # includes nan and inf: refused alike
        assert_like_reference(number().encode())
        assert_like_reference(f'{{"v": [{number()}, "{chr(rnd.randint(0xd700, 0xe000))!r}"]}}'.encode(
            "utf-8", "surrogatepass"))
        soup = bytes(rnd.choices(b'[]{}":,0123456789.eE+-ntrufasl \\u\xff\xc3\xa9', k=rnd.randint(0, 12)))
        assert_like_reference(soup)


def test_ordinary_payloads_skip_the_standard_library_and_the_flagged_ones_take_it(monkeypatch):
    calls: list[str] = []

    class Counting(json.JSONDecoder):
        def decode(self, s, *args):
            calls.append(s)
            return super().decode(s, *args)

    monkeypatch.setattr(json_input, "_DECODER", Counting(parse_constant=json_input._constant))
    assert json_input.loads(b'{"type": "state", "data": {"temperature": 28.5}}') == {
        "type": "state", "data": {"temperature": 28.5}}
    assert json_input.loads(NESTED_MAX) is not None
    assert calls == []  # orjson
    assert json_input.loads(b'{"x": 1234567890123456789}') == {"x": 1234567890123456789}
    assert json_input.loads(b'{"s": "' + b"[" * (MAX_DEPTH + 1) + b'"}') == {"s": "[" * (MAX_DEPTH + 1)}
    with pytest.raises(UnsupportedValue):
        json_input.loads(b'{"x": NaN}')  # orjson refuses it; the standard library says why
    assert len(calls) == 3
