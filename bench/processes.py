"""The other parties of a benchmark as separate processes, as they are in a deployment:
the Parley server (`parley serve`), simulated devices, and a bare MQTT responder.
Each has its own interpreter (and GIL), so the numbers measure Parley, not contention
with the load generator inside one process."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.services import start_parley, stop_parley

_ctx = mp.get_context("spawn")


def start_server(data_dir: Path, broker_url: str, port: int, database_url: str | None = None) -> subprocess.Popen:
    """`parley serve --demo` on `port`; returns once /api/health answers."""
    return start_parley(data_dir, broker_url, port, database_url, client_id=f"bench-{port}")


def stop_server(proc: subprocess.Popen) -> None:
    stop_parley(proc)


def _run_simulator(kwargs: dict[str, Any], ready: Any, stop: Any) -> None:
    from gateways.demo import THERMOSTAT
    from gateways.logs import configure_logging
    from gateways.simulate import Simulator

    configure_logging("console", "error")
    sim = Simulator(THERMOSTAT["device_spec"], "thermostat", **kwargs)
    sim.start()
    ready.set()
    stop.wait()
    sim.stop()


class _Child:
    """A party of the benchmark in its own process: `target(*args, ready, stop)` sets `ready`
    once it can serve, and ends when `stop` is set. Used as a context manager."""

    def __init__(self, target: Any, *args: Any) -> None:
        self.ready, self.stop_event = _ctx.Event(), _ctx.Event()
        self.proc = _ctx.Process(target=target, args=(*args, self.ready, self.stop_event), daemon=True)

    def __enter__(self) -> "_Child":
        self.proc.start()
        if not self.ready.wait(30):
            raise RuntimeError(f"{type(self).__name__} did not get ready within 30 s")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        self.proc.join(20)


class SimulatorProcess(_Child):
    """A `gateways.simulate.Simulator` for the demo thermostat, in its own process."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(_run_simulator, kwargs)


def _run_responder(host: str, port: int, cmd_topic: str, resp_topic: str | None, online_topics: tuple[str, ...],
                   arrivals: Any, ready: Any, stop: Any) -> None:
    import json

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from gateways.mqtt_client import no_delay

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-resp-{os.getpid()}")

    def on_connect(cl: paho.Client, *a: Any) -> None:
        no_delay(cl)
        cl.subscribe(cmd_topic, 1)

    def on_subscribe(cl: paho.Client, *a: Any) -> None:
        for topic in online_topics:  # make the devices known and online to Parley first
            cl.publish(topic, b'{"type":"status","data":{"status":"online"}}', qos=1)
        ready.set()

    def on_message(cl: paho.Client, u: Any, m: paho.MQTTMessage) -> None:
        # The least a device can do and still answer as seed 000 says: match the requestId.
        command = json.loads(m.payload)
        if arrivals is not None:
            arrivals.put((command["requestId"], time.time()))
        cl.publish(resp_topic or m.topic.rsplit("/", 1)[0] + "/responses",
                   json.dumps({"requestId": command["requestId"], "code": 0, "msg": "ok",
                               "data": {}, "ts": int(time.time() * 1000)}).encode(), qos=1)

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect(host, port)
    c.loop_start()
    stop.wait()
    c.disconnect()
    c.loop_stop()


class ResponderProcess(_Child):
    """A bare paho device (QoS 1, TCP_NODELAY): answers every command on its response topic
    with code 0 and the command's requestId. The same device serves the bare MQTT baseline
    and Parley, so the difference between the two is Parley's. With a wildcard `cmd_topic`
    and no `resp_topic` it answers for many devices, each on its own response topic, and
    with `arrivals` (a queue of this module's context) it puts (requestId, time.time()) there
    as each command arrives."""

    def __init__(self, host: str, port: int, cmd_topic: str, resp_topic: str | None = None, *,
                 online_topics: tuple[str, ...] = (), arrivals: Any = None) -> None:
        super().__init__(_run_responder, host, port, cmd_topic, resp_topic, online_topics, arrivals)


def queue() -> Any:
    """A queue the child processes of this module can put to."""
    return _ctx.Queue()


def _run_http_floor(kind: str, port: int, ready: Any, stop: Any) -> None:
    """A no-op command endpoint: reads the JSON body and answers like a command result.
    `hypercorn`: a bare ASGI app; `quart-trio`: a QuartTrio app served the way Parley serves
    its own (gateways.http_server.serve_http). What HTTP alone costs on this machine."""
    import json
    from functools import partial

    import trio

    from gateways.http_server import serve_http

    def answer(body: bytes) -> dict[str, Any]:
        command = json.loads(body)["command"]
        return {"requestId": "0", "command": command, "code": 0, "msg": "ok", "data": {}}

    async def bare_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        out = json.dumps(answer(body)).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    app: Any = bare_app
    if kind == "quart-trio":
        from quart import request
        from quart_trio import QuartTrio

        app = QuartTrio("http-floor")

        @app.post("/api/devices/<device_id>/commands")
        async def command(device_id: str) -> dict[str, Any]:
            return answer(await request.get_data())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_http, app, "127.0.0.1", port))
            ready.set()
            await trio.to_thread.run_sync(stop.wait)
            nursery.cancel_scope.cancel()

    trio.run(main)


class HttpFloorProcess(_Child):
    """`kind` is "hypercorn" (bare ASGI) or "quart-trio": a server answering
    POST /api/devices/:id/commands at once, in its own process, on `port`."""

    def __init__(self, kind: str, port: int) -> None:
        super().__init__(_run_http_floor, kind, port)


def _run_publisher(host: str, port: int, msgs: list[tuple[str, bytes]], rate: float | None, ready: Any, go: Any,
                   result: Any) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from bench.common import publisher_cpus

    cpus = publisher_cpus()
    if cpus:  # its own core: it must not take the consumer's CPU (bench.common.pinned)
        os.sched_setaffinity(0, cpus)
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}")
    c.connect(host, port)
    c.loop_start()
    ready.set()
    go.wait()
    start = time.perf_counter()
    chunk = max(1, int(rate * 0.005)) if rate else len(msgs)  # paced in 5 ms slices, or not at all
    info = None
    for i in range(0, len(msgs), chunk):
        for topic, payload in msgs[i:i + chunk]:
            info = c.publish(topic, payload, qos=0)
        ahead = start + (i + chunk) / rate - time.perf_counter() if rate else 0
        if ahead > 0:
            time.sleep(ahead)
    if info is not None:
        info.wait_for_publish(60)
    result.value = len(msgs) / (time.perf_counter() - start)
    c.disconnect()
    c.loop_stop()


class PublisherProcess:
    """Devices' telemetry from another process: publish `msgs` at QoS 0, paced at `rate`
    msg/s, or as fast as paho can when `rate` is None."""

    def __init__(self, host: str, port: int, msgs: list[tuple[str, bytes]], rate: float | None) -> None:
        self.ready, self.go = _ctx.Event(), _ctx.Event()
        self.result = _ctx.Value("d", 0.0)
        self.proc = _ctx.Process(target=_run_publisher, daemon=True,
                                 args=(host, port, msgs, rate, self.ready, self.go, self.result))
        self.proc.start()
        if not self.ready.wait(30):
            raise RuntimeError("publisher process did not connect")

    def run(self) -> None:
        """Start publishing (returns at once)."""
        self.go.set()

    def finish(self, timeout: float = 120) -> float:
        """Wait until everything is published; the achieved rate."""
        self.proc.join(timeout)
        return self.result.value
