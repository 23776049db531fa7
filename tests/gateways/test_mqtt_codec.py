"""The seed-000 MQTT protocol, without a broker."""

from __future__ import annotations

import json

import pytest

from gateways import mqtt_codec as codec


@pytest.mark.parametrize("topic,route", [
    ("v1/thermostat/t-1/telemetry", ("telemetry", "thermostat", "t-1")),
    ("v1/thermostat/t-1/event", ("event", "thermostat", "t-1")),
    ("device-agent/thermostat/device/t-1/responses", ("responses", "thermostat", "t-1")),
    ("device-agent/thermostat/device/t-1/ntp/request", ("ntp", "thermostat", "t-1")),
])
def test_topics(topic, route):
    r = codec.parse_topic(topic)
    assert (r.kind, r.product_id, r.device_id) == route


@pytest.mark.parametrize("topic", [
    "v1/thermostat/telemetry", "v1/p/d/other", "device-agent/p/device/d/commands",
    "device-agent/p/x/d/responses", "v1//d/telemetry", "v1/p/" + "d" * 200 + "/telemetry", "",
])
def test_unknown_or_bad_topics(topic):
    with pytest.raises(codec.BadMessage):
        codec.parse_topic(topic)


def test_a_product_id_may_be_as_long_as_an_agent_id():
    """An agent_id has 3 to 255 characters (seed 001), and it is the topic's productId: a
    product created with a 200-character id heard none of its devices (ids over 128 were
    refused as bad_topic_id). Device ids stay at 128."""
    assert codec.parse_topic(f"v1/{'p' * 255}/{'d' * 128}/telemetry").product_id == "p" * 255
    for topic in (f"v1/{'p' * 256}/d/telemetry", f"v1/p/{'d' * 129}/telemetry",
                  f"device-agent/{'p' * 256}/device/d/responses"):
        with pytest.raises(codec.BadMessage) as exc:
            codec.parse_topic(topic)
        assert exc.value.reason == "bad_topic_id"


def test_sdk_status_messages():
    bare = codec.parse_telemetry({"type": "status", "ts": 5, "metadata": {"productId": "p"}, "data": {"status": "online"}})
    assert (bare.kind, bare.status, bare.state, bare.ts) == ("status", "online", None, 5)
    full = codec.parse_telemetry({"type": "status", "data": {"status": "online", "state": {"temperature": 28}}})
    assert full.state == {"temperature": 28}
    state = codec.parse_telemetry({"type": "state", "data": {"humidity": 62}})
    assert (state.kind, state.state) == ("state", {"humidity": 62})


@pytest.mark.parametrize("obj", [
    {"type": "status", "data": {"status": "sleepy"}},
    {"type": "status", "data": "online"},
    {"type": "status"},
    {"type": "weather", "data": {}},
    {"type": "status", "data": {"status": "online", "state": [1]}},
    {"type": "status", "ts": "yesterday", "data": {"status": "online"}},
])
def test_bad_telemetry(obj):
    with pytest.raises(codec.BadMessage):
        codec.parse_telemetry(obj)


@pytest.mark.parametrize("obj, detail", [
    ({"status": "online"}, "telemetry needs a type: 'status' or 'state'"),
    ({"type": "weather", "data": {}}, "telemetry type must be 'status' or 'state', not 'weather'"),
    ({"type": "state"}, "'data' must be an object"),
])
def test_bad_telemetry_says_what_it_lacks(obj, detail):
    with pytest.raises(codec.BadMessage) as exc:
        codec.parse_telemetry(obj)
    assert exc.value.reason == "bad_field" and exc.value.detail == detail


def test_event_flattens_fields_and_needs_a_name():
    e = codec.parse_event({"type": "event", "data": {"event": "temperature_alert", "temperature": 38.5, "level": "warning"}})
    assert (e.name, e.data) == ("temperature_alert", {"temperature": 38.5, "level": "warning"})
    with pytest.raises(codec.BadMessage):
        codec.parse_event({"type": "event", "data": {"temperature": 1}})


@pytest.mark.parametrize("name", ["bad\x00name", "\x00", "line\nbreak", "tab\there", "del\x7f"])
def test_an_event_name_with_a_control_character_is_refused(name):
    # NUL above all: the events view keeps names as text, which PostgreSQL refuses with NUL.
    with pytest.raises(codec.BadMessage) as exc:
        codec.parse_event({"type": "event", "data": {"event": name}})
    assert exc.value.reason == "bad_field" and "control character" in exc.value.detail
    assert codec.parse_event({"type": "event", "data": {"event": "温度 alert ✓"}}).name == "温度 alert ✓"


def test_a_payload_that_is_no_object_is_named_as_json_names_it():
    for raw, name in [(b"[1]", "array"), (b"null", "null"), (b"true", "boolean"), (b'"x"', "string"), (b"1.5", "number")]:
        with pytest.raises(codec.BadMessage, match=f"payload is a JSON {name}, not an object$"):
            codec.decode(raw)


def test_responses():
    r = codec.parse_response({"code": 0, "msg": "ok", "requestId": "req-001", "data": {"target_temperature": 24}})
    assert (r.request_id, r.code, r.msg, r.data) == ("req-001", 0, "ok", {"target_temperature": 24})
    # A msg that is no string reads as its JSON would: never Python's None or True.
    for msg, seen in [(None, ""), (5, "5"), (True, "true"), ({"a": "é"}, '{"a": "é"}')]:
        assert codec.parse_response({"requestId": "r", "code": 0, "msg": msg}).msg == seen
    assert codec.parse_response({"requestId": "r", "code": 0}).msg == ""
    for bad in ({"code": 0}, {"requestId": "x", "code": "0"}, {"requestId": "x", "code": True}):
        with pytest.raises(codec.BadMessage):
            codec.parse_response(bad)


def test_ntp_response():
    out = json.loads(codec.ntp_response({"deviceSendTime": 1710000010000}, 1710000010100, 1710000010105))
    assert out == {"deviceSendTime": 1710000010000, "serverRecvTime": 1710000010100, "serverSendTime": 1710000010105}
    with pytest.raises(codec.BadMessage):
        codec.ntp_response({}, 1, 2)


@pytest.mark.parametrize("payload,reason", [
    (b"{not json", "malformed_json"), (b"\xff\xfe", "malformed_json"), (b"[1,2]", "not_an_object"),
    (b"", "empty"),  # what a device clearing its retained message sends
    (b"x" * (codec.MAX_PAYLOAD + 1), "too_large"),
    # Valid to Python's json, but nothing Parley could store or give back (gateways/json_input.py):
    (b'{"data": {"x": 18446744073709551616}}', "unsupported_value"),  # 2**64
    (b'{"data": {"x": -9223372036854775809}}', "unsupported_value"),  # -2**63 - 1
    (b'{"data": {"x": NaN}}', "unsupported_value"), (b'{"data": {"x": -Infinity}}', "unsupported_value"),
    (b'{"data": {"x": 1e400}}', "unsupported_value"),
    (b'{"data": ' + b'[' * 40 + b']' * 40 + b'}', "unsupported_value"),
    (b'{"data": ' + b'[' * 5000 + b']' * 5000 + b'}', "unsupported_value"),  # deeper than json's own limit
    (b'{"data": {"x": "\\ud800"}}', "unsupported_value"), (b'{"data": {"\\udfff": 1}}', "unsupported_value"),
])
def test_decode_errors(payload, reason):
    with pytest.raises(codec.BadMessage) as exc:
        codec.decode(payload)
    assert exc.value.reason == reason


def test_the_edges_of_what_is_stored_still_decode():
    obj = codec.decode(b'{"a": 18446744073709551615, "b": -9223372036854775808, "c": 1.5e300, "d": '
                       + b'[' * 30 + b']' * 30 + b', "e": "\\u6e29\\ud83c\\udf21"}')
    assert (obj["a"], obj["b"], obj["c"], obj["e"]) == (2**64 - 1, -(2**63), 1.5e300, "\u6e29\U0001f321")


# A device time is epoch milliseconds stored as a signed 64-bit integer (log and views):
# any number in that range is taken, negative too, a fraction of a millisecond dropped.
@pytest.mark.parametrize("ts,stored", [
    (1710000000000, 1710000000000), (1710000000000.9, 1710000000000), (0, 0), (-5, -5), (-0.5, 0),
    (2**63 - 1, 2**63 - 1), (-(2**63), -(2**63)), (-9.223372036854775808e18, -(2**63)),
    (9.2e18, 9200000000000000000),
])
def test_ts_within_64_bits_is_taken(ts, stored):
    assert codec.parse_telemetry({"type": "status", "ts": ts, "data": {"status": "online"}}).ts == stored
    assert codec.parse_telemetry({"type": "state", "ts": ts, "data": {}}).ts == stored
    assert codec.parse_event({"type": "event", "ts": ts, "data": {"event": "e"}}).ts == stored


# Beyond it: `int()` of them fits no column, and the message used to crash its actor at
# commit instead of being dropped as bad input. Integers of 2**63 .. 2**64-1 pass decode
# (msgpack could store them as data) but not the views' BIGINT device_ts.
@pytest.mark.parametrize("ts", [1e300, -1e300, 1e20, -1e19, 9.3e18, 2.0**63, 2**63, 2**64 - 1, -(2**63) - 1,
                                "1710000000000", True, [1], {"ms": 1}])
def test_ts_that_could_not_be_stored_is_a_bad_field(ts):
    for parse, obj in ((codec.parse_telemetry, {"type": "status", "ts": ts, "data": {"status": "online"}}),
                       (codec.parse_telemetry, {"type": "state", "ts": ts, "data": {}}),
                       (codec.parse_event, {"type": "event", "ts": ts, "data": {"event": "e"}}),
                       (lambda o: codec.ntp_response(o, 1, 2), {"deviceSendTime": ts})):
        with pytest.raises(codec.BadMessage) as exc:
            parse(obj)
        assert exc.value.reason == "bad_field"


def test_ts_beyond_64_bits_from_the_wire_is_a_bad_field_not_a_crash():
    for payload in (b'{"type":"status","ts":1e300,"data":{"status":"online"}}',
                    b'{"type":"status","ts":9223372036854775808,"data":{"status":"online"}}'):
        with pytest.raises(codec.BadMessage) as exc:
            codec.parse_telemetry(codec.decode(payload))
        assert exc.value.reason == "bad_field"


@pytest.mark.parametrize("sent", [1710000010000.9, 1710000010000, 1.71e12, -3, 0.25])
def test_ntp_echoes_device_send_time_exactly_as_sent(sent):
    raw = codec.ntp_response(codec.decode(json.dumps({"deviceSendTime": sent}).encode()), 1710000010100, 1710000010105)
    out = json.loads(raw)
    assert out["deviceSendTime"] == sent and type(out["deviceSendTime"]) is type(sent)
    assert (out["serverRecvTime"], out["serverSendTime"]) == (1710000010100, 1710000010105)
    assert b'"deviceSendTime":1710000010000.9,' in codec.ntp_response({"deviceSendTime": 1710000010000.9}, 1, 2)


def test_response_code_is_an_integer_within_what_decode_lets_through():
    """`code` takes JSON integers, and whole numbers written as floats by firmware whose
    JSON writer has only doubles (0.0), up to 2**53 (not 1e300); decode has already held
    integers to msgpack's range; the code is stored in the log only (no BIGINT view
    column), so every integer that reaches parse_response can be stored."""
    for code in (0, 404, -1, 2**63, 2**64 - 1):
        raw = json.dumps({"requestId": "r", "code": code}).encode()
        assert codec.parse_response(codec.decode(raw)).code == code
    for raw, code in ((b"0.0", 0), (b"404.0", 404), (b"-1.0", -1)):
        parsed = codec.parse_response(codec.decode(b'{"requestId": "r", "code": ' + raw + b"}")).code
        assert (parsed, type(parsed)) == (code, int)
    for code in (1e300, 2.0**60, 200.5, float("nan")):
        with pytest.raises(codec.BadMessage):
            codec.parse_response({"requestId": "r", "code": code})


def test_commands_go_out_as_utf8_json():
    """"温度 🌡" is 11 bytes on the wire, not 42 of \\u escapes (and surrogate pairs) that
    small embedded parsers may hand over undecoded; a string UTF-8 cannot carry (a lone
    surrogate, which inputs refuse anyway) falls back to escapes rather than failing."""
    raw = codec.encode({"cmd": "say", "params": {"text": "温度 🌡"}})
    assert raw == '{"cmd":"say","params":{"text":"温度 🌡"}}'.encode()
    assert json.loads(raw) == {"cmd": "say", "params": {"text": "温度 🌡"}}
    assert codec.encode({"text": "\ud800"}) == b'{"text":"\\ud800"}'
    assert codec.encode({"n": 2**70, "x": 21.5}) == b'{"n":1180591620717411303424,"x":21.5}'
