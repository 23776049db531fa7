"""paho-mqtt's Client, reading the socket in large chunks.

paho 2.2 reads every packet with at least three `recv()` calls (the type byte, the
remaining length byte by byte, then the body), after one `select()` per packet. Each of
those calls releases the GIL and takes it back. Alone in a process that costs little (a
bare subscriber keeps up with 25k msg/s here), but next to the actor, journal and
projection threads every re-take waits behind a busy thread, and Parley's network
thread crawled at about 5k msg/s (docs/benchmarks.md). Reading up to 64 KiB per
`recv()` and serving paho's small reads from that buffer makes it one GIL release per
socket read instead of four per message: in the ingest benchmark as it was then (publisher
paced at 25k msg/s, nothing pinned) Parley went from 5.7k to 14k msg/s.

It also writes a PUBLISH or PUBACK from the thread that sends it (an actor publishing a
command, or acknowledging a message it committed) when no other thread is writing. paho
would queue the packet and wake its network thread with a byte on a socket pair; that
thread then takes the GIL from whoever runs, only to write a few bytes. Measured on the
command round trip, servers A and B side by side with requests alternating between them:
0.15-0.32 ms less at p50 (three runs of 1,000 pairs; an A/A run differs by 0.01 ms).

It decodes a PUBLISH that lies whole in the buffer itself (`_packet_read`): paho's
byte-at-a-time read and decode cost 7.5 µs per message, this 1.5 µs; in the ingest
benchmark Parley's network thread went from 15.9 to 9.4 µs of CPU per message and the
ratio from 0.45-0.47 to 0.48-0.54 (docs/benchmarks.md). The messages are paho's own
`MQTTMessage`, their fields as paho would set them (tests/gateways/test_mqtt_client_decode.py).
An MQTT 3.1.1 PUBACK (the broker's answer to each command Parley publishes) is its message
id alone; paho builds a ReasonCode and a Properties for each (its decode 11.5 µs), ours
share one (0.45 µs; measured without the on_publish that follows in both).

paho's internal methods overridden here: `_sock_recv` and `loop_read` (the buffer),
`_packet_read` (the PUBLISH decode above; everything else is paho's),
`_loop` (a select() bounded while the gateway holds messages back, see gateways/mqtt.py),
`_handle_on_message` (no per-topic callback lookup when none are registered),
`_handle_pubackcomp` (the PUBACK above), and
`_packet_queue` and `_packet_write` (the direct write, under one write lock); `withdraw`
reads and edits paho's outgoing message queue (`_out_messages`). paho is
pinned to 2.1-2.2 in pyproject.toml, and tests/gateways/test_mqtt_client*.py cover them.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

READ_SIZE = 65536
_now = paho.time_func
# An incoming message's `info` is paho's record of an outgoing publish; nobody waits on it.
# paho builds one per message all the same (a threading.Condition, 0.85 µs); ours share one.
_INCOMING = paho.MQTTMessageInfo(0)
# What paho hands on_publish for every MQTT 3.1.1 PUBACK: it has neither (see above).
_PUBACK_OK = ReasonCode(PacketTypes.PUBACK)
_PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)
# Packets another thread writes itself instead of waking the network thread (see above).
DIRECT_WRITE = frozenset({paho.PUBLISH, paho.PUBACK})


class BufferedClient(paho.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._rsock: Any = None  # the socket the buffer came from
        # Called once the messages of one socket read have all been passed to on_message:
        # a gateway may collect them and hand them on together.
        self.on_read_end: Callable[[], None] | None = None
        # Set by the gateway while it holds messages back: the network loop then waits in
        # select() no longer than this, and calls on_read_end when it wakes, read or not.
        self.hold_until: float | None = None
        self._topic_callbacks = False  # message_callback_add was used
        self._write_lock = threading.Lock()  # one thread writes the socket at a time

    def _buffered(self) -> int:
        """Bytes read from the current socket that paho has not consumed yet."""
        if self._rsock is not self._sock:
            return 0
        return len(self._rbuf) - self._rpos

    def _fill(self) -> bool:
        """Read what the socket holds into the buffer; False at the end of the stream.
        BlockingIOError when nothing is there, as paho expects of _sock_recv."""
        if self._rsock is not self._sock:
            # A new connection: whatever was left of the old one is meaningless.
            self._rbuf, self._rpos, self._rsock = b"", 0, self._sock
        data = super()._sock_recv(READ_SIZE)
        if not data:
            return False  # the broker closed the connection
        self._rbuf, self._rpos = data, 0
        # paho stamps this after each packet it reads; packets decoded by _whole_publish
        # are stamped here, when their bytes arrived (the keepalive reads it).
        with self._msgtime_mutex:
            self._last_bytes_received = _now()
        return True

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self._buffered() and not self._fill():
            return b""
        out = self._rbuf[self._rpos:self._rpos + bufsize]
        self._rpos += len(out)
        return out

    def input_waiting(self) -> bool:
        """Whether more bytes are waiting to be read, in our buffer or in the socket."""
        if self._buffered():
            return True
        sock = self._sock
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):  # closed meanwhile
            return False
        return bool(readable)

    def _packet_read(self) -> MQTTErrorCode:
        # paho reads a packet a byte at a time through _sock_recv, gathers it in a dict,
        # decodes it with struct formats built per call, and gives every message a
        # threading.Condition it never uses for an incoming one: 7.5 µs per PUBLISH here.
        # A PUBLISH that lies whole in our buffer is decoded at once instead (1.5 µs).
        # Everything else (other packets, QoS 2, MQTT 5, a packet split across reads, a
        # malformed one) goes paho's way, which also reports what is wrong.
        if self._in_packet["command"] == 0:
            if not self._buffered():
                try:
                    if not self._fill():
                        return MQTTErrorCode.MQTT_ERR_CONN_LOST
                except BlockingIOError:
                    return MQTTErrorCode.MQTT_ERR_AGAIN
                except OSError as err:  # as paho's own read reports it
                    self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
            message = self._whole_publish()
            if message is not None:
                if self._logger is not None or self._on_log is not None:
                    self._easy_log(paho.MQTT_LOG_DEBUG, "Received PUBLISH (d%d, q%d, r%d, m%d), '%s', ...  (%d bytes)",
                                   message.dup, message.qos, message.retain, message.mid,
                                   message._topic.decode("utf-8", "replace"), len(message.payload))
                self._handle_on_message(message)
                if message.qos == 1 and not self._manual_ack:
                    return self._send_puback(message.mid)
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._packet_read()

    def _whole_publish(self) -> paho.MQTTMessage | None:
        """The QoS 0 or 1 MQTT 3.1.1 PUBLISH at the buffer's read position, consumed, if it
        is all there and well formed; otherwise None, and nothing consumed."""
        buf, pos = self._rbuf, self._rpos
        size = len(buf)
        if size - pos < 5 or self._protocol == paho.MQTTv5:
            return None
        header = buf[pos]
        qos = (header >> 1) & 3
        if header & 0xF0 != paho.PUBLISH or qos > 1:
            return None
        i, length, shift = pos + 1, 0, 0
        while True:  # the remaining length: 1 to 4 bytes, 7 bits each
            if i >= size or shift > 21:
                return None
            byte = buf[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        end = i + length
        if length < 2 or end > size:
            return None
        topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
        body = topic_end + 2 if qos else topic_end
        if topic_end == i + 2 or body > end:
            return None
        message = paho.MQTTMessage.__new__(paho.MQTTMessage)  # every slot is set below
        message.timestamp = _now()
        message.state = paho.mqtt_ms_invalid
        message.dup = bool(header & 0x08)
        message.mid = (buf[topic_end] << 8) | buf[topic_end + 1] if qos else 0
        message._topic = buf[i + 2:topic_end]
        message.payload = buf[body:end]
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.info = _INCOMING
        message.properties = None
        self._rpos = end
        return message

    def message_callback_add(self, sub: str, callback: Any) -> None:
        self._topic_callbacks = True
        super().message_callback_add(sub, callback)

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol == paho.MQTTv5 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)  # (a malformed one too: paho says so)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_OK, _PUBACK_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        # paho looks for per-topic callbacks on every message (a topic-trie walk, a lock
        # and two topic decodes, ~1.5 µs); with none registered, go to on_message directly.
        if self._topic_callbacks:
            super()._handle_on_message(message)
            return
        on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception as err:
                self._easy_log(paho.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: paho.MQTTMessageInfo | None = None) -> MQTTErrorCode:
        if (command & 0xF0) not in DIRECT_WRITE or self._thread is None \
                or threading.current_thread() is self._thread \
                or isinstance(self._sock, ssl.SSLSocket) \
                or not self._write_lock.acquire(blocking=False):
            # paho's way: queue it, wake the network thread. Also for TLS, whose socket
            # must not be written by one thread while another reads it.
            return super()._packet_queue(command, packet, mid, qos, info)
        try:
            self._out_packet.append({"command": command, "mid": mid, "qos": qos, "pos": 0,
                                     "to_process": len(packet), "packet": packet, "info": info})
            super()._packet_write()  # paho's own write: partial writes, QoS 0 publish info
        finally:
            self._write_lock.release()
        if self._out_packet:  # the socket was full, or is gone: the network thread goes on
            sockpair = self._sockpairW
            if sockpair is not None:
                try:
                    sockpair.send(paho.sockpair_data)
                except BlockingIOError:
                    pass
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def withdraw(self, info: paho.MQTTMessageInfo) -> bool:
        """Forget an outgoing QoS 1 message the broker has not acknowledged: paho would
        otherwise send it (again) after the next reconnect. `info` (what `publish` returned),
        not the mid: mids wrap, and another message may carry this one's mid by now.
        False if it is no longer held (acknowledged)."""
        with self._out_message_mutex:
            message = self._out_messages.get(info.mid)
            if message is None or message.info is not info:
                return False
            del self._out_messages[info.mid]
            if message.state == paho.mqtt_ms_wait_for_puback:
                # It held a slot of the in-flight window; its PUBACK, if one comes, is ignored.
                self._inflight_messages -= 1
                if self._max_inflight_messages > 0:
                    self._update_inflight()
        return True

    def _packet_write(self) -> MQTTErrorCode:
        with self._write_lock:
            return super()._packet_write()

    def _loop(self, timeout: float = 1.0) -> MQTTErrorCode:
        hold_until = self.hold_until
        if hold_until is None:
            return super()._loop(timeout)
        rc = super()._loop(max(0.0, min(timeout, hold_until - time.monotonic())))
        if self.hold_until is not None and self.on_read_end is not None:
            self.on_read_end()  # nothing more came in time: let the gateway hand over
        return rc

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        # paho's loop reads one packet per select(); bytes already in our buffer would not
        # wake select() again, so handle every complete packet we hold before returning.
        try:
            rc = super().loop_read(max_packets)
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None and self._buffered():
                rc = super().loop_read(max_packets)
        finally:
            if self.on_read_end is not None:
                self.on_read_end()
        return rc


def no_delay(client: paho.Client) -> None:
    """Turn Nagle's algorithm off on a connected client's socket (call it in `on_connect`).
    paho leaves it on, and it adds 40+ ms to every QoS 1 round trip (REFERENCE.md)."""
    sock = client.socket()
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
