"""`parley serve`: the runtime, the MQTT gateway (and the built-in broker) and HTTP,
started in order and stopped in reverse."""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import dataclass
from functools import partial

import structlog
import trio

from gateways.broker import BuiltinBroker, BuiltinBrokerError
from gateways.config import Settings, reachable_mqtt_url, shown_url
from gateways.demo import ensure_demo_agent
from gateways.http.app import answer_waiting_requests, create_app
from gateways.http_server import serve_http
from gateways.mqtt import MqttGateway
from gateways.runtime import Runtime, RuntimeSettings

log = structlog.get_logger(__name__)


def check_port_free(host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) if `port` cannot be listened on, as hypercorn would later."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as hypercorn binds
        probe.bind((host, port))


def check_broker_port_free(host: str, port: int) -> None:
    """Raise BuiltinBrokerError (caused by the OSError) if the built-in broker could not
    listen on `port`, as its start would later."""
    try:
        check_port_free(host, port)
    except OSError as exc:
        raise BuiltinBrokerError(f"built-in MQTT broker failed to start on {host}:{port}: {exc}") from exc


# How long `serve` waits for the broker at start before it gives up (paho retries meanwhile).
MQTT_START_TIMEOUT = 15.0


async def connect(gateway: MqttGateway, timeout: float = MQTT_START_TIMEOUT) -> None:
    """Connect the gateway and wait until it has subscribed, in short waits off the loop so
    that Ctrl-C or SIGTERM stops a start whose broker is down at once, not after `timeout`
    (the gateway is stopped by whoever started it)."""
    await trio.to_thread.run_sync(gateway.begin)
    deadline = trio.current_time() + timeout
    while not await trio.to_thread.run_sync(gateway.wait_ready, 0.2):
        if trio.current_time() >= deadline:
            raise gateway.unreachable(timeout)


@dataclass(frozen=True)
class Running:
    http_port: int
    mqtt_url: str
    runtime: Runtime


async def serve(settings: Settings, *, task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED) -> None:
    # First: a second `parley serve` whose HTTP port is taken must stop here, not first
    # connect with the running server's MQTT session and knock it off (nor catch up with
    # the log and log that it started). The built-in broker's port too (a Mosquitto of the
    # machine's on 1883, say), and both before the store is opened: a start that fails on
    # a port leaves no data directory or empty log behind.
    check_port_free(settings.host, settings.http_port)
    if not settings.mqtt_url:
        check_broker_port_free(settings.host, settings.builtin_broker_port)
    runtime = Runtime(RuntimeSettings(
        data_dir=settings.data_dir, database_url=settings.database_url,
        liveness_window=settings.liveness_window, liveness_check_interval=settings.liveness_check_interval,
        idle_timeout=settings.idle_timeout, max_active_actors=settings.max_active_actors))
    broker: BuiltinBroker | None = None
    gateway: MqttGateway | None = None
    try:
        started = time.monotonic()
        if await trio.to_thread.run_sync(runtime.log.warm_up):
            log.info("store.wal_warmed", seconds=round(time.monotonic() - started, 3))
        await trio.to_thread.run_sync(runtime.start)
        mqtt_url = settings.mqtt_url
        if not mqtt_url:
            broker = BuiltinBroker(settings.host, settings.builtin_broker_port)
            port = await trio.to_thread.run_sync(broker.start)
            mqtt_url = reachable_mqtt_url(settings.host, port)
            log.info("broker.builtin_started", url=mqtt_url)
        gateway = MqttGateway(runtime, mqtt_url, client_id=settings.mqtt_client_id,
                              shared_group=settings.mqtt_shared_group)
        runtime.attach_device_link(gateway)
        await connect(gateway)
        if settings.demo and await trio.to_thread.run_sync(ensure_demo_agent, runtime):
            log.info("demo.agent_created", agent_id="thermostat")
        async with trio.open_nursery() as nursery:
            app = create_app(runtime, access_log=settings.access_log)
            # On shutdown, requests waiting on actors get 503 before hypercorn drains them.
            http_port = await nursery.start(partial(
                serve_http, app, settings.host, settings.http_port,
                on_shutdown=partial(answer_waiting_requests, app)))
            log.info("parley.ready", http=f"http://{settings.host}:{http_port}", mqtt=shown_url(mqtt_url),
                     store=runtime.store.url.split("@")[-1])
            task_status.started(Running(http_port, mqtt_url, runtime))
            await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            if gateway is not None:
                await trio.to_thread.run_sync(gateway.stop)
            await trio.to_thread.run_sync(runtime.close)
            if broker is not None:
                await trio.to_thread.run_sync(broker.stop)
            log.info("parley.stopped")


async def main(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            # Not `nursery.start`: a signal during start-up (a broker that is down, a long
            # catch-up) must stop it too, and this loop would only run once it was done.
            nursery.start_soon(serve, settings)
            async for signum in signals:
                log.info("parley.stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
