"""Command round trip: HTTP POST /api/devices/:id/commands through the real server to a
simulated device and back, minus a bare MQTT request/response round trip."""

from __future__ import annotations

import contextlib
import http.client
import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import Options, Result, console, ms, pct, quiet_logging, store, wait_until
from bench.processes import HttpFloorProcess, ResponderProcess, SimulatorProcess, start_server, stop_server
from gateways.mqtt_client import no_delay


# The command every round trip sends (the demo thermostat's, with valid params).
COMMAND = {"command": "set_target_temperature", "params": {"target_temperature": 21.5}}


def _nodelay_client(name: str) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:6]}")
    c.on_connect = lambda client, *a: no_delay(client)
    return c


@contextlib.contextmanager
def bare_requester(opts: Options) -> Iterator[Callable[[int], float]]:
    """Requester here, responder in its own process: the floor any broker-mediated command
    pays. Yields a function that makes round trip number i and returns its seconds."""
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

    def round_trip(i: int) -> float:
        got.clear()
        payload = ('{"cmd":"set_target_temperature","params":{"target_temperature":21.5},'
                   f'"requestId":"r{i}","ts":0}}').encode()
        t = time.perf_counter()
        requester.publish(cmd_topic, payload, qos=1)
        if not got.wait(5):
            raise TimeoutError("bare responder did not answer")
        return time.perf_counter() - t

    try:
        with ResponderProcess(b.host, b.port, cmd_topic, resp_topic):
            yield round_trip
    finally:
        requester.disconnect()
        requester.loop_stop()


def bare(opts: Options, n: int) -> list[float]:
    with bare_requester(opts) as round_trip:
        samples = [round_trip(i) for i in range(n + 50)]
    return samples[50:]  # after 50 warm-up


class HttpClient:
    """A keep-alive HTTP/1.1 client from the standard library. It does the least work per
    request on the client's side, so what is measured is the server (httpx costs about
    0.25 ms more per request on this machine)."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, data, {"Content-Type": "application/json"} if data else {})
        response = self.conn.getresponse()
        return response.status, json.loads(response.read() or b"null")

    def close(self) -> None:
        self.conn.close()


def _one(client: HttpClient, method: str, path: str, body: Any = None) -> float:
    """Seconds for one request, which must succeed (a POST: the device's code 0 too)."""
    t = time.perf_counter()
    status, answer = client.request(method, path, body)
    dt = time.perf_counter() - t
    if status != 200 or (method == "POST" and answer.get("code") != 0):
        raise RuntimeError(f"{method} {path} failed: {status} {str(answer)[:200]}")
    return dt


def _timed(client: HttpClient, method: str, path: str, n: int, body: Any = None, pause: float = 0.0) -> list[float]:
    samples = []
    for _ in range(n + 50):
        if pause:
            time.sleep(pause)
        samples.append(_one(client, method, path, body))
    return samples[50:]  # after 50 warm-up


def _online(client: HttpClient, device_id: str) -> bool:
    status, answer = client.request("GET", f"/api/devices/{device_id}")
    return status == 200 and answer["online"]


def device_process(broker_url: str, prefix: str, sdk_device: bool) -> tuple[Any, str]:
    """A thermostat in its own process (not started yet) and its device id: the bare
    responder of the baseline, or (`sdk_device`) a simulated thermostat that behaves like
    the generated SDK: status-with-state, state and an event before its response."""
    device_id = f"{prefix}-001"
    if sdk_device:
        return SimulatorProcess(devices=1, interval=3600, mqtt_url=broker_url, connections=1, response_qos=1,
                                prefix=prefix, state_on_command=True), device_id
    base = f"device-agent/thermostat/device/{device_id}"
    host, port = broker_url.removeprefix("mqtt://").split(":")
    return ResponderProcess(host, int(port), f"{base}/commands", f"{base}/responses",
                            online_topics=(f"v1/thermostat/{device_id}/telemetry",)), device_id


@contextlib.contextmanager
def parley_server(opts: Options, sdk_device: bool) -> Iterator[tuple[HttpClient, str]]:
    """`parley serve` and a device, each in their own process; yields an HTTP client for
    the server and the device's id. The device is the bare responder of the baseline, or
    (`sdk_device`) a simulated thermostat that behaves like the generated SDK:
    status-with-state, state and an event before its response."""
    from tests.services import free_port

    with store(opts, "commands") as (data_dir, url):
        port = free_port()
        server = start_server(data_dir, opts.broker.url, port, url)
        client = HttpClient(port)
        try:
            device, device_id = device_process(opts.broker.url, f"rt{uuid.uuid4().hex[:4]}", sdk_device)
            with device:
                assert wait_until(lambda: _online(client, device_id), 15), "the device never showed up online"
                yield client, device_id
        finally:
            client.close()
            stop_server(server)


def parley(opts: Options, n: int, sdk_device: bool) -> list[float]:
    """HTTP client here, `parley serve` and the device in their own processes."""
    with parley_server(opts, sdk_device) as (client, device_id):
        return _timed(client, "POST", f"/api/devices/{device_id}/commands", n, COMMAND)


# The bare and Parley round trips are measured in rounds of blocks, the two servers up
# throughout: this shared host's speed moves from one second to the next (the bare round
# trip's p50 over consecutive blocks of 300 went from 0.11 to 0.53 ms), and a bare phase
# followed by a Parley phase compared two different moments of it.
ROUNDS = 5


# A command as users send them: now and then, not back to back. After an idle spell this
# host runs everything slower for a while (bench/notes.md, thirteenth session: the same
# code's CPU work takes about twice as long), the bare round trip and Parley's alike.
ISOLATED_IDLE_S = 0.02


def paired(opts: Options, n: int, isolated: int,
           probes: dict[str, list[float]]) -> dict[str, list[float]]:
    """The bare round trip and Parley's, both up at once with their own bare device:
    ROUNDS rounds of a block of each (which goes first alternates), then request by request
    (n pairs), then `isolated` pairs with ISOLATED_IDLE_S of idleness before each request.
    Returns the samples: "bare" and "parley" (the blocks), "pair_bare" and "pair_parley",
    "isolated_bare" and "isolated_parley"."""
    out: dict[str, list[float]] = {k: [] for k in ("bare", "parley", "pair_bare", "pair_parley",
                                                    "isolated_bare", "isolated_parley")}
    bare_rt, par = out["bare"], out["parley"]
    with bare_requester(opts) as round_trip, parley_server(opts, sdk_device=False) as (client, device_id):
        path = f"/api/devices/{device_id}/commands"
        for probe in ("/api/health", f"/api/devices/{device_id}"):
            probes[probe] = _timed(client, "GET", probe, n)
        for i in range(50):  # warm-up
            round_trip(i)
            _one(client, "POST", path, COMMAND)
        block = max(1, n // ROUNDS)
        for r in range(ROUNDS):
            sides = [lambda: bare_rt.extend(round_trip(i) for i in range(block)),
                     lambda: par.extend(_one(client, "POST", path, COMMAND) for _ in range(block))]
            for side in sides if r % 2 == 0 else sides[::-1]:
                side()
        # Request by request: both meet the host in the very same moments, but Parley's
        # threads sit idle through each bare round trip.
        for i in range(n):
            out["pair_bare"].append(round_trip(i))
            out["pair_parley"].append(_one(client, "POST", path, COMMAND))
        for i in range(isolated):
            time.sleep(ISOLATED_IDLE_S)
            out["isolated_bare"].append(round_trip(i))
            time.sleep(ISOLATED_IDLE_S)
            out["isolated_parley"].append(_one(client, "POST", path, COMMAND))
    return out


# Inside a command the server idles while the device answers (about a bare MQTT round
# trip), and on this machine a CPU runs slower for a while after any idle spell
# (bench/notes.md). The floor is also measured with such a pause before each request.
FLOOR_PAUSE_S = 0.001


def http_floor(kind: str, n: int, pause: float = 0.0) -> list[float]:
    """The same POST, with the same client, to a server that answers at once (no actors, no
    MQTT, no store): what the HTTP stack alone costs on this machine; `pause` seconds of
    idleness before each request."""
    from tests.services import free_port

    port = free_port()
    with HttpFloorProcess(kind, port):
        client = HttpClient(port)
        try:
            return _timed(client, "POST", "/api/devices/floor/commands", n, COMMAND, pause)
        finally:
            client.close()


def run(opts: Options) -> Result:
    quiet_logging()
    n = 150 if opts.quick else 500
    isolated = 50 if opts.quick else 150
    r = Result("command round trip", target="difference p50 <= 2 ms and p99 <= 10 ms (same device on both sides)")
    console.print(f"  commands: bare MQTT request/response (QoS 1, TCP_NODELAY) and HTTP -> Parley -> the same "
                  f"kind of bare device -> Parley -> HTTP, {n} each in {ROUNDS} rounds, then {n} alternating pairs, "
                  f"then {isolated} pairs with {ISOLATED_IDLE_S * 1000:g} ms of idleness before each request ...")
    probes: dict[str, list[float]] = {}
    samples = paired(opts, n, isolated, probes)
    base, par, pair_bare, pair_par = (samples[k] for k in ("bare", "parley", "pair_bare", "pair_parley"))
    iso_bare, iso_par = samples["isolated_bare"], samples["isolated_parley"]
    console.print(f"  commands: the two as phases one after the other, {n} sequential each ...")
    phase_base = bare(opts, n)
    phase_par = parley(opts, n, sdk_device=False)
    console.print(f"  commands: same, with an SDK-like simulated device, {n} sequential ...")
    sdk = parley(opts, n, sdk_device=True)
    console.print(f"  commands: HTTP floor, the same POST answered at once by bare hypercorn and by quart-trio, "
                  f"{n} sequential each, and by quart-trio after a pause each ...")
    floors = {kind: http_floor(kind, n) for kind in ("hypercorn", "quart-trio")}
    paused = http_floor("quart-trio", n, FLOOR_PAUSE_S)
    r.add("requests", f"{n} bare and {n} Parley (after 50 warm-up each) in {ROUNDS} rounds of a block of each, "
          "which goes first alternating, both servers up throughout; stdlib http.client keep-alive client; "
          "server, devices and client in separate processes")
    r.add("bare MQTT round trip p50 / p99 (requester -> broker -> bare device -> broker -> requester)",
          f"{ms(pct(base, 50))} / {ms(pct(base, 99))}")
    r.add("Parley HTTP round trip p50 / p99 (the same kind of bare device)", f"{ms(pct(par, 50))} / {ms(pct(par, 99))}")
    d50, d99 = pct(par, 50) - pct(base, 50), pct(par, 99) - pct(base, 99)
    r.add("difference p50 / p99", f"{ms(d50)} / {ms(d99)}")
    r.add("for reference: the same as two phases one after the other (the method until the twelfth session, "
          "bench/notes.md): bare p50, Parley p50, difference p50 / p99",
          f"{ms(pct(phase_base, 50))}, {ms(pct(phase_par, 50))}, {ms(pct(phase_par, 50) - pct(phase_base, 50))} / "
          f"{ms(pct(phase_par, 99) - pct(phase_base, 99))}")
    r.add("for reference: Parley HTTP round trip p50 / p99 with an SDK-like device (status+state, state, event, "
          "then response)",
          f"{ms(pct(sdk, 50))} / {ms(pct(sdk, 99))}")
    for kind, samples in floors.items():
        r.add(f"for reference: HTTP floor, the same POST answered at once by {kind} p50 / p99",
              f"{ms(pct(samples, 50))} / {ms(pct(samples, 99))}")
    r.add(f"for reference: the quart-trio floor with {FLOOR_PAUSE_S * 1000:g} ms of idleness before each request "
          "(as inside a command, where the server waits for the device) p50 / p99",
          f"{ms(pct(paused, 50))} / {ms(pct(paused, 99))}")
    r.add("for reference: difference p50 minus the quart-trio floor p50 (Parley's own work: actors, "
          "store, MQTT hand-offs)", ms(d50 - pct(floors["quart-trio"], 50)))
    r.add("for reference: difference p50 minus the paused quart-trio floor p50", ms(d50 - pct(paused, 50)))
    r.add("for reference: bare MQTT and Parley alternating request by request (the same moments of the host): "
          "p50 each; difference of the p50s; median of the per-pair differences",
          f"{ms(pct(pair_bare, 50))}, {ms(pct(pair_par, 50))}; {ms(pct(pair_par, 50) - pct(pair_bare, 50))}; "
          f"{ms(statistics.median(p - b for b, p in zip(pair_bare, pair_par)))}")
    r.add(f"for reference: commands now and then, as users send them: {ISOLATED_IDLE_S * 1000:g} ms of idleness "
          "before each request, bare MQTT and Parley alternating: p50 each; difference of the p50s; Parley p99",
          f"{ms(pct(iso_bare, 50))}, {ms(pct(iso_par, 50))}; {ms(pct(iso_par, 50) - pct(iso_bare, 50))}; "
          f"{ms(pct(iso_par, 99))}")
    for path, probe in probes.items():
        r.add(f"for reference: HTTP GET {path.split('/api/')[0]}/api/{path.split('/api/')[1].split('/')[0]}"
              f"{'/:id' if path.count('/') > 2 else ''} p50 / p99", f"{ms(pct(probe, 50))} / {ms(pct(probe, 99))}")
    r.met = d50 <= 0.002 and d99 <= 0.010
    return r
