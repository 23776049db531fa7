"""Commands right after a restart, while every device's first report loads its actor.

Simulated thermostats report every few seconds; 100 probe devices (a bare responder in its
own process) answer commands. Baseline: commands to the probes while the server runs
steadily (their actors loaded). Then the server is stopped and started again on the same
store, and the same commands go to the probes from the moment it answers: now each probe's
actor must start and load first, among the thousands activated by the reports
(actors/starter.py and actors/loading.py let a command's actor go first). A command goes
out every 0.1 s, each on its own connection, whether the ones before have been answered
or not."""

from __future__ import annotations

import queue as queue_mod
import threading
import time
from typing import Any

from bench.commands import COMMAND, HttpClient
from bench.common import Options, Result, console, ms, pct, quiet_logging, store, wait_until
from bench.processes import ResponderProcess, SimulatorProcess, queue, start_server, stop_server

PROBES = 100
SPACING_S = 0.1
DOWN_S = 2.0  # between the stop and the start: the reports of these seconds are lost (QoS 0)


def _get(port: int, path: str) -> Any:
    client = HttpClient(port, timeout=30)
    try:
        return client.request("GET", path)[1]
    finally:
        client.close()


def _online(port: int) -> int:
    return sum(d["online"] for d in _get(port, "/api/products/thermostat/devices?status=online")["devices"])


def _commands(port: int, arrivals: Any, count: int) -> tuple[list[float], list[float], set[int]]:
    """`count` commands, one every SPACING_S to probe i % PROBES, each on its own connection
    and thread: (seconds to the answer, seconds to the device, HTTP statuses)."""
    sent: dict[str, float] = {}
    answered: list[float] = []
    statuses: set[int] = set()
    lock = threading.Lock()

    def one(device: str) -> None:
        client = HttpClient(port, timeout=120)
        t, wall = time.monotonic(), time.time()
        try:
            status, body = client.request("POST", f"/api/devices/{device}/commands", {**COMMAND, "timeoutMs": 60000})
            with lock:
                answered.append(time.monotonic() - t)
                statuses.add(status)
                if isinstance(body, dict) and "requestId" in body:
                    sent[body["requestId"]] = wall
        finally:
            client.close()

    threads = []
    for i in range(count):
        th = threading.Thread(target=one, args=(f"probe-{i % PROBES:03d}",), daemon=True)
        th.start()
        threads.append(th)
        time.sleep(SPACING_S)
    for th in threads:
        th.join(180)
    reached = []
    while True:
        try:
            request_id, at = arrivals.get(timeout=0.5)
        except queue_mod.Empty:
            break
        if request_id in sent:
            reached.append(at - sent[request_id])
    return answered, reached, statuses


def run(opts: Options) -> Result:
    quiet_logging()
    devices, interval = (1000, 1.0) if opts.quick else (4000, 2.0)
    count = 50 if opts.quick else PROBES
    r = Result("commands after a restart",
               target="(no target: compared with the same commands before the restart)")
    b = opts.broker
    with store(opts, "restart") as (data_dir, url):
        from tests.services import free_port

        port = free_port()
        server = start_server(data_dir, b.url, port, url)
        arrivals = queue()
        try:
            probes = tuple(f"v1/thermostat/probe-{i:03d}/telemetry" for i in range(PROBES))
            with SimulatorProcess(devices=devices, interval=interval, mqtt_url=b.url), \
                    ResponderProcess(b.host, b.port, "device-agent/thermostat/device/+/commands",
                                     online_topics=probes, arrivals=arrivals):
                console.print(f"  restart: {devices} devices reporting every {interval:g} s, {PROBES} probes ...")
                if not wait_until(lambda: _online(port) >= devices + PROBES, 180, interval=1):
                    raise RuntimeError("the devices never all showed up online")
                console.print(f"  restart: before, {count} commands to loaded probes, one every {SPACING_S} s ...")
                before, before_reached, before_statuses = _commands(port, arrivals, count)
                t_stop = time.monotonic()
                stop_server(server)
                stopped = time.monotonic() - t_stop
                time.sleep(DOWN_S)
                t0 = time.monotonic()
                server = start_server(data_dir, b.url, port, url)
                up = time.monotonic() - t0
                storm: list[float] = []
                peak = [0]
                watching = threading.Event()

                def watch() -> None:  # the line of loads: how long it lasts, how long it gets
                    while not watching.is_set():
                        waiting = _get(port, "/api/health")["loadingActors"]
                        peak[0] = max(peak[0], waiting)
                        if peak[0] and not waiting:
                            storm.append(time.monotonic() - t0 - up)
                            return
                        time.sleep(0.1)

                watcher = threading.Thread(target=watch, daemon=True)
                watcher.start()
                console.print(f"  restart: after, {count} commands to probes not loaded yet ...")
                after, after_reached, after_statuses = _commands(port, arrivals, count)
                watcher.join(60)
                watching.set()
        finally:
            stop_server(server)
    r.add("devices", f"{devices} simulated thermostats reporting every {interval:g} s "
          f"({devices / interval:,.0f} msg/s) and {PROBES} probe devices answering commands; SQLite" if url is None
          else f"{devices} simulated thermostats reporting every {interval:g} s and {PROBES} probes; PostgreSQL")
    r.add("commands", f"{count} in each phase, one every {SPACING_S} s, each on its own connection")
    r.add("before the restart (actors loaded): answer p50 / p90 / max",
          f"{ms(pct(before, 50))} / {ms(pct(before, 90))} / {ms(max(before))}; HTTP {sorted(before_statuses)}")
    r.add("after the restart (each probe's actor loads first): answer p50 / p90 / max",
          f"{ms(pct(after, 50))} / {ms(pct(after, 90))} / {ms(max(after))}; HTTP {sorted(after_statuses)}")
    if after_reached:
        r.add("after the restart: command at the device p50 / p90 / max",
              f"{ms(pct(after_reached, 50))} / {ms(pct(after_reached, 90))} / {ms(max(after_reached))}")
    r.add("server stop (SIGTERM to exit: every actor stopped, each snapshotted if it moved on since its load)",
          f"{stopped:.1f} s")
    r.add("server start (process start to /api/health answering)", f"{up:.1f} s")
    r.add("activation storm: actors waiting to load at most; until none waits (from /api/health answering)",
          f"{peak[0]:,}; " + (f"{storm[0]:.1f} s" if storm else "not over within the run"))
    return r
