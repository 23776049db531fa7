"""Built-in MQTT broker for ``parley serve`` when no ``--mqtt-url`` is given.

Parley's main loop is trio; amqtt is asyncio-based.  The broker therefore runs on
its own daemon thread with its own asyncio event loop, and the rest of Parley talks
to it over a real TCP socket exactly like it talks to Mosquitto (paho-mqtt client).

    with BuiltinBroker(port=0) as broker:
        print(broker.url)          # mqtt://127.0.0.1:54321

amqtt 0.12 behaviour relevant to Parley (checked by tests/gateways/test_broker.py):

* Works: MQTT 3.1.1 QoS 0 and QoS 1 publish/subscribe, ``+``/``#`` wildcard
  subscriptions, persistent sessions (``clean_session=False``) that queue QoS 1
  messages published while the subscriber is offline and deliver them on
  reconnect, and paho's manual acknowledgement (``manual_ack=True`` +
  ``client.ack(mid, qos)``) as long as the ack is sent within 5 seconds.
* Does NOT work (amqtt limitations, not worked around here):
  - A QoS 1 message delivered to a client but not yet PUBACKed when the client
    disconnects is dropped, not redelivered on reconnect (MQTT-4.4.0-1).
    ``ProtocolHandler._handle_qos1_message_flow`` pops the message from
    ``session.inflight_out`` in a ``finally:`` when the PUBACK waiter is cancelled.
  - The broker waits only 5 s for a PUBACK (hard-coded ``asyncio.wait_for(waiter,
    timeout=5)``); a manual ack sent later is ignored and the message is dropped
    (not resent, not redelivered on reconnect).  amqtt logs "Timeout waiting for
    PUBACK for packet ID n" and "Received PUBACK for unknown pending message Id"
    at WARNING and the failed delivery task with a traceback at ERROR.
  - Sessions and queued messages live in memory only (no persistence across
    broker restarts); disconnected persistent sessions never expire unless
    ``session_expiry_interval`` is given.
* Worked around: amqtt delivers a message at the subscription's QoS instead of
  min(publish QoS, subscription QoS) (MQTT-3.3.5), so a device's QoS 0 telemetry reached
  Parley's QoS 1 subscription as QoS 1: acknowledged one by one and never held for a
  group commit. ``_Broker`` below delivers a QoS 0 publish at QoS 0. (A QoS 1 publish to
  a QoS 1 or 0 subscription already gets the right QoS; Parley uses no QoS 2.)
* Worked around: amqtt delivered the messages it queued for an offline persistent
  session with RETAIN set (``_publish_session_retained_messages`` used ``retain=True``).
  They match an established subscription, so RETAIN must be 0 (MQTT-3.3.1-9), and Parley
  ignores RETAIN 1 copies, which are replays of retained messages (gateways/mqtt.py).
  ``_Broker`` below sends them with RETAIN 0, as Mosquitto does.
* Worked around: on stop, amqtt cancels each connection's reader and waits for it. On
  Python 3.11 that cancellation can be lost inside ``asyncio.wait_for`` when a packet
  arrives at the same moment; the reader then waits for the client's next packet (up to
  1.5 x its keep-alive), and stop hung for every run with a few subscribers holding
  unacknowledged QoS 1 messages. We abort every client connection first, so each reader
  sees EOF and ends on its own, and we wait for amqtt's shutdown a bounded time only.
* Worked around: when a connection took over the session of another with the same
  client id, the old connection's end marked the shared session disconnected, and the new
  one got nothing more while it looked connected. ``_Broker`` leaves the session to the
  connection that holds it (tests/gateways/test_broker.py).
* Worked around: amqtt's default ``AnonymousAuthPlugin`` (allow_anonymous=True)
  marks every session anonymous, and amqtt discards anonymous sessions on
  disconnect and never queues messages for them, i.e. persistent sessions silently
  do not work with amqtt's stock anonymous config.  We use our own permit-all auth
  plugin (``PermitAllAuthPlugin`` below) instead.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from typing import Any

import structlog
from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from gateways.config import reachable_mqtt_url

__all__ = ["BuiltinBroker", "BuiltinBrokerError", "PermitAllAuthPlugin"]

log = structlog.get_logger(__name__)

# Loggers that amqtt (and its state-machine dependency) log to at INFO/DEBUG on every
# connection and packet.
_NOISY_LOGGERS = ("amqtt", "transitions")
# How long stop() lets amqtt's own shutdown run once every connection is dropped.
SHUTDOWN_GRACE = 3.0
# amqtt forwards every publish through one queue on its own asyncio loop, in Python, under
# the GIL it shares with Parley. Measured on 2 cores (1 device = 2 messages a second):
# 1,020 msg/s sent, commands p50 24 ms; 1,515 msg/s, the queue grew without end and every
# command timed out (its answer waited behind hundreds of thousands of reports). Past this
# many queued messages the broker is falling behind: said once a minute at most.
BACKLOG_WARN = 10_000
BACKLOG_CHECK_S = 5.0
BACKLOG_REPORT_S = 60.0


# amqtt lines that say nothing an operator can act on:
# - "Broker startup failed" with a traceback: start() raises the same cause as a
#   BuiltinBrokerError with one clear sentence, so the duplicate only scares users;
# - an error and a warning for a TCP connection that closed before sending a packet (a port
#   scan, a load balancer's health check, `nc -z`): nobody's error.
_QUIET = ("Broker startup failed", "No data from ", "Failed to initialize client session: No data to decode")


def _drop_quiet_lines(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_QUIET)


logging.getLogger("amqtt.broker").addFilter(_drop_quiet_lines)


# The QoS of the PUBLISH amqtt is handling in this task (see _Broker).
_PUBLISH_QOS: contextvars.ContextVar[int | None] = contextvars.ContextVar("publish_qos", default=None)


class _Broker(Broker):
    """amqtt's broker, delivering a QoS 0 publish at QoS 0 and queued messages with RETAIN 0
    (module docstring). amqtt 0.12
    internals: each client's task hands a PUBLISH to `_handle_message_delivery`, which
    calls `_broadcast_message` in the same task, without the message's QoS."""

    async def _handle_message_delivery(self, client_session: Session, handler: Any,
                                       wait_deliver: asyncio.Future[Any]) -> bool:
        message = wait_deliver.result() if wait_deliver.done() else None
        token = _PUBLISH_QOS.set(getattr(message, "qos", None))
        try:
            return await super()._handle_message_delivery(client_session, handler, wait_deliver)
        finally:
            _PUBLISH_QOS.reset(token)

    async def _broadcast_message(self, session: Session | None, topic: str | None,
                                 data: bytes | bytearray | None, force_qos: int | None = None) -> None:
        if force_qos is None and _PUBLISH_QOS.get() == 0:
            force_qos = 0  # min(0, the subscription's QoS)
        await super()._broadcast_message(session, topic, data, force_qos)

    async def _handle_disconnect(self, client_session: Session, handler: Any,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        # A connection whose session a newer one with the same client id took over
        # (MQTT-3.1.4-2): amqtt 0.12 marked the shared session disconnected when the old
        # connection ended, and the new one, connected and subscribed, then got nothing:
        # its messages were queued as for an offline client (a second `parley serve` on the
        # same data dir, or a reconnect the broker took for a second client, left Parley
        # deaf while /api/health said connected). The session is the new connection's now.
        current = self._sessions.get(client_session.client_id)
        if current is not None and current[1] is not handler:
            await self._stop_handler(handler)
            return
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # Called on every new connection once its handler is the session's: if the old
        # connection of a takeover ended first (before amqtt made the new one the session's
        # handler), it marked the session disconnected, and the takeover path does not mark
        # it connected again. It is connected: this connection is live.
        if session.transitions.state != "connected":
            session.transitions.connect()
        # amqtt 0.12's own, but with RETAIN 0: these were queued while the client was away
        # and match its established subscriptions (MQTT-3.3.1-9). A client takes RETAIN 1 as
        # a replayed retained message, which Parley ignores.
        handler = self._get_handler(session)
        tasks = []
        if handler:
            while not session.retained_messages.empty():
                queued = await session.retained_messages.get()
                tasks.append(asyncio.ensure_future(
                    handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)))
        if tasks:
            await asyncio.wait(tasks)


class BuiltinBrokerError(RuntimeError):
    """The built-in broker could not be started or stopped."""


class PermitAllAuthPlugin(BaseAuthPlugin):
    """Accept every client, with or without a username, without flagging it anonymous.

    amqtt's AnonymousAuthPlugin sets ``session.is_anonymous = True`` on every client
    when anonymous access is allowed, and amqtt neither keeps disconnected anonymous
    sessions nor queues QoS 1 messages for them -- which breaks clean_session=False.
    """

    async def authenticate(self, *, session: Session) -> bool:  # noqa: ARG002
        return True


def broker_config(host: str, port: int, session_expiry_interval: int | None = None) -> dict[str, Any]:
    """amqtt 0.12 BrokerConfig dictionary: one TCP listener, no file/auth/$SYS plugins."""
    return {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0},
        },
        # An explicit plugins dict replaces amqtt's defaults (EventLoggerPlugin,
        # PacketLoggerPlugin, AnonymousAuthPlugin, BrokerSysPlugin).  amqtt refuses
        # every connection if no auth plugin answers, so one must be present.
        "plugins": {f"{__name__}.PermitAllAuthPlugin": {}},
        "session_expiry_interval": session_expiry_interval,
    }


class BuiltinBroker:
    """An amqtt broker running on a private thread + asyncio loop."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        log_level: int | None = logging.WARNING,
        session_expiry_interval: int | None = None,
    ) -> None:
        self.host = host
        self.port = port  # replaced by the bound port once started
        self._session_expiry_interval = session_expiry_interval
        if log_level is not None:
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).setLevel(log_level)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._running = False
        self._abandoned: list[asyncio.Task[Any]] = []
        self.backlog_warn, self.backlog_check_s = BACKLOG_WARN, BACKLOG_CHECK_S

    # -- public API -------------------------------------------------------------

    @property
    def url(self) -> str:
        return reachable_mqtt_url(self.host, self.port)

    @property
    def running(self) -> bool:
        return self._running

    def start(self, timeout: float = 10.0) -> int:
        """Start the broker thread; block until it accepts connections; return the port."""
        if self._thread is not None:
            raise BuiltinBrokerError("BuiltinBroker already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._thread_main, name="parley-builtin-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self._request_stop()
            self._thread.join(timeout)
            self._thread = None
            raise BuiltinBrokerError(f"built-in MQTT broker did not start within {timeout}s on {self.host}:{self.port}")
        if self._error is not None:
            self._thread.join(timeout)
            self._thread = None
            err = self._error
            cause = err.__cause__ or err
            raise BuiltinBrokerError(f"built-in MQTT broker failed to start on {self.host}:{self.port}: {cause}") from err
        # broker.start() returned inside the thread, so asyncio.start_server() has
        # bound and is listening.  (No TCP probe: amqtt logs an ERROR for every
        # connection that closes without sending CONNECT.)
        self._running = True  # `parley serve` says so (broker.builtin_started), with the URL to use
        return self.port

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down cleanly and join its thread.  Idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._request_stop()
        thread.join(timeout)
        if thread.is_alive():
            raise BuiltinBrokerError(f"built-in MQTT broker thread did not stop within {timeout}s")
        self._thread = None
        self._running = False
        if self._error is not None:
            err, self._error = self._error, None
            raise BuiltinBrokerError(f"built-in MQTT broker shut down with an error: {err}") from err

    def __enter__(self) -> BuiltinBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<BuiltinBroker {self.url} {state}>"

    # -- broker thread ----------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            if self._error is None:
                self._error = exc
        finally:
            try:
                self._finish(loop)
            finally:
                self._ready.set()

    async def _watch_backlog(self, broker: Broker) -> None:
        said = -BACKLOG_REPORT_S
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.backlog_check_s)
            queue = getattr(broker, "_broadcast_queue", None)  # amqtt's; gone in another version
            queued = queue.qsize() if queue is not None else 0
            if queued > self.backlog_warn and loop.time() - said >= BACKLOG_REPORT_S:
                said = loop.time()
                log.warning("broker.builtin_behind", queued=queued,
                             hint="the built-in broker cannot keep up (about 1,000 messages a second): "
                                  "commands wait behind the backlog; use Mosquitto or EMQX (--mqtt-url)")

    def _finish(self, loop: asyncio.AbstractEventLoop) -> None:
        """What asyncio.run does on the way out, with a bound: it would wait forever for a
        task that does not end when cancelled (see the module docstring)."""
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            _, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
            # Kept referenced: a pending task that is garbage-collected logs an error.
            self._abandoned = list(stuck)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        broker = _Broker(broker_config(self.host, self.port, self._session_expiry_interval))
        try:
            await broker.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        watch = asyncio.ensure_future(self._watch_backlog(broker))
        try:
            self.port = self._bound_port(broker)
            self._ready.set()
            await self._stop_event.wait()
        finally:
            watch.cancel()
            self._drop_connections(broker)
            shutdown = asyncio.ensure_future(broker.shutdown())
            # asyncio.wait, not wait_for: on timeout wait_for would cancel and then wait
            # for the stuck task all the same.
            done, _ = await asyncio.wait({shutdown}, timeout=SHUTDOWN_GRACE)
            if not done:
                log.warning("broker.builtin_shutdown_slow", waited_s=SHUTDOWN_GRACE,
                            hint="its remaining tasks are abandoned")

    @staticmethod
    def _drop_connections(broker: Broker) -> None:
        """Abort every client's TCP connection (amqtt 0.12 internals: `_sessions` maps a
        client id to its session and protocol handler; the handler's writer adapter wraps
        the asyncio StreamWriter)."""
        for _session, handler in list(broker._sessions.values()):  # noqa: SLF001
            adapter = getattr(handler, "writer", None)
            transport = getattr(getattr(adapter, "_writer", None), "transport", None)
            if transport is None:
                continue
            # The adapter then drops what amqtt still writes, instead of asyncio warning
            # "socket.send() raised exception." for every write to an aborted socket.
            adapter.is_closed = True
            transport.abort()

    def _bound_port(self, broker: Broker) -> int:
        if self.port:
            return self.port
        # amqtt has no public accessor for the listening socket; read it from the
        # asyncio.Server it created for the "default" listener (needed for port 0).
        server = broker._servers["default"].instance  # noqa: SLF001
        return int(server.sockets[0].getsockname()[1])

    def _request_stop(self) -> None:
        loop, event = self._loop, self._stop_event
        if loop is None or event is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # loop closed between the check and the call
            pass
