"""BufferedClient._packet_read: a PUBLISH lying whole in the read buffer is decoded in one
pass; it must come out exactly as paho's own decoding gives it, and everything the fast
path does not take must still go paho's way."""

from __future__ import annotations

import logging
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateways import mqtt_client
from gateways.mqtt_client import BufferedClient
from tests.gateways.test_mqtt_client import FakeSock

SLOTS = ("_topic", "payload", "qos", "mid", "dup", "retain", "properties", "state")


class ByteSock:
    """A socket holding `data`, honouring recv's size: what paho's own reads expect."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sent = b""

    def recv(self, n: int) -> bytes:
        if not self.data:
            raise BlockingIOError()
        out, self.data = self.data[:n], self.data[n:]
        return out

    def send(self, data: bytes) -> int:
        self.sent += bytes(data)
        return len(data)

    def close(self) -> None:
        pass


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: bytes, payload: bytes, *, qos: int = 0, mid: int = 0, dup: bool = False,
            retain: bool = False) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + payload
    header = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return bytes([header]) + remaining_length(len(body)) + body


def received(c: paho.Client, sock: ByteSock | FakeSock) -> list[paho.MQTTMessage]:
    """Every message `c` delivers from what `sock` holds."""
    got: list[paho.MQTTMessage] = []
    c.on_message = lambda cl, u, m: got.append(m)
    c._sock = sock
    while True:
        assert c.loop_read() == paho.MQTT_ERR_SUCCESS
        unread = sock.data if isinstance(sock, ByteSock) else sock.chunks
        if not unread and not (isinstance(c, BufferedClient) and c._buffered()):
            return got


def buffered(**kwargs: object) -> BufferedClient:
    return BufferedClient(CallbackAPIVersion.VERSION2, client_id="unit", **kwargs)


VARIANTS = [
    publish(b"v1/thermostat/t-1/telemetry", b'{"type":"state","state":{"temperature":21.5}}'),
    publish(b"v1/p/d/telemetry", b""),  # an empty payload: a device clearing its retained message
    publish(b"v1/p/d/event", b"x" * 127),
    publish(b"v1/p/d/event", b"x" * 128),  # two length bytes
    publish(b"v1/p/d/event", b"y" * 16_384),  # three
    publish(b"v1/p/d/event", b"z" * 2_097_152),  # four
    publish(b"device-agent/p/device/d/responses", b'{"code":0}', qos=1, mid=1),
    publish(b"device-agent/p/device/d/responses", b'{"code":0}', qos=1, mid=65535, dup=True),
    publish(b"v1/p/d/telemetry", b"{}", retain=True),
    publish("v1/p/d\u00e9/telemetry".encode(), b"{}"),  # a UTF-8 topic
    publish(b"v1/p/\xff\xfe/telemetry", b"{}"),  # not UTF-8: paho raises when .topic is read
]


@pytest.mark.parametrize("packet", VARIANTS, ids=lambda p: f"{p[0]:#x}-{len(p)}")
def test_a_whole_publish_comes_out_as_paho_decodes_it(packet: bytes) -> None:
    theirs = received(paho.Client(CallbackAPIVersion.VERSION2, client_id="ref", manual_ack=True), ByteSock(packet))
    ours = received(buffered(manual_ack=True), FakeSock([packet]))
    assert len(theirs) == len(ours) == 1
    for slot in SLOTS:
        assert getattr(ours[0], slot) == getattr(theirs[0], slot), slot
    assert ours[0].info is mqtt_client._INCOMING  # decoded by the fast path, not paho's
    assert ours[0].timestamp == pytest.approx(time.monotonic(), abs=5)


def test_many_messages_of_one_read_arrive_in_order_each_whole() -> None:
    packets = [publish(f"v1/p/d-{i}/telemetry".encode(), str(i).encode() * (i % 300), qos=i % 2, mid=i)
               for i in range(1, 2000)]
    got = received(buffered(manual_ack=True), FakeSock([b"".join(packets)]))
    assert [(m.topic, m.payload, m.qos, m.mid if m.qos else 0) for m in got] == \
        [(f"v1/p/d-{i}/telemetry", str(i).encode() * (i % 300), i % 2, i if i % 2 else 0) for i in range(1, 2000)]


@pytest.mark.parametrize("what,data", [
    ("QoS 2 (needs paho's PUBREC)", publish(b"t", b"x", qos=2, mid=7)),
    ("not a PUBLISH (PINGRESP)", b"\xd0\x00"),
    ("half a packet", publish(b"t", b"payload")[:5]),
    ("remaining length still unfinished", b"\x30\x80\x80"),
    ("remaining length of five bytes", b"\x30\x80\x80\x80\x80\x01" + b"\x00" * 8),
    ("an empty topic (MQTT 3.1.1 forbids it)", publish(b"", b"payload")),
    ("a topic longer than the packet", b"\x30\x05\x00\x09abc"),
    ("a QoS 1 packet without its message id", b"\x32\x04\x00\x01t\x00"),
])
def test_the_fast_path_leaves_everything_else_to_paho(what: str, data: bytes) -> None:
    c = buffered()
    c._rsock = c._sock = FakeSock([])
    c._rbuf, c._rpos = data, 0
    assert c._whole_publish() is None, what
    assert c._rpos == 0  # nothing consumed


def test_a_malformed_publish_is_a_protocol_error_as_before() -> None:
    c = buffered()
    c._sock = FakeSock([publish(b"", b"payload")])
    assert c.loop_read() == paho.MQTT_ERR_PROTOCOL  # paho's verdict on its own path


def test_an_mqtt5_client_decodes_with_paho_properties_and_all() -> None:
    c = buffered(protocol=paho.MQTTv5)
    packet = b"\x30\x09\x00\x01t\x03\x23\x00\x05" + b"hi"  # properties: topic alias 5
    got = received(c, FakeSock([packet]))
    assert [(m.topic, m.payload) for m in got] == [("t", b"hi")]
    assert got[0].properties is not None and got[0].properties.TopicAlias == 5


def test_a_qos1_message_is_acknowledged_at_once_without_manual_ack() -> None:
    c = buffered()  # paho's default: acknowledged as soon as on_message returns
    sock = ByteSock(b"")
    c._sock = sock
    c._rsock, c._rbuf, c._rpos = sock, publish(b"t", b"x", qos=1, mid=0x1234), 0
    got: list[int] = []
    c.on_message = lambda cl, u, m: got.append(m.mid)
    assert c._packet_read() == paho.MQTT_ERR_SUCCESS
    assert got == [0x1234] and sock.sent == b"\x40\x02\x12\x34"  # PUBACK for that mid


def test_with_manual_ack_nothing_is_acknowledged_until_asked() -> None:
    c = buffered(manual_ack=True)
    sock = ByteSock(b"")
    c._sock = sock
    c._rsock, c._rbuf, c._rpos = sock, publish(b"t", b"x", qos=1, mid=9), 0
    c.on_message = lambda cl, u, m: None
    assert c._packet_read() == paho.MQTT_ERR_SUCCESS
    assert sock.sent == b""


def test_arriving_bytes_count_for_the_keepalive() -> None:
    c = buffered()
    c.on_message = lambda cl, u, m: None
    c._last_bytes_received = 0.0
    c._sock = FakeSock([publish(b"t", b"x")])
    assert c.loop_read() == paho.MQTT_ERR_SUCCESS
    assert c._last_bytes_received == pytest.approx(time.monotonic(), abs=5)


def test_pahos_debug_line_is_still_logged(caplog: pytest.LogCaptureFixture) -> None:
    c = buffered()
    c.enable_logger(logging.getLogger("paho-test"))
    c.on_message = lambda cl, u, m: None
    c._sock = FakeSock([publish(b"v1/p/d/telemetry", b"abc", qos=1, mid=3)])
    with caplog.at_level(logging.DEBUG, logger="paho-test"):
        c.loop_read()
    assert "Received PUBLISH (d0, q1, r0, m3), 'v1/p/d/telemetry', ...  (3 bytes)" in caplog.text
