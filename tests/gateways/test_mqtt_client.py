"""BufferedClient: paho with chunked socket reads must deliver exactly what paho would."""

from __future__ import annotations

import threading
import time
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


# -- hold_until: the gateway holding messages back bounds the network loop's wait ----------


def connected_client(mqtt_broker, calls: list[float]) -> BufferedClient:
    """A BufferedClient connected to the broker, driven from the test thread (no loop_start),
    recording when on_read_end is called."""
    c = BufferedClient(CallbackAPIVersion.VERSION2, client_id=f"hold-{uuid.uuid4().hex[:6]}")
    c.connect(mqtt_broker.host, mqtt_broker.port)
    deadline = time.monotonic() + 5
    while not c.is_connected():  # read the CONNACK (no hold: paho's own loop)
        assert time.monotonic() < deadline, "no CONNACK"
        c.loop(timeout=0.1)
    c.on_read_end = lambda: calls.append(time.monotonic())
    return c


def test_while_holding_the_loop_waits_no_longer_than_the_hold_then_calls_on_read_end(mqtt_broker) -> None:
    calls: list[float] = []
    c = connected_client(mqtt_broker, calls)
    try:
        assert not c.input_waiting()
        c.hold_until = hold_until = time.monotonic() + 0.05
        start = time.monotonic()
        assert c._loop(timeout=5) == paho.MQTT_ERR_SUCCESS
        assert time.monotonic() - start < 1  # bounded by the hold, not the 5 s timeout
        assert len(calls) == 1 and calls[0] >= hold_until - 0.01  # once, when the hold ended, nothing read
        # A hold already over: select() does not wait (and is not given a negative timeout).
        c.hold_until = time.monotonic() - 1
        start = time.monotonic()
        assert c._loop(timeout=5) == paho.MQTT_ERR_SUCCESS
        assert time.monotonic() - start < 0.5 and len(calls) == 2
    finally:
        c.disconnect()


def test_without_a_hold_the_loop_is_pahos(mqtt_broker) -> None:
    calls: list[float] = []
    c = connected_client(mqtt_broker, calls)
    try:
        assert c.hold_until is None
        start = time.monotonic()
        assert c._loop(timeout=0.1) == paho.MQTT_ERR_SUCCESS
        assert time.monotonic() - start >= 0.09  # waited its timeout for input
        assert calls == []  # nothing read: no on_read_end
    finally:
        c.disconnect()


def test_a_read_while_holding_ends_with_on_read_end_once_when_that_ends_the_hold(mqtt_broker) -> None:
    calls: list[float] = []
    c = connected_client(mqtt_broker, calls)
    got: list[bytes] = []
    c.on_message = lambda cl, u, m: got.append(m.payload)
    topic = f"hold/{uuid.uuid4().hex[:8]}"
    try:
        subscribed = threading.Event()
        c.on_subscribe = lambda *a: subscribed.set()
        c.subscribe(topic, qos=0)
        wait_until(lambda: c.loop(timeout=0.05) == paho.MQTT_ERR_SUCCESS and subscribed.is_set(), 5)
        calls.clear()
        assert not c.input_waiting()
        c.publish(topic, b"x", qos=0)  # written at once (no network thread); the broker sends it back
        wait_until(c.input_waiting, 5)

        def hand_over() -> None:  # as the gateway does once it has handed everything over
            calls.append(time.monotonic())
            c.hold_until = None

        c.on_read_end = hand_over
        c.hold_until = time.monotonic() + 5
        start = time.monotonic()
        assert c._loop(timeout=5) == paho.MQTT_ERR_SUCCESS
        assert time.monotonic() - start < 1  # the read woke it, not the hold's end
        assert got == [b"x"] and len(calls) == 1  # after the read; the hold ended, so not again
        assert not c.input_waiting()
    finally:
        c.disconnect()
