"""The MQTT gateway: device traffic in, commands out, on paho-mqtt 2's network thread.

The network thread only parses, hands each device's messages to its actor (`tell_many`,
after each socket read; under load gathered for up to 200 ms, see `_hand_over`), and
publishes. A QoS 1 message is acknowledged (paho manual ack) only when its actor replies
that the events are committed; a message Parley drops on purpose (unknown product, bad
payload) is acknowledged at once, so the broker does not redeliver it forever.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import socket
import sys
import threading
import time
from collections import Counter
from functools import partial
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from actors.device import AnswerRefused, DeviceActor, DeviceResponded, ReportEvent, ReportTelemetry
from actors.errors import ActorCrashed, HeldBack, Unavailable
from actors.log_throttle import LogThrottle
from actors.ports import NoReply
from eventstore.breaker import store_down
from eventstore.failures import RepeatedFailures
from gateways import mqtt_codec as codec
from gateways.config import check_mqtt_url
from gateways.mqtt_client import BufferedClient, no_delay
from gateways.runtime import Runtime

log = structlog.get_logger(__name__)

RECONNECT_MAX_DELAY_S = 5  # paho doubles its wait between tries from 1 s up to this
# A device that sends bad messages, or a product nobody created, is logged the first time,
# then at most once per this many seconds with how many were left out (`left_out`); the
# counters count every one.
DROP_LOG_INTERVAL_S = 60.0
UNREACHABLE_REPORT_S = 60.0  # while the broker stays unreachable, a line this often


def _outcome(error: Exception) -> str:
    """The counter a message whose actor answered `error` goes to: `not_committed` (the
    store was unavailable: worth trying again), `held_back` (not tried, because an earlier
    message of its device failed: tried again after that one), `poison` (it crashed its actor, and would
    again), else `dropped.<code>` (refused, and logged, by its actor: bad input)."""
    if isinstance(error, HeldBack):
        return "held_back"  # not tried: an earlier one of its device failed (tried again too)
    if isinstance(error, Unavailable):
        return "not_committed"
    if isinstance(error, ActorCrashed):
        return "poison"
    return f"dropped.{getattr(error, 'code', 'error')}"


class _Ack:
    """Acknowledge a QoS 1 message once its events are committed."""

    __slots__ = ("gw", "mid", "qos", "key", "seq", "message", "connection", "attempts")

    def __init__(self, gw: MqttGateway, mid: int, qos: int, key: tuple[str, str], seq: int) -> None:
        self.gw, self.mid, self.qos, self.key, self.seq = gw, mid, qos, key, seq
        self.message: Any = None  # set once the message exists (it carries this reply)
        self.connection = gw._connection  # the broker connection the message came on
        self.attempts = 0

    def ok(self, value: Any = None) -> None:
        self.gw._ack(self.mid, self.qos, self.connection)

    def fail(self, error: Exception) -> None:
        outcome = _outcome(error)
        self.gw.stats[outcome] += 1
        if outcome in ("not_committed", "held_back"):
            self.gw._retry(self, error)  # unacknowledged, and tried again
        else:
            self.gw._ack(self.mid, self.qos, self.connection)  # it would fail alike on every redelivery


class _Line:
    """One device's messages the gateway holds back, in the order they came (`seq`): a QoS 1
    message whose commit failed, until it is tried again, or one waiting for its product,
    and every later message of that device, so that none overtakes it. (A retry used to
    come 0.5-30 s later, after the device's newer reports: its older state overwrote the
    newer one. And after an outage all retries went at once, in a set's order.)"""

    __slots__ = ("items", "armed", "for_product", "unacked")

    # QoS 0 messages a line holds at most: during a store outage they pile up until the next
    # retry (up to 30 s); past this many, a device's newer ones are counted lost at once
    # (they would be lost with the store down anyway; QoS 1 is bounded by the broker's
    # in-flight window).
    MAX_UNACKED = 100

    def __init__(self, for_product: bool = False) -> None:
        self.items: list[tuple[int, Any]] = []  # (seq, message), by seq
        self.armed = False  # a retry is scheduled
        self.for_product = for_product  # waiting for its product to show up (shared subscriptions)
        self.unacked = 0  # QoS 0 messages among the items

    def add(self, seq: int, message: Any) -> None:
        bisect.insort(self.items, (seq, message), key=lambda item: item[0])


class _Unacked(NoReply):
    """The reply of a QoS 0 message: nobody waits for its commit (so a burst of them is
    not flushed to disk for its sake, actors/base.py), but a failure is counted like a
    QoS 1 message's; one not committed is `lost` (QoS 0 is at most once: not tried again)."""

    __slots__ = ("gw",)

    def __init__(self, gw: MqttGateway) -> None:
        self.gw = gw

    def fail(self, error: Exception) -> None:
        outcome = _outcome(error)
        self.gw.stats["lost" if outcome == "not_committed" else outcome] += 1


# A topic in a log line: a device may use one of 64 KiB (a 60,000-character device id
# made one log line of 60 KB).
TOPIC_SHOWN = 200


def _shown_topic(msg: paho.MQTTMessage) -> str:
    """A topic for the log, whatever its bytes (paho's `topic` raises on non-UTF-8)."""
    return bytes(msg._topic).decode("utf-8", errors="replace")[:TOPIC_SHOWN]


def default_client_id(store_url: str) -> str:
    """`parley-<host>-<store>`: the same after a restart (the broker keeps our persistent
    session and what it queued meanwhile), different for a second checkout or data dir on
    the same host. With one id for both, each connect would take the other's session and
    knock it off, about once a second, for as long as both run."""
    digest = hashlib.sha256(store_url.encode()).hexdigest()[:8]
    return f"parley-{socket.gethostname()}-{digest}"


class MqttGateway:
    def __init__(self, runtime: Runtime, url: str, *, client_id: str | None = None,
                 shared_group: str | None = None, keepalive: int = 30) -> None:
        # A scheme is required: "127.0.0.1:1884" parses as a path, and the defaults would
        # have sent us to port 1883 of localhost while the log said 1884.
        u = urlparse(check_mqtt_url(url))
        self.runtime = runtime
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 1883
        self.keepalive = keepalive
        self.client_id = client_id or default_client_id(runtime.store.url)
        self.shared_group = shared_group
        self.stats: Counter[str] = Counter()
        self._unacked = _Unacked(self)
        # Devices whose messages are held back (`_Line`), in the order their lines began:
        # tried again after a delay, and when the store (PostgreSQL) is back after an
        # outage, all of them at once. Touched by the network thread, actors' threads (a
        # failed commit), the scheduler's and the breaker's: under the lock.
        self._lines: dict[tuple[str, str], _Line] = {}
        self._lines_lock = threading.Lock()
        self._seq = itertools.count()  # the order messages came in (network thread only)
        if runtime.log.breaker is not None:
            runtime.log.breaker.on_up(self._retry_held_now)
        self._ready = threading.Event()
        # Since when (wall clock, s) devices can be heard: connected and subscribed. None
        # while not. The liveness sweep waits on it (Runtime.liveness_paused).
        self.listening_since: float | None = None
        # Drops are logged the first time per device (or topic) and reason, then at most once
        # a minute with how many were left out; an unknown product likewise, per product.
        self._drops_logged = LogThrottle(DROP_LOG_INTERVAL_S)
        self._unknown_logged = LogThrottle(DROP_LOG_INTERVAL_S)
        self.client = BufferedClient(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                     clean_session=False, protocol=paho.MQTTv311, manual_ack=True)
        if u.username:
            self.client.username_pw_set(u.username, u.password)
        # Parley is one client of its broker, not a fleet, so it may try often: with 30 s
        # at most, commands came back 21 s after a broker that was down for 40 s; with 5 s,
        # within 5 s. Repeated failures are counted rather than logged (_on_connect_fail).
        self.client.reconnect_delay_set(min_delay=1, max_delay=RECONNECT_MAX_DELAY_S)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        # Messages parsed but not yet handed to their actors, with the order they came in.
        # Only the network thread touches these.
        self._bursts: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        self._held = 0  # messages in _bursts
        self._held_since = 0.0
        self._urgent = False  # a command's response is among them: hand over now
        self._held_unacked = 0  # QoS 1 messages among them: the broker waits for their acks
        self.client.on_read_end = self._hand_over
        # Counts connects and disconnects: a message is acknowledged only on the connection it
        # came on (`_ack`), so it changes on both, and a message's ack never reaches a new
        # connection, not even one still waiting for its CONNACK.
        self._connection = 0
        self._connected_at = 0.0
        # Whether the broker answered this connection's CONNECT (accepting or refusing it).
        # A connection closed before that is a failed connect, not a disconnect.
        self._connack = False
        self._short_drops: list[float] = []
        self._warned_takeover_at = -60.0
        self._warned_retained = -1  # the connection whose replayed retained messages were logged
        self._stopping = False
        # Failed connects since the link was last up: the first said, then a count a minute.
        self.connect_failures = RepeatedFailures("mqtt.connect_failed", "mqtt.still_unreachable",
                                                 every_s=UNREACHABLE_REPORT_S, level="warning",
                                                 broker=f"{self.host}:{self.port}")

    # -- lifecycle -------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> None:
        """Connect (retrying with backoff in paho's thread) and wait until subscribed."""
        self.begin()
        if not self.wait_ready(timeout):
            self.stop()
            raise self.unreachable(timeout)

    def begin(self) -> None:
        """Start connecting in paho's network thread (it retries with backoff, and logs
        each failure); `wait_ready` says when it has subscribed."""
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def unreachable(self, timeout: float) -> ConnectionError:
        # With the last failure's reason (refused, no such host), which was only in an
        # earlier log line: "not reachable" alone left the user to guess.
        error = self.connect_failures.error
        why = f" ({error})" if error else ""
        return ConnectionError(f"MQTT broker at {self.host}:{self.port} not reachable within {timeout} s{why}")

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()
        self._flush()  # the network thread has ended: what it held goes to the actors now
        self._count_left_in_lines()

    def _count_left_in_lines(self) -> None:
        """At stop, the messages still held in devices' lines (a commit that failed, waiting
        for its retry; a device waiting for its product) are not handed on: a QoS 1 one the
        broker redelivers (persistent session), a QoS 0 one is lost, and counted so."""
        with self._lines_lock:
            lines, self._lines = self._lines, {}
        qos0 = sum(1 for line in lines.values() for _, m in line.items if m.reply is self._unacked)
        qos1 = sum(len(line.items) for line in lines.values()) - qos0
        if qos0 or qos1:
            self.stats["lost"] += qos0
            log.warning("mqtt.stopped_holding", devices=len(lines), qos0_lost=qos0, qos1_left_to_broker=qos1)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connack = True
        if reason.is_failure:
            log.error("mqtt.connect_refused", reason=str(reason))
            return
        no_delay(client)
        self._connected_at = time.monotonic()
        self._connection += 1  # retries of messages from an earlier connection stop: redelivered
        # Subscribe on every connect: the broker may have lost our persistent session.
        client.subscribe([(t, 1) for t in self._subscriptions()])
        episode = self.connect_failures.succeeded()
        unreachable = {"failed_attempts": episode[0], "unreachable_s": episode[1]} if episode else {}
        log.info("mqtt.connected", broker=f"{self.host}:{self.port}", client_id=self.client_id,
                 session_present=flags.session_present, **unreachable)

    def _subscriptions(self) -> list[str]:
        prefix = f"$share/{self.shared_group}/" if self.shared_group else ""
        return [prefix + t for t in codec.SUBSCRIPTIONS]

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError`, and passes no error: it is the one
        # being handled. Without this line a broker that is down was 15 s of silence.
        # A long outage is a line a minute, not one per try (every 5 s).
        self.connect_failures.failed(sys.exc_info()[1], will_retry=not self._stopping)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        refused = [(t, str(r)) for t, r in zip(self._subscriptions(), reasons) if r.is_failure]
        if refused:
            # Refused (an ACL, a broker without shared subscriptions): Parley would hear
            # nothing on those topics while it looked connected. Not ready: commands are
            # refused (503), /api/health says the link is down, and this says why.
            self.stats["subscriptions_refused"] += len(refused)
            log.error("mqtt.subscription_refused", refused=refused, broker=f"{self.host}:{self.port}",
                      hint="allow this client to subscribe to these topics on the broker")
            return
        if not self._ready.is_set():
            self.listening_since = time.time()
        self._ready.set()

    # Dropped this soon after connecting, this often: another client is taking our session.
    SHORT_LIVED_S = 5.0
    TAKEOVER_DROPS = 3

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connection += 1  # what came on the lost connection is not acknowledged on the next
        self._ready.clear()
        self.listening_since = None
        self._flush()  # nothing held waits for a reconnect
        connack, self._connack = self._connack, False
        if reason.is_failure and not connack:
            # Something took the TCP connection and closed it without a CONNACK (paho says
            # "Protocol error" or "Unspecified error", by what came before the close): a TLS
            # or WebSocket port, another service, a proxy. Counted with the failed connects:
            # said once, and the reason `unreachable()` gives.
            self.connect_failures.failed(ConnectionError(
                "the connection was closed before an MQTT broker answered; is this a broker's "
                "plain MQTT port? mqtts:// and WebSocket ports are not supported"),
                will_retry=not self._stopping)
        elif reason.is_failure:
            log.warning("mqtt.disconnected", reason=str(reason), will_retry=True)
            self._note_short_connection()

    def _note_short_connection(self) -> None:
        """MQTT 3.1.1 gives no reason when a broker drops us because another client
        connected with our client id; the sign is a connection closed right after it was
        made, again and again. Say what is probably wrong (once a minute at most)."""
        now = time.monotonic()
        if now - self._connected_at > self.SHORT_LIVED_S:
            self._short_drops.clear()
            return
        self._short_drops.append(now)
        recent = [t for t in self._short_drops if now - t < 60]
        self._short_drops[:] = recent
        if len(recent) >= self.TAKEOVER_DROPS and now - self._warned_takeover_at > 60:
            self._warned_takeover_at = now
            log.error("mqtt.session_taken_over", client_id=self.client_id, drops=len(recent),
                      hint="another MQTT client is probably connecting with this client id: give "
                           "each Parley process its own (--mqtt-client-id / PARLEY_MQTT_CLIENT_ID)")

    # -- device -> Parley ------------------------------------------------------------
    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        received_ms = int(time.time() * 1000)
        self.stats["received"] += 1
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            # paho decodes the topic when asked, and raised out of this callback, which ended
            # its network thread. Mosquitto refuses such a topic; another broker may not.
            self.stats["dropped.bad_topic"] += 1
            self._log_dropped(_shown_topic(msg), None, "bad_topic", "topic is not UTF-8")
            self._ack(msg.mid, msg.qos)
            return
        if msg.retain:
            self._ignore_retained(msg)
            return
        obj: dict[str, Any] | None = None
        route: codec.Route | None = None
        try:
            route = codec.parse_topic(topic)
            obj = codec.decode(msg.payload)
            if self.runtime.agents.get(route.product_id) is None and not self._answers_a_command(route, obj):
                if msg.qos and self.shared_group and route.kind != "ntp":
                    # Another process may have created it a moment ago (our mirror of the
                    # agents follows the log some 50 ms later): look again before dropping.
                    self._wait_for_product(route, obj, msg, received_ms)
                else:
                    self._unknown_product(route, msg)  # NTP too: no product, no answer
                return
            if route.kind == "ntp":
                payload = codec.ntp_response(obj, received_ms, int(time.time() * 1000))
                client.publish(codec.ntp_response_topic(route.product_id, route.device_id), payload, qos=0)
                self._ack(msg.mid, msg.qos)
                return
            key = (route.product_id, route.device_id)
            seq = next(self._seq)
            reply = _Ack(self, msg.mid, msg.qos, key, seq) if msg.qos else self._unacked
            message = self._message(route, obj, received_ms, reply, len(msg.payload))
            if msg.qos:
                reply.message = message  # to try it again if its commit fails
                self._held_unacked += 1
            burst = self._bursts.get(key)
            if burst is None:
                self._bursts[key] = [(seq, message)]
                if not self._held:
                    self._held_since = time.monotonic()
            else:
                burst.append((seq, message))
            self._held += 1
            if route.kind == "responses":
                self._urgent = True
        except codec.BadMessage as exc:
            self.stats[f"dropped.{exc.reason}"] += 1
            self._log_dropped(topic, route, exc.reason, exc.detail[:200])
            self._ack(msg.mid, msg.qos)
            if obj is not None:
                self._tell_refused(obj, exc.detail[:200])
        except Exception:
            # Never let one message kill the network thread. Acknowledged: Parley cannot use
            # it (a bug of ours), and unacknowledged it would hold a slot of the broker's
            # in-flight window until the next reconnect, and then come again.
            self.stats["dropped.error"] += 1
            log.exception("mqtt.message_failed", topic=topic[:TOPIC_SHOWN])
            self._ack(msg.mid, msg.qos)

    def _log_dropped(self, topic: str, route: codec.Route | None, reason: str, detail: str) -> None:
        """`mqtt.dropped`, throttled per device (per topic if it names none) and reason."""
        key = (reason, route.product_id, route.device_id) if route is not None else (reason, topic[:TOPIC_SHOWN])
        fields = self._drops_logged.admit(key)
        if fields is None:
            return
        # An empty message is what a device clearing its retained message sends: no error.
        (log.info if reason == "empty" else log.warning)(
            "mqtt.dropped", topic=topic[:TOPIC_SHOWN], reason=reason, detail=detail, **fields)

    def _tell_refused(self, obj: dict[str, Any], detail: str) -> None:
        """A dropped answer to a command waiting here: its caller's 504 will say why."""
        request_id = obj.get("requestId")
        key = self.runtime.system.inflight.get(request_id) if isinstance(request_id, str) else None
        if key is not None:
            try:
                self.runtime.system.tell(DeviceActor, key, AnswerRefused(request_id, detail))
            except Exception as exc:  # shutting down: the 504 just says less
                log.info("mqtt.refusal_not_told", request_id=request_id, error=str(exc))

    # Under load, hold parsed messages back for up to this long (or this many), so that each
    # actor wakes once for a burst of its device's messages instead of once per socket read.
    HOLD_SECONDS = 0.2
    HOLD_MESSAGES = 20000
    HOLD_MIN = 200  # fewer held than this and nothing more waiting: hand over at once

    def _hand_over(self) -> None:
        """After each socket read: give every device its messages at once. Its actor then
        wakes once and folds them into one commit, instead of waking (and committing) per
        message. Under load, messages are held back for at most HOLD_SECONDS (or until
        HOLD_MESSAGES are held), so the bursts grow. Nothing is held when a command's
        response is among them. When nothing more is waiting in the socket, messages are
        held only if there are many (HOLD_MIN) and none awaits an acknowledgement: an idle
        device's message waits for nothing, and neither does a QoS 1 stream, whose broker
        sends no more than its in-flight window until we acknowledge."""
        if not self._held:
            self.client.hold_until = None
            return
        if not self._urgent and self._held < self.HOLD_MESSAGES \
                and time.monotonic() - self._held_since < self.HOLD_SECONDS \
                and ((self._held >= self.HOLD_MIN and not self._held_unacked) or self.client.input_waiting()):
            self.client.hold_until = self._held_since + self.HOLD_SECONDS
            return
        self._flush()

    def _flush(self) -> None:
        """Hand every held message to its actor now (or to its device's line, if it has one)."""
        self.client.hold_until = None
        bursts, self._bursts = self._bursts, {}
        self._held, self._held_unacked, self._urgent = 0, 0, False
        waiting_for_product = []
        if self._lines:
            with self._lines_lock:
                for key in [k for k in bursts if k in self._lines]:
                    line = self._lines[key]
                    for seq, message in bursts.pop(key):
                        if message.reply is self._unacked:
                            if line.unacked >= line.MAX_UNACKED:
                                self.stats["lost"] += 1
                                continue
                            line.unacked += 1
                        line.add(seq, message)
                    if line.for_product:
                        waiting_for_product.append(key)
        # A device's answer read alone, nothing more waiting to be read: its actor may handle
        # it on this thread (ActorSystem.tell_many's `here`). Never when more came or is
        # coming: this thread must not wait on a commit then. (The look at the socket is a
        # system call: only for a message it can matter to.)
        here = len(bursts) == 1 and self._lone_answer(next(iter(bursts.values()))) \
            and not self.client.input_waiting()
        for key, items in bursts.items():
            self._tell(key, [message for _, message in items], here=here)
        for key in waiting_for_product:
            if self.runtime.agents.get(key[0]) is not None:  # it showed up: no need to wait for the next look
                self._release(key)

    @staticmethod
    def _lone_answer(items: list[tuple[int, Any]]) -> bool:
        return len(items) == 1 and isinstance(items[0][1], DeviceActor.run_here)

    def _tell(self, key: tuple[str, str], messages: list[Any], here: bool = False) -> None:
        try:
            self.runtime.system.tell_many(DeviceActor, key, messages, here=here)
        except Exception as exc:
            # Shutting down: leave QoS 1 messages unacknowledged, so they are redelivered.
            self.stats["dropped.error"] += len(messages)
            log.error("mqtt.not_delivered", product_id=key[0], device_id=key[1],
                      messages=len(messages), error=str(exc))

    @staticmethod
    def _message(route: codec.Route, obj: dict[str, Any], received_ms: int, reply: Any, size: int) -> Any:
        if route.kind == "telemetry":
            t = codec.parse_telemetry(obj)
            return ReportTelemetry(t.kind, t.status, t.state, t.ts, received_ms, t.metadata, reply=reply,
                                   payload_bytes=size)
        if route.kind == "event":
            e = codec.parse_event(obj)
            return ReportEvent(e.name, e.data, e.ts, received_ms, e.metadata, reply=reply)
        r = codec.parse_response(obj)
        return DeviceResponded(r.request_id, r.code, r.msg, r.data, received_ms, reply=reply)

    def _ignore_retained(self, msg: paho.MQTTMessage) -> None:
        """A message with RETAIN set is a retained message the broker replays because we
        subscribed (on every connect): a message that matches an established subscription
        comes with RETAIN 0 (MQTT-3.3.1-9), even one a device published retained. So this is
        an old report of unknown age, taken already if we were connected when it was
        published; taken again, it would store an alert twice and bring a device that
        went away months ago back online. Logged once per connection, then counted."""
        self.stats["dropped.retained"] += 1
        if self._warned_retained != self._connection:
            self._warned_retained = self._connection
            log.info("mqtt.retained_ignored", topic=_shown_topic(msg),
                     hint="retained messages are replays of old reports, not new ones; Parley takes "
                          "only messages published while it is subscribed (see docs/mqtt.md)")
        else:
            log.debug("mqtt.retained_ignored", topic=_shown_topic(msg))
        self._ack(msg.mid, msg.qos)

    def _answers_a_command(self, route: codec.Route, obj: dict[str, Any]) -> bool:
        """A response that may answer a command still pending, though its product was deleted
        since: the device did carry the command out, and its caller should hear so (not a
        504 after the whole timeout). A command this process waits on; or, with several
        processes (a shared subscription), one another process may have sent to a device of
        that product: its actor catches up with the log and records the answer if the
        command is pending there, else logs it as unmatched."""
        if route.kind != "responses":
            return False
        request_id = obj.get("requestId")
        key = self.runtime.system.inflight.get(request_id) if isinstance(request_id, str) else None
        if key == (route.product_id, route.device_id):
            return True
        return bool(self.shared_group) and route.product_id in self.runtime.devices.products_of(route.device_id)

    # How long to look again for a product this process does not know, with several
    # processes on one log (seconds after the message came, each).
    PRODUCT_WAITS = (0.1, 0.4, 1.5)

    def _wait_for_product(self, route: codec.Route, obj: dict[str, Any], msg: paho.MQTTMessage,
                          received_ms: int) -> None:
        """A QoS 1 message for a product this process does not know, while other processes
        share the log: one of them may have just created it (a device's first report right
        after `POST /api/agents` through another process was dropped 9 times in 10). Left
        unacknowledged, it is handed to its actor once the product shows up here, or
        dropped as unknown_product after PRODUCT_WAITS."""
        key = (route.product_id, route.device_id)
        reply = _Ack(self, msg.mid, msg.qos, key, next(self._seq))
        reply.message = self._message(route, obj, received_ms, reply, len(msg.payload))  # refusals first
        self.stats["waited.unknown_product"] += 1
        with self._lines_lock:
            line = self._lines.get(key)
            started = line is None
            if started:
                line = self._lines[key] = _Line(for_product=True)
            line.add(reply.seq, reply.message)  # the device's later messages wait behind it
        if not started:
            return  # its line is looked at already

        def again(attempt: int) -> None:
            if self.runtime.agents.get(route.product_id) is not None:
                self._release(key)
            elif attempt + 1 < len(self.PRODUCT_WAITS):
                self.runtime.system.scheduler.call_later(self.PRODUCT_WAITS[attempt + 1], partial(again, attempt + 1))
            else:
                with self._lines_lock:
                    gone = self._lines.pop(key, None)
                for _, message in gone.items if gone is not None else ():
                    if not isinstance(message.reply, _Ack) or self._still_held(message.reply):
                        self._unknown_product(route, msg, getattr(message.reply, "connection", None),
                                              getattr(message.reply, "mid", 0), getattr(message.reply, "qos", 0))

        self.runtime.system.scheduler.call_later(self.PRODUCT_WAITS[0], partial(again, 0))

    def _unknown_product(self, route: codec.Route, msg: paho.MQTTMessage, connection: int | None = None,
                         mid: int | None = None, qos: int | None = None) -> None:
        """Drop `msg` (or the message `mid` of that device, waiting in its line) as unknown."""
        self.stats["dropped.unknown_product"] += 1
        fields = self._unknown_logged.admit(route.product_id)
        if fields is not None:
            log.warning("mqtt.unknown_product", product_id=route.product_id, topic=msg.topic[:TOPIC_SHOWN], **fields)
        self._ack(msg.mid if mid is None else mid, msg.qos if qos is None else qos, connection)

    # Waits before a message whose commit failed is tried again: a store that is down for a
    # while gets one try per device message every 30 s, not a storm.
    RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

    def _retry(self, ack: _Ack, error: Exception) -> None:
        """Try a QoS 1 message whose commit failed again, later. Left unacknowledged, the
        broker would redeliver it only on the next connection, and meanwhile it would hold
        a slot of the broker's in-flight window (Mosquitto: 20): a store outage of a few
        seconds would stall all QoS 1 traffic until a reconnect."""
        delay = self.RETRY_DELAYS[min(ack.attempts, len(self.RETRY_DELAYS) - 1)]
        ack.attempts += 1
        # The store known down is one line of the breaker's (store.down), not one a message.
        log_fn = log.debug if store_down(error) or isinstance(error, HeldBack) \
            else log.error if ack.attempts == 1 else log.warning
        log_fn("mqtt.not_committed", mid=ack.mid, product_id=ack.key[0], device_id=ack.key[1],
               error=str(error), attempt=ack.attempts, retry_in_s=delay)

        with self._lines_lock:
            line = self._lines.get(ack.key)
            if line is None:
                line = self._lines[ack.key] = _Line()
            line.add(ack.seq, ack.message)
            arm = not line.armed and not line.for_product
            line.armed = True
        if arm:
            self.runtime.system.scheduler.call_later(delay, partial(self._release, ack.key))

    def _release(self, key: tuple[str, str]) -> None:
        """Hand a device's line to its actor, in the order its messages came. A QoS 1
        message from a connection that is gone is left out: the broker redelivers it."""
        with self._lines_lock:
            line = self._lines.pop(key, None)
        if line is None:
            return  # released already: the store came back (_retry_held_now)
        messages = []
        for _, message in line.items:
            reply = message.reply
            if isinstance(reply, _Ack):
                if not self._still_held(reply):
                    continue
                if reply.attempts:
                    self.stats["retried"] += 1
            messages.append(message)
        if messages:
            self._tell(key, messages)

    def _retry_held_now(self) -> None:
        """The store is back: try every held QoS 1 message now, not at the end of its
        backoff (up to 30 s). They fill the broker's in-flight window, and meanwhile it
        queues the rest for us only up to its limit, then drops them (a re-audit lost
        messages for 18 s after the store was back). Device by device, in the order their
        lines began, each line in the order its messages came."""
        with self._lines_lock:
            keys = [key for key, line in self._lines.items() if not line.for_product]
        for key in keys:
            self._release(key)

    def _still_held(self, ack: _Ack) -> bool:
        """Whether a QoS 1 message held back (to retry, or to wait for its product) is still
        ours to hand over: after a reconnect the broker redelivers it itself (persistent
        session)."""
        return not (self._stopping or ack.connection != self._connection or self.client.socket() is None)

    def _ack(self, mid: int, qos: int, connection: int | None = None) -> None:
        """PUBACK a QoS 1 message; `connection`: the one it came on, if it may have changed
        since (its commit took a while). A packet id means something only on its own
        connection: sent on the next, it acknowledged whatever the broker gave that id
        there (after a lost session, another message, not yet committed, which was then
        lost). So a message whose connection is gone is left to the broker: redelivered
        with a persistent session (and stored again: QoS 1 is at least once), or dropped
        with the session. paho waits a second or more before it reconnects, far longer
        than this check takes before the write."""
        if not qos:
            return
        if connection is not None and connection != self._connection:
            self.stats["ack_skipped.reconnected"] += 1
            log.debug("mqtt.ack_skipped", mid=mid, reason="the connection it came on is gone")
            return
        self.client.ack(mid, qos)
        self.stats["acked"] += 1

    # -- Parley -> device (the actors' DeviceLink) -------------------------------------
    @property
    def connected(self) -> bool:
        return self._ready.is_set()  # connected and subscribed: the answer can come back

    def publish_command(self, product_id: str, device_id: str, payload: dict[str, Any]) -> paho.MQTTMessageInfo:
        info = self.client.publish(codec.command_topic(product_id, device_id), codec.encode(payload), qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            # paho would keep it and send it after the reconnect, perhaps long after its
            # caller gave up (504) and retried: a device would act on it twice. Not queued.
            self.client.withdraw(info)
            log.warning("mqtt.command_not_sent", rc=str(info.rc), product_id=product_id,
                        device_id=device_id, request_id=payload.get("requestId"))
            raise Unavailable("no MQTT link to devices: the broker connection is down")
        return info

    def withdraw(self, handle: Any) -> None:
        if self.client.withdraw(handle):
            log.info("mqtt.command_withdrawn", mid=handle.mid)
