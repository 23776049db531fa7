"""BufferedClient's direct write: a PUBLISH or PUBACK sent from another thread than paho's
network thread is written by that thread when nobody else writes, instead of waking the
network thread; everything arrives intact and in order, over a real broker."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.exception import MalformedPacket

from gateways.mqtt_client import BufferedClient
from tests.support import wait_until


class CountingSockpair:
    """paho's wake-up socket, counting the wake-ups sent to the network thread."""

    def __init__(self, sock: Any) -> None:
        self.sock, self.sends = sock, 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return self.sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def connected(broker, *, manual_ack: bool = False, max_inflight: int = 20) -> BufferedClient:
    c = BufferedClient(CallbackAPIVersion.VERSION2, client_id=f"dw-{uuid.uuid4().hex[:8]}", manual_ack=manual_ack)
    c.max_inflight_messages_set(max_inflight)
    up = threading.Event()
    c.on_connect = lambda *a: up.set()
    c.connect(broker.host, broker.port)
    c.loop_start()
    assert up.wait(5)
    c._sockpairW = CountingSockpair(c._sockpairW)
    return c


class Subscriber:
    def __init__(self, broker, topic: str) -> None:
        self.got: list[bytes] = []
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dw-sub-{uuid.uuid4().hex[:8]}")
        self.client.on_message = lambda c, u, m: self.got.append(m.payload)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def stop(c: paho.Client) -> None:
    c.disconnect()
    c.loop_stop()


@contextlib.contextmanager
def publisher_and_subscriber(broker, **kwargs: Any) -> Iterator[tuple[BufferedClient, Subscriber, str]]:
    """A connected BufferedClient (kwargs: `connected`'s), a subscriber to a fresh topic."""
    topic = f"dw/{uuid.uuid4().hex[:8]}"
    sub, c = Subscriber(broker, topic), connected(broker, **kwargs)
    try:
        yield c, sub, topic
    finally:
        stop(c)
        sub.close()


def test_a_publish_from_another_thread_is_written_there(mqtt_broker) -> None:
    # paho sends QoS 1 publishes beyond its in-flight limit itself, from the network thread,
    # as PUBACKs come in: no limit here, so that every publish is this thread's.
    with publisher_and_subscriber(mqtt_broker, max_inflight=0) as (c, sub, topic):
        # One QoS at a time: a broker may deliver QoS 0 ahead of QoS 1 held in its in-flight
        # window, so only messages of one QoS keep their order across the two.
        for qos in (0, 1):
            infos = [c.publish(topic, b"q%d-%d" % (qos, i), qos=qos) for i in range(25)]
            for info in infos:
                info.wait_for_publish(5)  # QoS 0: written; QoS 1: the broker's PUBACK came back
                assert info.is_published()
            assert wait_until(lambda: len(sub.got) == 25 * (qos + 1), 5)
        assert sub.got == [b"q%d-%d" % (qos, i) for qos in (0, 1) for i in range(25)]
        assert c._sockpairW.sends == 0  # the network thread was never woken to write
        assert not c._out_packet


def test_while_the_socket_is_being_written_the_network_thread_writes_it(mqtt_broker) -> None:
    with publisher_and_subscriber(mqtt_broker) as (c, sub, topic):
        with c._write_lock:  # as if the network thread were writing right now
            info = c.publish(topic, b"queued", qos=1)
            assert c._sockpairW.sends == 1 and len(c._out_packet) == 1  # paho's way
        info.wait_for_publish(5)
        assert wait_until(lambda: sub.got == [b"queued"], 5)


def test_a_partial_write_is_finished_by_the_network_thread(mqtt_broker) -> None:
    with publisher_and_subscriber(mqtt_broker) as (c, sub, topic):
        real_send, caller = c._sock_send, threading.current_thread()
        cut = []

        def send_some(data: bytes) -> int:
            if threading.current_thread() is caller:
                if not cut:
                    cut.append(len(data))
                    return real_send(data[:5])  # the socket took only five bytes...
                raise BlockingIOError()  # ...and is full now
            return real_send(data)

        c._sock_send = send_some
        payload = bytes(range(256)) * 40
        info = c.publish(topic, payload, qos=1)
        assert cut and c._sockpairW.sends == 1  # the rest was left to the network thread
        info.wait_for_publish(5)
        assert wait_until(lambda: sub.got == [payload], 5)


def test_threads_publishing_at_once_interleave_whole_packets_in_order(mqtt_broker) -> None:
    threads, n = 4, 300
    with publisher_and_subscriber(mqtt_broker) as (c, sub, topic):

        def publish(t: int) -> None:
            for i in range(n):
                c.publish(topic, b"%d:%d:" % (t, i) + b"x" * (i % 50), qos=1)

        workers = [threading.Thread(target=publish, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert wait_until(lambda: len(sub.got) == threads * n, 15), len(sub.got)
        for t in range(threads):
            mine = [int(p.split(b":")[1]) for p in sub.got if p.startswith(b"%d:" % t)]
            assert mine == list(range(n)), t  # none lost, none torn, in each thread's order
        assert wait_until(lambda: not c._out_messages, 5)  # every QoS 1 publish acknowledged


def test_a_manual_ack_from_another_thread_is_written_there(mqtt_broker) -> None:
    topic = f"dw/{uuid.uuid4().hex[:8]}"
    got: list[paho.MQTTMessage] = []
    c = connected(mqtt_broker, manual_ack=True)
    subscribed = threading.Event()
    c.on_message = lambda cl, u, m: got.append(m)
    c.on_subscribe = lambda *a: subscribed.set()
    c.subscribe(topic, qos=1)
    assert subscribed.wait(5)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dw-pub-{uuid.uuid4().hex[:8]}")
    pub.connect(mqtt_broker.host, mqtt_broker.port)
    pub.loop_start()
    try:
        pub.publish(topic, b"ack me", qos=1).wait_for_publish(5)
        assert wait_until(lambda: len(got) == 1, 5)
        sends = c._sockpairW.sends
        assert c.ack(got[0].mid, got[0].qos) == paho.MQTT_ERR_SUCCESS
        assert c._sockpairW.sends == sends and not c._out_packet  # written by this thread
    finally:
        stop(pub)
        stop(c)


# -- withdraw: an outgoing QoS 1 message paho would otherwise send after a reconnect -------


def test_a_withdrawn_message_is_not_sent_when_the_connection_comes(mqtt_broker) -> None:
    topic = f"dw/{uuid.uuid4().hex[:8]}"
    sub = Subscriber(mqtt_broker, topic)
    c = BufferedClient(CallbackAPIVersion.VERSION2, client_id=f"dw-{uuid.uuid4().hex[:8]}")
    try:
        # Not connected yet: paho keeps QoS 1 messages and sends them once connected.
        kept = c.publish(topic, b"withdrawn", qos=1)
        also = c.publish(topic, b"kept", qos=1)
        assert kept.rc == paho.MQTT_ERR_NO_CONN and also.rc == paho.MQTT_ERR_NO_CONN
        assert c.withdraw(kept) is True
        assert c.withdraw(kept) is False  # once
        up = threading.Event()
        c.on_connect = lambda *a: up.set()
        c.connect(mqtt_broker.host, mqtt_broker.port)
        c.loop_start()
        assert up.wait(5)
        c.publish(topic, b"after", qos=1)
        wait_until(lambda: sub.got == [b"kept", b"after"], timeout=5)
        wait_until(lambda: not c._out_messages, timeout=5)
    finally:
        stop(c)
        sub.close()


def test_withdrawing_an_in_flight_message_frees_its_slot(mqtt_broker) -> None:
    """A message sent but not yet acknowledged holds one of the in-flight slots; withdrawn,
    it gives the slot to the next queued message, which goes out at once."""
    with publisher_and_subscriber(mqtt_broker, max_inflight=1) as (c, sub, topic):
        with c._out_message_mutex:  # no PUBACK is handled meanwhile: both stay held
            first = c.publish(topic, b"first", qos=1)
            second = c.publish(topic, b"second", qos=1)
            assert c._out_messages[first.mid].state == paho.mqtt_ms_wait_for_puback
            assert c._out_messages[second.mid].state == paho.mqtt_ms_queued
            assert c.withdraw(first) is True  # sent already: it arrives, but is not sent again
            assert c._out_messages[second.mid].state == paho.mqtt_ms_wait_for_puback
        wait_until(lambda: sub.got == [b"first", b"second"], timeout=5)
        wait_until(lambda: not c._out_messages and c._inflight_messages == 0, timeout=5)


def test_withdraw_knows_a_message_by_more_than_its_mid(mqtt_broker) -> None:
    with publisher_and_subscriber(mqtt_broker) as (c, sub, topic):
        acked = c.publish(topic, b"one", qos=1)
        acked.wait_for_publish(5)
        assert c.withdraw(acked) is False  # acknowledged: nothing to withdraw
        other = paho.MQTTMessageInfo(acked.mid)  # same mid, another message
        with c._out_message_mutex:
            held = c.publish(topic, b"two", qos=1)
            other.mid = held.mid
            assert c.withdraw(other) is False and held.mid in c._out_messages
        wait_until(lambda: sub.got == [b"one", b"two"], timeout=5)


def test_pubacks_free_the_in_flight_window_and_reach_on_publish(mqtt_broker) -> None:
    """An MQTT 3.1.1 PUBACK is decoded here (its mid only), not by paho: each must still
    reach on_publish with a success code and free its slot of the in-flight window."""
    with publisher_and_subscriber(mqtt_broker, max_inflight=3) as (c, sub, topic):
        acked: list[tuple[int, bool]] = []
        c.on_publish = lambda _c, _u, mid, rc, _props: acked.append((mid, rc.is_failure))
        infos = [c.publish(topic, b"m%d" % i, qos=1) for i in range(40)]  # 37 wait for a slot
        for info in infos:
            info.wait_for_publish(5)
            assert info.is_published()
        assert sorted(acked) == sorted((info.mid, False) for info in infos)
        assert c._inflight_messages == 0 and not c._out_messages
        assert wait_until(lambda: len(sub.got) == 40, 5)


def test_a_puback_that_is_not_two_bytes_is_left_to_paho() -> None:
    c = BufferedClient(CallbackAPIVersion.VERSION2, client_id="puback-bad")
    c._in_packet = {"command": 0x40, "packet": b"\x00\x01\x00"}
    with pytest.raises(MalformedPacket):  # paho's own refusal, as before
        c._handle_pubackcomp("PUBACK")
