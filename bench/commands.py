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
from bench.processes import ResponderProcess, SimulatorProcess, start_server, stop_server


def _nodelay_client(name: str) -> paho.Client:
    import socket

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:6]}")

    def on_connect(client: paho.Client, *a: Any) -> None:
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    c.on_connect = on_connect
    return c


def bare(opts: Options, n: int) -> list[float]:
    """Requester here, responder in its own process: the floor any broker-mediated command pays."""
    b = opts.broker
    cmd_topic, resp_topic = "device-agent/bare/device/d1/commands", "device-agent/bare/device/d1/responses"
    requester = _nodelay_client("bench-req")
    got = threading.Event()
    subscribed = threading.Event()
    requester.on_message = lambda c, u, m: got.set()
    requester.on_subscribe = lambda *a: subscribed.set()
    requester.connect(b.host, b.port)
    requester.loop_start()
    requester.subscribe(resp_topic, 1)
    subscribed.wait(5)
    out = []
    try:
        with ResponderProcess(b.host, b.port, cmd_topic, resp_topic):
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
        requester.disconnect()
        requester.loop_stop()
    return out


def _timed(client: Any, method: str, path: str, n: int, **kw: Any) -> list[float]:
    samples = []
    for i in range(n + 50):
        t = time.perf_counter()
        resp = client.request(method, path, **kw)
        dt = time.perf_counter() - t
        if resp.status_code != 200 or (method == "POST" and resp.json().get("code") != 0):
            raise RuntimeError(f"{method} {path} failed: {resp.status_code} {resp.text[:200]}")
        if i >= 50:
            samples.append(dt)
    return samples


def parley(opts: Options, n: int, state_on_command: bool, probes: dict[str, list[float]] | None = None) -> list[float]:
    """HTTP client here; `parley serve` and the simulated device each in their own process."""
    import httpx

    from tests.services import free_port

    prefix = f"rt{uuid.uuid4().hex[:4]}"
    device_id = f"{prefix}-001"
    with store(opts, "commands") as (data_dir, url):
        port = free_port()
        server = start_server(data_dir, opts.broker.url, port, url)
        try:
            with SimulatorProcess(devices=1, interval=3600, mqtt_url=opts.broker.url, connections=1,
                                  response_qos=1, prefix=prefix, state_on_command=state_on_command), \
                    httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                assert wait_until(lambda: client.get(f"/api/devices/{device_id}").status_code == 200
                                  and client.get(f"/api/devices/{device_id}").json()["online"], 15), \
                    "simulated device never showed up online"
                for path in ("/api/health", f"/api/devices/{device_id}") if probes is not None else ():
                    probes[path] = _timed(client, "GET", path, n)
                body = {"command": "set_target_temperature", "params": {"target_temperature": 21.5}}
                return _timed(client, "POST", f"/api/devices/{device_id}/commands", n, json=body)
        finally:
            stop_server(server)


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
    r.add("requests", f"{n} sequential (after 50 warm-up), httpx keep-alive client; server, device and client in separate processes")
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
