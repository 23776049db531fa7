"""Command round trip: HTTP POST /api/devices/:id/commands through the real server to a
simulated device and back, minus a bare MQTT request/response round trip."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import Options, Result, console, ms, pct, quiet_logging, store, wait_until
from gateways.demo import THERMOSTAT
from gateways.simulate import Simulator


def _nodelay_client(name: str) -> paho.Client:
    import socket

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:6]}")

    def on_connect(client: paho.Client, *a: Any) -> None:
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    c.on_connect = on_connect
    return c


def bare(opts: Options, n: int) -> list[float]:
    b = opts.broker
    cmd_topic, resp_topic = "device-agent/bare/device/d1/commands", "device-agent/bare/device/d1/responses"
    responder, requester = _nodelay_client("bench-resp"), _nodelay_client("bench-req")
    got = threading.Event()
    subs = threading.Semaphore(0)
    responder.on_message = lambda c, u, m: c.publish(resp_topic, m.payload, qos=1)
    requester.on_message = lambda c, u, m: got.set()
    for c, topic in ((responder, cmd_topic), (requester, resp_topic)):
        c.on_subscribe = lambda *a: subs.release()
        c.connect(b.host, b.port)
        c.loop_start()
        c.subscribe(topic, 1)
    subs.acquire(timeout=5)
    subs.acquire(timeout=5)
    out = []
    try:
        for i in range(n + 50):
            got.clear()
            payload = ('{"cmd":"set_target_temperature","params":{"target_temperature":21.5},'
                       f'"requestId":"r{i}","ts":0}}').encode()
            t = time.perf_counter()
            requester.publish(cmd_topic, payload, qos=1)
            if not got.wait(5):
                raise TimeoutError("bare responder did not answer")
            if i >= 50:  # warm-up
                out.append(time.perf_counter() - t)
    finally:
        for c in (responder, requester):
            c.disconnect()
            c.loop_stop()
    return out


class Server:
    """gateways.serve.serve on a trio loop in a background thread."""

    def __init__(self, opts: Options, data_dir: Any, database_url: str | None) -> None:
        from gateways.config import Settings

        self.settings = Settings(mqtt_url=opts.broker.url, data_dir=data_dir, database_url=database_url,
                                 http_port=0, demo=True, log_level="error", log_format="console",
                                 mqtt_client_id=f"bench-serve-{uuid.uuid4().hex[:6]}")
        import logging

        logging.getLogger("hypercorn.error").setLevel(logging.WARNING)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-serve", daemon=True)

    def _run(self) -> None:
        import trio

        from gateways.serve import serve

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                self.running = await nursery.start(serve, self.settings)
                self.token = trio.lowlevel.current_trio_token()
                self.scope = nursery.cancel_scope
                self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()

    def start(self) -> Any:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self.running

    def stop(self) -> None:
        import trio

        trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
        self._thread.join(30)


def parley(opts: Options, n: int, state_on_command: bool, probes: dict[str, list[float]] | None = None) -> list[float]:
    import httpx

    with store(opts, "commands") as (data_dir, url):
        server = Server(opts, data_dir, url)
        running = server.start()
        sim = Simulator(THERMOSTAT["device_spec"], "thermostat", devices=1, interval=3600,
                        mqtt_url=opts.broker.url, connections=1, response_qos=1,
                        prefix=f"rt{uuid.uuid4().hex[:4]}", state_on_command=state_on_command)
        sim.start()
        device_id = sim.devices[0].device_id
        out = []
        try:
            assert wait_until(lambda: any(r.online for r in running.runtime.devices.find(device_id)), 10), \
                "simulated device never showed up online"
            with httpx.Client(base_url=f"http://127.0.0.1:{running.http_port}", timeout=10) as client:
                for path in ("/api/health", f"/api/devices/{device_id}") if probes is not None else ():
                    probes[path] = samples = []
                    for i in range(n + 50):
                        t = time.perf_counter()
                        client.get(path).raise_for_status()
                        if i >= 50:
                            samples.append(time.perf_counter() - t)
                body = {"command": "set_target_temperature", "params": {"target_temperature": 21.5}}
                for i in range(n + 50):
                    t = time.perf_counter()
                    resp = client.post(f"/api/devices/{device_id}/commands", json=body)
                    dt = time.perf_counter() - t
                    if resp.status_code != 200 or resp.json().get("code") != 0:
                        raise RuntimeError(f"command failed: {resp.status_code} {resp.text[:200]}")
                    if i >= 50:
                        out.append(dt)
        finally:
            sim.stop()
            server.stop()
    return out


def run(opts: Options) -> Result:
    quiet_logging()
    n = 150 if opts.quick else 500
    r = Result("command round trip", target="difference p50 <= 2 ms and p99 <= 10 ms")
    console.print(f"  commands: bare MQTT request/response (QoS 1, TCP_NODELAY), {n} sequential ...")
    base = bare(opts, n)
    console.print(f"  commands: HTTP -> Parley -> simulated device -> Parley -> HTTP, {n} sequential ...")
    probes: dict[str, list[float]] = {}
    par = parley(opts, n, state_on_command=True, probes=probes)
    console.print(f"  commands: same, device answering with the response only, {n} sequential ...")
    par_only = parley(opts, n, state_on_command=False)
    r.add("requests", f"{n} sequential (after 50 warm-up), httpx keep-alive client")
    r.add("bare MQTT round trip p50 / p99", f"{ms(pct(base, 50))} / {ms(pct(base, 99))}")
    r.add("Parley HTTP round trip p50 / p99 (device as SDK: status+state, then response)",
          f"{ms(pct(par, 50))} / {ms(pct(par, 99))}")
    d50, d99 = pct(par, 50) - pct(base, 50), pct(par, 99) - pct(base, 99)
    r.add("difference p50 / p99", f"{ms(d50)} / {ms(d99)}")
    o50, o99 = pct(par_only, 50) - pct(base, 50), pct(par_only, 99) - pct(base, 99)
    r.add("Parley HTTP round trip p50 / p99 (device sends the response only)",
          f"{ms(pct(par_only, 50))} / {ms(pct(par_only, 99))}")
    r.add("difference p50 / p99 (response only)", f"{ms(o50)} / {ms(o99)}")
    for path, samples in probes.items():
        r.add(f"for reference: HTTP GET {path.split('/api/')[0]}/api/{path.split('/api/')[1].split('/')[0]}"
              f"{'/:id' if path.count('/') > 2 else ''} p50 / p99", f"{ms(pct(samples, 50))} / {ms(pct(samples, 99))}")
    r.met = d50 <= 0.002 and d99 <= 0.010
    return r
