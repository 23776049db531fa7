"""BufferedClient._handle_on_message: on_message directly when no per-topic callbacks exist,
paho's own dispatch as soon as one is registered, paho's exception semantics either way."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest

from tests.gateways.test_mqtt_client import FakeSock, client, publish_packet


def feed(c, *packets: bytes) -> None:
    c._sock = FakeSock([b"".join(packets)])
    assert c.loop_read() == paho.MQTT_ERR_SUCCESS


def test_without_topic_callbacks_every_message_reaches_on_message_with_its_topic() -> None:
    c = client()
    got: list[tuple[str, bytes]] = []
    c.on_message = lambda cl, userdata, m: got.append((m.topic, m.payload))
    feed(c, publish_packet("v1/p/d/telemetry", b"a"), publish_packet("v1/p/d/event", b"b"))
    assert got == [("v1/p/d/telemetry", b"a"), ("v1/p/d/event", b"b")]


def test_on_message_gets_the_client_and_its_userdata() -> None:
    c = client()
    c.user_data_set({"who": "gateway"})
    seen: list[object] = []
    c.on_message = lambda cl, userdata, m: seen.extend([cl, userdata])
    feed(c, publish_packet("t", b"x"))
    assert seen == [c, {"who": "gateway"}]


def test_no_on_message_drops_quietly() -> None:
    c = client()
    feed(c, publish_packet("t", b"x"))  # nothing to call, nothing raised


def test_a_topic_callback_takes_its_topics_and_on_message_keeps_the_rest() -> None:
    c = client()
    filtered: list[bytes] = []
    general: list[bytes] = []
    c.on_message = lambda cl, u, m: general.append(m.payload)
    c.message_callback_add("v1/+/+/event", lambda cl, u, m: filtered.append(m.payload))
    feed(c, publish_packet("v1/p/d/event", b"e"), publish_packet("v1/p/d/telemetry", b"t"))
    assert filtered == [b"e"] and general == [b"t"]  # paho's rule: matched topics skip on_message


def test_an_exception_in_on_message_is_passed_on_unless_suppressed() -> None:
    c = client()

    def boom(cl, u, m) -> None:
        raise RuntimeError("bug in on_message")

    c.on_message = boom
    with pytest.raises(RuntimeError, match="bug in on_message"):
        feed(c, publish_packet("t", b"x"))
    c.suppress_exceptions = True
    feed(c, publish_packet("t", b"y"))  # logged by paho, not raised
