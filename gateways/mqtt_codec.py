"""The seed-000 MQTT device protocol as pure functions: topics and payloads in, typed
messages out (and back). No I/O here, so every rule is tested without a broker."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

from gateways import json_input

MAX_PAYLOAD = 256 * 1024
_DEVICE_ID = re.compile(r"^[^/#+\x00]{1,128}$")
# A product id is an agent's agent_id, which seed 001 allows 3 to 255 characters long.
_PRODUCT_ID = re.compile(r"^[^/#+\x00]{1,255}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

SUBSCRIPTIONS = (
    "v1/+/+/telemetry",
    "v1/+/+/event",
    "device-agent/+/device/+/responses",
    "device-agent/+/device/+/ntp/request",
)


class BadMessage(ValueError):
    """A message Parley cannot use; `reason` is a short machine-readable label for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Route:
    kind: str  # telemetry | event | responses | ntp
    product_id: str
    device_id: str


# Cached: a device publishes on the same few topics all its life, and parsing one (split
# and two regex matches) costs 1.3 µs against 0.1 for a hit. Bad topics raise, and
# lru_cache does not keep exceptions, so only valid routes fill it.
@functools.lru_cache(maxsize=65536)
def parse_topic(topic: str) -> Route:
    parts = topic.split("/")
    if len(parts) == 4 and parts[0] == "v1" and parts[3] in ("telemetry", "event"):
        route = Route(parts[3], parts[1], parts[2])
    elif len(parts) == 5 and parts[0] == "device-agent" and parts[2] == "device" and parts[4] == "responses":
        route = Route("responses", parts[1], parts[3])
    elif parts[:1] == ["device-agent"] and parts[2:3] == ["device"] and parts[4:] == ["ntp", "request"]:
        route = Route("ntp", parts[1], parts[3])
    else:
        raise BadMessage("unknown_topic", topic)
    if not (_PRODUCT_ID.match(route.product_id) and _DEVICE_ID.match(route.device_id)):
        raise BadMessage("bad_topic_id", topic)
    return route


def command_topic(product_id: str, device_id: str) -> str:
    return f"device-agent/{product_id}/device/{device_id}/commands"


def ntp_response_topic(product_id: str, device_id: str) -> str:
    return f"device-agent/{product_id}/device/{device_id}/ntp/response"


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def decode(payload: bytes) -> dict[str, Any]:
    if not payload:
        raise BadMessage("empty", "an empty message (what a device clearing its retained message sends)")
    if len(payload) > MAX_PAYLOAD:
        raise BadMessage("too_large", f"{len(payload)} bytes > {MAX_PAYLOAD}")
    try:
        obj = json_input.loads(payload)
    except json_input.UnsupportedValue as exc:
        raise BadMessage("unsupported_value", str(exc)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadMessage("malformed_json", str(exc)) from None
    if not isinstance(obj, dict):
        raise BadMessage("not_an_object", f"payload is a JSON {_JSON_TYPES.get(type(obj), 'value')}, not an object")
    return obj


def _object(obj: dict[str, Any], key: str, *, required: bool = True) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        raise BadMessage("bad_field", f"'{key}' must be an object")
    return value


# A device time is epoch milliseconds, stored as a signed 64-bit integer (the events view's
# BIGINT device_ts; msgpack in the log takes nothing wider). Any number in that range is
# taken (negative too; a fraction of a millisecond is dropped). Beyond it (`1e300`, `-1e19`,
# or an integer of 2**63 and up, which json_input lets through as data) it could not be
# stored, and the message crashed its actor at commit: refused here, as bad input.
TS_MIN, TS_MAX = -(2**63), 2**63 - 1


def _time(obj: dict[str, Any], key: str) -> int | float | None:
    """The number under `key` as the device sent it, None if absent; refused unless it is a
    number within TS_MIN..TS_MAX (decode already refused NaN and infinities)."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadMessage("bad_field", f"'{key}' must be a number")
    if not TS_MIN <= value <= TS_MAX:  # exact for floats too (Python compares int/float exactly)
        raise BadMessage("bad_field", f"'{key}' must be epoch milliseconds within 64 bits, not {value!r:.40}")
    return value


def _ts(obj: dict[str, Any], key: str = "ts") -> int | None:
    value = _time(obj, key)
    return None if value is None else int(value)


# Not frozen, like the actor messages made from it (actors/device/messages.py): built per
# message, and a frozen dataclass costs three times as much to build.
@dataclass(slots=True)
class Telemetry:
    kind: str  # status | state
    status: str | None
    state: dict[str, Any] | None
    ts: int | None
    metadata: dict[str, Any] | None


def parse_telemetry(obj: dict[str, Any]) -> Telemetry:
    kind = obj.get("type")
    if kind not in ("status", "state"):  # first: a message without it is told what it lacks
        raise BadMessage("bad_field", f"telemetry type must be 'status' or 'state', not {kind!r}"
                         if "type" in obj else "telemetry needs a type: 'status' or 'state'")
    data = _object(obj, "data")
    metadata = _object(obj, "metadata", required=False)
    if kind == "status":
        status = data.get("status")
        if status not in ("online", "offline"):
            raise BadMessage("bad_field", "status telemetry needs data.status 'online' or 'offline'")
        state = _object(data, "state", required=False)
        return Telemetry("status", status, state, _ts(obj), metadata)
    return Telemetry("state", None, data, _ts(obj), metadata)


@dataclass(slots=True)
class DeviceEvent:
    name: str
    data: dict[str, Any]
    ts: int | None
    metadata: dict[str, Any] | None


def parse_event(obj: dict[str, Any]) -> DeviceEvent:
    if obj.get("type", "event") != "event":
        raise BadMessage("bad_field", f"event type must be 'event', not {obj.get('type')!r}")
    data = dict(_object(obj, "data"))
    name = data.pop("event", None)
    if not isinstance(name, str) or not name:
        raise BadMessage("bad_field", "event needs a string data.event name")
    if _CONTROL.search(name):
        # A name is a column of the events view, and PostgreSQL text cannot hold NUL: stored,
        # it stopped the views at that event for good. Other control characters are no
        # name a spec can declare or an operator read either.
        raise BadMessage("bad_field", f"event name {name[:64]!r} has a control character")
    return DeviceEvent(name, data, _ts(obj), _object(obj, "metadata", required=False))


@dataclass(frozen=True, slots=True)
class Response:
    request_id: str
    code: int
    msg: str
    data: Any


def parse_response(obj: dict[str, Any]) -> Response:
    request_id = obj.get("requestId")
    if not isinstance(request_id, str) or not request_id:
        raise BadMessage("bad_field", "response needs a string requestId")
    code = obj.get("code")
    if isinstance(code, float) and code.is_integer() and -2**53 <= code <= 2**53:
        code = int(code)  # 0.0 from firmware whose JSON writer has only doubles (not 1e300)
    if isinstance(code, bool) or not isinstance(code, int):
        raise BadMessage("bad_field", "response needs an integer code")
    return Response(request_id, code, _msg(obj.get("msg")), obj.get("data"))


def _msg(msg: Any) -> str:
    """A response's `msg` is a string; taken from a device that sends something else, as
    that JSON reads: absent or null is "", 5 is "5", true is "true" (not Python's "None"
    or "True")."""
    if isinstance(msg, str):
        return msg
    return "" if msg is None else json.dumps(msg, ensure_ascii=False)


def ntp_response(obj: dict[str, Any], received_ms: int, sent_ms: int) -> bytes:
    device_send = _time(obj, "deviceSendTime")  # echoed as sent (1710000010000.9 stays so)
    if device_send is None:
        raise BadMessage("bad_field", "ntp request needs deviceSendTime")
    return encode({"deviceSendTime": device_send, "serverRecvTime": received_ms, "serverSendTime": sent_ms})


def encode(obj: dict[str, Any]) -> bytes:
    """JSON in UTF-8, as devices send theirs: "温度" is 6 bytes, not 12 of `\\u6e29\\u5ea6`
    (which small embedded parsers such as jsmn hand over undecoded). orjson writes that
    directly (a command: 0.2 µs, against 3 µs with `json` in a loop and about 15 on the
    command path, where its caches are cold). What orjson refuses (a string that cannot
    be UTF-8, such as a lone surrogate, which inputs refuse; an integer beyond 64 bits)
    is written by `json` with ASCII escapes."""
    try:
        return orjson.dumps(obj)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(obj, separators=(",", ":")).encode()
