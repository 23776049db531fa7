"""BufferedClient: paho with chunked socket reads must deliver exactly what paho would."""

from __future__ import annotations

import threading
import uuid

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateways.mqtt_client import BufferedClient
from tests.support import wait_until


class FakeSock:
    """Hands out pre-cut chunks, then raises BlockingIOError like an empty non-blocking socket."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.reads: list[int] = []

    def recv(self, n: int) -> bytes:
        self.reads.append(n)
        if not self.chunks:
            raise BlockingIOError()
        return self.chunks.pop(0)

    def close(self) -> None:  # paho closes its socket when the client is collected
        pass


def client() -> BufferedClient:
    return BufferedClient(CallbackAPIVersion.VERSION2, client_id="unit")


def test_small_reads_are_served_from_one_large_recv() -> None:
    c = client()
    c._sock = FakeSock([b"abcdef"])
    assert [c._sock_recv(1), c._sock_recv(1), c._sock_recv(10)] == [b"a", b"b", b"cdef"]
    assert c._sock.reads == [65536]  # one socket read for all three


def test_a_read_across_chunks_returns_what_is_buffered_then_reads_again() -> None:
    c = client()
    c._sock = FakeSock([b"ab", b"cd"])
    assert c._sock_recv(3) == b"ab"  # a short read: paho asks again for the rest
    assert c._sock_recv(3) == b"cd"
    try:
        c._sock_recv(1)
    except BlockingIOError:
        pass
    else:
        raise AssertionError("an empty socket must raise BlockingIOError, as paho expects")


def test_a_new_socket_drops_what_was_left_of_the_old_one() -> None:
    c = client()
    c._sock = FakeSock([b"old-leftovers"])
    assert c._sock_recv(3) == b"old"
    c._sock = FakeSock([b"new"])  # paho reconnected
    assert c._sock_recv(3) == b"new"


def test_end_of_stream_is_passed_through() -> None:
    c = client()
    c._sock = FakeSock([b""])
    assert c._sock_recv(1) == b""


def test_every_message_arrives_intact_and_in_order(mqtt_broker) -> None:
    """Over a real broker: many small messages in bursts (several per recv) and large
    ones (many recvs per message) come out exactly as paho would deliver them."""
    topic = f"buffered/{uuid.uuid4().hex[:8]}"
    sizes = [0, 1, 2, 127, 128, 16383, 16384, 70_000, 300_000] + [40] * 3000
    payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    got: list[bytes] = []
    subscribed = threading.Event()
    sub = BufferedClient(CallbackAPIVersion.VERSION2, client_id=f"buf-{uuid.uuid4().hex[:6]}")
    sub.on_message = lambda c, u, m: got.append(m.payload)
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect(mqtt_broker.host, mqtt_broker.port)
    sub.loop_start()
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
    pub.connect(mqtt_broker.host, mqtt_broker.port)
    pub.loop_start()
    try:
        sub.subscribe(topic, qos=1)
        assert subscribed.wait(5)
        for p in payloads:
            pub.publish(topic, p, qos=1)
        assert wait_until(lambda: len(got) >= len(payloads), 30), f"{len(got)} of {len(payloads)} arrived"
        assert got == payloads
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


class GappySock(FakeSock):
    """A FakeSock where None stands for "nothing more has arrived yet" (BlockingIOError)."""

    def recv(self, n: int) -> bytes:
        if self.chunks and self.chunks[0] is None:
            self.chunks.pop(0)
            raise BlockingIOError()
        return super().recv(n)


def publish_packet(topic: str, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH as a broker sends it (MQTT 3.1.1; remaining length < 128 here)."""
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + payload
    assert len(body) < 128
    return bytes([0x30, len(body)]) + body


def recording_client(calls: list[str], fail_on: bytes | None = None) -> BufferedClient:
    c = client()

    def on_message(cl, userdata, msg) -> None:
        calls.append(msg.payload.decode())
        if msg.payload == fail_on:
            raise RuntimeError("bug in on_message")

    c.on_message = on_message
    c.on_read_end = lambda: calls.append("end")
    return c


def test_on_read_end_follows_all_the_messages_of_one_read() -> None:
    calls: list[str] = []
    c = recording_client(calls)
    one_read = b"".join(publish_packet("t", p) for p in (b"a", b"b", b"c"))
    c._sock = FakeSock([one_read, publish_packet("t", b"d")])
    assert c.loop_read() == paho.MQTT_ERR_SUCCESS
    assert calls == ["a", "b", "c", "end"]  # once, after the last message of the read
    assert c.loop_read() == paho.MQTT_ERR_SUCCESS
    assert calls == ["a", "b", "c", "end", "d", "end"]
    assert c.loop_read() == paho.MQTT_ERR_SUCCESS  # nothing there (BlockingIOError): still called
    assert calls == ["a", "b", "c", "end", "d", "end", "end"]


def test_on_read_end_is_called_when_a_packet_is_split_across_reads() -> None:
    calls: list[str] = []
    c = recording_client(calls)
    packet = publish_packet("t", b"whole")
    c._sock = GappySock([packet[:4], None, packet[4:] + publish_packet("t", b"next")])
    c.loop_read()
    assert calls == ["end"]  # half a packet: no message yet, but the read ended
    c.loop_read()
    assert calls == ["end", "whole", "next", "end"]


def test_on_read_end_is_called_even_when_on_message_raises() -> None:
    calls: list[str] = []
    c = recording_client(calls, fail_on=b"b")
    c._sock = FakeSock([b"".join(publish_packet("t", p) for p in (b"a", b"b", b"c"))])
    try:
        c.loop_read()
    except RuntimeError as exc:
        assert str(exc) == "bug in on_message"
    else:
        raise AssertionError("paho passes on_message's exception on (suppress_exceptions is off)")
    assert calls == ["a", "b", "end"]  # what was collected up to the failure is still handed over


def test_on_read_end_is_called_when_the_connection_ends_mid_read() -> None:
    calls: list[str] = []
    c = recording_client(calls)
    c._sock = FakeSock([publish_packet("t", b"last"), b""])  # then the broker closes the socket
    assert c.loop_read() == paho.MQTT_ERR_SUCCESS
    assert calls == ["last", "end"]
    assert c.loop_read() == paho.MQTT_ERR_CONN_LOST
    assert calls == ["last", "end", "end"] and c._sock is None


def test_on_read_end_is_optional() -> None:
    c = client()
    got: list[bytes] = []
    c.on_message = lambda cl, u, m: got.append(m.payload)
    c._sock = FakeSock([publish_packet("t", b"x")])
    assert c.on_read_end is None
    assert c.loop_read() == paho.MQTT_ERR_SUCCESS and got == [b"x"]
